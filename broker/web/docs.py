"""The API reference: ``/openapi.json`` (built from the routes and their models) and the ``/docs`` page."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, render_template

from broker import docs_render, hosts, openapi
from broker.web import enabled_models

bp = Blueprint("docs", __name__)


def spec() -> dict:
    """The OpenAPI document, built once per app."""
    cached = current_app.extensions.get("broker.openapi")
    if cached is None:
        cached = current_app.extensions["broker.openapi"] = openapi.build(current_app)
    return cached


@bp.get("/openapi.json")
def openapi_json():
    response = jsonify(spec())
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


@bp.get("/docs")
def reference():
    models = docs_render.default_models(enabled_models())
    ref = docs_render.reference(spec(), hosts.public_base_url(), openapi.ERRORS, models)
    return render_template("docs/index.html", ref=ref)
