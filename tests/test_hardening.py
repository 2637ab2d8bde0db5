"""Client-triggered 500s become clear 4xx answers: deep JSON, absurd spend caps, foreign Stripe sessions, long URLs."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from broker.models import ApiKey, WebhookEvent
from tests.conftest import COINBASE_WEBHOOK_SECRET, STRIPE_WEBHOOK_SECRET, assert_invariant
from tests.fakes.stripe_api import coinbase_signature, stripe_webhook
from tests.test_dashboard import member  # noqa: F401  (a fixture)

DEEP = b"[" * 3000  # ~3 KB: enough to exhaust Python's recursion limit in any JSON parser built on recursion


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/chat", "/v1/checkout", "/v1/register", "/v1/tts", "/v1/image"]
)
def test_deeply_nested_json_is_a_400_and_charges_nothing(app, client, tenant, path):
    start = balance(app, tenant)
    body = b'{"model": "demo/chat", "messages": ' + DEEP + b'"x"' + b"]" * 3000 + b"}"
    for data in (DEEP, body):
        response = client.post(path, data=data, headers={**tenant.headers, "Content-Type": "application/json"})
        assert response.status_code == 400, response.get_data()[:300]
        assert response.json["error"]["code"] == "invalid_json"
        assert response.json["error"]["type"] == "invalid_request_error"
    assert balance(app, tenant) == start
    assert_invariant(app)


def test_deeply_nested_signed_coinbase_body_is_a_400(client):
    body = b'{"event": ' + DEEP
    headers = {
        "Content-Type": "application/json",
        "X-CC-Webhook-Signature": coinbase_signature(body, COINBASE_WEBHOOK_SECRET),
    }
    response = client.post("/webhooks/coinbase", data=body, headers=headers)
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("cap", ["1e30", "-5", "0", "Infinity", "NaN", "1000000.000001", "0.0000001", "lots"])
def test_absurd_spend_cap_in_the_dashboard_is_a_422_and_stores_nothing(app, client, member, cap):  # noqa: F811
    tenant, token = member
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    response = client.post(f"/dashboard/keys/{tenant.key_id}/limits", data={"credits_per_day": cap}, headers=hx)
    assert response.status_code == 422  # the form with its error, which htmx swaps in
    assert "at most 1,000,000" in response.get_data(as_text=True)
    session = app.extensions["broker"].db()
    session.expire_all()
    assert session.get(ApiKey, tenant.key_id).spend_per_day_ucr is None


def test_spend_cap_at_the_maximum_is_stored(app, client, member):  # noqa: F811
    tenant, token = member
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    response = client.post(f"/dashboard/keys/{tenant.key_id}/limits", data={"credits_per_day": "1000000"}, headers=hx)
    assert response.status_code == 200
    session = app.extensions["broker"].db()
    session.expire_all()
    assert session.get(ApiKey, tenant.key_id).spend_per_day_ucr == 1_000_000 * 1_000_000


def test_non_numeric_rate_limit_in_the_dashboard_names_the_bound(client, member):  # noqa: F811
    tenant, token = member
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    response = client.post(f"/dashboard/keys/{tenant.key_id}/limits", data={"per_minute": "1e30"}, headers=hx)
    assert response.status_code == 422 and "Requests a minute must be a whole number" in response.get_data(as_text=True)


@pytest.mark.parametrize("cap", ["1e30", "-5", "Infinity"])
def test_absurd_spend_cap_in_the_cli_is_refused_and_stores_nothing(app, runner, tenant, cap):
    result = runner.invoke(args=["broker", "limit-key", str(tenant.key_id), "--credits-per-day", cap])
    assert result.exit_code == 2 and "at most 1,000,000" in result.output
    assert not isinstance(result.exception, (OverflowError, ValueError))
    session = app.extensions["broker"].db()
    session.expire_all()
    assert session.get(ApiKey, tenant.key_id).spend_per_day_ucr is None


def test_cli_refuses_a_negative_rate_limit(runner, tenant):
    result = runner.invoke(args=["broker", "limit-key", str(tenant.key_id), "--per-minute", "-1"])
    assert result.exit_code == 2


def test_signed_stripe_event_about_a_session_that_is_not_ours_is_a_200_and_logged(app, client, caplog):
    event = {
        "id": "evt_not_ours_1",
        "object": "event",
        "type": "checkout.session.completed",
        "created": 1,
        "data": {"object": {"id": "cs_test_someone_elses_session", "object": "checkout.session"}},
    }
    body, headers = stripe_webhook(event, STRIPE_WEBHOOK_SECRET)
    with caplog.at_level("INFO"):
        response = client.post("/webhooks/stripe", data=body, headers=headers)
    assert response.status_code == 200 and response.json["outcome"] == "not ours"
    messages = [r.getMessage() for r in caplog.records]
    assert "checkout session not found" in messages and "stripe event" in messages
    session = app.extensions["broker"].db()
    assert session.scalar(select(WebhookEvent.outcome).where(WebhookEvent.event_id == "evt_not_ours_1")) == "not ours"


def test_return_page_for_an_unknown_session_is_a_404(client, member):  # noqa: F811
    response = client.get("/dashboard/billing/return?session_id=cs_test_made_up_by_a_visitor")
    assert response.status_code == 404


def test_url_over_4_kb_is_a_json_414_on_the_api_and_a_414_elsewhere(client, tenant):
    long_query = "q=" + "a" * 4100
    api = client.get(f"/v1/balance?{long_query}", headers=tenant.headers)
    assert api.status_code == 414 and api.json["error"]["code"] == "request_uri_too_long"
    assert "4096 bytes" in api.json["error"]["message"]
    unauthenticated = client.get("/v1/" + "x" * 4200)
    assert unauthenticated.status_code == 414 and unauthenticated.json["error"]["code"] == "request_uri_too_long"
    page = client.get(f"/docs?{long_query}")
    assert page.status_code == 414
    assert client.get("/v1/balance?q=" + "a" * 3900, headers=tenant.headers).status_code == 200


def test_openapi_documents_the_414_on_every_operation(client):
    spec = client.get("/openapi.json").json
    assert "4,096 bytes" in spec["info"]["description"] and "8,190" in spec["info"]["description"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert "414" in op["responses"], (path, method)


def test_compose_runs_redis_with_a_password_and_private():
    """Whoever writes to Redis can enqueue any function for the workers: compose's Redis needs a password."""
    import yaml

    from broker import ROOT

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_service = services["redis"]
    assert "ports" not in redis_service  # reachable from the compose network only
    command = redis_service["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert redis_service["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert "PONG" in " ".join(redis_service["healthcheck"]["test"])
    for name in ("web", "worker", "cron", "migrate"):
        url = services[name]["environment"]["REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0"), (name, url)
