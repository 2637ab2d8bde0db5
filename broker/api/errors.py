"""One JSON error envelope for the API: domain errors, HTTP errors on /v1, and engines that are down."""

from __future__ import annotations

import json
import logging
import uuid

import redis
import sqlalchemy.exc
from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException, RequestURITooLarge

from broker import ledger
from broker.errors import BrokerError, InvalidRequest, PayloadTooLarge, ServiceUnavailable, outcome_unknown

log = logging.getLogger(__name__)

# Longer URLs are refused with a 414 before any work; gunicorn itself refuses a request line
# (method + URL + version) over limit_request_line = 8190 bytes, its maximum, with a plain 414.
MAX_URL_BYTES = 4096

HTTP_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


# Anthropic's Messages API routes answer in Anthropic's envelope instead, so that the anthropic
# SDK and Claude Code raise their own classes: its error type by our status, else api_error
# (5xx) or invalid_request_error.
ANTHROPIC_PATH = "/v1/messages"
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_error_body(error: BrokerError, request_id: str) -> dict:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``, as Anthropic answers."""
    kind = ANTHROPIC_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}, "request_id": request_id}


def _is_anthropic() -> bool:
    return request.path == ANTHROPIC_PATH or request.path.startswith(ANTHROPIC_PATH + "/")


def error_response(error: BrokerError) -> Response:
    body = anthropic_error_body(error, g.get("request_id", "")) if _is_anthropic() else error.body()
    response = jsonify(body)
    response.status_code = error.status
    response.headers.update(error.headers)
    if _is_anthropic():
        response.headers["request-id"] = body["request_id"]  # where the anthropic SDK reads it
    return response


def _is_api() -> bool:
    return request.path.startswith(("/v1/", "/webhooks/")) or request.path == "/v1"


def _url_bytes(environ: dict) -> int:
    """The URL's length as the client sent it (path and query), however the server reports it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return len(raw)
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return len(path) + len(environ.get("QUERY_STRING", "")) + 1


# Where the web layer leaves its page renderer for HTTP errors outside /v1 (see broker.web.errors);
# a string key, so this package never imports broker.web.
HTML_ERROR_HOOK = "broker.html_error"


def _page(error: HTTPException):
    """An HTTP error for a person: the web layer's page if it registered one, else werkzeug's bare one."""
    render = current_app.extensions.get(HTML_ERROR_HOOK)
    return render(error) if render else error


# The code of a 503 whose charge is unknown; such a request also sets ``g.outcome_unknown``, so
# that its Idempotency-Key is kept rather than freed for a retry (broker.api.keep_idempotent).
OUTCOME_UNKNOWN = "outcome_unknown"  # the code of broker.errors.outcome_unknown


def _store_down() -> Response:
    """The 503 for Redis or the database down: "nothing was charged" only when that is true.

    Before the request sent a hold or a settle to Redis nothing can have been charged (and a
    hold Redis runs after its request gave up is refused). Once it has, the script may have
    run: the answer says the outcome is unknown and names the request to look up.
    """
    if not ledger.money_sent():
        return error_response(ServiceUnavailable("The service is temporarily unavailable; nothing was charged."))
    request_id = g.get("request_id", "")
    g.outcome_unknown = True
    error = outcome_unknown(request_id)
    response = error_response(error)
    if not _is_anthropic():  # Anthropic's envelope carries the request id already
        response.set_data(json.dumps({**error.body(), "request_id": request_id}))
    return response


def register_error_handlers(app: Flask) -> None:
    @app.before_request
    def _request_id() -> None:
        g.request_id = "req_" + uuid.uuid4().hex

    @app.before_request
    def _url_length() -> None:
        if _url_bytes(request.environ) > MAX_URL_BYTES:
            raise RequestURITooLarge(f"The URL is longer than {MAX_URL_BYTES} bytes; send long input in the body.")

    @app.after_request
    def _stamp(response: Response) -> Response:
        response.headers.setdefault("X-Request-Id", g.get("request_id", ""))
        return response

    @app.errorhandler(BrokerError)
    def _broker_error(error: BrokerError) -> Response:
        return error_response(error)

    @app.errorhandler(redis.RedisError)
    def _redis_down(error: redis.RedisError) -> Response:
        log.error("redis unavailable", extra={"error": type(error).__name__, "money_sent": ledger.money_sent()})
        return _store_down()

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    def _database_down(error: sqlalchemy.exc.OperationalError) -> Response:
        log.error("database unavailable", extra={"error": type(error).__name__, "money_sent": ledger.money_sent()})
        return _store_down()

    @app.errorhandler(RecursionError)
    def _too_deep(error: RecursionError):
        # A few KB of "[[[[…" is enough to exhaust the parser's (or a validator's) stack;
        # it is the client's body that is at fault, and it fails before anything is charged.
        log.warning("request body nested too deeply", extra={"path": request.path[:200]})
        if not _is_api():
            return _page(BadRequest("The request body is nested too deeply."))
        return error_response(InvalidRequest("The request body is nested too deeply to parse.", code="invalid_json"))

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        if not _is_api():
            return _page(error)
        if error.code == 413:
            return error_response(PayloadTooLarge("The request body is too large."))
        body = BrokerError(error.description or error.name, code=error.name.lower().replace(" ", "_"))
        body.status = error.code or 500
        body.type = HTTP_TYPES.get(body.status, "invalid_request_error")
        response = error_response(body)
        if getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response
