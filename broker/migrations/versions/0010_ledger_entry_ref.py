"""What a ledger entry was for: the purchase a refund's entries belong to

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 01:10:00

A refund's debit, what open holds later pay towards it and what it gives up as already spent
carry ``ref`` (``p<purchase id>``), so ``reconcile`` can check each purchase's refunded credits
against the entries booked for it. Refund debits written before this release are found by
their reason ("refund of purchase N").
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries") as batch:
        batch.add_column(sa.Column("ref", sa.String(64), nullable=True))
        batch.create_index("ix_ledger_ref", ["ref"])
    op.execute(
        "UPDATE ledger_entries SET ref = 'p' || substr(reason, 20) "
        "WHERE kind = 'debit' AND reason LIKE 'refund of purchase %' AND ref IS NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_index("ix_ledger_ref")
        batch.drop_column("ref")
