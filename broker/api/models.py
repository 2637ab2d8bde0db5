"""``GET /v1/models`` and ``GET /v1/models/{id}`` in OpenAI's shape, with each model's prices in credits.

The list holds chat models unless ``kind`` asks for embeddings (``embedding``), media (``tts``,
``image``, ``music``) or ``all``. Model ids carry a slash (``openai/gpt-4o-mini``), so the retrieve route takes a path,
as the SDK's ``models.retrieve("openai/gpt-4o-mini")`` sends it. ``created`` is the Unix time
of the row's ``effective_from`` date in the price table (when its price was last checked).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from flask import jsonify
from pydantic import BaseModel, ConfigDict

from broker import pricing
from broker.api import bp, parse_query
from broker.api.openapi import operation
from broker.errors import NotFound
from broker.extensions import Services, services
from broker.pricing import ModelPrice
from broker.schemas import ModelInfo, ModelList


class ModelsQuery(BaseModel):
    """Query of ``GET /v1/models``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["chat", "embedding", "tts", "image", "music", "all"] = "chat"


def _serves(svc: Services, price: ModelPrice) -> bool:
    by_kind = {
        "chat": svc.providers,
        "embedding": {name for name, provider in svc.providers.items() if hasattr(provider, "embed")},
        "tts": svc.media.speech,
        "image": svc.media.images,
        "music": svc.media.music,
    }
    return price.provider in by_kind[price.kind]


def _created(price: ModelPrice) -> int:
    return int(datetime.fromisoformat(price.effective_from).replace(tzinfo=UTC).timestamp())


def _model_json(svc: Services, price: ModelPrice) -> dict:
    m = svc.metering
    return {
        "id": price.id,
        "object": "model",
        "created": _created(price),
        "owned_by": price.provider,
        "kind": price.kind,
        "max_output_tokens": price.max_output_tokens or None,
        "context_window": price.context_window or None,
        "pricing": {"markup": str(m.markup), **pricing.price_summary(price, m.markup, m.credit_usd)},
    }


@bp.get("/models")
@operation(
    summary="Models you can call, with prices in credits",
    description="Chat models by default; `kind` lists another kind (`embedding`, `tts`, `image`, `music`) or `all`.",
    tag="Account",
    query=ModelsQuery,
    response=ModelList,
    errors=("400", "401", "429", "503"),
)
def models():
    query = parse_query(ModelsQuery)
    svc = services()
    data = [
        _model_json(svc, price)
        for price in svc.prices.models.values()
        if (query.kind == "all" or price.kind == query.kind) and _serves(svc, price)
    ]
    return jsonify({"object": "list", "data": data})


@bp.get("/models/<path:model_id>")
@operation(
    summary="One model, with its prices in credits",
    tag="Account",
    response=ModelInfo,
    errors=("401", "404", "429", "503"),
)
def model(model_id: str):
    svc = services()
    price = svc.prices.models.get(model_id)
    if price is None or not _serves(svc, price):
        raise NotFound(f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return jsonify(_model_json(svc, price))
