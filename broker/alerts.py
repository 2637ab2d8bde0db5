"""Operator alerts to a Slack-compatible webhook, at most once per kind per window."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import redis
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.models import Job, UsageRecord

log = logging.getLogger(__name__)

QUOTA_ERROR_CODE = "upstream_quota_exceeded"  # broker.providers.base.UpstreamQuotaExceeded.code


def send(client: redis.Redis, url: str, kind: str, text: str, window_seconds: int) -> bool:
    """Post ``{"text": …}`` unless the same kind was sent within the window; True when sent."""
    if not url or not client.set(f"alert:{kind}", "1", nx=True, ex=window_seconds):
        return False
    try:
        requests.post(url, json={"text": f"[AI API Broker] {text}"}, timeout=5)
    except requests.RequestException as error:
        log.error("alert not delivered", extra={"kind": kind, "error": type(error).__name__})
        client.delete(f"alert:{kind}")
        return False
    log.warning("alert sent", extra={"kind": kind, "text": text})
    return True


def findings(session: Session, error_rate: float, failed_jobs: int, minutes: int = 10) -> list[tuple[str, str]]:
    """Upstream error-rate spikes and exhausted provider accounts per provider, and failed-job
    spikes, over the last ``minutes``."""
    since = datetime.now(UTC) - timedelta(minutes=minutes)
    found = []
    rows = session.execute(
        select(UsageRecord.provider, UsageRecord.status, func.count())
        .where(UsageRecord.started_at >= since)
        .group_by(UsageRecord.provider, UsageRecord.status)
    ).all()
    totals: dict[str, list[int]] = {}
    for provider, status, count in rows:
        errors_total = totals.setdefault(provider, [0, 0])
        errors_total[1] += count
        if status == "error":
            errors_total[0] += count
    for provider, (errors, total) in totals.items():
        if total >= 10 and errors / total >= error_rate:
            found.append((f"upstream:{provider}", f"{provider}: {errors} of {total} calls failed in {minutes} min"))
    # Our own provider account out of quota: every call to that provider fails until an operator acts.
    quota = session.execute(
        select(UsageRecord.provider, func.count())
        .where(UsageRecord.started_at >= since, UsageRecord.error_code == QUOTA_ERROR_CODE)
        .group_by(UsageRecord.provider)
    ).all()
    for provider, count in quota:
        found.append((f"quota:{provider}", f"{provider}: the broker's account is out of quota ({count} calls refused)"))
    failed = session.scalar(select(func.count()).where(Job.status == "failed", Job.finished_at >= since))
    if failed >= failed_jobs:
        found.append(("jobs:failed", f"{failed} media jobs failed in {minutes} min"))
    return found
