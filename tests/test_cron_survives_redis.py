"""The housekeeping survives a Redis restart in ``python worker.py`` (issue 10 item 6).

Before, the cron child died on the first Redis error and nothing drained, reaped or checked
stuck jobs again until someone restarted the worker. Here a real worker runs against its
own Valkey (AOF on), which is killed and started again; the ledger drain must carry on.
"""

from __future__ import annotations

import time

import pytest

from broker import create_app
from broker.embedded_redis import EmbeddedRedis
from broker.ledger import keys_of
from tests.conftest import CURRENT, WorkerProcess, make_tenant

pytestmark = pytest.mark.slow


def wait_drained(redis_client, stream: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if redis_client.xlen(stream) == 0:
                return True
        except Exception:  # noqa: BLE001 - Redis may still be starting
            pass
        time.sleep(0.3)
    return False


def test_the_drain_carries_on_after_redis_is_killed_and_started_again(app, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    config = {**app.config["BROKER_TEST_CONFIG"], "REDIS_URL": server.url}
    own = create_app(config)
    CURRENT["app"] = own
    worker = WorkerProcess(config).start()
    try:
        svc = own.extensions["broker"]
        tenant = make_tenant("5")
        stream = keys_of(tenant.account_id)["log"]
        assert svc.ledger.hold(tenant.account_id, "before-outage", 1000, 0, 0, 1).ok
        assert wait_drained(svc.redis, stream, 20), "the cron never drained"
        server.kill()
        time.sleep(3)  # the cron meets the outage
        server.start()
        assert svc.ledger.hold(tenant.account_id, "after-outage", 1000, 0, 0, 1).ok
        assert wait_drained(svc.redis, stream, 60), "the drain stopped for good after the outage"
    finally:
        worker.stop()
        server.stop()
        own.extensions["broker"].engine.dispose()


def test_the_worker_carries_on_after_redis_dies_while_a_job_runs(app, tmp_path):
    """A job running as Redis goes away: RQ's bookkeeping of it fails and RQ quits the worker.
    ``python worker.py`` starts it again, so the housekeeping carries on once Redis is back."""
    from rq import Queue

    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    config = {**app.config["BROKER_TEST_CONFIG"], "REDIS_URL": server.url}
    own = create_app(config)
    CURRENT["app"] = own
    worker = WorkerProcess(config).start()
    try:
        svc = own.extensions["broker"]
        tenant = make_tenant("5")
        stream = keys_of(tenant.account_id)["log"]
        assert svc.ledger.hold(tenant.account_id, "before-outage", 1000, 0, 0, 1).ok
        assert wait_drained(svc.redis, stream, 20), "the cron never drained"
        busy = Queue("housekeeping", connection=svc.queue_redis).enqueue("time.sleep", 3)
        deadline = time.monotonic() + 20
        while busy.get_status(refresh=True) != "started":  # the worker is inside the job
            assert time.monotonic() < deadline, "the worker never started the job"
            time.sleep(0.05)
        server.kill()
        time.sleep(4)  # the job ends while Redis is away
        server.start()
        assert worker.process.poll() is None, "worker.py exited"
        assert svc.ledger.hold(tenant.account_id, "after-outage", 1000, 0, 0, 1).ok
        assert wait_drained(svc.redis, stream, 60), "the drain stopped for good after the outage"
    finally:
        worker.stop()
        server.stop()
        own.extensions["broker"].engine.dispose()
