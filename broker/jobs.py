"""RQ job functions: housekeeping that the worker's cron runs (drain the ledger, reap holds, stamp key use).

Jobs take ids, not objects, run inside the worker's app context and are safe to run twice.
"""

from __future__ import annotations

import logging

from broker import keys
from broker.extensions import services

log = logging.getLogger(__name__)


def drain_ledger() -> int:
    """Copy every account's pending ledger stream entries into SQL."""
    svc = services()
    try:
        return svc.ledger.drain(svc.db())
    finally:
        svc.db.remove()


def reap_holds() -> int:
    """Release holds past their deadline (their process died before settling)."""
    reaped = services().ledger.reap_expired()
    return len(reaped)


def flush_key_usage() -> int:
    """Move API keys' last-used stamps from Redis to SQL."""
    svc = services()
    try:
        return keys.flush_last_used(svc.db(), svc.redis)
    finally:
        svc.db.remove()
