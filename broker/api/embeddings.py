"""``POST /v1/embeddings`` (OpenAI-compatible) for OpenAI and Gemini embedding models."""

from __future__ import annotations

from flask import Response, g, jsonify

from broker import embeddings
from broker.api import bp, parse
from broker.api.openapi import operation
from broker.extensions import services
from broker.schemas import EmbeddingList, EmbeddingRequest


@bp.post("/embeddings")
@operation(
    summary="Create embeddings (OpenAI-compatible)",
    description=(
        "OpenAI's request and answer for `openai/text-embedding-3-small`, `openai/text-embedding-3-large` and "
        "`gemini/gemini-embedding-001` (Gemini's `batchEmbedContents`). `input` is a string, a list of strings or "
        "(OpenAI models) token arrays; `dimensions` shortens the vectors; `encoding_format: base64` gives each "
        "vector as base64 of little-endian float32. Charged from OpenAI's reported tokens; Gemini reports none, "
        "so its count is the broker's estimate (about 4 bytes a token), flagged `estimated` in the receipt."
    ),
    tag="Embeddings",
    body=EmbeddingRequest,
    response=EmbeddingList,
    errors=("400", "401", "402", "404", "413", "429", "502", "503", "504"),
    headers={"X-Credits-Charged": "Credits charged", "X-Credits-Remaining": "Balance after the charge"},
)
def create_embeddings() -> Response:
    req = parse(EmbeddingRequest)
    result = embeddings.start(services().metering, g.caller, req, g.request_id)
    response = jsonify(result.body)
    response.headers.update(result.headers)
    return response
