"""usage filters: roll-ups by key and endpoint, an index for each usage list query

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 10:00:00

``usage_daily`` gains ``key_id`` and ``endpoint`` (so totals and charts filtered by key or
endpoint come from the roll-ups too) and ``first_id``/``last_id`` (the record ids each
bucket spans, which bound a period's list). The roll-ups are derived data: the table is
rebuilt and refilled from ``usage_records`` in one statement.

``usage_records`` gets one index per list query, each ending in ``id`` (the list's order):
(account_id, id), (account_id, model, id), (account_id, key_id, id), (account_id, endpoint, id).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

LIST_INDEXES = {
    "ix_usage_account_id": ["account_id", "id"],
    "ix_usage_account_model_id": ["account_id", "model", "id"],
    "ix_usage_account_key_id": ["account_id", "key_id", "id"],
    "ix_usage_account_endpoint_id": ["account_id", "endpoint", "id"],
}


def _day(dialect: str) -> str:
    """The UTC day of ``started_at`` (SQLite stores UTC timestamps without their zone)."""
    return "date(started_at)" if dialect == "sqlite" else "CAST(started_at AT TIME ZONE 'UTC' AS DATE)"


def upgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        for name, columns in LIST_INDEXES.items():
            batch_op.create_index(name, columns, unique=False)

    op.drop_table("usage_daily")
    op.create_table(
        "usage_daily",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("key_id", sa.Integer(), server_default="0", nullable=False),
        sa.Column("endpoint", sa.String(length=40), server_default="chat", nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("charged_ucr", sa.BigInteger(), nullable=False),
        sa.Column("first_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "day", "model", "key_id", "endpoint"),
    )
    day = _day(op.get_bind().dialect.name)
    op.execute(
        "INSERT INTO usage_daily "
        "(account_id, day, model, key_id, endpoint, requests, charged_ucr, first_id, last_id) "
        f"SELECT account_id, {day}, model, COALESCE(key_id, 0), endpoint, "
        "COUNT(*), COALESCE(SUM(charged_ucr), 0), MIN(id), MAX(id) "
        f"FROM usage_records GROUP BY account_id, {day}, model, COALESCE(key_id, 0), endpoint"
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
    op.create_table(
        "usage_daily",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("charged_ucr", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "day", "model"),
    )
    day = _day(op.get_bind().dialect.name)
    op.execute(
        "INSERT INTO usage_daily (account_id, day, model, requests, charged_ucr) "
        f"SELECT account_id, {day}, model, COUNT(*), COALESCE(SUM(charged_ucr), 0) "
        f"FROM usage_records GROUP BY account_id, {day}, model"
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        for name in LIST_INDEXES:
            batch_op.drop_index(name)
