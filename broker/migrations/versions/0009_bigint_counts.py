"""64-bit token counts and ledger/usage ids

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-12 10:00:00

A provider's usage report can name more tokens than a 32-bit INTEGER holds (the broker cuts a
count to its bound, but the bound of a large model is still large), and the ledger and usage
tables grow past 2**31 rows on a busy system. On PostgreSQL the token columns of
``usage_records`` and the primary keys of ``ledger_entries`` and ``usage_records`` (with their
sequences) become BIGINT. On SQLite every INTEGER is already 64-bit and "INTEGER PRIMARY KEY"
is the rowid, so nothing changes there.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TOKEN_COLUMNS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens", "output_tokens")
ID_TABLES = ("ledger_entries", "usage_records")


def _retype(new: sa.types.TypeEngine, old: sa.types.TypeEngine, sequence_type: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in TOKEN_COLUMNS:
        op.alter_column("usage_records", name, type_=new, existing_type=old, existing_nullable=False)
    for table in ID_TABLES:
        op.alter_column(table, "id", type_=new, existing_type=old, existing_nullable=False)
        # A SERIAL's sequence has the column's old type as its own maximum: it moves along.
        op.execute(f"ALTER SEQUENCE {table}_id_seq AS {sequence_type}")


def upgrade() -> None:
    _retype(sa.BigInteger(), sa.Integer(), "bigint")


def downgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger(), "integer")
