"""Fixtures: a real Redis-compatible server, a migrated SQLite database per test, fake upstreams, live HTTP.

With ``TEST_DATABASE_URL`` (a PostgreSQL URL; ``.ci/run`` always sets it) the money tests
(``MONEY_MODULES``) run twice, on SQLite and on PostgreSQL: their ``app`` fixture is
parametrised through ``db_backend``, and each PostgreSQL test gets its own database
copied from a template migrated once per session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import psutil
import pytest
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from werkzeug.serving import make_server

from broker import ROOT, accounts, create_app, keys, migrations, pricing
from broker.embedded_redis import EmbeddedRedis, free_port
from broker.extensions import services
from tests.fakes.smtp import FakeSmtp
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
# Who runs the service (the terms and privacy pages); production refuses to start without them.
OPERATOR = {
    "OPERATOR_NAME": "Test Operator Ltd",
    "OPERATOR_CONTACT": "support@broker.test",
    "OPERATOR_JURISDICTION": "England and Wales",
}


# -- database backends ----------------------------------------------------------

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
# The tests of money: each of their tests that uses ``app`` runs on every backend in ``DB_BACKENDS``.
MONEY_MODULES = frozenset(
    ("test_chat_billing", "test_race", "test_ledger", "test_failures", "test_payments", "test_media_jobs")
)
DB_BACKENDS = ("sqlite", "postgresql") if TEST_DATABASE_URL else ("sqlite",)
PG_PREFIX = "broker_t"  # every database the tests create: broker_t<pid>_<session>[_<n>]


def pytest_configure(config) -> None:
    if os.environ.get("CI") and not TEST_DATABASE_URL:
        raise pytest.UsageError(
            "CI is set but TEST_DATABASE_URL is not: the PostgreSQL runs of the money tests would silently "
            "disappear. .ci/run starts PostgreSQL and sets it; set it to postgresql+psycopg://USER:PW@HOST/DB."
        )


def pytest_report_header(config) -> str:
    where = make_url(TEST_DATABASE_URL).render_as_string() if TEST_DATABASE_URL else "unset: SQLite only"
    return f"database backends of the money tests: {', '.join(DB_BACKENDS)} (TEST_DATABASE_URL {where})"


def pytest_generate_tests(metafunc) -> None:
    """Run the money modules' tests that use ``app`` once per backend (ids end in ``sqlite`` / ``postgresql``)."""
    if "db_backend" not in metafunc.fixturenames or len(DB_BACKENDS) < 2:
        return
    if metafunc.module.__name__.rpartition(".")[2] not in MONEY_MODULES:
        return
    if any("db_backend" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test chose its backends itself
    metafunc.parametrize("db_backend", DB_BACKENDS, indirect=True)


@pytest.fixture
def db_backend(request) -> str:
    """``sqlite`` unless the test was parametrised (money modules with TEST_DATABASE_URL set)."""
    return getattr(request, "param", "sqlite")


class PostgresDatabases:
    """Creates and drops the tests' PostgreSQL databases through one maintenance connection."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self.prefix = f"{PG_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.template = f"{self.prefix}_tpl"
        self.count = 0

    def url_of(self, name: str) -> str:
        return self.url.set(database=name).render_as_string(hide_password=False)

    def _sql(self, statement: str, **params) -> list:
        with self.admin.connect() as connection:
            result = connection.execute(text(statement), params)
            return result.all() if result.returns_rows else []

    def drop(self, name: str) -> None:
        # FORCE ends connections a crashed or killed process left behind.
        self._sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop_orphans(self) -> None:
        """Drop databases of earlier test runs on this machine whose process is gone (killed runs)."""
        for (name,) in self._sql("SELECT datname FROM pg_database WHERE datname LIKE :p", p=f"{PG_PREFIX}%"):
            pid = name.removeprefix(PG_PREFIX).partition("_")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                self.drop(name)

    def create_template(self) -> None:
        self.drop_orphans()
        self._sql(f'CREATE DATABASE "{self.template}"')
        migrations.upgrade(self.url_of(self.template))

    def create(self) -> tuple[str, str]:
        """A fresh, migrated database: (name, URL)."""
        self.count += 1
        name = f"{self.prefix}_{self.count}"
        self._sql(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name, self.url_of(name)

    def close(self) -> None:
        self.drop(self.template)
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_databases():
    """Needs TEST_DATABASE_URL; skips without it (outside CI: ``pytest_configure`` refuses CI without it)."""
    if not TEST_DATABASE_URL:
        pytest.skip("TEST_DATABASE_URL is not set (PostgreSQL)")
    databases = PostgresDatabases(TEST_DATABASE_URL)
    databases.create_template()
    yield databases
    databases.close()


@pytest.fixture
def postgres_url(postgres_databases):
    """A fresh migrated PostgreSQL database for one test; dropped afterwards (dispose engines first)."""
    name, url = postgres_databases.create()
    yield url
    postgres_databases.drop(name)


# -- services ---------------------------------------------------------------------


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


SMTP: dict = {}
MAIL_FROM = "AI API Broker <no-reply@broker.test>"


def shared_smtp() -> FakeSmtp:
    """The session's fake SMTP server (STARTTLS + AUTH), started on first use: every test app mails through it."""
    if "server" not in SMTP:
        SMTP["server"] = FakeSmtp().start()
    return SMTP["server"]


@pytest.fixture(scope="session")
def smtp_server():
    yield shared_smtp()
    SMTP.pop("server").stop()


@pytest.fixture
def mailbox(app, smtp_server) -> FakeSmtp:
    """The fake SMTP server the test app sends to, emptied for this test."""
    return smtp_server


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "template.db"
    migrations.upgrade(f"sqlite:///{path}")
    return path


def app_config(tmp_path, redis_url: str, upstream: FakeUpstream, db_url: str, stripe_url: str = "") -> dict:
    return {
        "STRIPE_API_BASE": stripe_url or "http://127.0.0.1:9",
        # The fake's hosted Checkout page is on its API's origin; set, so no STRIPE_CHECKOUT_ORIGIN in .env leaks in.
        "STRIPE_CHECKOUT_ORIGIN": stripe_url or "http://127.0.0.1:9",
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
        "MAIL_URL": shared_smtp().url,
        "MAIL_FROM": MAIL_FROM,
        "MAIL_TLS_CA_FILE": shared_smtp().ca_file,
        **PROVIDER_KEYS,
        **OPERATOR,
    }


@pytest.fixture
def app(request, tmp_path, redis_server, upstream, stripe_fake, smtp_server, migrated_db, db_backend):
    if db_backend == "postgresql":
        # Its teardown (DROP DATABASE) runs after this fixture's, which disposes the engine.
        db_url = request.getfixturevalue("postgres_url")
    else:
        shutil.copy(migrated_db, tmp_path / "broker.db")
        db_url = f"sqlite:///{tmp_path / 'broker.db'}"
    redis.Redis(port=redis_server.port).flushall()
    upstream.reset()
    stripe_fake.reset()
    smtp_server.reset()
    config = app_config(tmp_path, redis_server.url, upstream, db_url, stripe_fake.url)
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

    def _group(self) -> list[psutil.Process]:
        """The worker and every process it started (cron, RQ's scheduler)."""
        try:
            main = psutil.Process(self.process.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the worker, its work horse and its cron child at once, as a crash would."""
        if self.process and self.process.poll() is None:
            group = self._group()
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            psutil.wait_procs(group, timeout=10)

    def stop(self) -> None:
        """SIGTERM, and wait until every process of the group has gone: a scheduler child that
        outlived its worker could hold RQ's scheduler lock in the next test's Redis."""
        if self.process and self.process.poll() is None:
            group = self._group()
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            _, alive = psutil.wait_procs(group, timeout=10)
            for process in alive:
                process.kill()
            psutil.wait_procs(alive, timeout=5)


class GunicornProcess:
    """``gunicorn -c gunicorn.conf.py app:app`` with one worker and the test app's settings (plus ``env``),
    as a context manager that waits until it answers and stops it (SIGTERM) at the end."""

    def __init__(self, app, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**WorkerProcess(app.config["BROKER_TEST_CONFIG"]).env, "PORT": str(self.port)}
        self.env.update({"WEB_CONCURRENCY": "1", **env})
        self.output = tmp_path / "gunicorn.out"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> GunicornProcess:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{self.port}",
            "app:app",
        ]
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.output.read_text()
            try:
                requests.get(self.base + "/healthz", timeout=2)
                return self
            except requests.ConnectionError:
                assert time.monotonic() < deadline, self.output.read_text()
                time.sleep(0.2)

    def __exit__(self, *_exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(30)


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
