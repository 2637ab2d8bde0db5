"""The background worker: ``python worker.py`` runs RQ on the ``housekeeping`` and ``media`` queues, plus
RQ's cron scheduler (a child process) that enqueues the housekeeping jobs.

With several workers, run the cron once: ``python worker.py --no-cron`` for the workers
and ``python worker.py --cron-only`` for the one scheduler (see the Procfile).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys

from rq import Queue, Worker
from rq.cron import CronScheduler
from sqlalchemy.orm import configure_mappers

from broker import create_app, jobs
from broker.extensions import services

# Housekeeping first: a media backlog must not delay the ledger drain or the stuck-job check.
QUEUES = ("housekeeping", "media")


def schedule(config) -> tuple:
    """Housekeeping jobs and their intervals in seconds."""
    return (
        (jobs.drain_ledger, 2),
        (jobs.reap_holds, 10),
        (jobs.finish_stuck_jobs, config["STUCK_JOB_CHECK_SECONDS"]),
        (jobs.flush_key_usage, 30),
        (jobs.rollup_usage, 60),
        (jobs.purge_expired_media, 3600),
        (jobs.check_alerts, 300),
    )


def run_cron(connection, config) -> None:
    scheduler = CronScheduler(connection=connection, logging_level="WARNING")
    for func, seconds in schedule(config):
        scheduler.register(func, queue_name="housekeeping", interval=seconds, result_ttl=60)
    scheduler.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-cron", action="store_true", help="run jobs only; another process runs the cron")
    mode.add_argument("--cron-only", action="store_true", help="run only the cron scheduler")
    args = parser.parse_args(argv)
    app = create_app()
    with app.app_context():
        connection = services().queue_redis
        if args.cron_only:
            run_cron(connection, app.config)
            return 0
        # Done once here, so each forked work horse does not redo it (~25 ms a job).
        configure_mappers()
        cron = None
        if not args.no_cron:
            cron = multiprocessing.get_context("fork").Process(
                target=run_cron, args=(connection, app.config), daemon=True
            )
            cron.start()
        try:
            worker = Worker([Queue(name, connection=connection) for name in QUEUES], connection=connection)
            # The scheduler moves retries (RQ Retry with intervals) back onto their queue when due.
            worker.work(with_scheduler=True, logging_level="WARNING")
        finally:
            if cron is not None:
                cron.terminate()
                cron.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
