"""SQLAlchemy models: accounts, API keys, the durable ledger, usage records, media jobs and daily roll-ups."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from broker.db import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


# BIGINT for ids and token counts; INTEGER on SQLite, where it is 64-bit already and
# "INTEGER PRIMARY KEY" is the autoincrementing rowid (migration 0009 alters PostgreSQL only).
INT64 = BigInteger().with_variant(Integer, "sqlite")


class Account(Base):
    """A customer: owns keys, a balance (in Redis, mirrored by the ledger) and usage."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(20), default="cli")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # None until the owner follows the emailed link; an unverified account cannot buy or make keys.
    email_verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Bumped by "log out everywhere" and password changes: every older web session ends at once.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Had no password at the account-security release, when anyone could log into such accounts.
    legacy_passwordless: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")


class ApiKey(Base):
    """An API key, stored only as its SHA-256 hash plus a short display prefix."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Where it was made: web, cli, register, dev; None for keys made before sources were recorded.
    source: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Per-key overrides of the server's default limits (None: the default).
    rate_per_minute: Mapped[int | None] = mapped_column(Integer)
    rate_per_day: Mapped[int | None] = mapped_column(Integer)
    spend_per_day_ucr: Mapped[int | None] = mapped_column(BigInteger)


class LedgerEntry(Base):
    """One balance change. Append-only; ``entry_id`` makes every replay harmless.

    ``total_delta`` changes available + held (grants +, charges −); ``held_delta``
    changes the held part alone (a hold +, its end −). So for an account,
    Σ total_delta = Redis available + open holds, and Σ held_delta = open holds.
    Entry ids: ``grant:<id>``, ``hold:<hold id>``, ``end:<hold id>`` (settle, release
    or expire: one end per hold), ``late:<hold id>`` (a settle after its hold expired),
    ``debit:<id>``, and a refund's ``debt:<hold id>:<n>`` (paid from a hold as it ended) and
    ``unpaid:…`` (already spent, given up; no balance change).
    """

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(INT64, primary_key=True)
    entry_id: Mapped[str] = mapped_column(String(120), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    kind: Mapped[str] = mapped_column(String(16))
    total_delta: Mapped[int] = mapped_column(BigInteger, default=0)
    held_delta: Mapped[int] = mapped_column(BigInteger, default=0)
    hold_id: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(200), default="")
    ref: Mapped[str | None] = mapped_column(String(64))  # a refund's entries: p<purchase id>
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_ledger_account_kind", "account_id", "kind"), Index("ix_ledger_ref", "ref"))


class UsageRecord(Base):
    """The receipt of one metered request: what the provider reported and what it cost."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(INT64, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int | None] = mapped_column(Integer)
    endpoint: Mapped[str] = mapped_column(String(40), default="chat")
    provider: Mapped[str] = mapped_column(String(20))
    model: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    input_tokens: Mapped[int] = mapped_column(INT64, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(INT64, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(INT64, default=0)
    cache_write_1h_tokens: Mapped[int] = mapped_column(INT64, default=0)
    output_tokens: Mapped[int] = mapped_column(INT64, default=0)
    cost_usd: Mapped[str] = mapped_column(String(40), default="0")
    markup: Mapped[str] = mapped_column(String(20), default="1")
    charged_ucr: Mapped[int] = mapped_column(BigInteger, default=0)
    hold_ucr: Mapped[int] = mapped_column(BigInteger, default=0)
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    capped: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(60))
    detail: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    # Each list query (newest first, by id) has an index that matches it: all, by model, by key, by endpoint.
    __table_args__ = (
        Index("ix_usage_account_started", "account_id", "started_at"),
        Index("ix_usage_account_id", "account_id", "id"),
        Index("ix_usage_account_model_id", "account_id", "model", "id"),
        Index("ix_usage_account_key_id", "account_id", "key_id", "id"),
        Index("ix_usage_account_endpoint_id", "account_id", "endpoint", "id"),
    )


class Job(Base):
    """A slow media generation: queued by the API, run once by a worker, polled by the client.

    ``hold_id`` names the credit hold the job settles or releases exactly once.
    Status moves only by compare-and-set: queued → running → succeeded | failed,
    queued → canceled; a running job whose worker died is failed by the cron.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int | None] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(10))
    model: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(12), default="queued")
    params: Mapped[str] = mapped_column(Text)
    hold_id: Mapped[str] = mapped_column(String(64), unique=True)
    hold_ucr: Mapped[int] = mapped_column(BigInteger)
    cost_ucr: Mapped[int | None] = mapped_column(BigInteger)
    progress: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    upstream_task_id: Mapped[str | None] = mapped_column(String(255))
    error_type: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    media_expired: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index("ix_jobs_account_created", "account_id", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
    )


class JobResult(Base):
    """One stored output of a job; (job, index) is unique so a re-run stores nothing twice."""

    __tablename__ = "job_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    index: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(60))
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(200))

    __table_args__ = (UniqueConstraint("job_id", "index"),)


class UsageDaily(Base):
    """Per account, day, model, key and endpoint: requests and credits, rolled up from usage records.

    Kept current as records are stored (``broker.usage.store_records``), so totals and charts
    never scan the records. ``key_id`` 0 stands for "no key". ``first_id``/``last_id`` bound
    the record ids of the bucket, so a list limited to a period reads only that period's ids.
    """

    __tablename__ = "usage_daily"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    day: Mapped[date] = mapped_column(Date)
    model: Mapped[str] = mapped_column(String(100))
    key_id: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    endpoint: Mapped[str] = mapped_column(String(40), default="chat", server_default="chat")
    requests: Mapped[int] = mapped_column(Integer, default=0)
    charged_ucr: Mapped[int] = mapped_column(BigInteger, default=0)
    first_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    __table_args__ = (UniqueConstraint("account_id", "day", "model", "key_id", "endpoint"),)


class Purchase(Base):
    """Money in: one Stripe Checkout Session or Coinbase charge, granted at most once.

    Unique on (provider, external_id). ``status``: pending → paid → refunded /
    partially_refunded, or failed. ``shortfall_ucr`` is what a refund could not take
    back because the credits were already spent.
    """

    __tablename__ = "purchases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    provider: Mapped[str] = mapped_column(String(20))
    external_id: Mapped[str] = mapped_column(String(255))
    payment_intent: Mapped[str | None] = mapped_column(String(255), index=True)
    method: Mapped[str] = mapped_column(String(20), default="card")
    pack: Mapped[str | None] = mapped_column(String(40))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(10), default="usd")
    credits_ucr: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    refunded_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded_ucr: Mapped[int] = mapped_column(BigInteger, default=0)
    shortfall_ucr: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    receipt_url: Mapped[str | None] = mapped_column(String(500))  # the Stripe charge's receipt, once paid

    __table_args__ = (UniqueConstraint("provider", "external_id"),)

    def credits_for(self, cents: int) -> int:
        """The credits ``cents`` of its price bought (all of them for the whole price)."""
        if cents >= self.amount_cents:
            return self.credits_ucr
        return self.credits_ucr * cents // self.amount_cents


class WebhookEvent(Base):
    """A processed webhook delivery; unique per provider and event id, so replays are skipped."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(String(20))
    event_id: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(80))
    outcome: Mapped[str] = mapped_column(String(40))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("provider", "event_id"),)
