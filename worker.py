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


def schedule(config) -> tuple:
    """Housekeeping jobs and their intervals in seconds."""
    return (
        (jobs.drain_ledger, 2),
        (jobs.reap_holds, 10),
        (jobs.finish_stuck_jobs, config["STUCK_JOB_CHECK_SECONDS"]),
        (jobs.flush_key_usage, 30),
        (jobs.rollup_usage, 60),
        (jobs.purge_expired_media, 3600),
    )


def run_cron(connection, config) -> None:
    scheduler = CronScheduler(connection=connection, logging_level="WARNING")
    for func, seconds in schedule(config):
        scheduler.register(func, queue_name="housekeeping", interval=seconds, result_ttl=60)
    scheduler.start()


def main() -> int:
    app = create_app()
    with app.app_context():
        connection = services().queue_redis
        cron = multiprocessing.get_context("fork").Process(target=run_cron, args=(connection, app.config), daemon=True)
        cron.start()
        try:
            worker = Worker(
                [Queue(name, connection=connection) for name in QUEUES],
                connection=connection,
            )
            # The scheduler moves retries (RQ Retry with intervals) back onto their queue when due.
            worker.work(with_scheduler=True, logging_level="WARNING")
        finally:
            cron.terminate()
            cron.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
