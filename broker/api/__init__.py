"""The /v1 blueprint: API-key auth for every route, and request parsing into pydantic models."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flask import Blueprint, Response, current_app, g, request
from pydantic import BaseModel, ValidationError

from broker import idempotency, keys, ledger
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
def forget_money() -> None:
    """First: whether this request has sent a hold or settle starts false (a context may be reused)."""
    ledger.forget_money_sent()


@bp.before_request
def authenticate() -> None:
    svc = services()
    config = current_app.config
    if rapidapi.is_marketplace_request(request.headers):
        g.caller = rapidapi.authenticate(
            svc.redis, svc.db, config["RAPIDAPI_SECRET"], config["RAPIDAPI_PLANS"], request.headers
        )
        return
    g.caller, g.rate_headers = keys.authenticate(
        svc.redis,
        svc.db,
        presented_key(),
        config["KEY_CACHE_SECONDS"],
        config["DEFAULT_LIMITS"],
        client_id=request.remote_addr or "",
        failures_per_minute=config["AUTH_FAILURES_PER_MINUTE"],
    )


@bp.after_request
def rate_headers(response: Response) -> Response:
    response.headers.update(g.get("rate_headers") or {})
    return response


KEPT_HEADERS = (
    "Content-Type",
    "Location",
    "X-Credits-Charged",
    "X-Credits-Remaining",
    "X-Credits-Held",
    "X-Request-Id",
)


@bp.before_request
def replay_idempotent():
    """Runs after ``authenticate``: a retried POST with the same Idempotency-Key gets the first answer."""
    idempotency_key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not idempotency_key:
        return None
    key, stored = idempotency.begin(
        services().redis,
        g.caller.account_id,
        idempotency_key,
        request.get_data(),
        current_app.config["IDEMPOTENCY_KEYS_PER_ACCOUNT"],
    )
    if stored is None:
        g.idempotency_key = key
        return None
    if stored.get("job_id"):
        # A synchronous media route bound the key to its job: the retry waits for it (broker.api.openai_media).
        g.idempotent_job = stored["job_id"]
        return None
    response = Response(stored["data"], status=stored["status"], headers=stored["headers"])
    response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.after_request
def keep_idempotent(response: Response) -> Response:
    key = g.pop("idempotency_key", None)
    if key is not None and response.is_streamed and response.status_code < 300:
        response.response = _kept_stream(response.response, key, response.status_code, dict(response.headers))
    elif key is not None and (g.get("outcome_unknown") or (response.status_code == 500 and ledger.money_sent())):
        # A hold or settle may have reached the ledger: a retry must not run (and charge) again.
        idempotency.keep_unknown(services().redis, key, request.get_data(), g.get("request_id", ""))
    elif key is not None:
        data = None if response.is_streamed else response.get_data()
        headers = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
        idempotency.finish(
            services().redis,
            key,
            request.get_data(),
            response.status_code,
            headers,
            data,
            current_app.config["IDEMPOTENCY_MAX_BODY_BYTES"],
        )
    return response


def _kept_stream(chunks: Iterable, key: str, status: int, all_headers: dict) -> Iterator[bytes]:
    """Relay a streamed answer and, when it has ended (or the client left), keep what was sent
    for retries of its Idempotency-Key; the key stays claimed (409 to a retry) meanwhile."""
    # Read here, in the request: the stream itself runs after the request context has gone.
    client, body = services().redis, request.get_data()
    limit, request_id = current_app.config["IDEMPOTENCY_MAX_BODY_BYTES"], g.get("request_id", "")
    headers = {name: all_headers[name] for name in KEPT_HEADERS if name in all_headers}

    def relay() -> Iterator[bytes]:
        sent, size = [], 0
        try:
            for chunk in chunks:
                data = chunk.encode() if isinstance(chunk, str) else chunk
                size += len(data)
                if size <= limit:
                    sent.append(data)
                yield data
        finally:
            kept = b"".join(sent) if size <= limit else None
            idempotency.finish_stream(client, key, body, status, headers, kept, request_id, limit)

    return relay()


@bp.teardown_request
def _abandon_idempotent(_error) -> None:
    key = g.pop("idempotency_key", None)
    if key is not None and ledger.money_sent():
        idempotency.keep_unknown(services().redis, key, request.get_data(), g.get("request_id", ""))
    elif key is not None:
        idempotency.abandon(services().redis, key)


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


from broker.api import account, billing, chat, embeddings, media, messages, models, openai_media, responses  # noqa: E402,F401  (routes register on bp)
