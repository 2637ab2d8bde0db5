"""Chat routes: ``POST /v1/chat/completions`` (OpenAI-compatible) and the seed's ``POST /v1/chat``."""

from __future__ import annotations

from flask import Response, g, jsonify

from broker import chat
from broker.api import bp, parse
from broker.extensions import services
from broker.schemas import ChatCompletionRequest, SimpleChatRequest


def _respond(result: chat.ChatResponse) -> Response:
    if result.stream is not None:
        return Response(result.stream, mimetype="text/event-stream", headers=result.headers)
    response = jsonify(result.body)
    response.headers.update(result.headers)
    return response


@bp.post("/chat/completions")
def chat_completions() -> Response:
    req = parse(ChatCompletionRequest)
    return _respond(chat.start(services().metering, g.caller, req, req.model, g.request_id))


@bp.post("/chat")
def chat_simple() -> Response:
    req = parse(SimpleChatRequest)
    return _respond(chat.start(services().metering, g.caller, req, req.qualified_model(), g.request_id))
