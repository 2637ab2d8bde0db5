"""The API reference: ``/openapi.json`` (built from the routes and their models) and the ``/docs`` page."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from broker.api import openapi

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
