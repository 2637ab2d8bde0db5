"""The background worker: ``python worker.py`` runs RQ on the ``media`` and ``housekeeping`` queues,
plus RQ's cron scheduler (in a child process) that enqueues the housekeeping jobs."""

from __future__ import annotations

import multiprocessing
import sys

from rq import Queue, Worker
from rq.cron import CronScheduler

from broker import create_app, jobs
from broker.extensions import services

QUEUES = ("media", "housekeeping")
SCHEDULE = (
    (jobs.drain_ledger, 2),
    (jobs.reap_holds, 10),
    (jobs.flush_key_usage, 30),
)


def run_cron(connection) -> None:
    scheduler = CronScheduler(connection=connection)
    for func, seconds in SCHEDULE:
        scheduler.register(func, queue_name="housekeeping", interval=seconds, result_ttl=60)
    scheduler.start()


def main() -> int:
    app = create_app()
    with app.app_context():
        connection = services().queue_redis
        cron = multiprocessing.get_context("fork").Process(target=run_cron, args=(connection,), daemon=True)
        cron.start()
        try:
            worker = Worker(
                [Queue(name, connection=connection) for name in QUEUES],
                connection=connection,
            )
            worker.work(with_scheduler=False, logging_level="WARNING")
        finally:
            cron.terminate()
            cron.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
