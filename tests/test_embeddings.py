"""``POST /v1/embeddings`` with the official openai SDK: OpenAI and Gemini models, charged to the micro-credit."""

from __future__ import annotations

import base64
import json
import math
import struct
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.conftest import assert_invariant, make_tenant
from tests.fakes.upstreams import Reply, fake_embedding

PRICES = json.loads((Path(__file__).parent.parent / "broker" / "prices.json").read_text())["models"]
MARKUP = Decimal("1.8")
CREDIT_USD = Decimal("0.01")


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def ucr_for(model: str, tokens: int) -> int:
    """The charge computed from the price file, independently of the broker."""
    usd = tokens * Decimal(PRICES[model]["input"]) / Decimal(1_000_000)
    return math.ceil(usd * MARKUP / CREDIT_USD * 1_000_000)


def credits(ucr: int) -> str:
    return f"{ucr // 1_000_000}.{ucr % 1_000_000:06d}"


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def receipt(client, tenant, raw) -> dict:
    return client.get(f"/v1/requests/{raw.headers['X-Request-Id']}", headers=tenant.headers).json


@pytest.mark.parametrize("model", ["openai/text-embedding-3-small", "openai/text-embedding-3-large"])
def test_openai_embedding_is_charged_from_the_reported_tokens(model, app, live_server, tenant, upstream, client):
    upstream.queue(Reply(input_tokens=7))
    before = balance(app, tenant)
    raw = sdk(live_server, tenant.key).embeddings.with_raw_response.create(
        model=model, input="The quick brown fox jumped over the lazy dog", encoding_format="float"
    )
    result = raw.parse()
    want = ucr_for(model, 7)

    assert before - balance(app, tenant) == want
    assert raw.headers["X-Credits-Charged"] == credits(want)
    assert result.usage.prompt_tokens == 7 and result.usage.total_tokens == 7
    assert result.usage.model_extra["cost_credits"] == float(credits(want))
    assert result.model == model
    full = 1536 if model.endswith("small") else 3072
    assert result.data[0].embedding == fake_embedding("The quick brown fox jumped over the lazy dog", full)
    sent = upstream.requests[-1]
    assert sent.path == "/v1/embeddings" and sent.json["model"] == model.split("/")[1]
    got = receipt(client, tenant, raw)
    assert got["endpoint"] == "embeddings" and got["charged_ucr"] == want
    assert got["tokens"]["input"] == 7 and got["tokens"]["output"] == 0
    assert got["flags"] == {"estimated": False, "capped": False}
    assert_invariant(app)


def test_sdk_default_base64_decodes_to_the_same_floats_and_batches_keep_their_order(app, live_server, tenant, upstream):
    texts = ["first input", "second, longer input", "третий"]
    upstream.queue(Reply(input_tokens=5))
    before = balance(app, tenant)
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    result = sdk(live_server, tenant.key).embeddings.create(model="openai/text-embedding-3-small", input=texts)
    assert upstream.requests[-1].json["encoding_format"] == "base64"
    assert [d.index for d in result.data] == [0, 1, 2]
    for text, item in zip(texts, result.data, strict=True):
        assert item.embedding == fake_embedding(text, 1536)
    assert result.usage.prompt_tokens == 15
    assert before - balance(app, tenant) == ucr_for("openai/text-embedding-3-small", 15)
    assert_invariant(app)


def test_dimensions_are_passed_to_openai_and_token_arrays_are_taken(app, live_server, tenant, upstream):
    client = sdk(live_server, tenant.key)
    short = client.embeddings.create(
        model="openai/text-embedding-3-large", input="shorten me", dimensions=256, encoding_format="float"
    )
    assert upstream.requests[-1].json["dimensions"] == 256
    assert len(short.data[0].embedding) == 256

    before = balance(app, tenant)
    tokens = client.embeddings.create(
        model="openai/text-embedding-3-small", input=[[1212, 318, 257], [1332, 13]], encoding_format="float"
    )
    assert upstream.requests[-1].json["input"] == [[1212, 318, 257], [1332, 13]]
    assert tokens.usage.prompt_tokens == 5  # the fake counts token arrays exactly
    assert tokens.data[1].embedding == fake_embedding("tokens:1332,13", 1536)
    assert before - balance(app, tenant) == ucr_for("openai/text-embedding-3-small", 5)
    assert_invariant(app)


def test_gemini_embeddings_through_batch_embed_contents_charged_at_the_documented_estimate(
    app, live_server, tenant, upstream, client
):
    texts = ["a" * 10, "b" * 3, "ü" * 5]  # 10, 3 and 10 bytes: 3 + 1 + 3 estimated tokens
    before = balance(app, tenant)
    raw = sdk(live_server, tenant.key).embeddings.with_raw_response.create(
        model="gemini/gemini-embedding-001", input=texts, dimensions=768, encoding_format="float"
    )
    result = raw.parse()
    sent = upstream.requests[-1]
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert sent.json == {
        "requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": t}]}, "outputDimensionality": 768}
            for t in texts
        ]
    }
    for text, item in zip(texts, result.data, strict=True):
        assert item.embedding == fake_embedding(text, 768)
    want = ucr_for("gemini/gemini-embedding-001", 7)
    assert result.usage.prompt_tokens == 7
    assert before - balance(app, tenant) == want
    got = receipt(client, tenant, raw)
    assert got["charged_ucr"] == want and got["flags"]["estimated"] is True and got["provider"] == "gemini"
    assert_invariant(app)


def test_gemini_base64_is_little_endian_float32_of_the_floats(app, live_server, tenant, upstream):
    client = sdk(live_server, tenant.key)
    raw = client.embeddings.with_raw_response.create(
        model="gemini/gemini-embedding-001", input="hello", encoding_format="base64"
    )
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    values = struct.unpack("<3072f", base64.b64decode(encoded))
    assert list(values) == fake_embedding("hello", 3072)
    # The SDK's own decoding of the default (base64) gives the same floats.
    assert client.embeddings.create(model="gemini/gemini-embedding-001", input="hello").data[0].embedding == list(
        values
    )
    assert_invariant(app)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gemini/gemini-embedding-001", "input": [[1, 2, 3]]}, "input"),
        ({"model": "gemini/gemini-embedding-001", "input": ["x"] * 101}, "input"),
        ({"model": "openai/text-embedding-3-small", "input": ""}, "input"),
        ({"model": "openai/text-embedding-3-small", "input": "x", "dimensions": 1537}, "dimensions"),
        ({"model": "openai/gpt-4o-mini", "input": "x"}, "model"),
        ({"model": "openai/text-embedding-3-small", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_refusals_hold_and_call_nothing(body, param, app, client, tenant, upstream):
    before = balance(app, tenant)
    response = client.post("/v1/embeddings", json=body, headers=tenant.headers)
    assert response.status_code == 400, response.json
    assert response.json["error"]["param"] == param
    assert upstream.requests == []
    assert balance(app, tenant) == before
    assert app.extensions["broker"].ledger.snapshot(tenant.account_id)["held"] == 0
    assert_invariant(app)


def test_provider_failure_releases_the_hold_and_too_little_credit_is_a_402(app, live_server, tenant, upstream):
    upstream.queue(*[Reply(status=500)] * 3)  # the first try and the broker's two retries
    before = balance(app, tenant)
    with pytest.raises(openai.APIStatusError) as failed:
        sdk(live_server, tenant.key).embeddings.create(model="openai/text-embedding-3-small", input="x")
    assert failed.value.status_code == 502
    assert balance(app, tenant) == before

    poor = make_tenant("0.000001")
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(live_server, poor.key).embeddings.create(model="openai/text-embedding-3-large", input="x" * 1000)
    assert refused.value.status_code == 402
    assert_invariant(app)


def test_models_list_embedding_kind_with_prices(client, tenant):
    listed = client.get("/v1/models?kind=embedding", headers=tenant.headers).json["data"]
    ids = {m["id"] for m in listed}
    assert ids == {"openai/text-embedding-3-small", "openai/text-embedding-3-large", "gemini/gemini-embedding-001"}
    small = next(m for m in listed if m["id"] == "openai/text-embedding-3-small")
    assert small["kind"] == "embedding"
    assert small["pricing"]["unit"] == "credits per 1M tokens"
    assert Decimal(small["pricing"]["input"]) == Decimal("0.02") * MARKUP / CREDIT_USD
    assert "openai/text-embedding-3-small" not in {
        m["id"] for m in client.get("/v1/models", headers=tenant.headers).json["data"]
    }


def test_marketplace_callers_are_metered_not_charged(app, client, upstream):
    from tests.conftest import RAPIDAPI_SECRET

    rapid = {
        "X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET,
        "X-RapidAPI-User": "embedder",
        "X-RapidAPI-Subscription": "PRO",
    }
    upstream.queue(Reply(input_tokens=30))
    response = client.post(
        "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "x"}, headers=rapid
    )
    assert response.status_code == 200 and response.headers["X-Credits-Charged"] == "0.000000"
    usage = client.get("/v1/usage", headers=rapid).json["data"][0]
    assert usage["endpoint"] == "embeddings" and usage["charged_ucr"] == 0 and usage["tokens"]["input"] == 30
    assert usage["detail"]["plan"] == "PRO" and usage["provider_cost_usd"] == "0.0000006"  # not "6E-7"
    assert_invariant(app)
