"""The /v1 blueprint: API-key auth for every route, and request parsing into pydantic models."""

from __future__ import annotations

from flask import Blueprint, current_app, g, request
from pydantic import BaseModel, ValidationError

from broker import keys
from broker.billing import rapidapi
from broker.errors import InvalidRequest
from broker.extensions import services

bp = Blueprint("api", __name__, url_prefix="/v1")


def presented_key() -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key.strip()
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


@bp.before_request
def authenticate() -> None:
    svc = services()
    config = current_app.config
    if rapidapi.is_marketplace_request(request.headers):
        g.caller = rapidapi.authenticate(
            svc.redis, svc.db, config["RAPIDAPI_SECRET"], config["RAPIDAPI_PLANS"], request.headers
        )
        return
    g.caller = keys.authenticate(svc.redis, svc.db, presented_key(), config["KEY_CACHE_SECONDS"])


def parse(model: type[BaseModel]) -> BaseModel:
    """The JSON body validated by ``model``; a 400 naming the first offending field otherwise."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return _validate(model, body)


def parse_query(model: type[BaseModel]) -> BaseModel:
    """The query string validated by ``model``; a 400 naming the offending parameter otherwise."""
    return _validate(model, request.args.to_dict())


def _validate(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"] if first["type"] != "extra_forbidden" else "Unrecognized request argument"
        raise InvalidRequest(f"{message}: {param}", param=param, code=first["type"]) from None


from broker.api import account, billing, chat, media  # noqa: E402,F401  (routes register on bp)
