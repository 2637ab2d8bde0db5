"""RQ job functions: media generations, and the housekeeping the worker's cron runs.

Jobs take ids, not objects, run inside the worker's app context and are safe to run twice.
"""

from __future__ import annotations

import logging

from flask import current_app

from broker import alerts, keys, media, usage
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


def run_media_job(job_id: str, recheck: str | None = None) -> str:
    """Run one media job (enqueued by name by the API), or one scheduled re-check of a waiting
    music job (``recheck``: the lease it was scheduled with); RQ retries it while this raises."""
    from rq import get_current_job

    svc = services()
    rq_job = get_current_job()
    retries_left = (rq_job.retries_left or 0) if rq_job is not None else 0
    try:
        return media.run(
            svc.media, svc.db(), job_id, final_attempt=not retries_left, recheck=recheck, retries_left=retries_left
        )
    finally:
        svc.db.remove()


def finish_stuck_jobs() -> int:
    """Fail (and release) or complete running jobs whose worker died; see ``media.finish_stuck``."""
    svc = services()
    try:
        return len(media.finish_stuck(svc.media, svc.db()))
    finally:
        svc.db.remove()


def purge_expired_media() -> int:
    """Delete stored media older than MEDIA_TTL_DAYS; the jobs stay, marked expired."""
    svc = services()
    try:
        return media.purge_media(svc.media, svc.db(), current_app.config["MEDIA_TTL_DAYS"])
    finally:
        svc.db.remove()


def rollup_usage() -> int:
    """Recompute today's and yesterday's per-account, per-model daily totals for the charts."""
    svc = services()
    try:
        svc.ledger.drain(svc.db())
        return usage.rollup_days(svc.db(), days=2)
    finally:
        svc.db.remove()


def check_alerts() -> int:
    """Alert the operator on upstream error spikes, failed-job spikes and ledger mismatches (deduplicated)."""
    svc = services()
    config = current_app.config
    try:
        session = svc.db()
        found = alerts.findings(session, config["ALERT_UPSTREAM_ERROR_RATE"], config["ALERT_FAILED_JOBS"])
        mismatches = svc.ledger.reconcile(session)
        if mismatches:
            found.append(("ledger", f"reconcile found {len(mismatches)} mismatches: {mismatches[0]}"))
        return sum(
            alerts.send(svc.redis, config["ALERT_WEBHOOK_URL"], kind, text, config["ALERT_WINDOW_SECONDS"])
            for kind, text in found
        )
    finally:
        svc.db.remove()
