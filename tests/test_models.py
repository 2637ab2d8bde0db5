"""``GET /v1/models`` and ``GET /v1/models/{id}`` as the official ``openai`` SDK calls them."""

from __future__ import annotations

from datetime import UTC, datetime

import openai
import pytest


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def test_the_list_holds_chat_models_and_kind_asks_for_media(app, live_server, tenant):
    client = sdk(live_server, tenant.key)
    listed = {m.id: m for m in client.models.list()}
    assert "openai/gpt-4o-mini" in listed and "demo/chat" in listed
    assert {m.kind for m in listed.values()} == {"chat"}  # the broker's extra field, kept by the SDK
    images = client.models.list(extra_query={"kind": "image"})
    assert {m.kind for m in images} == {"image"} and "openai/gpt-image-1" in {m.id for m in images}
    everything = {m.id for m in client.models.list(extra_query={"kind": "all"})}
    assert set(listed) < everything and "suno/V4_5ALL" in everything


def test_created_comes_from_the_price_table(app, live_server, tenant):
    row = app.extensions["broker"].prices.models["openai/gpt-4o-mini"]
    model = sdk(live_server, tenant.key).models.retrieve("openai/gpt-4o-mini")
    assert model.created == int(datetime.fromisoformat(row.effective_from).replace(tzinfo=UTC).timestamp())
    assert model.created > 1_600_000_000


def test_retrieve_takes_an_id_with_a_slash(live_server, tenant):
    model = sdk(live_server, tenant.key).models.retrieve("openai/gpt-4o-mini")
    assert model.id == "openai/gpt-4o-mini" and model.object == "model" and model.owned_by == "openai"
    assert model.pricing["input"] == "27"  # $0.15 per 1M × 1.8 ÷ $0.01


def test_an_unknown_model_is_a_404_the_sdk_raises_as_not_found(live_server, tenant):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk(live_server, tenant.key).models.retrieve("openai/no-such-model")
    assert raised.value.body["code"] == "model_not_found"


def test_a_bad_kind_is_a_400_naming_it(client, tenant):
    refused = client.get("/v1/models?kind=video", headers=tenant.headers)
    assert refused.status_code == 400 and refused.json["error"]["param"] == "kind"
