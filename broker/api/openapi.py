"""The OpenAPI 3.1 document, built from the routes themselves and the pydantic models that validate them.

Each /v1 view is decorated with ``operation(...)`` naming its body, query and response
models; ``build`` walks the URL map, so a route without a description, or a described
path that is not routed, cannot go unnoticed (a test checks both).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Flask
from pydantic import BaseModel

from broker.schemas import ErrorResponse

ERRORS = {
    "400": "Invalid request: `error.param` names the field.",
    "401": "Missing, malformed, unknown, revoked or expired API key.",
    "402": "Insufficient credits: nothing was called or charged.",
    "404": "No such model, route or object (another account's objects are not found either).",
    "409": "The object is in a state that does not allow this.",
    "413": "Request body too large.",
    "414": "The URL (path and query) is longer than 4,096 bytes; nothing was done.",
    "422": "The request is well-formed but a value is not acceptable (e.g. an invalid email address).",
    "429": "Rate limited: retry after `Retry-After` seconds.",
    "502": "The provider failed; the hold was released.",
    "503": "The provider, or the broker's own store, is unavailable; nothing was charged.",
    "504": "The provider timed out; the hold was released.",
}


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


def _operation(op: Operation, path: str, method: str, components: dict) -> dict:
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{([a-z_]+)}", path)
    ]
    if op.query:
        params += _query_parameters(op.query)
    success: dict = {"description": op.summary}
    if op.response:
        success["content"] = {op.content_type: {"schema": _schema(op.response, components)}}
        if op.stream:
            success["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    elif op.content_type != "application/json":
        success["content"] = {op.content_type: {"schema": {"type": "string", "format": "binary"}}}
    if op.headers:
        success["headers"] = {
            name: {"description": text, "schema": {"type": "string"}} for name, text in op.headers.items()
        }
    responses = {str(op.status): success}
    error_ref = _schema(ErrorResponse, components)
    # Every route refuses an over-long URL before anything else (broker/api/errors.py).
    for code in sorted({*op.errors, "414"}):
        responses[code] = {"description": ERRORS[code], "content": {"application/json": {"schema": error_ref}}}
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
    return result


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
