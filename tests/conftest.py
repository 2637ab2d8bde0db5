"""Fixtures: a real Redis-compatible server, a migrated SQLite database per test, fake upstreams, live HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from decimal import Decimal

import pytest
import redis
from werkzeug.serving import make_server

from broker import ROOT, accounts, create_app, keys, migrations, pricing
from broker.embedded_redis import EmbeddedRedis
from broker.extensions import services
from tests.fakes.stripe_api import FakeStripe
from tests.fakes.upstreams import FakeUpstream

PROVIDER_KEYS = {
    "OPENAI_API_KEY": "sk-test-openai-secret-0001",
    "ANTHROPIC_API_KEY": "sk-ant-test-secret-0002",
    "GOOGLE_API_KEY": "AIza-test-secret-0003",
    "ELEVENLABS_API_KEY": "xi-test-secret-0004",
    "SUNO_API_KEY": "suno-test-secret-0005",
    "STRIPE_SECRET_KEY": "sk_test_secret_0006",
}
STRIPE_WEBHOOK_SECRET = "whsec_test_secret_0007"
COINBASE_WEBHOOK_SECRET = "cb-test-secret-0008"
RAPIDAPI_SECRET = "rapid-test-secret-0009"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def upstream():
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def stripe_fake():
    fake = FakeStripe().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "template.db"
    migrations.upgrade(f"sqlite:///{path}")
    return path


def app_config(tmp_path, redis_url: str, upstream: FakeUpstream, db_url: str, stripe_url: str = "") -> dict:
    return {
        "STRIPE_API_BASE": stripe_url or "http://127.0.0.1:9",
        "STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
        "STRIPE_CRYPTO": True,
        "COINBASE_WEBHOOK_SECRET": COINBASE_WEBHOOK_SECRET,
        "RAPIDAPI_SECRET": RAPIDAPI_SECRET,
        "BROKER_ENV": "testing",
        "SECRET_KEY": "test-secret",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": upstream.openai_base,
        "ANTHROPIC_BASE_URL": upstream.anthropic_base,
        "GEMINI_BASE_URL": upstream.gemini_base,
        "ELEVENLABS_BASE_URL": upstream.elevenlabs_base,
        "SUNO_BASE_URL": upstream.suno_base,
        "MUSIC_POLL_SECONDS": 0.1,
        "JOB_RETRY_INTERVALS": "1,1",
        "JOB_LEASE_SECONDS": 4,
        "STUCK_JOB_CHECK_SECONDS": 1,
        "DEMO_PROVIDER": True,
        "MARKUP": Decimal("1.8"),
        "CREDIT_USD": Decimal("0.01"),
        "UPSTREAM_RETRIES": 2,
        "UPSTREAM_CONNECT_TIMEOUT": 2.0,
        "UPSTREAM_READ_TIMEOUT": 2.0,
        **PROVIDER_KEYS,
    }


@pytest.fixture
def app(tmp_path, redis_server, upstream, stripe_fake, migrated_db):
    shutil.copy(migrated_db, tmp_path / "broker.db")
    redis.Redis(port=redis_server.port).flushall()
    upstream.reset()
    stripe_fake.reset()
    config = app_config(tmp_path, redis_server.url, upstream, f"sqlite:///{tmp_path / 'broker.db'}", stripe_fake.url)
    app = create_app(config)
    app.config["BROKER_TEST_CONFIG"] = config
    # No app context stays pushed: each test request gets its own, as in production
    # (a shared one would share ``g`` and the SQL session between requests).
    CURRENT["app"] = app
    yield app
    CURRENT.pop("app", None)
    services_ = app.extensions["broker"]
    services_.db.remove()
    services_.engine.dispose()


class WorkerProcess:
    """``python worker.py`` as its own process group, with the test app's settings in its environment."""

    def __init__(self, config: dict) -> None:
        self.env = {**os.environ, **{k: str(int(v) if isinstance(v, bool) else v) for k, v in config.items()}}
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py")], env=self.env, cwd=ROOT, start_new_session=True
        )
        return self

    def kill(self) -> None:
        """SIGKILL the worker, its work horse and its cron child at once, as a crash would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def worker(app):
    process = WorkerProcess(app.config["BROKER_TEST_CONFIG"]).start()
    yield process
    process.stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def live_server(app):
    """The app on a real socket (threaded), for SDK clients and concurrency tests."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


@dataclass
class Tenant:
    """An account with one API key, for tests."""

    account_id: int
    email: str
    key: str
    key_id: int

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


CURRENT: dict = {}


def make_tenant(credits: str = "100") -> Tenant:
    """An account with a key and ``credits``, in the current test's app."""
    with CURRENT["app"].app_context():
        return _make_tenant(credits)


def _make_tenant(credits: str) -> Tenant:
    svc = services()
    session = svc.db()
    account = accounts.create_account(session, f"user-{uuid.uuid4().hex[:8]}@example.com")
    row, plain = keys.create_key(session, account, "test")
    amount = pricing.credits_to_ucr(Decimal(credits))
    if amount:
        svc.ledger.grant(session, account.id, amount, f"test-{uuid.uuid4().hex}", "test credits")
    return Tenant(account.id, account.email, plain, row.id)


@pytest.fixture
def tenant(app) -> Tenant:
    return make_tenant()


def assert_invariant(app) -> None:
    """Invariant L (DESIGN.md) for every account, after draining."""
    svc = app.extensions["broker"]
    mismatches = svc.ledger.reconcile(svc.db())
    assert mismatches == [], [str(m) for m in mismatches]
