"""One OpenAPI document, generated from the routes and the models that validate them."""

from __future__ import annotations

import pytest

from broker.api import openapi


def test_every_v1_route_is_documented_and_every_documented_path_is_routed(app, client):
    spec = client.get("/openapi.json").json
    routed = {(path, method) for path, method, _ in openapi.documented_routes(app)}
    undocumented = [(p, m) for p, m, op in openapi.documented_routes(app) if op is None]
    assert undocumented == []
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert documented == routed
    assert spec["openapi"].startswith("3.1")


def test_document_schemas_are_the_validating_models(client):
    spec = client.get("/openapi.json").json
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["additionalProperties"] is False
    temperature = body["properties"]["temperature"]["anyOf"]
    assert {"type": "number", "minimum": 0, "maximum": 2} in temperature
    usage = {p["name"]: p for p in spec["paths"]["/v1/usage"]["get"]["parameters"]}
    assert set(usage) == {"limit", "cursor", "after", "from", "to", "model", "key_id", "endpoint"}
    assert usage["limit"]["schema"]["maximum"] == 100
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for response in op["responses"].values():
                for media in response.get("content", {}).values():
                    target = media["schema"].get("$ref")
                    if target:
                        assert target.rsplit("/", 1)[1] in spec["components"]["schemas"], (path, method)


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("post", "/v1/chat/completions", {"model": "demo/chat", "messages": [], "max_tokens": 3}, "messages"),
        ("post", "/v1/chat/completions", {"model": "demo/chat", "messages": [{"role": "robot"}]}, "messages.0.role"),
        ("post", "/v1/image", {"model": "demo/image", "prompt": "p", "quality": "ultra"}, "quality"),
        ("get", "/v1/usage?limit=500", None, "limit"),
        ("get", "/v1/usage?from=yesterday", None, "from"),
        ("get", "/v1/jobs?type=video", None, "type"),
        ("get", "/v1/jobs?colour=red", None, "colour"),
    ],
)
def test_validation_errors_name_the_offending_param(client, tenant, method, path, body, param):
    response = getattr(client, method)(path, json=body, headers=tenant.headers)
    assert response.status_code == 400
    assert response.json["error"]["param"] == param
