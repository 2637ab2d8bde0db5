"""Schemathesis against the app's own /openapi.json, in process (WSGI): no 5xx, schema-conformant answers.

Every operation of the document is fuzzed (examples, coverage and fuzzing phases; positive and negative
data) with every check schemathesis runs on a response: not_a_server_error, status_code_conformance,
content_type_conformance, response_schema_conformance, response_headers_conformance,
positive_data_acceptance, negative_data_rejection, missing_required_header, unsupported_method,
allow_header_conformance, ignored_auth, object_level_authorization, use_after_free,
ensure_resource_availability. Requests carry a funded tenant's key as ``Authorization: Bearer``; bodies
name ``demo/*`` models most of the time (chat also reaches the fake upstream's providers), and the
``{job_id}`` / ``{request_id}`` operations also get ids of real jobs and receipts. A second pass does the
same with the key limited to 3 requests a minute, so every operation must also document its 429.

The webhooks are in the document without a request body (they take the provider's raw, signed bytes),
so schemathesis only sends them empty bodies and odd methods; ``test_webhooks_refuse_unsigned_bodies``
fuzzes their bodies and signature headers directly: always a 400 ``bad_signature``, never a 5xx, and
nothing recorded.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from broker import create_app
from broker.jobs import run_media_job
from broker.models import Purchase, WebhookEvent
from tests.conftest import app_config, make_tenant
from tests.fakes.upstreams import FakeUpstream

CHAT_MODELS = ["demo/chat", "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5", "gemini/gemini-2.5-flash"]


def _load_schema(config: schemathesis.Config):
    # ``schemathesis.pytest.from_fixture`` would hand the test's own app to the loader, but in
    # schemathesis 4.32.5 it reads ``request.node._nodeid``, which pytest 9.2 no longer has
    # (AttributeError at run time). So the document is loaded at import from an app built only to
    # serve /openapi.json (the document is built from the routes, not from settings: no Redis, SQL or
    # upstream is touched), and every generated request goes to the test's ``app`` fixture instead.
    with tempfile.TemporaryDirectory(prefix="fuzz-openapi-") as tmp:
        path = Path(tmp)
        app = create_app(app_config(path, "redis://127.0.0.1:9/0", FakeUpstream(), f"sqlite:///{path / 'spec.db'}"))
        return schemathesis.openapi.from_wsgi("/openapi.json", app, config=config)


def _model_for(path: str, dictionary: str) -> dict:
    # 90% of generated bodies name a model of the right kind: the rest keep schemathesis' own strings
    # (unknown models: 404, wrong kind: 400).
    return {"include-path": path, "parameters": {"body.model": {"dictionary": dictionary, "probability": 0.9}}}


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240601,
        "generation": {
            "mode": "all",
            "max-examples": 25,
            "deterministic": True,
            # The key is sent explicitly (below); generated X-API-Key values would take precedence over
            # it in the broker (``presented_key``) and turn nearly every request into a 401.
            "with-security-parameters": False,
        },
        "checks": {
            # The request models carry rules JSON Schema does not express here: a model name must exist
            # and be of the route's kind, ``pack`` XOR ``amount_usd`` and a known pack id, music's
            # ``prompt`` or ``lyrics`` + ``style``, OpenAI-only fields refused for other providers
            # (README: ``400 unsupported_parameter``), webhooks need a signature: those answer the
            # documented 400. /v1/register answers its documented 422 to a string that is not an email
            # address. 402 depends on the balance, not on the request. Everything else keeps
            # schemathesis' defaults (2xx, 3xx, 401, 403, 404, 409, 429; 5xx is not_a_server_error's).
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "400", "401", "402", "403", "404", "409", "422", "429", "5xx"]
            },
        },
        "dictionaries": {
            "chat": {"values": CHAT_MODELS},
            "tts": {"values": ["demo/tts"]},
            "image": {"values": ["demo/image"]},
            "music": {"values": ["demo/music"]},
            "emails": {"values": ["ada@example.com", "grace.hopper@example.org", "x@example.net"]},
        },
        "operations": [
            _model_for("/v1/chat/completions", "chat"),
            _model_for("/v1/chat", "chat"),
            _model_for("/v1/tts", "tts"),
            _model_for("/v1/image", "image"),
            _model_for("/v1/music", "music"),
            {
                "include-path": "/v1/register",
                "parameters": {"body.email": {"dictionary": "emails", "probability": 0.5}},
            },
        ],
    }
)
schema = _load_schema(CONFIG)


# Ids of objects that exist in the current test's app, so the {job_id} and {request_id} operations are
# also fuzzed against real jobs and receipts (200 bodies checked against JobOut / Receipt / the binary
# content), not only against the 404 of a random id.
KNOWN: dict[str, list[str]] = {}


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    known = {name: KNOWN[name] for name in path_parameters or {} if KNOWN.get(name)}
    if not known:
        return st.just(path_parameters)
    real = st.fixed_dictionaries(
        {
            name: st.sampled_from(known[name]) if name in known else st.just(value)
            for name, value in path_parameters.items()
        }
    )
    return st.one_of(st.just(path_parameters), real)


SYNC_MEDIA_PATHS = {"/v1/audio/speech", "/v1/images/generations"}


@pytest.fixture
def funded(app):
    """A key with far more credits than a run spends, a receipt, and three jobs (two done, one queued).

    One per operation: each operation's test gets a fresh database and Redis from ``app``.
    """
    # Registration is limited to 5/hour per IP; fuzzing sends far more, and the 201 body (Registration)
    # would then never be checked. The limit is read from the config at each request.
    app.config["REGISTER_RATE_LIMIT"] = "10000/hour"
    tenant = make_tenant("1000000")
    client = app.test_client()
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16},
        headers=tenant.headers,
    )
    assert chat.status_code == 200, chat.get_data()
    jobs = []
    for path, body in [
        ("/v1/tts", {"model": "demo/tts", "text": "Hello there", "voice_id": "demo"}),
        ("/v1/image", {"model": "demo/image", "prompt": "a lighthouse", "n": 2}),
        ("/v1/music", {"model": "demo/music", "prompt": "a calm piano piece", "instrumental": True}),
    ]:
        response = client.post(path, json=body, headers=tenant.headers)
        assert response.status_code == 202, response.get_data()
        jobs.append(response.get_json())
    with app.app_context():
        for job in jobs[:2]:  # the worker's own entry point, in process; the music job stays queued
            assert run_media_job(job["id"]) == "succeeded"
    KNOWN["job_id"] = [job["id"] for job in jobs]
    KNOWN["request_id"] = [chat.headers["X-Request-Id"], *(job["request_id"] for job in jobs)]
    yield tenant
    KNOWN.clear()


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, app, funded, request):
    # Nothing is excluded: /v1/register needs no key (``security: []``) and the webhooks answer their
    # documented 400 to the unsigned, body-less requests schemathesis sends them.
    if case.path in SYNC_MEDIA_PATHS:
        # These answer once their job has run: a real worker runs it (without one they wait, then 504).
        request.getfixturevalue("worker")
    case.call_and_validate(app=app, headers=funded.headers)


@pytest.fixture
def rate_limited(app, funded):
    """The same key, limited to 3 requests a minute (the limits are read from the config at each request)."""
    app.config["DEFAULT_LIMITS"] = dataclasses.replace(app.config["DEFAULT_LIMITS"], per_minute=3)
    return funded


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_rate_limited_answers_are_documented(case, app, rate_limited):
    """Per-key limits apply to every /v1 route: past them, each operation must still answer a documented 429."""
    case.call_and_validate(app=app, headers=rate_limited.headers)


SIGNATURE_HEADERS = {"/webhooks/stripe": "Stripe-Signature", "/webhooks/coinbase": "X-CC-Webhook-Signature"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Header values as a client can send them: any text but CR/LF. The WSGI server hands the bytes on as
# latin-1, so non-ASCII characters reach the view as non-ASCII ``str``.
header_text = st.text(st.characters(blacklist_characters="\r\n"), max_size=80)
hex_digests = st.text("0123456789abcdef", min_size=64, max_size=64)
SIGNATURES = {
    "/webhooks/coinbase": st.none() | header_text | hex_digests,
    "/webhooks/stripe": st.none()
    | header_text
    | st.builds("t={},v1={}".format, st.integers(min_value=0, max_value=2**40), hex_digests | header_text),
}


@pytest.mark.parametrize("path", sorted(SIGNATURE_HEADERS))
def test_webhooks_refuse_unsigned_bodies(app, path):
    """Anyone can POST to a webhook: without the right signature the answer is a 400 and nothing changes."""
    client = app.test_client()

    @given(
        body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
        signature=SIGNATURES[path],
        content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream"]),
    )
    @example(
        body=b"{}", signature="t=1,v1=\u00e9" if path.endswith("stripe") else "\u00e9", content_type="application/json"
    )
    @settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(body: bytes, signature: str | None, content_type: str) -> None:
        headers = {"Content-Type": content_type}
        if signature is not None:
            headers[SIGNATURE_HEADERS[path]] = signature.encode("utf-8", "surrogatepass").decode("latin-1")
        response = client.post(path, data=body, headers=headers)
        assert response.status_code == 400, (signature, response.status_code, response.get_data()[:300])
        assert response.get_json()["error"]["code"] == "bad_signature"

    check()
    svc = app.extensions["broker"]
    session = svc.db()
    assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    assert session.scalar(select(func.count()).select_from(Purchase)) == 0
