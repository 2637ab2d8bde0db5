"""Measure media-job throughput and latency (TTS or images, optionally with music) through the web app, RQ, workers.

The image cell of issue 14: ``python bench/jobs.py --images 500 --latency 20 --workers 2 --clients 16``
(500 image jobs submitted at once, a fake upstream that takes 20 s for each, 2 worker processes).

The music cell: ``python bench/jobs.py --music 200 --music-polls-per-stage 8 --music-poll-seconds 5
--images 20 --latency 2 --jobs-after 30 --workers 2 --phase-timeout 400`` (200 music jobs that each
wait about 2 minutes for the fake Suno, 9 × 3 polls 5 s apart; 20 images submitted 30 s into
that wait). It samples, while the music jobs wait, the worker threads above the workers' idle
count, RQ's scheduled re-checks and the busy workers.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import psutil
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.embedded_redis import free_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MODEL = "elevenlabs/eleven_flash_v2_5"
IMAGE_MODEL = "openai/gpt-image-1"
MUSIC_MODEL = "suno/V4_5ALL"  # the fake Suno answers 4 polls (one a stage) before the clips
MUSIC_POLL_SECONDS = 1
VOICE_ID = "JBFqnCBsd6RMkjVDRZzb"
TEXT = "The quick brown fox jumps over the lazy dog, twice: the quick brown fox jumps over the lazy dog."
EMAIL = "bench-jobs@example.com"
GRANT_CREDITS = "1000000"
TERMINAL = ("succeeded", "failed", "canceled")
RQ_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
HTTP_TIMEOUT = 30.0
FORK_WORKER = "import sys, rq, worker; worker.WORKER_CLASS = rq.Worker; sys.exit(worker.main())"
# Production forces HTTPS (Talisman); gunicorn trusts this header from 127.0.0.1, as from a TLS proxy.
PROXY_HEADERS = {"X-Forwarded-Proto": "https"}


class BenchError(RuntimeError):
    """A setup step failed; the message says which and where its log is."""


def _terminate(signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A child process started in its own session, stopped with its whole group and descendants."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        kids: list[psutil.Process] = []
        if self.alive():
            with suppress(psutil.NoSuchProcess):
                kids = psutil.Process(self.popen.pid).children(recursive=True)
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, self.stop_signal)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        for kid in kids:  # e.g. an RQ work horse: it sits in a process group of its own
            with suppress(psutil.NoSuchProcess):
                kid.kill()
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_proc(name: str, args: list[str], env: dict[str, str], log: Path, stop_signal: int = signal.SIGTERM) -> Proc:
    with log.open("ab") as out:
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log, stop_signal)


def wait_http(proc: Proc, url: str, timeout: float = 60.0) -> None:
    """Wait until the process answers HTTP at all (any status counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        try:
            requests.get(url, headers=PROXY_HEADERS, timeout=2, allow_redirects=False)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise BenchError(f"{proc.name} did not start; its log ends:\n{proc.tail()}")


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One ``flask --app app broker ...`` command with the broker's environment."""
    done = subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "app", "broker", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and done.returncode != 0:
        raise BenchError(f"flask broker {args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done


def tree_cpu(pids: list[int]) -> float:
    """User+system CPU seconds of processes, their live descendants and the children they reaped."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            with suppress(psutil.NoSuchProcess):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def worker_threads(pids: list[int]) -> tuple[int, int]:
    """(RSS in bytes, threads) of the worker processes and their children, added up."""
    rss = threads = 0
    for pid in pids:
        with suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in (root, *root.children(recursive=True)):
                with suppress(psutil.NoSuchProcess):
                    rss += proc.memory_info().rss
                    threads += proc.num_threads()
    return rss, threads


def box_busy() -> float:
    """Busy CPU seconds of the whole machine so far."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


# --------------------------------------------------------------------------- statistics


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float | None:
    return pct(values, 50)


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def parse_rq_time(value: bytes | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value.decode(), RQ_TIME).replace(tzinfo=UTC)


def seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def present(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


# --------------------------------------------------------------------------- the API client


class Api:
    """A thin client of the broker's /v1 API; one ``requests.Session`` per thread (keep-alive)."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {key}", **PROXY_HEADERS}
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
        return session

    def submit_tts(self) -> requests.Response:
        body = {"model": MODEL, "text": TEXT, "voice_id": VOICE_ID, "output_format": "mp3_44100_128"}
        return self.session.post(f"{self.base}/v1/tts", json=body, headers=self.headers, timeout=HTTP_TIMEOUT)

    def submit_image(self) -> requests.Response:
        body = {"model": IMAGE_MODEL, "prompt": "a bench lighthouse", "quality": "low"}
        return self.session.post(f"{self.base}/v1/image", json=body, headers=self.headers, timeout=HTTP_TIMEOUT)

    def submit_music(self) -> requests.Response:
        body = {"model": MUSIC_MODEL, "prompt": "a bench tune", "instrumental": True}
        return self.session.post(f"{self.base}/v1/music", json=body, headers=self.headers, timeout=HTTP_TIMEOUT)

    def list_jobs(self, status: str | None = None, stop_when: Callable[[list[dict]], bool] | None = None) -> list[dict]:
        """Every job of the account (optionally of one status), newest first, following the cursor."""
        params: dict[str, str | int] = {"limit": 100}
        if status:
            params["status"] = status
        jobs: list[dict] = []
        while True:
            response = self.session.get(f"{self.base}/v1/jobs", params=params, headers=self.headers, timeout=30)
            if response.status_code != 200:
                raise BenchError(f"GET /v1/jobs answered {response.status_code}: {response.text[:300]}")
            page = response.json()
            jobs.extend(page["data"])
            if not page["has_more"] or (stop_when is not None and stop_when(jobs)):
                return jobs
            params["cursor"] = page["next_cursor"]

    def wait_ended(self, job_id: str, timeout: float) -> None:
        """Until the job is terminal (or ``timeout`` passed), looking every 20 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.session.get(f"{self.base}/v1/jobs/{job_id}", headers=self.headers, timeout=HTTP_TIMEOUT)
            if response.status_code != 200 or response.json()["status"] in TERMINAL:
                return
            time.sleep(0.02)

    def cancel(self, job_id: str) -> int:
        response = self.session.delete(f"{self.base}/v1/jobs/{job_id}", headers=self.headers, timeout=HTTP_TIMEOUT)
        return response.status_code


# --------------------------------------------------------------------------- one phase


@dataclass
class Submission:
    started: float  # wall clock, time.time()
    latency: float  # seconds
    status: int  # HTTP status, 0 for a transport error
    job_id: str | None
    error: str = ""


@dataclass
class PhaseResult:
    workers: int
    jobs: int
    submissions: list[Submission] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)  # job id -> the API's job JSON
    rq: dict[str, dict[bytes, bytes]] = field(default_factory=dict)  # job id -> RQ's job hash
    aborted: str = ""
    submit_wall: float = 0.0
    max_housekeeping: int = 0
    housekeeping_left: int = 0
    housekeeping_drain_s: float | None = None
    cpu_worker_s: float = 0.0
    cpu_web_s: float = 0.0
    busy_pct: float = 0.0
    other_pct: float = 0.0
    canceled_by_bench: int = 0
    music_ids: list[str] = field(default_factory=list)
    music_submit_errors: int = 0
    music_started: float = 0.0
    music_records: list[dict] = field(default_factory=list)
    kind: str = "tts"
    peak_rss: int = 0  # bytes: the most the worker processes (with their children) held at once
    peak_threads: int = 0  # the most threads the worker processes had at once
    not_charged_once: int = 0  # succeeded jobs whose hold has not exactly one hold and one settle entry
    # While music jobs wait, every 0.5 s: (time.time(), worker threads above the idle count, RQ's
    # scheduled jobs, busy RQ workers, workers' RSS in bytes).
    music_samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    music_not_charged_once: int = 0
    idle_threads: int = 0


class Bench:
    """Everything one run shares: the services, the broker's environment and the API key."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs: list[Proc] = []
        self.redis_server: Any = None
        self.env: dict[str, str] = {}
        self.web: Proc | None = None
        self.api: Api | None = None
        self.rds: redis.Redis | None = None
        self.web_describe = ""

    # -- setup

    def start(self) -> None:
        from broker import migrations
        from broker.embedded_redis import EmbeddedRedis

        self.redis_server = EmbeddedRedis(self.work / "redis", appendonly=True).start()
        self.rds = redis.Redis.from_url(self.redis_server.url)
        db_url = f"sqlite:///{self.work / 'broker.db'}"
        migrations.upgrade(db_url)

        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "FLASK_"))}
        for name in ("ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "SUNO_API_KEY", "DEMO_PROVIDER", "WEB_CONCURRENCY"):
            base_env.pop(name, None)
        fake_port, web_port = free_port(), free_port()
        fake = start_proc(
            "fake upstream",
            [
                sys.executable,
                "-m",
                "tests.fakes.upstreams",
                "--port",
                str(fake_port),
                "--delay",
                str(self.args.latency),
                "--suno-polls-per-stage",
                str(self.args.music_polls_per_stage),
            ],
            base_env,
            self.work / "fake.log",
        )
        self.procs.append(fake)
        fake_url = f"http://127.0.0.1:{fake_port}"
        self.env = {
            **base_env,
            "BROKER_ENV": "production",
            "SECRET_KEY": secrets.token_urlsafe(48),
            "TRUSTED_HOSTS": "127.0.0.1",  # the address the bench sends its requests to
            "MAIL_URL": "smtp://127.0.0.1:25",  # production requires one; the bench sends no mail
            "OPERATOR_NAME": "Bench Operator",  # production requires the three OPERATOR_* settings
            "OPERATOR_CONTACT": "bench@example.com",
            "OPERATOR_JURISDICTION": "nowhere in particular",
            "INSTANCE_PATH": str(self.work / "instance"),
            "DATABASE_URL": db_url,
            "REDIS_URL": self.redis_server.url,
            "ELEVENLABS_BASE_URL": fake_url,
            "ELEVENLABS_API_KEY": "xi-bench-anything",
            "OPENAI_BASE_URL": fake_url + "/v1",
            "OPENAI_API_KEY": "sk-bench-anything",
            "SUNO_BASE_URL": fake_url,
            "SUNO_API_KEY": "suno-bench-anything",
            "MUSIC_POLL_SECONDS": str(self.args.music_poll_seconds),
            # The bench's own submits and job listings are not what is measured: no per-key cap on them.
            "RATE_LIMIT_PER_MINUTE": "1000000",
            "RATE_LIMIT_PER_DAY": "100000000",
            "LOG_LEVEL": self.args.log_level,
            "PORT": str(web_port),
        }
        web_env = dict(self.env)
        conf = ROOT / "gunicorn.conf.py"
        if conf.exists():
            gunicorn_args = ["--config", str(conf)]
            if self.args.web_workers:
                web_env["WEB_CONCURRENCY"] = str(self.args.web_workers)
            self.web_describe = "gunicorn -c gunicorn.conf.py"
        else:
            gunicorn_args = ["-k", "gthread", "--threads", "8", "-w", str(self.args.web_workers or 2)]
            self.web_describe = "gunicorn " + " ".join(gunicorn_args)
        if self.args.web_class:
            gunicorn_args += ["--worker-class", self.args.web_class]
            self.web_describe += f" --worker-class {self.args.web_class}"
        gunicorn_args += ["--bind", f"127.0.0.1:{web_port}"]
        # SIGINT: gunicorn's quick shutdown (SIGTERM would wait out its graceful timeout).
        self.web = start_proc(
            "broker web",
            [str(VENV_BIN / "gunicorn"), *gunicorn_args, "app:app"],
            web_env,
            self.work / "web.log",
            stop_signal=signal.SIGINT,
        )
        self.procs.append(self.web)
        wait_http(fake, fake_url + "/")
        wait_http(self.web, f"http://127.0.0.1:{web_port}/v1/models")
        web_workers = len(psutil.Process(self.web.popen.pid).children())
        self.web_describe += f" ({web_workers} processes)"

        cli(self.env, "create-user", EMAIL)
        key = cli(self.env, "create-key", EMAIL, "--name", "bench-jobs").stdout.strip().splitlines()[-1]
        cli(self.env, "grant", EMAIL, GRANT_CREDITS, "--reason", "bench-jobs")
        self.api = Api(f"http://127.0.0.1:{web_port}", key)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.redis_server is not None:
            self.redis_server.stop()

    # -- workers

    def start_workers(self, count: int, phase: int) -> list[Proc]:
        assert self.rds is not None
        workers = []
        command = [sys.executable, str(ROOT / "worker.py")]
        if self.args.worker_kind == "fork":  # comparison: worker.py's main with RQ's forking worker
            command = [sys.executable, "-c", FORK_WORKER]
        for n in range(count):
            proc = start_proc(
                f"worker {n + 1}",
                command,
                self.env,
                self.work / f"worker-p{phase}-{n + 1}.log",
            )
            self.procs.append(proc)
            workers.append(proc)
        deadline = time.monotonic() + 30
        while self.rds.scard("rq:workers") < count:
            dead = [w for w in workers if not w.alive()]
            if dead or time.monotonic() > deadline:
                culprit = dead[0] if dead else workers[0]
                raise BenchError(f"{culprit.name} did not register with RQ; its log ends:\n{culprit.tail()}")
            time.sleep(0.1)
        # Each worker's cron enqueues every housekeeping job at start; let them run before the burst.
        self.wait_queue_empty("housekeeping", 30)
        return workers

    def stop_workers(self, workers: list[Proc]) -> None:
        for proc in workers:  # SIGTERM: RQ's warm shutdown (finish the current job, then exit)
            proc.stop(timeout=30)
            self.procs.remove(proc)
        assert self.rds is not None
        deadline = time.monotonic() + 10
        while self.rds.scard("rq:workers") and time.monotonic() < deadline:
            time.sleep(0.1)

    def wait_queue_empty(self, name: str, timeout: float) -> float | None:
        """Seconds until RQ's queue ``name`` is empty and no worker is busy, or None on timeout."""
        assert self.rds is not None
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.rds.llen(f"rq:queue:{name}") == 0 and not self.busy_workers():
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    def our_cpu(self) -> float:
        """CPU seconds of everything this bench runs: its services, its workers and itself (the clients)."""
        me = psutil.Process().cpu_times()
        pids = [p.popen.pid for p in self.procs]
        if self.redis_server is not None and self.redis_server.process is not None:
            pids.append(self.redis_server.process.pid)
        return tree_cpu(pids) + me.user + me.system

    def busy_workers(self) -> int:
        assert self.rds is not None
        names = [m.decode() for m in self.rds.smembers("rq:workers")]
        states = [self.rds.hget(f"rq:worker:{n.removeprefix('rq:worker:')}", "state") for n in names]
        return sum(1 for s in states if s == b"busy")

    # -- one phase

    def run_phase(self, workers_n: int, phase: int) -> PhaseResult:
        assert self.api is not None and self.web is not None and self.rds is not None
        api = self.api
        kind = "image" if self.args.images else "tts"
        count = self.args.images or self.args.jobs
        result = PhaseResult(workers=workers_n, jobs=count, kind=kind)
        print(f"phase {phase}: {workers_n} worker(s), {count} {kind} jobs ...", flush=True)
        workers = self.start_workers(workers_n, phase)
        try:
            worker_pids = [w.popen.pid for w in workers]
            cpu_w0, cpu_web0, ours0, busy0, wall0 = (
                tree_cpu(worker_pids),
                tree_cpu([self.web.popen.pid]),
                self.our_cpu(),
                box_busy(),
                time.monotonic(),
            )
            result.idle_threads = worker_threads(worker_pids)[1]
            music_stop = threading.Event()
            if self.args.music:
                self._submit_music(result)
                threading.Thread(target=self._sample_music, args=(result, worker_pids, music_stop), daemon=True).start()
            jobs_from = time.monotonic() + self.args.jobs_after
            counter = itertools.count()
            lock = threading.Lock()
            stop = threading.Event()

            def submitter() -> None:
                stop.wait(max(0.0, jobs_from - time.monotonic()))  # --jobs-after: into the music jobs' wait
                while not stop.is_set():
                    with lock:
                        n = next(counter)
                    if n >= count:
                        return
                    started, t0 = time.time(), time.perf_counter()
                    try:
                        response = api.submit_image() if kind == "image" else api.submit_tts()
                        latency = time.perf_counter() - t0
                        job_id = response.json().get("id") if response.status_code == 202 else None
                        error = "" if job_id else response.text[:200]
                        sub = Submission(started, latency, response.status_code, job_id, error)
                        if job_id and self.args.idle:
                            api.wait_ended(job_id, HTTP_TIMEOUT)  # the queue is idle at each submit
                    except requests.RequestException as exc:
                        sub = Submission(started, time.perf_counter() - t0, 0, None, repr(exc)[:200])
                    with lock:
                        result.submissions.append(sub)

            deadline = time.monotonic() + self.args.phase_timeout
            clients = 1 if self.args.idle else self.args.clients
            threads = [threading.Thread(target=submitter, daemon=True) for _ in range(clients)]
            for thread in threads:
                thread.start()
            sampler = threading.Thread(target=self._sample_workers, args=(result, worker_pids, stop), daemon=True)
            sampler.start()
            try:
                self._poll(result, threads, lock, deadline)
            finally:
                stop.set()
                sampler.join(timeout=5)
                for thread in threads:
                    thread.join(timeout=HTTP_TIMEOUT + 5)
            if self.args.music and not result.aborted:
                self._wait_music(result, deadline)
            music_stop.set()
            if result.aborted:
                self._cancel_leftovers(result)
            result.cpu_worker_s = tree_cpu(worker_pids) - cpu_w0
            result.cpu_web_s = tree_cpu([self.web.popen.pid]) - cpu_web0
            wall = time.monotonic() - wall0
            capacity = wall * (psutil.cpu_count() or 1)
            busy = box_busy() - busy0
            result.busy_pct = busy / capacity * 100
            result.other_pct = max(0.0, busy - (self.our_cpu() - ours0)) / capacity * 100
            result.housekeeping_left = int(self.rds.llen("rq:queue:housekeeping"))
            result.housekeeping_drain_s = self.wait_queue_empty("housekeeping", 60)
            self._collect(result)
            result.not_charged_once = self._not_charged_once(result)
        finally:
            self.stop_workers(workers)
        return result

    def _sample_workers(self, result: PhaseResult, pids: list[int], stop: threading.Event) -> None:
        """Every 0.2 s until ``stop``: the worker processes' total RSS and threads, keeping the peaks."""
        while not stop.wait(0.2):
            rss, threads = worker_threads(pids)
            result.peak_rss = max(result.peak_rss, rss)
            result.peak_threads = max(result.peak_threads, threads)

    def _sample_music(self, result: PhaseResult, pids: list[int], stop: threading.Event) -> None:
        """Every 0.5 s while the music jobs wait: what holds a worker meanwhile (see ``PhaseResult``)."""
        assert self.rds is not None
        while not stop.wait(0.5):
            rss, threads = worker_threads(pids)
            scheduled = int(self.rds.zcard("rq:scheduled:media"))
            sample = (time.time(), threads - result.idle_threads, scheduled, self.busy_workers(), rss)
            result.music_samples.append(sample)

    def _not_charged_once(self, result: PhaseResult) -> int:
        """Succeeded jobs whose hold has anything but one hold and one settle entry in SQL (after a drain)."""
        import sqlite3

        cli(self.env, "reconcile", check=False)  # drains the ledger into SQL first
        holds = {r["request_id"] for r in result.records.values() if r["status"] == "succeeded"}
        music = {r["request_id"] for r in result.music_records if r["status"] == "succeeded"}
        holds |= music
        with sqlite3.connect(self.work / "broker.db") as db:
            rows = db.execute("SELECT hold_id, kind FROM ledger_entries WHERE kind IN ('hold', 'settle')").fetchall()
        kinds: dict[str, list[str]] = {}
        for hold_id, entry_kind in rows:
            if hold_id in holds:
                kinds.setdefault(hold_id, []).append(entry_kind)
        result.music_not_charged_once = sum(1 for h in music if sorted(kinds.get(h, [])) != ["hold", "settle"])
        return sum(1 for h in holds - music if sorted(kinds.get(h, [])) != ["hold", "settle"])

    def _poll(
        self, result: PhaseResult, threads: list[threading.Thread], lock: threading.Lock, deadline: float
    ) -> None:
        """Until every submitted job is terminal (or the phase's time is up)."""
        assert self.api is not None and self.rds is not None
        last_note = time.monotonic()
        while True:
            time.sleep(0.5)
            result.max_housekeeping = max(result.max_housekeeping, int(self.rds.llen("rq:queue:housekeeping")))
            with lock:
                ids = {s.job_id for s in result.submissions if s.job_id}
                submitted = len(result.submissions)
            pending = {j["id"] for status in ("queued", "running") for j in self.api.list_jobs(status)} & ids
            submitting = any(t.is_alive() for t in threads)
            if not submitting and not pending:
                return
            if time.monotonic() > deadline:
                result.aborted = (
                    f"aborted after {self.args.phase_timeout:g} s: {submitted} submitted, {len(pending)} not finished"
                )
                print(f"  {result.aborted}", flush=True)
                return
            if time.monotonic() - last_note > 5:
                print(f"  {submitted} submitted, {len(ids) - len(pending)} finished", flush=True)
                last_note = time.monotonic()

    def _submit_music(self, result: PhaseResult) -> None:
        """Music jobs first: each waits for the fake Suno through re-checks RQ's scheduler enqueues."""
        assert self.api is not None
        result.music_started = time.time()
        api = self.api
        with ThreadPoolExecutor(self.args.clients) as pool:  # the fake's --latency delays each submit
            for response in pool.map(lambda _: api.submit_music(), range(self.args.music)):
                if response.status_code == 202:
                    result.music_ids.append(response.json()["id"])
                else:
                    result.music_submit_errors += 1

    def _wait_music(self, result: PhaseResult, deadline: float) -> None:
        assert self.api is not None
        ids = set(result.music_ids)
        while time.monotonic() < deadline:
            jobs = [j for j in self.api.list_jobs() if j["id"] in ids]
            if all(j["status"] in TERMINAL for j in jobs) and len(jobs) == len(ids):
                result.music_records = jobs
                return
            time.sleep(0.5)
        result.aborted = f"aborted after {self.args.phase_timeout:g} s: music jobs not finished"

    def _cancel_leftovers(self, result: PhaseResult) -> None:
        """Cancel this phase's still-queued jobs (releasing their holds) so the next phase starts clean."""
        assert self.api is not None and self.rds is not None
        ids = {s.job_id for s in result.submissions if s.job_id}
        for job in self.api.list_jobs("queued"):
            if job["id"] in ids and self.api.cancel(job["id"]) == 200:
                result.canceled_by_bench += 1
        self.rds.delete("rq:queue:media")  # the canceled jobs' RQ entries; each would only be skipped

    def _collect(self, result: PhaseResult) -> None:
        """The API's final view of every job of the phase, and RQ's record of each."""
        assert self.api is not None and self.rds is not None
        ids = {s.job_id for s in result.submissions if s.job_id}
        jobs = self.api.list_jobs(stop_when=lambda got: ids <= {j["id"] for j in got})
        result.records = {j["id"]: j for j in jobs if j["id"] in ids}
        fields = (b"enqueued_at", b"started_at", b"ended_at", b"worker_name")
        pipe = self.rds.pipeline(transaction=False)
        ordered = sorted(ids)
        for job_id in ordered:
            pipe.hmget(f"rq:job:{job_id}", list(fields))
        for job_id, values in zip(ordered, pipe.execute(), strict=True):
            result.rq[job_id] = dict(zip(fields, values, strict=True))


# --------------------------------------------------------------------------- report


@dataclass
class Summary:
    workers: int
    submitted: int
    submit_errors: int
    succeeded: int
    failed: int
    other: int
    throughput: float | None
    ideal: float
    submit_rate: float | None
    submit_ms: tuple[float | None, float | None]
    to_running: tuple[float | None, float | None]
    to_succeeded: tuple[float | None, float | None]
    cycle_ms: float | None
    fn_ms: float | None
    gap_ms: float | None
    pre_ms: float | None
    post_ms: float | None
    cpu_worker_ms: float | None
    cpu_web_ms: float | None
    busy_pct: float
    other_pct: float
    max_housekeeping: int
    housekeeping_drain_s: float | None
    aborted: str
    errors: dict[str, int]
    music: str = ""
    kind: str = "tts"
    span_s: float | None = None
    peak_rss_mib: float = 0.0
    peak_threads: int = 0
    not_charged_once: int = 0


def summarize(result: PhaseResult, latency: float, polls: int = 4, poll_seconds: float = MUSIC_POLL_SECONDS) -> Summary:
    subs = result.submissions
    records = list(result.records.values())
    ok = [r for r in records if r["status"] == "succeeded"]
    failed = [r for r in records if r["status"] == "failed"]
    errors: dict[str, int] = {}
    for r in failed:
        kind = (r.get("error") or {}).get("type") or "?"
        errors[kind] = errors.get(kind, 0) + 1
    for s in subs:
        if not s.job_id:
            errors[f"submit HTTP {s.status}"] = errors.get(f"submit HTTP {s.status}", 0) + 1
    first_submit = min((s.started for s in subs), default=None)
    last_done = max((parse_time(r["finished_at"]) for r in ok), default=None)
    throughput = span = None
    if first_submit is not None and last_done is not None:
        span = last_done.timestamp() - first_submit
        throughput = len(ok) / span if span > 0 else None
    last_submit_end = max((s.started + s.latency for s in subs), default=None)
    submit_rate = None
    if first_submit is not None and last_submit_end is not None and last_submit_end > first_submit:
        submit_rate = len(subs) / (last_submit_end - first_submit)
    sub_ms = [s.latency * 1000 for s in subs if s.job_id]
    running = present([seconds(parse_time(r["started_at"]), parse_time(r["created_at"])) for r in records])
    done = present([seconds(parse_time(r["finished_at"]), parse_time(r["created_at"])) for r in ok])

    # Per-job timeline from RQ's job hashes (horse-side started_at/ended_at) and the API's own stamps.
    per_worker: dict[bytes, list[tuple[datetime, datetime]]] = {}
    fn, pre, post = [], [], []
    for job_id, rq in result.rq.items():
        record = result.records.get(job_id)
        rq_start, rq_end = parse_rq_time(rq.get(b"started_at")), parse_rq_time(rq.get(b"ended_at"))
        if record is None or record["status"] != "succeeded" or rq_start is None or rq_end is None:
            continue
        per_worker.setdefault(rq.get(b"worker_name") or b"?", []).append((rq_start, rq_end))
        app_start, app_end = parse_time(record["started_at"]), parse_time(record["finished_at"])
        fn.append(seconds(app_end, app_start))
        pre.append(seconds(app_start, rq_start))
        post.append(seconds(rq_end, app_end))
    cycles, gaps = [], []
    for spans in per_worker.values():
        spans.sort()
        for (start_a, end_a), (start_b, _) in itertools.pairwise(spans):
            cycles.append((start_b - start_a).total_seconds())
            gaps.append((start_b - end_a).total_seconds())
    n_ok = len(ok) or None

    def ms(values: list[float | None]) -> float | None:
        m = median(present(values))
        return None if m is None else m * 1000

    return Summary(
        workers=result.workers,
        submitted=len(subs),
        submit_errors=sum(1 for s in subs if not s.job_id),
        succeeded=len(ok),
        failed=len(failed),
        other=len(records) - len(ok) - len(failed),
        throughput=throughput,
        ideal=result.workers / latency if latency > 0 else math.inf,
        submit_rate=submit_rate,
        submit_ms=(pct(sub_ms, 50), pct(sub_ms, 99)),
        to_running=(pct(running, 50), pct(running, 99)),
        to_succeeded=(pct(done, 50), pct(done, 99)),
        cycle_ms=ms(list(cycles)),
        fn_ms=ms(fn),
        gap_ms=ms(list(gaps)),
        pre_ms=ms(pre),
        post_ms=ms(post),
        cpu_worker_ms=result.cpu_worker_s * 1000 / n_ok if n_ok else None,
        cpu_web_ms=result.cpu_web_s * 1000 / n_ok if n_ok else None,
        busy_pct=result.busy_pct,
        other_pct=result.other_pct,
        max_housekeeping=result.max_housekeeping,
        housekeeping_drain_s=result.housekeeping_drain_s,
        aborted=result.aborted,
        errors=errors,
        music=summarize_music(result, polls, poll_seconds),
        kind=result.kind,
        span_s=span,
        peak_rss_mib=result.peak_rss / 2**20,
        peak_threads=result.peak_threads,
        not_charged_once=result.not_charged_once,
    )


def summarize_music(result: PhaseResult, polls: int, poll_seconds: float) -> str:
    """How the music jobs ended and how long they waited, and what held a worker meanwhile."""
    if not result.music_ids:
        return ""
    records = result.music_records
    ok = [r for r in records if r["status"] == "succeeded"]
    done = present([seconds(parse_time(r["finished_at"]), parse_time(r["created_at"])) for r in ok])
    last = max((parse_time(r["finished_at"]).timestamp() for r in ok), default=None)
    span = f"{last - result.music_started:.1f} s" if last else "-"
    # Samples while every music job was still waiting (none ended yet): the wait itself.
    first_end = min((parse_time(r["finished_at"]).timestamp() for r in ok), default=math.inf)
    waiting = [sample for sample in result.music_samples if sample[0] < first_end]
    threads = sorted(float(t) for _, t, _, _, _ in waiting)
    scheduled = sorted(float(q) for _, _, q, _, _ in waiting)
    busy = [b for _, _, _, b, _ in waiting]
    rss = max((r for *_, r in result.music_samples), default=0) / 2**20
    return (
        f"{len(result.music_ids)} music jobs (submit errors {result.music_submit_errors}): "
        f"{len(ok)} succeeded, {len(records) - len(ok)} not, {result.music_not_charged_once} not charged "
        f"exactly once; submit->succeeded p50 / max {fmt(pct(done, 50), '.1f')} / "
        f"{fmt(max(done, default=None), '.1f')} s (each {polls} polls {poll_seconds:g} s apart); all done {span} "
        f"after the first submit.\n  While they waited ({len(waiting)} samples, 0.5 s apart): worker threads "
        f"above the idle {result.idle_threads} (the lease keeper, started by the first job, is 1): "
        f"median {fmt(pct(threads, 50), '.0f')}, p99 "
        f"{fmt(pct(threads, 99), '.0f')}, max {fmt(max(threads, default=None), '.0f')}; re-checks scheduled "
        f"in RQ: median {fmt(pct(scheduled, 50), '.0f')}; RQ workers busy in "
        f"{sum(1 for b in busy if b)} samples; workers' peak RSS {rss:.0f} MiB. A worker thread held per job "
        f"would be {len(result.music_ids)} threads for the whole wait."
    )


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def pair(values: tuple[float | None, float | None], spec: str) -> str:
    return f"{fmt(values[0], spec)} / {fmt(values[1], spec)}"


def print_table(summaries: list[Summary], latency: float) -> None:
    rows: list[tuple[str, list[str], str]] = []

    def ratio(get: Callable[[Summary], float | None]) -> str:
        if len(summaries) < 2:
            return ""
        a, b = get(summaries[0]), get(summaries[-1])
        return f"{b / a:.2f}x" if a and b else "-"

    def row(label: str, get: Callable[[Summary], str], ratio_of: Callable[[Summary], float | None] | None = None):
        rows.append((label, [get(s) for s in summaries], ratio(ratio_of) if ratio_of else ""))

    row("jobs submitted (submit errors)", lambda s: f"{s.submitted} ({s.submit_errors})")
    row("succeeded / failed / other (canceled, unfinished)", lambda s: f"{s.succeeded} / {s.failed} / {s.other}")
    row("throughput, jobs/s (1st submit->last success)", lambda s: fmt(s.throughput), lambda s: s.throughput)
    row(f"ideal: workers / {latency:g} s upstream, jobs/s", lambda s: fmt(s.ideal), lambda s: s.ideal)
    row("efficiency vs ideal", lambda s: fmt(s.throughput / s.ideal * 100, ".0f") + " %" if s.throughput else "-")
    row("submit rate, jobs/s", lambda s: fmt(s.submit_rate, ".0f"))
    row(f"POST /v1/{summaries[0].kind} latency p50 / p99, ms", lambda s: pair(s.submit_ms, ".1f"))
    row("submit->running p50 / p99, s", lambda s: pair(s.to_running, ".2f"))
    row(
        "submit->running p50 / p99, ms",
        lambda s: pair(tuple(None if v is None else v * 1000 for v in s.to_running), ".0f"),
    )
    row("submit->succeeded p50 / p99, s", lambda s: pair(s.to_succeeded, ".2f"))
    row("all succeeded, s after the 1st submit", lambda s: fmt(s.span_s, ".1f"))
    row("succeeded jobs not charged exactly once", lambda s: str(s.not_charged_once))
    row("workers' peak RSS, all processes, MiB", lambda s: fmt(s.peak_rss_mib, ".0f"))
    row("workers' peak threads, all processes", lambda s: str(s.peak_threads))
    row("per job, medians (RQ + job timestamps):", lambda s: "")
    row("  cycle per worker (start to next start), ms", lambda s: fmt(s.cycle_ms, ".0f"))
    row("  job function (claim -> succeeded), ms", lambda s: fmt(s.fn_ms, ".0f"))
    row("  RQ gap between jobs (fork, dequeue...), ms", lambda s: fmt(s.gap_ms, ".0f"))
    row("  horse start -> claim, ms", lambda s: fmt(s.pre_ms, ".0f"))
    row("  succeeded -> RQ job end, ms", lambda s: fmt(s.post_ms, ".0f"))
    row(
        "  not upstream (cycle - latency), ms",
        lambda s: fmt(None if s.cycle_ms is None else s.cycle_ms - latency * 1000, ".0f"),
    )
    row("CPU per job: workers / web, ms", lambda s: f"{fmt(s.cpu_worker_ms, '.1f')} / {fmt(s.cpu_web_ms, '.1f')}")
    row("box busy, all CPUs (of it not this bench)", lambda s: f"{s.busy_pct:.0f} % ({s.other_pct:.0f} %)")
    row(
        "housekeeping queue max (drained in s)",
        lambda s: f"{s.max_housekeeping} ({fmt(s.housekeeping_drain_s, '.1f')})",
    )

    heads = [f"{s.workers} worker" + ("s" if s.workers > 1 else "") for s in summaries]
    width = max(len(label) for label, _, _ in rows)
    cols = [max(len(h), *(len(v[i]) for _, v, _ in rows)) for i, h in enumerate(heads)]
    head = f"{'':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, cols, strict=True))
    if len(summaries) > 1:
        head += f"  {'2w/1w':>6}"
    print(head)
    print("-" * len(head))
    for label, values, r in rows:
        line = f"{label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols, strict=True))
        print(line + (f"  {r:>6}" if r else ""))
    for s in summaries:
        if s.music:
            print(f"{s.workers} worker(s): {s.music}")
    for s in summaries:
        if s.aborted:
            print(f"{s.workers} worker(s): {s.aborted}")
        if s.errors:
            print(f"{s.workers} worker(s) errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())))


def log_problems(work: Path) -> str:
    """Warning/error lines of the web and worker logs."""
    lines = []
    for log in sorted(work.glob("*.log")):
        text = log.read_text(errors="replace")
        noisy = [
            x
            for x in text.splitlines()
            if re.search(r"WARNING|ERROR|Traceback|CRITICAL|\"level\": \"(warning|error)", x)
        ]
        if noisy:
            lines.append(f"  {log.name}: {len(noisy)} warning/error lines, e.g.")
            lines += [f"    {x[:200]}" for x in noisy[:3]]
    return "\n".join(lines) if lines else "  none"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200, help="TTS jobs per phase (default 200)")
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="image jobs per phase instead of TTS jobs (issue 14's cell: --images 500 --latency 20 --workers 2; "
        "target: all succeeded <= 40 s after the 1st submit, workers <= 1024 MiB, each charged once)",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="fixed fake upstream latency, s (default 0.2)")
    parser.add_argument("--clients", type=int, default=4, help="client threads submitting (default 4)")
    parser.add_argument("--workers", default="1,2", help="worker counts, one phase each (default 1,2)")
    parser.add_argument("--phase-timeout", type=float, default=120.0, help="a phase aborts after this, s (default 120)")
    parser.add_argument("--web-workers", type=int, default=None, help="WEB_CONCURRENCY for gunicorn")
    parser.add_argument("--web-class", default=None, help="gunicorn worker class (default: gunicorn.conf.py's)")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of web and workers (default INFO)")
    parser.add_argument(
        "--worker-kind",
        choices=("fork", "simple"),
        default="simple",
        help="simple: python worker.py (rq.SimpleWorker, jobs in the worker process, the default); fork: the same "
        "main() with rq.Worker, a work horse forked per job (the worker before issue 14, to price the fork)",
    )
    parser.add_argument(
        "--idle",
        action="store_true",
        help="job overhead with the queue idle: one client submits each job only after the previous one ended "
        "(read 'submit->running p50, ms'; target <= 50 ms)",
    )
    parser.add_argument(
        "--music",
        type=int,
        default=0,
        help="music jobs submitted at the start of each phase, before the TTS jobs (fake Suno: "
        "3 × --music-polls-per-stage + 1 polls, --music-poll-seconds apart); they wait in scheduled re-checks, "
        "not in a worker",
    )
    parser.add_argument(
        "--music-polls-per-stage",
        type=int,
        default=1,
        help="the fake Suno's polls per status stage (default 1; 8 with --music-poll-seconds 5: about 2 minutes)",
    )
    parser.add_argument(
        "--music-poll-seconds",
        type=float,
        default=MUSIC_POLL_SECONDS,
        help=f"MUSIC_POLL_SECONDS of the workers (default {MUSIC_POLL_SECONDS})",
    )
    parser.add_argument(
        "--jobs-after",
        type=float,
        default=0.0,
        help="seconds after the music jobs before the TTS/image jobs are submitted (default 0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database) for inspection")
    return parser.parse_args(argv)


@contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="broker-bench-jobs-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # also when started with SIGINT ignored (a background job)
    sys.path.insert(0, str(ROOT))
    try:
        with workspace(args.keep) as work:
            bench = Bench(args, work)
            try:
                bench.start()
                print(
                    f"web: {bench.web_describe}; workers: "
                    + (
                        "rq.Worker (fork per job); "
                        if args.worker_kind == "fork"
                        else "python worker.py (media jobs in threads); "
                    )
                    + f"fake upstream latency {args.latency:g} s; {args.clients} client threads; "
                    f"{psutil.cpu_count()} CPUs\n",
                    flush=True,
                )
                results = [bench.run_phase(n, i + 1) for i, n in enumerate(counts)]
                polls = 3 * args.music_polls_per_stage + 1
                summaries = [summarize(r, args.latency, polls, args.music_poll_seconds) for r in results]
                print()
                print_table(summaries, args.latency)
                reconcile = cli(bench.env, "reconcile", check=False)
                output = (reconcile.stdout + reconcile.stderr).strip()
                print(f"\nflask broker reconcile: exit {reconcile.returncode}: {output}")
                print("log warnings/errors:\n" + log_problems(work))
                ok = reconcile.returncode == 0 and all(
                    not s.aborted and s.succeeded == s.submitted and not s.not_charged_once for s in summaries
                )
                ok = ok and all(
                    sum(1 for r in x.music_records if r["status"] == "succeeded") == args.music
                    and not x.music_not_charged_once
                    for x in results
                )
                return 0 if ok else 1
            except BenchError as error:
                print(f"\nbench failed: {error}", file=sys.stderr)
                return 1
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                bench.stop()
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped and removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
