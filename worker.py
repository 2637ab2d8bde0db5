"""The background worker: ``python worker.py`` runs RQ on the ``housekeeping`` and ``media`` queues, plus
RQ's cron scheduler (a child process) that enqueues the housekeeping jobs.

Jobs run in the worker process itself (``MediaWorker``, RQ's ``SimpleWorker``), not in a work
horse forked per job: the fork cost about 55 ms of CPU a job. A media job runs in a thread
of its own (``broker.jobs.MediaPool``), up to ``MEDIA_JOBS_PER_WORKER`` at once, each with
its own session, lease (renewed while it runs) and timeout (``MEDIA_JOB_TIMEOUT_SECONDS``),
so a 20 s image call holds a thread, not the process; housekeeping jobs run beside them in
the main thread (RQ's job timeout, a SIGALRM, still covers those). A music job waiting for
its vendor holds nothing: its next poll is a job RQ's scheduler (``with_scheduler``)
enqueues when due. RQ's scheduler runs in a thread of the worker (``ThreadScheduler``),
never a forked child: RQ forks it again later (its maintenance, every 10 minutes, for a
worker that did not get the scheduler's lock at start), and a fork while media threads
hold locks (Redis and database pools, logging) can leave the child deadlocked.
SIGTERM stops taking jobs and waits for those in flight; a second SIGTERM (or SIGKILL)
leaves them to the stuck-job check.

With several workers, run the cron once: ``python worker.py --no-cron`` for the workers
and ``python worker.py --cron-only`` for the one scheduler (see the Procfile).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import threading
import time

import redis
from rq import Queue, SimpleWorker
from rq.cron import CronScheduler
from rq.exceptions import DequeueTimeout, StopRequested
from rq.scheduler import RQScheduler
from sqlalchemy.orm import configure_mappers

from broker import create_app, jobs
from broker.extensions import services

log = logging.getLogger("broker.worker")

# Housekeeping first: a media backlog must not delay the ledger drain or the stuck-job check.
QUEUES = ("housekeeping", "media")
# While its media jobs fill the pool, the worker looks for room this often (seconds).
FULL_POLL_SECONDS = 1
# A worker without the scheduler's lock tries for it this often, so the scheduler moves to a live
# worker soon after its holder dies (the lock itself lapses 61 s after its last refresh).
SCHEDULER_TAKEOVER_SECONDS = 5


class ThreadScheduler(RQScheduler):
    """RQ's scheduler (moves due scheduled jobs, retries and music re-checks, onto their queues) in a
    thread of the worker instead of a forked process (see the module docstring).

    The thread runs in every worker, holding the lock or not, and one without it tries for the
    lock every ``SCHEDULER_TAKEOVER_SECONDS``. As RQ's worker only starts it again when it is
    not alive, RQ never forks a scheduler process here.
    """

    def start(self) -> threading.Thread:
        self._status = self.Status.STARTED
        self._stop_requested = False
        self._process = threading.Thread(target=self._loop, name="rq-scheduler", daemon=True)
        self._process.start()
        return self._process

    def _loop(self) -> None:
        tried = 0.0
        while not self._stop_requested:
            try:
                if self._acquired_locks != self._queue_names and time.monotonic() - tried > SCHEDULER_TAKEOVER_SECONDS:
                    tried = time.monotonic()
                    self.acquire_locks()
                    self.register_birth()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
            except redis.RedisError as error:
                log.warning("scheduler lost Redis; trying again", extra={"error": type(error).__name__})
            time.sleep(self.interval)
        try:
            self.stop()
        except redis.RedisError:
            pass  # its lock lapses by itself


class MediaWorker(SimpleWorker):
    """RQ's ``SimpleWorker`` whose media jobs start threads of a ``MediaPool`` (see the module docstring).

    While the pool is full it takes only housekeeping jobs, looking for room every
    ``FULL_POLL_SECONDS``; a job left on the media queue waits for this worker or another.
    """

    pool: jobs.MediaPool | None = None

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO", *args, **kwargs) -> None:
        # RQ's own starts a forked process, and only when it got the lock (see ThreadScheduler).
        level = logging_level or "WARNING"
        self.scheduler = ThreadScheduler(
            self.queues, connection=self.connection, logging_level=level, serializer=self.serializer
        )
        self.scheduler.start()

    def stop_scheduler(self) -> None:
        if self.scheduler is not None and self.scheduler._process is not None:
            self.scheduler.request_stop()
            self.scheduler._process.join(5)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        # Listed twice so RQ pops with BLPOP, as for the worker's two queues (with one queue it moves
        # the job to an intermediate list that only a one-queue worker clears).
        housekeeping = [q for q in self._ordered_queues if q.name == "housekeeping"] * 2
        while self.pool is not None and not self.pool.has_room():
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            try:
                result = self.queue_class.dequeue_any(
                    housekeeping,
                    FULL_POLL_SECONDS,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                continue
            except redis.ConnectionError:
                time.sleep(FULL_POLL_SECONDS)
                continue
            if result is not None:
                return result
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)


# Jobs in this process, no fork per job (see the module docstring); bench/jobs.py swaps in rq.Worker to compare.
WORKER_CLASS: type[SimpleWorker] = MediaWorker


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
    """Run the cron scheduler; after a Redis outage (a restart, a stall) start it again rather
    than let the housekeeping stop for good, pausing 1, 2, 4 … up to 30 s between tries."""
    pause = 1
    while True:
        try:
            scheduler = CronScheduler(connection=connection, logging_level="WARNING")
            for func, seconds in schedule(config):
                scheduler.register(func, queue_name="housekeeping", interval=seconds, result_ttl=60)
            scheduler.start()
            return
        except redis.RedisError as error:
            log.warning("cron lost Redis; starting it again", extra={"error": type(error).__name__, "pause": pause})
            time.sleep(pause)
            pause = min(pause * 2, 30)


def run_worker(connection, pool) -> None:
    """Run the RQ worker until it is told to stop. A Redis outage while a job runs makes RQ's own
    bookkeeping of the job fail and the worker quit: start it again, pausing 1, 2, 4 … up to 30 s,
    so the housekeeping (and media) jobs carry on once Redis is back."""
    pause = 1
    while True:
        worker = WORKER_CLASS([Queue(name, connection=connection) for name in QUEUES], connection=connection)
        worker.pool = pool
        try:
            # The scheduler moves retries and music re-checks onto their queue when due.
            worker.work(with_scheduler=True, logging_level="WARNING")
            return
        except redis.RedisError as error:
            log.warning("worker lost Redis; starting it again", extra={"error": type(error).__name__, "pause": pause})
        try:
            time.sleep(pause)
        except StopRequested:  # SIGTERM while pausing: RQ's handler of the worker that quit
            return
        pause = min(pause * 2, 30)


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
        # Done once here, before the cron child forks and the first job runs (~25 ms).
        configure_mappers()
        cron = None
        if not args.no_cron:
            cron = multiprocessing.get_context("fork").Process(
                target=run_cron, args=(connection, app.config), daemon=True
            )
            cron.start()
        pool = None
        if issubclass(WORKER_CLASS, MediaWorker):  # a forking worker runs each job in its work horse
            config = app.config
            pool = jobs.MediaPool(
                app,
                config["MEDIA_JOBS_PER_WORKER"],
                config["MEDIA_MAX_IN_FLIGHT_PER_PROVIDER"],
                config["MEDIA_JOB_TIMEOUT_SECONDS"],
            )
        try:
            jobs.POOL = pool
            run_worker(connection, pool)
            if pool is not None:
                pool.stop()  # a second SIGTERM ends this wait (RQ's cold shutdown)
        finally:
            jobs.POOL = None
            if cron is not None:
                cron.terminate()
                cron.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
