"""One JSON error envelope for the API: domain errors, HTTP errors on /v1, and engines that are down."""

from __future__ import annotations

import logging
import uuid

import redis
import sqlalchemy.exc
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from broker.errors import BrokerError, PayloadTooLarge, ServiceUnavailable

log = logging.getLogger(__name__)

HTTP_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(error: BrokerError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def _is_api() -> bool:
    return request.path.startswith(("/v1/", "/webhooks/")) or request.path == "/v1"


def register_error_handlers(app: Flask) -> None:
    @app.before_request
    def _request_id() -> None:
        g.request_id = "req_" + uuid.uuid4().hex

    @app.after_request
    def _stamp(response: Response) -> Response:
        response.headers.setdefault("X-Request-Id", g.get("request_id", ""))
        return response

    @app.errorhandler(BrokerError)
    def _broker_error(error: BrokerError) -> Response:
        return error_response(error)

    @app.errorhandler(redis.RedisError)
    def _redis_down(error: redis.RedisError) -> Response:
        log.error("redis unavailable", extra={"error": type(error).__name__})
        return error_response(ServiceUnavailable("The service is temporarily unavailable; nothing was charged."))

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    def _database_down(error: sqlalchemy.exc.OperationalError) -> Response:
        log.error("database unavailable", extra={"error": type(error).__name__})
        return error_response(ServiceUnavailable("The service is temporarily unavailable; nothing was charged."))

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        if not _is_api():
            return error
        if error.code == 413:
            return error_response(PayloadTooLarge("The request body is too large."))
        body = BrokerError(error.description or error.name, code=error.name.lower().replace(" ", "_"))
        body.status = error.code or 500
        body.type = HTTP_TYPES.get(body.status, "invalid_request_error")
        response = error_response(body)
        if getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response
