"""``POST /v1/responses`` and ``GET /v1/responses/{id}``: OpenAI's Responses API for OpenAI models."""

from __future__ import annotations

from flask import Response, g, jsonify

from broker import responses
from broker.api import bp, parse
from broker.api.openapi import operation
from broker.extensions import services
from broker.schemas import ResponseObject, ResponsesRequest


@bp.post("/responses")
@operation(
    summary="Create a response (OpenAI's Responses API, OpenAI models)",
    description=(
        "OpenAI's request and answer, passed through for `openai/…` models and metered from `usage` (the "
        "answer's `usage` has `cost_credits`). With `stream: true` the answer is OpenAI's named Server-Sent "
        "Events as sent, ending with `response.completed` (or `response.incomplete` / `response.failed`), "
        "whose usage is what is charged. Stored responses are bound to your account: `previous_response_id` "
        "and input items given by `id` must be yours (else `404`). Refused with `400`: other providers' "
        "models, built-in tools other than `function` and `custom`, `background: true`, `conversation`, "
        "`prompt`, uploaded `file_id`s."
    ),
    tag="Chat",
    body=ResponsesRequest,
    response=ResponseObject,
    stream=True,
    errors=("400", "401", "402", "404", "413", "429", "502", "503", "504"),
    headers={"X-Credits-Charged": "Credits charged", "X-Credits-Remaining": "Balance after the charge"},
)
def create_response() -> Response:
    req = parse(ResponsesRequest)
    svc = services()
    result = responses.start(svc.metering, svc.redis, g.caller, req, g.request_id)
    if result.stream is not None:
        return Response(result.stream, mimetype="text/event-stream", headers=result.headers)
    response = jsonify(result.body)
    response.headers.update(result.headers)
    return response


@bp.get("/responses/<response_id>")
@operation(
    summary="Retrieve a stored response of yours",
    description="Free. A response another account made, one stored with `store: false`, or an unknown id is `404`.",
    tag="Chat",
    response=ResponseObject,
    errors=("401", "404", "429", "502", "503"),
)
def get_response(response_id: str) -> Response:
    svc = services()
    return jsonify(responses.retrieve(svc.metering, svc.redis, g.caller, response_id))
