"""account security: verified emails, session generations, key sources

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 06:40:00

Accounts that exist now count as verified. Accounts without a password now are marked
``legacy_passwordless``: before this release anyone could log into them, so the keys made
in their web sessions are listed by ``flask broker review-keys`` for the operator.
Keys made before this release have no ``source`` (NULL).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("email_verified_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("session_generation", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("legacy_passwordless", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source", sa.String(length=20), nullable=True))
    op.execute("UPDATE accounts SET email_verified_at = created_at")
    op.execute(
        sa.text("UPDATE accounts SET legacy_passwordless = :yes WHERE password_hash IS NULL").bindparams(yes=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("source")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("legacy_passwordless")
        batch_op.drop_column("session_generation")
        batch_op.drop_column("email_verified_at")
