"""Scale-out: two web processes and two workers (plus one cron) on one Redis and one PostgreSQL database.

Every process is configured by environment variables only, as in production (``BROKER_ENV=production``).
Concurrent chat (plain and streamed, demo and fake-upstream) and image jobs alternate between the two web
ports until the balance runs out (402s); at the end every job is terminal, ``flask broker reconcile``
exits 0, and the charges in the usage rows add up exactly to what the balance lost — and to what the
clients were told they were charged.

Needs PostgreSQL (``TEST_DATABASE_URL``; ``.ci/run`` sets it): skipped without it outside CI.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
import redis
import requests
from rq import Worker
from rq.job import Job as RQJob
from sqlalchemy import func, select

from broker import ROOT, pricing
from broker.models import Job, UsageRecord
from tests.conftest import WorkerProcess, make_tenant

# The ``app`` fixture on a fresh PostgreSQL database (skipped without TEST_DATABASE_URL).
pytestmark = pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)

START_CREDITS = "4"  # four low-quality demo images hold ~1.6; the chat load spends the rest, then gets 402s
FIRST_IMAGES = 4  # submitted before the chat load, one burst, so that both workers take some
LOAD_SECONDS = 10.0
MAX_REQUESTS = 1500  # a bound on the whole load, whatever the machine's speed
CLIENT_THREADS = 8
IMAGE_EVERY = 40  # one request in this many during the load is an image job
IMAGE = {"model": "demo/image", "prompt": "a lighthouse at dawn", "size": "1024x1024", "quality": "low"}
MESSAGES = [{"role": "user", "content": "Tell me about scaling out."}]
CHAT_MODELS = ("demo/chat", "openai/gpt-4o-mini")  # the demo provider, and the fake upstream
MAX_TOKENS = 24
TERMINAL = ("succeeded", "failed", "canceled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ucr(credits) -> int:
    return pricing.credits_to_ucr(Decimal(str(credits)))


class Service(WorkerProcess):
    """A process (its own process group) with the test's environment, its output in a log file."""

    def __init__(self, env: dict, argv: list[str], log: Path) -> None:
        self.env = env
        self.argv = argv
        self.log = log
        self.process = None

    def start(self) -> Service:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {' '.join(self.argv[1:])} ({self.log.name}) ---\n" + "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def cluster(app, tmp_path):
    """2 × gunicorn, 2 × ``worker.py --no-cron``, 1 × ``worker.py --cron-only``; yields (env, ports, services)."""
    env = WorkerProcess(app.config["BROKER_TEST_CONFIG"]).env
    env.update(
        BROKER_ENV="production",  # needs REDIS_URL and MAIL_URL (in the test config) and these two:
        SECRET_KEY=secrets.token_urlsafe(48),
        TRUSTED_HOSTS="127.0.0.1",  # the address the test sends its requests to
        LOG_LEVEL="WARNING",
        WEB_CONCURRENCY="1",
        GUNICORN_LOGLEVEL="warning",
        GUNICORN_GRACEFUL_TIMEOUT="5",
        RATE_LIMIT_PER_MINUTE="1000000",  # one key sends the whole load; per-key limits are not tested here
    )
    assert env["DATABASE_URL"].startswith("postgresql"), env["DATABASE_URL"]
    ports = [_free_port(), _free_port()]
    services: list[Service] = []
    try:
        for n, port in enumerate(ports):
            argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
            services.append(Service({**env, "PORT": str(port)}, argv, tmp_path / f"web{n}.log").start())
        for n in range(2):
            argv = [sys.executable, str(ROOT / "worker.py"), "--no-cron"]
            services.append(Service(env, argv, tmp_path / f"worker{n}.log").start())
        services.append(Service(env, [sys.executable, str(ROOT / "worker.py"), "--cron-only"], tmp_path / "cron.log"))
        services[-1].start()
        yield env, ports, services
    finally:
        for service in services:
            service.stop()
        for service in services:
            print(service.tail())  # shown only when the test fails


def _wait_until_up(ports: list[int], services: list[Service], tenant, queue_redis: redis.Redis) -> None:
    deadline = time.monotonic() + 60
    pending = set(ports)
    while time.monotonic() < deadline:
        dead = [s for s in services if s.process.poll() is not None]
        assert not dead, "a process exited at start:\n" + "\n".join(s.tail() for s in dead)
        for port in list(pending):
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/balance", headers=tenant.headers, timeout=10).ok:
                    pending.discard(port)
            except (requests.ConnectionError, requests.Timeout):
                pass
        if not pending and len(Worker.all(connection=queue_redis)) == 2:
            return
        time.sleep(0.2)
    raise AssertionError("the cluster did not come up in 60 s:\n" + "\n".join(s.tail() for s in services))


class Load:
    """Bounded concurrent load; records every outcome and the charge each client was told."""

    def __init__(self, ports: list[int], tenant) -> None:
        self.ports = ports
        self.tenant = tenant
        self.lock = threading.Lock()
        self.next = 0
        self.statuses: Counter = Counter()
        self.by_port: Counter = Counter()
        self.charged_chat = 0  # µcr, from X-Credits-Charged or the stream's usage chunk
        self.chats_ok = 0
        self.job_ids: list[str] = []
        self.errors: list[str] = []

    def url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index % 2]}{path}"

    def image(self, session: requests.Session, index: int) -> int:
        response = session.post(self.url(index, "/v1/image"), json=IMAGE, headers=self.tenant.headers, timeout=30)
        if response.status_code == 202:
            with self.lock:
                self.job_ids.append(response.json()["id"])
        return response.status_code

    def chat(self, session: requests.Session, index: int) -> int:
        kind = (index // 2) % 4  # each kind on both ports
        model, stream = CHAT_MODELS[kind % 2], kind >= 2
        body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        response = session.post(
            self.url(index, "/v1/chat/completions"), json=body, headers=self.tenant.headers, timeout=30, stream=stream
        )
        with response:
            if response.status_code != 200:
                return response.status_code
            if not stream:
                charged = _ucr(response.headers["X-Credits-Charged"])
                assert charged == _ucr(repr(response.json()["usage"]["cost_credits"]))
            else:
                usage, done = None, False
                for line in response.iter_lines(decode_unicode=True):
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        usage = chunk.get("usage") or usage
                assert done and usage, f"stream of {model} ended without usage or [DONE]"
                charged = _ucr(repr(usage["cost_credits"]))
        assert charged > 0
        with self.lock:
            self.charged_chat += charged
            self.chats_ok += 1
        return 200

    def run_client(self, deadline: float) -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                with self.lock:
                    index, self.next = self.next, self.next + 1
                if index >= MAX_REQUESTS:
                    return
                try:
                    is_image = index % IMAGE_EVERY == IMAGE_EVERY - 1
                    status = self.image(session, index) if is_image else self.chat(session, index)
                except Exception as error:  # noqa: BLE001 - collected, asserted empty below
                    with self.lock:
                        self.errors.append(f"request {index}: {type(error).__name__}: {error}")
                    continue
                with self.lock:
                    self.statuses[status] += 1
                    self.by_port[self.ports[index % 2]] += 1


def _jobs_terminal(load: Load, timeout: float = 90) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    states: dict[str, dict] = {}
    with requests.Session() as session:
        while time.monotonic() < deadline:
            for n, job_id in enumerate(load.job_ids):
                if states.get(job_id, {}).get("status") not in TERMINAL:
                    url = load.url(n, f"/v1/jobs/{job_id}")
                    states[job_id] = session.get(url, headers=load.tenant.headers, timeout=10).json()
            if all(s["status"] in TERMINAL for s in states.values()):
                return states
            time.sleep(0.2)
    raise AssertionError(f"jobs not terminal after {timeout} s: { {k: v['status'] for k, v in states.items()} }")


def test_two_webs_two_workers_one_cron_share_redis_and_postgresql(app, cluster):
    env, ports, services = cluster
    svc = app.extensions["broker"]
    tenant = make_tenant(START_CREDITS)
    start = _ucr(START_CREDITS)
    _wait_until_up(ports, services, tenant, svc.queue_redis)

    # Production settings: plain HTTP is served (TLS ends at the proxy), HSTS is sent for HTTPS.
    plain = requests.get(f"http://127.0.0.1:{ports[0]}/v1/balance", headers=tenant.headers, timeout=5)
    assert plain.status_code == 200 and plain.json()["available_ucr"] == start
    proxied = requests.get(
        f"http://127.0.0.1:{ports[1]}/v1/balance", headers={**tenant.headers, "X-Forwarded-Proto": "https"}, timeout=5
    )
    assert proxied.status_code == 200 and "Strict-Transport-Security" in proxied.headers

    load = Load(ports, tenant)
    with requests.Session() as session:
        first = [load.image(session, n) for n in range(FIRST_IMAGES)]
    assert first == [202] * FIRST_IMAGES, first
    began = time.monotonic()
    deadline = began + LOAD_SECONDS
    clients = [threading.Thread(target=load.run_client, args=(deadline,)) for _ in range(CLIENT_THREADS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(LOAD_SECONDS + 60)
    assert not any(thread.is_alive() for thread in clients)

    seconds = time.monotonic() - began
    print(f"load in {seconds:.1f} s: {dict(load.statuses)} by port {dict(load.by_port)}; {len(load.job_ids)} jobs")
    assert load.errors == []
    assert set(load.statuses) <= {200, 202, 402}, load.statuses
    assert load.statuses[200] > 0 and load.statuses[402] > 0, f"the balance must run out: {load.statuses}"
    assert all(load.by_port[port] > 0 for port in ports), load.by_port

    # Every job ends; the demo images succeed, and both workers ran some.
    states = _jobs_terminal(load)
    assert {s["status"] for s in states.values()} == {"succeeded"}, states
    charged_jobs = sum(_ucr(s["cost_credits"]) for s in states.values())
    workers = {RQJob.fetch(job_id, connection=svc.queue_redis).worker_name for job_id in load.job_ids}
    assert len(workers) == 2, f"media jobs ran on {workers} only"

    # No hold left open, and the balance never went below zero.
    balance = requests.get(f"http://127.0.0.1:{ports[1]}/v1/balance", headers=tenant.headers, timeout=5).json()
    assert balance["held_ucr"] == 0 and balance["available_ucr"] >= 0, balance
    end = balance["available_ucr"]

    # The operator's check, run as the operator would: same environment, its own process.
    reconcile = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "broker", "reconcile"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert "ledger consistent" in reconcile.stdout

    # Reconcile drained every stream into SQL: the usage rows account for every micro-credit.
    session = svc.db()
    charged_sql = session.scalar(
        select(func.coalesce(func.sum(UsageRecord.charged_ucr), 0)).where(UsageRecord.account_id == tenant.account_id)
    )
    assert charged_sql == start - end
    assert charged_sql == load.charged_chat + charged_jobs
    rows = session.scalar(
        select(func.count()).select_from(UsageRecord).where(UsageRecord.account_id == tenant.account_id)
    )
    assert rows == load.chats_ok + len(load.job_ids)
    statuses = set(session.scalars(select(Job.status).where(Job.account_id == tenant.account_id)))
    assert statuses == {"succeeded"}
    assert svc.ledger.reconcile(session) == []
