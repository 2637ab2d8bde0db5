"""Media jobs in flight at once in one real worker process (``broker.jobs.MediaPool``).

Overlap is read from the fake upstream's own count of requests it was answering at once
(``FakeUpstream.max_in_flight``), never from the wall clock. Each slow image call (the
fake waits before answering) is longer than the suite's 4 s job lease, so a job only
succeeds if its worker renews its lease while it runs; the worker's cron runs the
stuck-job check every second beside it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psutil
import pytest
from rq import Queue
from sqlalchemy import select

from broker import media
from broker.models import Job, JobResult, LedgerEntry
from tests.conftest import WorkerProcess, assert_invariant
from tests.fakes.upstreams import Reply

IMAGE = {"model": "openai/gpt-image-1", "prompt": "a lighthouse at dawn", "quality": "low"}
TERMINAL = ("succeeded", "failed", "canceled")


@pytest.fixture
def start_worker(app):
    """Start ``python worker.py`` with settings of its own; every worker started is stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(**settings) -> WorkerProcess:
        # The fake answers slowly on purpose: a read timeout above its delay.
        config = {**app.config["BROKER_TEST_CONFIG"], "UPSTREAM_READ_TIMEOUT": 20.0, **settings}
        process = WorkerProcess(config).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def submit_images(client, tenant, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = client.post("/v1/image", json=IMAGE, headers=tenant.headers)
        assert response.status_code == 202, response.json
        ids.append(response.json["id"])
    return ids


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def job(client, tenant, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json


def wait_ended(client, tenant, ids: list[str], timeout: float = 90) -> list[dict]:
    wait_for(lambda: all(job(client, tenant, i)["status"] in TERMINAL for i in ids), "every job ended", timeout)
    return [job(client, tenant, i) for i in ids]


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def settles(app, tenant, hold_id: str) -> list[str]:
    svc = app.extensions["broker"]
    session = svc.db()
    svc.ledger.drain(session, [tenant.account_id])
    return sorted(session.scalars(select(LedgerEntry.kind).where(LedgerEntry.hold_id == hold_id)).all())


def charged(done: dict) -> int:
    return int(Decimal(done["cost_credits"]) * 1_000_000)


def places_in_use(app) -> int:
    svc = app.extensions["broker"]
    return media.places_in_use(svc.media, svc.prices.models[IMAGE["model"]].provider)


def test_slow_jobs_of_one_worker_run_at_once_renew_their_leases_and_are_charged_once(
    app, client, tenant, upstream, start_worker
):
    upstream.default = Reply(delay=6)  # each call outlasts the 4 s lease
    start_worker()
    start = balance(app, tenant)
    ids = submit_images(client, tenant, 4)
    done = wait_ended(client, tenant, ids)
    assert [d["status"] for d in done] == ["succeeded"] * 4, [d["error"] for d in done]
    # All four calls were at the provider at once, from one worker process.
    assert upstream.max_in_flight["openai_images"] == 4
    assert len([r for r in upstream.requests if r.provider == "openai_images"]) == 4
    assert start - balance(app, tenant) == sum(charged(d) for d in done) > 0
    for d in done:
        assert settles(app, tenant, d["request_id"]) == ["hold", "settle"]
    assert places_in_use(app) == 0
    assert_invariant(app)


def test_the_per_provider_cap_is_never_exceeded_and_jobs_over_it_wait(app, client, tenant, upstream, start_worker):
    upstream.default = Reply(delay=1.5)
    start_worker(MEDIA_MAX_IN_FLIGHT_PER_PROVIDER=2)
    start = balance(app, tenant)
    ids = submit_images(client, tenant, 6)
    done = wait_ended(client, tenant, ids)
    assert [d["status"] for d in done] == ["succeeded"] * 6, [d["error"] for d in done]
    assert upstream.max_in_flight["openai_images"] == 2
    assert start - balance(app, tenant) == sum(charged(d) for d in done)
    assert places_in_use(app) == 0
    assert_invariant(app)


def test_a_full_worker_takes_no_more_media_jobs_and_still_runs_housekeeping(
    app, client, tenant, upstream, start_worker
):
    upstream.default = Reply(delay=5)
    start_worker(MEDIA_JOBS_PER_WORKER=2)
    ids = submit_images(client, tenant, 3)
    wait_for(lambda: upstream.in_flight.get("openai_images") == 2, "two calls in flight")
    # A housekeeping job enqueued now runs while both media jobs are still at the provider.
    svc = app.extensions["broker"]
    housekeeping = Queue("housekeeping", connection=svc.queue_redis).enqueue("broker.jobs.reap_holds")
    wait_for(lambda: housekeeping.get_status(refresh=True) == "finished", "the housekeeping job ran")
    assert upstream.in_flight["openai_images"] == 2
    states = sorted(job(client, tenant, i)["status"] for i in ids)
    assert states == ["queued", "running", "running"]
    done = wait_ended(client, tenant, ids)
    assert [d["status"] for d in done] == ["succeeded"] * 3
    assert upstream.max_in_flight["openai_images"] == 2
    assert_invariant(app)


def test_a_worker_killed_with_jobs_in_flight_has_each_finished_by_the_stuck_job_check_once(
    app, client, tenant, upstream, start_worker
):
    upstream.default = Reply(delay=8)
    worker = start_worker()
    start = balance(app, tenant)
    ids = submit_images(client, tenant, 3)
    wait_for(lambda: upstream.in_flight.get("openai_images") == 3, "three calls in flight")
    assert [job(client, tenant, i)["status"] for i in ids] == ["running"] * 3
    worker.kill()  # SIGKILL: the worker with its three threads mid-call, and its cron
    svc = app.extensions["broker"]
    session = svc.db()
    # Their leases were renewed up to the kill: the check leaves them until they lapse ...
    assert media.finish_stuck(svc.media, session) == []
    finished: list[str] = []
    deadline = time.time() + 30
    while len(finished) < 3:
        assert time.time() < deadline, f"the stuck-job check finished only {finished}"
        finished += media.finish_stuck(svc.media, session)
        time.sleep(0.2)
    assert sorted(finished) == sorted(ids)
    # ... then fails and releases each exactly once.
    assert media.finish_stuck(svc.media, session) == []
    for i in ids:
        body = job(client, tenant, i)
        assert body["status"] == "failed" and body["error"]["type"] == "worker_lost"
        assert settles(app, tenant, body["request_id"]) == ["hold", "release"]
    assert balance(app, tenant) == start
    assert places_in_use(app) == 0
    assert_invariant(app)


def test_a_job_past_its_timeout_is_failed_and_released_and_its_late_answer_changes_nothing(
    app, client, tenant, upstream, start_worker
):
    upstream.default = Reply(delay=6)
    start_worker(MEDIA_JOB_TIMEOUT_SECONDS=2)
    start = balance(app, tenant)
    (job_id,) = submit_images(client, tenant, 1)
    (done,) = wait_ended(client, tenant, [job_id])
    assert done["status"] == "failed" and done["error"]["type"] == "job_timeout", done
    assert balance(app, tenant) == start
    assert upstream.in_flight["openai_images"] == 1  # failed while the provider was still working
    # The thread lets go of its provider place only when its call has ended: after the late answer.
    wait_for(lambda: upstream.in_flight["openai_images"] == 0 and places_in_use(app) == 0, "the call ended")
    assert job(client, tenant, job_id) == done
    session = app.extensions["broker"].db()
    assert session.scalars(select(JobResult).where(JobResult.job_id == job_id)).all() == []
    assert settles(app, tenant, done["request_id"]) == ["hold", "release"]
    assert balance(app, tenant) == start
    assert_invariant(app)


def test_a_job_waiting_for_its_provider_place_is_queued_and_its_cancel_releases_it_once_unsent(
    app, client, tenant, upstream, start_worker
):
    upstream.default = Reply(delay=3)
    start_worker(MEDIA_MAX_IN_FLIGHT_PER_PROVIDER=1)
    start = balance(app, tenant)
    first, second = submit_images(client, tenant, 2)
    wait_for(lambda: upstream.in_flight.get("openai_images") == 1, "one call at the provider")
    calling, waiting = (first, second) if job(client, tenant, first)["status"] == "running" else (second, first)
    # The other is held by the worker, waiting for the one place: still queued, so cancelable.
    session = app.extensions["broker"].db()

    def reserved() -> bool:
        session.commit()
        row = session.get(Job, waiting)
        session.refresh(row)
        return row.status == "queued" and row.lease_until is not None

    wait_for(reserved, "the worker holds the waiting job")
    assert job(client, tenant, waiting)["status"] == "queued"
    canceled = client.delete(f"/v1/jobs/{waiting}", headers=tenant.headers)
    assert canceled.status_code == 200 and canceled.json["status"] == "canceled", canceled.json
    (done,) = wait_ended(client, tenant, [calling])
    assert done["status"] == "succeeded"
    # A job submitted after gets the freed place; the canceled one never reached the provider.
    (third,) = submit_images(client, tenant, 1)
    (later,) = wait_ended(client, tenant, [third])
    assert later["status"] == "succeeded"
    assert len([r for r in upstream.requests if r.provider == "openai_images"]) == 2
    assert job(client, tenant, waiting)["status"] == "canceled"
    assert settles(app, tenant, canceled.json["request_id"]) == ["hold", "release"]
    assert start - balance(app, tenant) == charged(done) + charged(later)
    assert places_in_use(app) == 0
    assert_invariant(app)


def test_rqs_scheduler_runs_in_a_thread_of_the_worker_and_is_never_forked(app):
    """RQ forks its scheduler process at start, and again from its maintenance (every 10 minutes) in a
    worker that did not get the scheduler's lock; a fork while media threads hold locks could leave
    the child deadlocked. Here the worker starts without the lock, runs that maintenance, and takes
    the lock once its holder is gone: no child process, the due job moved by the worker's thread."""
    import worker

    svc = app.extensions["broker"]
    connection = svc.queue_redis
    lock = "rq:scheduler-lock:media"
    connection.set(lock, "a scheduler elsewhere", ex=60)
    queues = [Queue(name, connection=connection) for name in worker.QUEUES]
    children = psutil.Process().children()  # the test's own (the Valkey server)
    rq_worker = worker.MediaWorker(queues, connection=connection)
    rq_worker._start_scheduler()
    try:
        rq_worker.last_cleaned_at = datetime.now(UTC) - timedelta(hours=1)
        rq_worker.run_maintenance_tasks()  # where RQ starts a scheduler process when it has none alive
        assert psutil.Process().children() == children
        due = Queue("media", connection=connection).enqueue_in(timedelta(seconds=1), "broker.jobs.reap_holds")
        assert due.get_status(refresh=True) == "scheduled"
        connection.delete(lock)  # its holder died and the lock lapsed
        wait_for(lambda: due.get_status(refresh=True) == "queued", "the worker's own scheduler thread moved the job")
        assert connection.get(lock).decode() == rq_worker.scheduler.name
        assert psutil.Process().children() == children
        assert rq_worker.scheduler._process.name == "rq-scheduler" and rq_worker.scheduler._process.is_alive()
    finally:
        rq_worker.stop_scheduler()
    assert not rq_worker.scheduler._process.is_alive()
    assert connection.get(lock) is None  # released on stop, for the next worker
