"""Production refuses a weak SECRET_KEY, and no Host a client sends chooses the links the app builds.

Each app here is configured as production runs (``BROKER_ENV=production``), on the test
services (real Redis-compatible server, SQLite, fake Stripe), and attacked with the headers an
attacker controls: ``Host`` and ``X-Forwarded-Host``.
"""

from __future__ import annotations

import secrets
import shutil

import pytest
import redis

from broker import create_app
from tests.conftest import CURRENT, RAPIDAPI_SECRET, app_config, make_tenant

STRONG_KEY = secrets.token_urlsafe(48)
PUBLIC = "https://broker.example"
RAPID = {"X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET, "X-RapidAPI-User": "alice_dev", "X-RapidAPI-Subscription": "PRO"}


@pytest.fixture
def production(tmp_path, monkeypatch, redis_server, upstream, stripe_fake, migrated_db):
    """``production(**overrides)``: a production app on the test services.

    ``PUBLIC_URL`` and ``TRUSTED_HOSTS`` go through the environment, as an operator sets them.
    """
    redis.Redis(port=redis_server.port).flushall()
    upstream.reset()
    stripe_fake.reset()
    built = []

    def build(**overrides):
        shutil.copy(migrated_db, tmp_path / "broker.db")
        db_url = f"sqlite:///{tmp_path / 'broker.db'}"
        settings = app_config(tmp_path, redis_server.url, upstream, db_url, stripe_fake.url)
        for name in ("PUBLIC_URL", "TRUSTED_HOSTS"):
            monkeypatch.setenv(name, str(overrides.pop(name, "")))
        settings.update({"BROKER_ENV": "production", "SECRET_KEY": STRONG_KEY, **overrides})
        app = create_app(settings)
        built.append(app)
        CURRENT["app"] = app
        return app

    yield build
    CURRENT.pop("app", None)
    for app in built:
        app.extensions["broker"].db.remove()
        app.extensions["broker"].engine.dispose()


# -- item 13: SECRET_KEY --------------------------------------------------------------


@pytest.mark.parametrize(
    "weak",
    ["x", "dev-only-insecure-secret", "a" * 64, "ab" * 40, secrets.token_urlsafe(16), "0123456789" * 3 + "0"],
    ids=["one-letter", "dev-default", "one-char-repeated", "two-chars-repeated", "short-random", "31-chars"],
)
def test_production_refuses_a_weak_secret_key_and_says_how_to_make_one(production, weak):
    with pytest.raises(RuntimeError, match="at least 32 characters, at least 10 of them different") as refused:
        production(SECRET_KEY=weak, PUBLIC_URL=PUBLIC)
    message = str(refused.value)
    assert 'python -c "import secrets; print(secrets.token_urlsafe(48))"' in message
    assert weak not in message  # the refused secret is not repeated into logs
    # What the message says to run makes a key production starts with.
    app = production(SECRET_KEY=secrets.token_urlsafe(48), PUBLIC_URL=PUBLIC)
    assert app.test_client().get("/healthz", base_url=PUBLIC).status_code == 200


# -- item 15: the Host header -----------------------------------------------------------


def test_production_refuses_to_start_with_neither_public_url_nor_trusted_hosts(production):
    with pytest.raises(RuntimeError, match="PUBLIC_URL .* or TRUSTED_HOSTS must be set"):
        production()


@pytest.mark.parametrize("url", ["broker.example", "ftp://broker.example", "https://"])
def test_a_public_url_without_scheme_or_host_is_refused_at_start(production, url):
    with pytest.raises(RuntimeError, match="PUBLIC_URL must be an http"):
        production(PUBLIC_URL=url)


def test_an_untrusted_host_never_reaches_the_stripe_return_url(production, stripe_fake):
    app = production(PUBLIC_URL=PUBLIC)
    client = app.test_client()
    tenant = make_tenant()
    attack = client.post("/v1/checkout", json={"pack": "usd5"}, headers=tenant.headers, base_url="http://evil.example")
    assert attack.status_code == 400
    assert attack.json["error"]["type"] == "invalid_request_error"
    assert "evil.example" not in str([s["success_url"] for s in stripe_fake.sessions.values()])
    assert stripe_fake.sessions == {}
    page = client.post("/dashboard/billing/checkout", data={"pack": "usd5"}, base_url="http://evil.example")
    assert page.status_code == 400 and stripe_fake.sessions == {}

    honest = client.post("/v1/checkout", json={"pack": "usd5"}, headers=tenant.headers, base_url=PUBLIC)
    assert honest.status_code == 200, honest.json
    created = stripe_fake.sessions[honest.json["id"]]
    assert created["success_url"].startswith(PUBLIC + "/dashboard/billing/return?")
    assert created["cancel_url"].startswith(PUBLIC + "/")


def test_with_trusted_hosts_only_the_return_url_is_on_a_trusted_host(production, stripe_fake):
    app = production(TRUSTED_HOSTS="broker.example, .broker.example")
    client = app.test_client()
    tenant = make_tenant()
    attack = client.post("/v1/checkout", json={"pack": "usd5"}, headers=tenant.headers, base_url="https://evil.example")
    assert attack.status_code == 400 and stripe_fake.sessions == {}
    honest = client.post(
        "/v1/checkout", json={"pack": "usd5"}, headers=tenant.headers, base_url="https://pay.broker.example"
    )
    assert honest.status_code == 200, honest.json
    assert stripe_fake.sessions[honest.json["id"]]["success_url"].startswith("https://pay.broker.example/dashboard/")


@pytest.mark.parametrize("proxy_hops", [0, 1])
def test_docs_and_landing_examples_show_the_public_url_whatever_host_is_sent(production, proxy_hops):
    app = production(PUBLIC_URL=PUBLIC, TRUSTED_HOSTS=".broker.example", PROXY_HOPS=proxy_hops)
    client = app.test_client()
    for path in ("/docs", "/"):
        assert client.get(path, base_url="http://evil.example").status_code == 400
        page = client.get(path, base_url="http://www.broker.example", headers={"X-Forwarded-Host": "evil.example"})
        if proxy_hops:  # the proxy is trusted to forward the host, and this one is not ours
            assert page.status_code == 400
            continue
        # Without a trusted proxy X-Forwarded-Host changes nothing; the links use PUBLIC_URL, not the Host.
        text = page.get_data(as_text=True)
        assert page.status_code == 200
        assert f"{PUBLIC}/v1" in text
        assert "evil.example" not in text and "www.broker.example" not in text


def test_only_health_probes_are_served_under_a_pod_address(production):
    app = production(PUBLIC_URL=PUBLIC)
    client = app.test_client()
    for host in ("http://10.1.2.3:8000", "http://localhost"):
        assert client.get("/healthz", base_url=host).status_code == 200
        assert client.get("/readyz", base_url=host).status_code == 200
        assert client.get("/docs", base_url=host).status_code == 400
        refused = client.get("/v1/models", base_url=host)
        assert refused.status_code == 400 and refused.json["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("proxy_hops", [0, 1])
def test_rapidapi_with_its_proxy_secret_is_served_under_its_gateway_host(production, proxy_hops):
    app = production(TRUSTED_HOSTS="broker.example", PROXY_HOPS=proxy_hops)
    client = app.test_client()
    gateway = "ai-broker.p.rapidapi.com"
    # RapidAPI's proxy names its gateway in Host, or in X-Forwarded-Host behind a proxy of ours.
    if proxy_hops:
        sent = {"base_url": "http://broker.example", "headers": {"X-Forwarded-Host": gateway}}
    else:
        sent = {"base_url": f"http://{gateway}", "headers": {}}
    served = client.get("/v1/balance", base_url=sent["base_url"], headers={**sent["headers"], **RAPID})
    assert served.status_code == 200, served.json
    # Admitted under our own host: even the docs it might fetch link to us, not to the gateway it named.
    docs = client.get("/docs", base_url=sent["base_url"], headers={**sent["headers"], **RAPID})
    assert docs.status_code == 200 and gateway not in docs.get_data(as_text=True)
    assert "http://broker.example/v1/" in docs.get_data(as_text=True)
    # The same host with a guessed secret is an untrusted host like any other.
    guessed = {**sent["headers"], **RAPID, "X-RapidAPI-Proxy-Secret": "guess"}
    assert client.get("/v1/balance", base_url=sent["base_url"], headers=guessed).status_code == 400
