"""Domain errors: every failure a caller can see, with its HTTP status and OpenAI-style type."""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the API turns into the JSON error envelope.

    ``type`` and ``code`` follow OpenAI's error body so that its SDK raises the
    matching exception class; ``param`` names the offending request field.
    """

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "type": self.type,
                "code": self.code,
                "message": self.message,
                "param": self.param,
            }
        }


class InvalidRequest(BrokerError):
    status = 400


class ValidationFailed(BrokerError):
    status = 422
    code = "validation_error"


class AuthenticationFailed(BrokerError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InsufficientCredits(BrokerError):
    status = 402
    type = "insufficient_credits"
    code = "insufficient_credits"


class Forbidden(BrokerError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(BrokerError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(BrokerError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(BrokerError):
    status = 413
    code = "payload_too_large"


class RateLimited(BrokerError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(BrokerError):
    """Our own engine (Redis, database) cannot be reached: nothing was admitted."""

    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


def outcome_unknown(request_id: str) -> ServiceUnavailable:
    """Redis or the database failed after the request sent its hold or settle: the script may have run."""
    return ServiceUnavailable(
        f"The service became unavailable while request {request_id} was being charged, so its outcome is "
        f"unknown. Once the service is back, look it up with GET /v1/requests/{request_id}: its receipt shows "
        "what was charged (a 404: nothing was). A retry with the same Idempotency-Key is not run again.",
        code="outcome_unknown",
        # The OpenAI and Anthropic SDKs retry a 503 by themselves, without an Idempotency-Key
        # (a second run and charge) or with one (a 409): neither helps.
        headers={"x-should-retry": "false"},
    )


class UpstreamError(BrokerError):
    """The provider failed before it delivered anything; the hold is released in full."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """Connection refused or reset, the provider overloaded (503/529) or still rate limiting after retries."""

    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRejected(UpstreamError):
    """The provider refused the request itself (a 4xx such as context too long)."""

    status = 400
    type = "invalid_request_error"
    code = "upstream_rejected"


class UpstreamStreamBroken(UpstreamError):
    """The provider's stream broke after the first byte; what was delivered is still charged."""

    code = "upstream_stream_broken"
