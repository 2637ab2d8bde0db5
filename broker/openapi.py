"""The OpenAPI 3.1 document, built from the routes themselves and the pydantic models that validate them.

Each /v1 view is decorated with ``operation(...)`` naming its body, query and response
models; ``build`` walks the URL map, so a route without a description, or a described
path that is not routed, cannot go unnoticed (a test checks both). Each answer carries
its model's example (``broker.schemas.EXAMPLES``) and the headers every /v1 answer has.
Payment webhooks are the operator's, not the customer's: they are marked
``x-audience: operator``.

Both the API (``broker.api``, which decorates its views) and the site (``broker.web``,
which serves the document and the reference page) use this module; it imports neither.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Flask
from pydantic import BaseModel

from broker.schemas import EXAMPLES, ErrorResponse

ERRORS = {
    "400": "Invalid request: `error.param` names the field.",
    "401": "Missing, malformed, unknown, revoked or expired API key.",
    "402": "Insufficient credits: nothing was called or charged.",
    "403": "Not allowed: a marketplace caller on a route outside the listing, or a signed link that was altered "
    "or has expired.",
    "404": "No such model, route or object (another account's objects are not found either).",
    "409": "The object is in a state that does not allow this, or an `Idempotency-Key` was reused with another "
    "body or while its first request still runs.",
    "413": "Request body too large.",
    "414": "The URL (path and query) is longer than 4,096 bytes; nothing was done.",
    "422": "The request is well-formed but a value is not acceptable (e.g. an invalid email address).",
    "429": "Rate limited: retry after `Retry-After` seconds.",
    "502": "The provider failed; the hold was released.",
    "503": "The provider, or the broker's own store (Redis, the database), is unavailable; nothing was charged — "
    "except with `error.code` `outcome_unknown`: the store failed after the request's hold or settle was sent, so "
    "whether it was charged is unknown. `request_id` (also `X-Request-Id`) names it: once the service is back, "
    "`GET /v1/requests/{request_id}` shows its receipt and what was charged (a `404`: nothing was); a retry "
    "with the same `Idempotency-Key` is answered `409` and not run again (`x-should-retry: false` keeps the SDKs "
    "from retrying it by themselves).",
    "504": "The provider timed out; the hold was released. On the synchronous media routes, `job_still_running`: "
    "the wait ran out, the job named in `error.job_id` goes on and is charged; retry with the same "
    "`Idempotency-Key` for its result.",
}

# Headers of every answer, of every answer to an API key, and of a POST (``broker.api``).
REQUEST_ID_HEADER = {
    "X-Request-Id": "This request's id; for a metered request `GET /v1/requests/{request_id}` gives its receipt."
}
RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": "Requests this key may make a minute (a day, once the daily limit is what binds).",
    "X-RateLimit-Remaining": "Requests left in that minute (or day).",
    "X-RateLimit-Reset": "Seconds until that count starts again.",
}
RETRY_AFTER_HEADER = {"Retry-After": "Seconds to wait before retrying."}
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Any string of up to 255 characters, new for each distinct request. A retry with the same key "
    "and body within 24 hours gets the first answer again (`Idempotent-Replayed: true`) and is charged once; "
    "the same key with another body, or while the first is still running, is a `409`.",
    # No minLength: an empty header is the same as none (no idempotency), not an error.
    "schema": {"type": "string", "maxLength": 255},
}
# What the metering headers mean, whichever view sends them (its own words are the fallback).
CREDIT_HEADERS = {
    "X-Credits-Charged": "Credits this request was charged, with six decimals (e.g. `0.001539`): the receipt's "
    "`credits_charged`.",
    "X-Credits-Remaining": "Your available balance after this request, in credits.",
    "X-Credits-Held": "Credits held for the job until it ends; what it does not cost comes back then.",
}
REPLAYED_HEADER = {"Idempotent-Replayed": "`true` when this is the stored answer to an earlier request with this key."}
OPERATOR_PATHS = ("/webhooks/",)


@dataclass
class Operation:
    summary: str
    tag: str
    description: str = ""
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    content_type: str = "application/json"
    stream: bool = False
    errors: tuple[str, ...] = ("400", "401", "429", "503")
    headers: dict[str, str] = field(default_factory=dict)
    auth: bool = True
    error_model: type[BaseModel] = ErrorResponse  # the Messages API answers in Anthropic's envelope


def operation(**kwargs) -> Callable:
    """Describe a view for the OpenAPI document (see ``Operation`` for the fields)."""

    def decorate(view: Callable) -> Callable:
        view.openapi = Operation(**kwargs)
        return view

    return decorate


def _path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def _schema(model: type[BaseModel], components: dict) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _query_parameters(model: type[BaseModel]) -> list[dict]:
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "description": prop.get("description", ""),
            "schema": {k: v for k, v in prop.items() if k != "description"},
        }
        for name, prop in schema["properties"].items()
    ]


# One event of a streamed answer (``stream: true``), as OpenAPI 3.1 tools read a text/event-stream
# schema (per event; 3.2 calls it itemSchema): its data is a JSON chunk, or "[DONE]" at the end.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "contentMediaType": "application/json"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}


def _operation(op: Operation, path: str, method: str, components: dict) -> dict:
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{([a-z_]+)}", path)
    ]
    if op.query:
        params += _query_parameters(op.query)
    customer = not path.startswith(OPERATOR_PATHS)
    # Every keyed POST of the API honours Idempotency-Key (broker.api.replay_idempotent).
    idempotent = customer and method == "post" and op.auth
    if idempotent:
        params.append(IDEMPOTENCY_PARAMETER)
    success: dict = {"description": op.summary}
    if op.response:
        media: dict = {"schema": _schema(op.response, components)}
        if op.response in EXAMPLES:
            media["example"] = EXAMPLES[op.response]
        success["content"] = {op.content_type: media}
        if op.stream:
            success["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    elif op.content_type != "application/json":
        success["content"] = {op.content_type: {"schema": {"type": "string", "format": "binary"}}}
    headers = {name: CREDIT_HEADERS.get(name, text) for name, text in op.headers.items()} | REQUEST_ID_HEADER
    if customer and op.auth:
        headers.update(RATE_LIMIT_HEADERS)
    if idempotent:
        headers.update(REPLAYED_HEADER)
    success["headers"] = _headers(headers)
    responses = {str(op.status): success}
    error_ref = _schema(op.error_model, components)
    # Every route refuses an over-long URL before anything else (broker/api/errors.py).
    for code in sorted({*op.errors, "414", *(("409",) if idempotent else ())}):
        media = {"schema": error_ref}
        responses[code] = {"description": ERRORS[code], "content": {"application/json": media}}
        responses[code]["headers"] = _headers({**REQUEST_ID_HEADER, **(RETRY_AFTER_HEADER if code == "429" else {})})
    result: dict = {
        "operationId": f"{method}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "summary": op.summary,
        "description": op.description,
        "tags": [op.tag],
        "parameters": params,
        "responses": responses,
    }
    if op.body:
        result["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(op.body, components)}},
        }
    if not op.auth:
        result["security"] = []
    if not customer:
        result["x-audience"] = "operator"
    return result


def _headers(headers: dict[str, str]) -> dict:
    return {name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()}


def documented_routes(app: Flask) -> list[tuple[str, str, Operation | None]]:
    """Every /v1 and /webhooks route as (path, method, its Operation or None)."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(("/v1/", "/webhooks/")):
            continue
        view = app.view_functions[rule.endpoint]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append((_path(rule.rule), method.lower(), getattr(view, "openapi", None)))
    return routes


def build(app: Flask, webhooks: dict | None = None) -> dict:
    components: dict = {}
    paths: dict = {}
    for path, method, op in documented_routes(app):
        if op is not None:
            paths.setdefault(path, {})[method] = _operation(op, path, method, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "AI API Broker",
            "version": "1.0.0",
            "description": (
                "One OpenAI-compatible API for chat (OpenAI, Anthropic, Gemini), text-to-speech, images "
                "and music, billed in prepaid credits from each provider's own usage report.\n\n"
                "Limits: a URL (path and query) longer than 4,096 bytes is answered 414 with the JSON error "
                "envelope; a request line (method, URL and version) longer than 8,190 bytes or a header line "
                "longer than 8,190 bytes is refused by the HTTP server itself (414 and 400, plain text, "
                "no JSON envelope); bodies are limited as each operation says (413)."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": dict(sorted(paths.items())),
        "webhooks": webhooks or {},
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer brk_live_…"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }
