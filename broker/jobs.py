"""RQ job functions: media generations, and the housekeeping the worker's cron runs.

Jobs take ids, not objects, run inside the worker's app context and are safe to run twice.

``python worker.py`` runs media jobs in threads of its own process (``MediaPool``): the RQ
job only claims the media job and starts its thread, so one process has many jobs in
flight while each waits for its provider, and housekeeping jobs keep running beside them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import UTC, datetime, timedelta

from flask import Flask, current_app

from broker import alerts, keys, media, usage
from broker.errors import BrokerError
from broker.extensions import Services, services

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


def run_media_job(job_id: str, recheck: str | None = None, retries_left: int | None = None) -> str:
    """Run one media job (enqueued by name by the API), or one scheduled re-check of a waiting
    music job (``recheck``: the lease it was scheduled with).

    In ``python worker.py`` (``POOL`` set) this claims the job and hands it to a thread of
    the process; the job retries itself (``retries_left``, re-enqueued when due). Anywhere
    else it runs here, and RQ retries it while this raises.
    """
    from rq import get_current_job

    svc = services()
    rq_job = get_current_job()
    left = _retries_left(rq_job.retries_left if rq_job is not None else None, retries_left)
    try:
        if POOL is not None:
            return POOL.start(svc, job_id, recheck, left)
        return media.run(svc.media, svc.db(), job_id, final_attempt=not left, recheck=recheck, retries_left=left)
    finally:
        svc.db.remove()


def _retries_left(by_rq: int | None, given: int | None) -> int:
    """A re-check or retry carries its budget (``given``); RQ's own count is lower once RQ retried it."""
    if given is None:
        return by_rq or 0
    return given if by_rq is None else min(given, by_rq)


class MediaPool:
    """Media jobs in threads of this worker process: at most ``size`` at once, each with its
    own lease, renewed while it runs, and its own timeout (RQ's job timeout is a per-process
    SIGALRM and cannot serve threads).

    A job is claimed (queued → running) by the RQ job that starts it, before its thread
    exists, so a process killed at any point leaves it running with a lease that lapses:
    the stuck-job check then finishes it. One keeper thread renews the leases of the jobs
    in flight here and fails (and releases) those past their timeout. With ``provider_cap``
    a new job first waits for one of its provider's places (``media.take_place``), shared by
    every worker, without calling anyone: reserved by this worker but still ``queued``
    (``media.reserve``), so its owner can cancel it meanwhile; it is claimed (running) only
    once it has its place (``media.claim_reserved``), and a canceled one never is.
    """

    def __init__(self, app: Flask, size: int, provider_cap: int, timeout: float) -> None:
        self.app = app
        self.size = max(1, size)
        self.provider_cap = provider_cap
        self.timeout = timeout
        self.stopping = threading.Event()
        self._running: dict[int, media.Running] = {}
        self._changed = threading.Condition()
        self._keeper: threading.Thread | None = None

    def in_flight(self) -> int:
        with self._changed:
            return len(self._running)

    def has_room(self) -> bool:
        return self.in_flight() < self.size

    def start(self, svc: Services, job_id: str, recheck: str | None, retries_left: int) -> str:
        """Claim (or, while it must wait for a provider place, reserve) the job and start its thread;
        "skipped" if it is not ours to run."""
        running = media.Running(job_id)
        reserved = recheck is None and self.provider_cap and media.reserve(svc.media, svc.db(), job_id, running)
        if not reserved and not media.claim(svc.media, svc.db(), job_id, recheck, running):
            return "skipped"
        with self._changed:
            self._running[id(running)] = running
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="media-leases", daemon=True)
            self._keeper.start()
        threading.Thread(target=self._run, args=(running, retries_left), name=f"media-{job_id}", daemon=True).start()
        return "started"

    def stop(self, timeout: float | None = None) -> bool:
        """Take no more jobs and wait for those in flight (jobs still waiting for a place go back to
        the queue); True when none is left."""
        self.stopping.set()
        with self._changed:
            return self._changed.wait_for(lambda: not self._running, timeout)

    def _run(self, running: media.Running, retries_left: int) -> None:
        with self.app.app_context():
            svc = services()
            ctx, session = svc.media, svc.db()
            outcome = "error"
            try:
                if self.provider_cap and not self._take_place(svc, running, retries_left):
                    outcome = "requeued" if not running.ended else "canceled"
                    return
                if running.waiting and not media.claim_reserved(ctx, session, running):
                    outcome = "canceled"  # while it waited: its place is freed, the provider never called
                    return
                running.deadline = time.monotonic() + self.timeout
                try:
                    outcome = media.run_claimed(
                        ctx, session, running, final_attempt=not retries_left, retries_left=retries_left
                    )
                except BrokerError:
                    outcome = "retrying"  # run_claimed queued the job again; it is run when due
                    self._retry(svc, running.job_id, retries_left)
            except Exception:
                # Its lease is no longer renewed: the stuck-job check finishes the job once it lapses.
                log.exception("media job failed in its thread", extra={"job_id": running.job_id})
                with running.lock:
                    running.ended = True
            finally:
                self._let_go(svc, running, outcome)
                svc.db.remove()

    def _take_place(self, svc: Services, running: media.Running, retries_left: int) -> bool:
        """Wait for one of the provider's places (the job's lease renewed meanwhile); on stop, hand the
        job back to the queue and return False; False too once it was canceled while it waited."""
        ctx = svc.media
        provider = media.provider_of(ctx, svc.db(), running.job_id)
        look_for_cancel = time.monotonic() + CANCEL_LOOK_SECONDS
        while True:
            until = time.time() + ctx.lease_seconds
            if media.take_place(ctx, provider, running.job_id, self.provider_cap, until):
                running.provider, running.place_until = provider, until
                return True
            if self.stopping.is_set():
                media.requeue(ctx, svc.db(), running, retries_left)
                return False
            if running.waiting and time.monotonic() > look_for_cancel:
                # A cancel signals the job's end; the keeper's renewal would notice it too, later.
                look_for_cancel = time.monotonic() + CANCEL_LOOK_SECONDS
                if media.gone(ctx, running.job_id):
                    running.ended = True
            if running.ended:
                return False
            time.sleep(random.uniform(0.1, 0.3))  # spread the looks of many waiting jobs

    def _retry(self, svc: Services, job_id: str, retries_left: int) -> None:
        ctx = svc.media
        intervals = ctx.retry_intervals or [0]
        delay = intervals[-retries_left] if retries_left <= len(intervals) else intervals[0]
        ctx.queue.enqueue_in(
            timedelta(seconds=delay),
            "broker.jobs.run_media_job",
            job_id,
            None,
            retries_left - 1,
            job_timeout=ctx.lease_seconds,
            result_ttl=3600,
            failure_ttl=7 * 86400,
        )

    def _let_go(self, svc: Services, running: media.Running, outcome: str) -> None:
        """The thread's end: free its provider place (a music job between polls keeps it until its re-check)."""
        try:
            if running.provider and outcome == "waiting":
                # Until the re-check's lease lapses; the re-check itself then renews it.
                until = time.time() + svc.media.music_poll_seconds + svc.media.lease_seconds
                media.renew_place(svc.media, running.provider, running.job_id, until)
            elif running.provider:
                media.free_place(svc.media, running.provider, running.job_id)
        except Exception:
            log.exception("could not let go of a provider place", extra={"job_id": running.job_id})
        finally:
            with self._changed:
                self._running.pop(id(running), None)
                self._changed.notify_all()

    def _keep(self) -> None:
        """Renew the leases (and provider places) of the jobs in flight here; time out the overdue."""
        with self.app.app_context():
            svc = services()
            ctx = svc.media
            tick = max(0.2, min(1.0, ctx.lease_seconds / 4))
            while True:
                time.sleep(tick)
                with self._changed:
                    jobs = list(self._running.values())
                for running in jobs:
                    try:
                        self._keep_one(svc, running)
                    except Exception:
                        log.exception("could not renew a media job's lease", extra={"job_id": running.job_id})
                        media.rollback_quietly(svc.db())
                svc.db.remove()

    def _keep_one(self, svc: Services, running: media.Running) -> None:
        ctx = svc.media
        # Renewed once a quarter of it has passed: a process that stops leaves it at least half a lease.
        due = ctx.lease_seconds * 3 / 4
        if not running.ended and time.monotonic() > running.deadline:
            if media.time_out(ctx, svc.db(), running, self.timeout):
                log.warning("media job timed out", extra={"job_id": running.job_id, "timeout": self.timeout})
        elif (
            not running.ended
            and running.lease_until is not None
            and (running.lease_until - datetime.now(UTC)).total_seconds() < due
        ):
            media.renew_lease(ctx, svc.db(), running)
        if running.provider and running.place_until - time.time() < due:
            running.place_until = time.time() + ctx.lease_seconds
            media.renew_place(ctx, running.provider, running.job_id, running.place_until)


# A job waiting for a provider place looks this often whether it was canceled (seconds).
CANCEL_LOOK_SECONDS = 1.0

# Set by worker.py (``python worker.py``): media jobs then run in its threads.
POOL: MediaPool | None = None


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
