"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

For the anthropic SDK and Claude Code: the key comes as ``x-api-key`` (or a bearer token),
``anthropic-version`` is accepted, ``anthropic-beta`` flags are filtered (``broker.messages``),
and every error on these paths is in Anthropic's envelope (``broker.api.errors``).
"""

from __future__ import annotations

from flask import Response, g, jsonify, request

from broker import messages
from broker.api import bp, parse
from broker.api.openapi import operation
from broker.extensions import services
from broker.schemas import (
    AnthropicErrorResponse,
    AnthropicMessage,
    MessagesCountRequest,
    MessagesRequest,
    MessagesTokenCount,
)

ERRORS = ("400", "401", "402", "404", "413", "429", "502", "503", "504")


def _betas() -> list[str]:
    return request.headers.getlist("anthropic-beta")


@bp.post("/messages")
@operation(
    summary="Create a message (Anthropic's Messages API)",
    description=(
        "Anthropic's Messages request and response, for the `anthropic` SDK and Claude Code. `model` is the "
        "broker's id (`anthropic/claude-haiku-4-5`), a bare upstream name or a dated one "
        "(`claude-haiku-4-5-20251001`), or an OpenAI or Gemini model (translated). Anthropic models get the "
        "request as sent and answer as Anthropic does, with `stream: true` in Anthropic's named events. "
        'Errors use Anthropic\'s envelope `{"type": "error", "error": {"type", "message"}, "request_id"}`.'
    ),
    tag="Chat",
    body=MessagesRequest,
    response=AnthropicMessage,
    stream=True,
    errors=ERRORS,
    error_model=AnthropicErrorResponse,
    headers={"X-Credits-Charged": "Credits charged", "X-Credits-Remaining": "Balance after the charge"},
)
def create_message() -> Response:
    req = parse(MessagesRequest)
    result = messages.create(services().metering, g.caller, req, _betas(), g.request_id)
    if result.stream is not None:
        response = Response(result.stream, mimetype="text/event-stream", headers=result.headers)
    else:
        response = jsonify(result.body)
        response.headers.update(result.headers)
    response.headers["request-id"] = g.request_id
    return response


@bp.post("/messages/count_tokens")
@operation(
    summary="Count a message's input tokens (free)",
    description=(
        "Anthropic's count for Anthropic models (its `count_tokens` endpoint), the broker's estimate "
        "(about four bytes a token) for OpenAI and Gemini models. Nothing is charged."
    ),
    tag="Chat",
    body=MessagesCountRequest,
    response=MessagesTokenCount,
    errors=("400", "401", "404", "413", "429", "502", "503", "504"),
    error_model=AnthropicErrorResponse,
)
def count_message_tokens() -> Response:
    req = parse(MessagesCountRequest)
    response = jsonify(messages.count_tokens(services().metering, req, _betas()))
    response.headers["request-id"] = g.request_id
    return response
