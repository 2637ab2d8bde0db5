"""purchases: the Stripe receipt of a paid purchase

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 22:00:00

``receipt_url`` is the charge's ``receipt_url``, stored when the purchase is fulfilled, so
the billing page can link each paid purchase to its Stripe receipt.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("receipt_url", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_column("receipt_url")
