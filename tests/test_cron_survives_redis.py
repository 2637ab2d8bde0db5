"""The housekeeping survives a Redis restart in ``python worker.py`` (issue 10 item 6).

Before, the cron child died on the first Redis error and nothing drained, reaped or checked
stuck jobs again until someone restarted the worker. Here a real worker runs against its
own Valkey (AOF on), which is killed and started again; the ledger drain must carry on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from broker import create_app
from broker.embedded_redis import EmbeddedRedis
from broker.extensions import Services
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


@dataclass
class Outage:
    """A real ``python worker.py`` on a Valkey of its own (AOF on), and an account whose stream it drains."""

    server: EmbeddedRedis
    worker: WorkerProcess
    svc: Services
    account_id: int

    def hold_and_drain(self, hold_id: str, seconds: float) -> bool:
        assert self.svc.ledger.hold(self.account_id, hold_id, 1000, 0, 0, 1).ok
        return wait_drained(self.svc.redis, keys_of(self.account_id)["log"], seconds)


@pytest.fixture
def outage(app, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    config = {**app.config["BROKER_TEST_CONFIG"], "REDIS_URL": server.url}
    own = create_app(config)
    CURRENT["app"] = own
    worker = WorkerProcess(config).start()
    try:
        yield Outage(server, worker, own.extensions["broker"], make_tenant("5").account_id)
    finally:
        worker.stop()
        server.stop()
        own.extensions["broker"].engine.dispose()


def test_the_drain_carries_on_after_redis_is_killed_and_started_again(outage):
    assert outage.hold_and_drain("before-outage", 20), "the cron never drained"
    outage.server.kill()
    time.sleep(3)  # the cron meets the outage
    outage.server.start()
    assert outage.hold_and_drain("after-outage", 60), "the drain stopped for good after the outage"


def test_the_worker_carries_on_after_redis_dies_while_a_job_runs(outage):
    """A job running as Redis goes away: RQ's bookkeeping of it fails and RQ quits the worker.
    ``python worker.py`` starts it again, so the housekeeping carries on once Redis is back."""
    from rq import Queue

    assert outage.hold_and_drain("before-outage", 20), "the cron never drained"
    busy = Queue("housekeeping", connection=outage.svc.queue_redis).enqueue("time.sleep", 3)
    deadline = time.monotonic() + 20
    while busy.get_status(refresh=True) != "started":  # the worker is inside the job
        assert time.monotonic() < deadline, "the worker never started the job"
        time.sleep(0.05)
    outage.server.kill()
    time.sleep(4)  # the job ends while Redis is away
    outage.server.start()
    assert outage.worker.process.poll() is None, "worker.py exited"
    assert outage.hold_and_drain("after-outage", 60), "the drain stopped for good after the outage"
