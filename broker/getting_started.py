"""A new account's first steps, as the dashboard overview lists them: verify, add credits, make a key, call.

Each step is done from the account's own state, never from a flag of its own: a verified
email, a balance above zero, an unrevoked key, a metered request on record.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.models import ApiKey, UsageRecord

STEPS = ("verify", "credits", "key", "call")


@dataclass(frozen=True)
class Progress:
    verify: bool
    credits: bool
    key: bool
    call: bool

    @property
    def done(self) -> bool:
        return all(getattr(self, step) for step in STEPS)

    @property
    def next_step(self) -> str | None:
        """The first step not done yet: the one the overview points at."""
        return next((step for step in STEPS if not getattr(self, step)), None)


def progress(session: Session, account_id: int, verified: bool, balance_ucr: int) -> Progress:
    """How far ``account_id`` has come; ``balance_ucr`` is its available balance (the ledger's snapshot)."""
    has_key = session.scalar(
        select(ApiKey.id).where(ApiKey.account_id == account_id, ApiKey.revoked_at.is_(None)).limit(1)
    )
    has_call = session.scalar(select(UsageRecord.id).where(UsageRecord.account_id == account_id).limit(1))
    return Progress(verify=verified, credits=balance_ucr > 0, key=has_key is not None, call=has_call is not None)
