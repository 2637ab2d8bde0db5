"""Chat routes: ``POST /v1/chat/completions`` (OpenAI-compatible) and the seed's ``POST /v1/chat``."""

from __future__ import annotations

from flask import Response, g, jsonify

from broker import chat
from broker.api import bp, parse
from broker.api.openapi import operation
from broker.extensions import services
from broker.schemas import ChatCompletion, ChatCompletionRequest, SimpleChatRequest


def _respond(result: chat.ChatResponse) -> Response:
    if result.stream is not None:
        return Response(result.stream, mimetype="text/event-stream", headers=result.headers)
    response = jsonify(result.body)
    response.headers.update(result.headers)
    return response


@bp.post("/chat/completions")
@operation(
    summary="Create a chat completion (OpenAI-compatible)",
    description=(
        "`model` is `provider/model` or a bare name that maps to one provider. With `stream: true` the answer "
        "is Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`; with "
        "`stream_options.include_usage` the last chunk before it has empty `choices` and the usage (with "
        "`cost_credits`). The receipt at `GET /v1/requests/{X-Request-Id}` always has the cost."
    ),
    tag="Chat",
    body=ChatCompletionRequest,
    response=ChatCompletion,
    stream=True,
    errors=("400", "401", "402", "404", "413", "429", "502", "503", "504"),
    headers={"X-Credits-Charged": "Credits charged", "X-Credits-Remaining": "Balance after the charge"},
)
def chat_completions() -> Response:
    req = parse(ChatCompletionRequest)
    return _respond(chat.start(services().metering, g.caller, req, req.model, g.request_id))


@bp.post("/chat")
@operation(
    summary="Chat in the simpler shape (`provider` and `model` apart)",
    tag="Chat",
    body=SimpleChatRequest,
    response=ChatCompletion,
    stream=True,
    errors=("400", "401", "402", "404", "413", "429", "502", "503", "504"),
)
def chat_simple() -> Response:
    req = parse(SimpleChatRequest)
    return _respond(chat.start(services().metering, g.caller, req, req.qualified_model(), g.request_id))
