"""Fake OpenAI, Anthropic and Gemini chat upstreams in one WSGI app (PROVIDERS.md §1, §4, §5)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

__all__ = ["FakeUpstream", "RecordedRequest", "Reply", "create_app", "make_wsgi_app"]

FAULTS = (None, "reset", "truncate", "no_usage", "error_event")


@dataclass
class Reply:
    """What the fake answers to one chat request, in neutral terms rendered per provider."""

    text: str = "Hello there! How can I help you today?"
    input_tokens: int = 12  # uncached input tokens
    cached_tokens: int = 0  # cache-read tokens
    cache_write_tokens: int = 0  # OpenAI cache_write_tokens / Anthropic 5-minute cache writes
    cache_write_1h_tokens: int = 0  # Anthropic 1-hour cache writes
    output_tokens: int = 9  # total billed output tokens INCLUDING reasoning
    reasoning_tokens: int = 0  # part of output_tokens
    finish: str = "stop"  # "stop" | "length" (other values pass through unchanged)
    status: int = 200  # != 200 -> the provider's own error body with that HTTP status
    error_message: str = "fake upstream error"
    retry_after: str | None = None  # Retry-After header (Gemini: RetryInfo.retryDelay in the body)
    delay: float = 0.0  # seconds to sleep before sending the response headers
    chunks: int = 3  # number of text pieces a stream splits `text` into
    fault: str | None = None  # None | "reset" | "truncate" | "no_usage" | "error_event"
    fault_after: int = 1  # for "truncate"/"error_event": text chunks sent before the fault
    chunk_delay: float = 0.0  # seconds to sleep before each streamed event after the first
    error_type: str | None = None  # overrides OpenAI error.type / Anthropic error.type / Gemini status
    error_code: str | None = None  # overrides OpenAI error.code (e.g. "insufficient_quota")

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {FAULTS}")


@dataclass
class RecordedRequest:
    """One request as the fake received it; header names are lower-case."""

    provider: str  # "openai" | "anthropic" | "gemini"
    path: str
    query: str
    headers: dict[str, str]
    json: dict[str, Any] = field(default_factory=dict)


class FakeUpstream:
    """One in-process HTTP server answering as all three chat providers."""

    def __init__(
        self,
        default: Reply | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
    ) -> None:
        self.default: Reply = default or Reply()
        self.requests: list[RecordedRequest] = []
        self.record = record
        self.host = host
        self.port = port
        self.url = ""
        self.openai_base = ""
        self.anthropic_base = ""
        self.gemini_base = ""
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = make_server(
            self.host,
            self.port,
            make_wsgi_app(self),
            threaded=True,
            request_handler=_Handler,
        )
        self.port = server.socket.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.openai_base = self.url + "/v1"
        self.anthropic_base = self.url
        self.gemini_base = self.url
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def queue(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.default = Reply()

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._queue.popleft() if self._queue else self.default

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(WSGIRequestHandler):
    """werkzeug's handler without the access log and with Nagle off, so each SSE event leaves at once."""

    disable_nagle_algorithm = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


# --------------------------------------------------------------------------- helpers

_ids = itertools.count(1)
_LINGER_0 = struct.pack("ii", 1, 0)
_OBFUSCATION = "r4N7vQ2m"
_FINGERPRINT = "fp_fake0000"
_JSON = "application/json"
_SSE = "text/event-stream"
_Headers = list[tuple[str, str]]


class _Reset(ConnectionResetError):
    """Raised after the fake reset the connection; werkzeug treats it as a dropped connection."""


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _new_id() -> str:
    return f"{next(_ids):024x}"


def _status_line(code: int) -> str:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Overloaded" if code == 529 else "Error"
    return f"{code} {phrase}"


def _pieces(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text)))
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def _rst(environ: WSGIEnvironment) -> None:
    """Abort the client connection with a TCP RST (SO_LINGER 0, then drop the last fd reference).

    The socket's fd is dup2()-ed onto a dead socketpair end instead of being closed, so the
    server's own socket object stays valid (reads see EOF, writes EPIPE) and no fd number is
    freed for another thread to reuse while the server still holds it.
    """
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
        spare, peer = socket.socketpair()
        peer.close()
        os.dup2(spare.fileno(), sock.fileno())
        spare.close()
    except OSError:
        pass


def _read_body(environ: WSGIEnvironment) -> bytes:
    stream = environ["wsgi.input"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > 0:
        return stream.read(length)
    if environ.get("wsgi.input_terminated"):
        return stream.read()
    return b""


def _headers(environ: WSGIEnvironment) -> dict[str, str]:
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    return headers


def _respond(start_response: StartResponse, status: int, headers: _Headers, body: bytes) -> list[bytes]:
    start_response(
        _status_line(status),
        [*headers, ("Content-Type", _JSON), ("Content-Length", str(len(body)))],
    )
    return [body]


def _stream(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    headers: _Headers,
    events: Iterator[bytes | None],
    content_type: str = _SSE,
    chunk_delay: float = 0.0,
) -> Iterator[bytes]:
    """Send each event as its own write; a None event means "reset the connection here"."""
    start_response(
        "200 OK",
        [*headers, ("Content-Type", content_type), ("Cache-Control", "no-cache")],
    )

    def body() -> Iterator[bytes]:
        for number, event in enumerate(events):
            if chunk_delay and number:
                time.sleep(chunk_delay)
            if event is None:
                _rst(environ)
                raise _Reset("fake upstream: stream truncated")
            yield event

    return body()


def _begin(fake: FakeUpstream, environ: WSGIEnvironment) -> Reply:
    """Pop the reply, then apply its delay and a "reset" fault."""
    reply = fake._next_reply()
    if reply.delay > 0:
        time.sleep(reply.delay)
    if reply.fault == "reset":
        _rst(environ)
        raise _Reset("fake upstream: connection reset")
    return reply


def _cut(reply: Reply) -> int | None:
    """Index of the text piece at which a mid-stream fault fires, or None."""
    if reply.fault in ("truncate", "error_event"):
        return max(0, reply.fault_after)
    return None


# --------------------------------------------------------------------------- OpenAI

_OPENAI_FINISH = {"stop": "stop", "length": "length"}
_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    409: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


def _openai_error(
    start_response: StartResponse,
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: _Headers | None = None,
) -> list[bytes]:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return _respond(start_response, status, headers or [], _dumps({"error": error}))


def _openai_reply_error(start_response: StartResponse, r: Reply, headers: _Headers) -> list[bytes]:
    type_, code = _OPENAI_ERRORS.get(r.status, ("server_error" if r.status >= 500 else "invalid_request_error", None))
    return _openai_error(
        start_response,
        r.status,
        r.error_message,
        r.error_type or type_,
        r.error_code or code,
        headers=headers,
    )


def _openai_usage(r: Reply) -> dict[str, Any]:
    prompt = r.input_tokens + r.cached_tokens + r.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": r.output_tokens,
        "total_tokens": prompt + r.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": r.cached_tokens,
            "audio_tokens": 0,
            "cache_write_tokens": r.cache_write_tokens,
        },
        "completion_tokens_details": {
            "reasoning_tokens": r.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path != "/v1/chat/completions":
        return _openai_error(start_response, 404, f"Invalid URL ({method} {path})")
    if method != "POST":
        return _openai_error(start_response, 405, f"Invalid method for URL ({method} {path})")
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        return _openai_error(
            start_response,
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    if not isinstance(data, dict):
        return _openai_error(start_response, 400, "We could not parse the JSON body of your request.")
    if not data.get("model"):
        return _openai_error(start_response, 400, "you must provide a model parameter")
    if "messages" not in data:
        return _openai_error(
            start_response,
            400,
            "Missing required parameter: 'messages'.",
            code="missing_required_parameter",
            param="messages",
        )
    n = data.get("n")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        return _openai_error(
            start_response,
            400,
            f"Invalid value for 'n': {n!r}. Expected an integer between 1 and 128.",
            code="invalid_value",
            param="n",
        )
    stream = data.get("stream") is True
    options = data.get("stream_options")
    if options is not None and not stream:
        return _openai_error(
            start_response,
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            code="invalid_value",
            param="stream_options",
        )

    r = _begin(fake, environ)
    rid = _new_id()
    headers: _Headers = [
        ("x-request-id", f"req_{rid}"),
        ("openai-version", "2020-10-01"),
    ]
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status != 200:
        return _openai_reply_error(start_response, r, headers)

    cid = f"chatcmpl-fake{rid}"
    created = int(time.time())
    model = str(data["model"])
    finish = _OPENAI_FINISH.get(r.finish, r.finish)
    tier = data.get("service_tier")
    tier = "default" if tier in (None, "auto") else tier
    if not stream:
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": r.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i in range(n)
            ],
        }
        if r.fault != "no_usage":
            body["usage"] = _openai_usage(r)
        body["service_tier"] = tier
        body["system_fingerprint"] = _FINGERPRINT
        return _respond(start_response, 200, headers, _dumps(body))

    options = options if isinstance(options, dict) else {}
    include_usage = options.get("include_usage") is True
    obfuscate = options.get("include_obfuscation") is not False

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None, pad: str) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if include_usage:
            obj["usage"] = None
        if obfuscate:
            obj["obfuscation"] = pad
        return b"data: " + _dumps(obj) + b"\n\n"

    def events() -> Iterator[bytes | None]:
        cut = _cut(r)
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""}, None, _OBFUSCATION)
        for k, piece in enumerate(_pieces(r.text, r.chunks)):
            if k == cut:
                break
            for i in range(n):
                yield chunk(i, {"content": piece}, None, _OBFUSCATION)
        if cut is not None:
            if r.fault == "truncate":
                yield None
                return
            error = {
                "message": r.error_message,
                "type": "server_error",
                "param": None,
                "code": None,
            }
            yield b"data: " + _dumps({"error": error}) + b"\n\n"
            return
        for i in range(n):
            yield chunk(i, {}, finish, "")
        if include_usage and r.fault != "no_usage":
            usage_chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [],
                "usage": _openai_usage(r),
            }
            yield b"data: " + _dumps(usage_chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return _stream(environ, start_response, headers, events(), chunk_delay=r.chunk_delay)


# --------------------------------------------------------------------------- Anthropic

_ANTHROPIC_FINISH = {"stop": "end_turn", "length": "max_tokens"}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _anthropic_error(
    start_response: StartResponse,
    status: int,
    message: str,
    type_: str | None = None,
    headers: _Headers | None = None,
) -> list[bytes]:
    default = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    headers = headers or [("request-id", f"req_fake{_new_id()}")]
    body = {
        "type": "error",
        "error": {"type": type_ or default, "message": message},
        "request_id": dict(headers)["request-id"],
    }
    return _respond(start_response, status, headers, _dumps(body))


def _anthropic_input_usage(r: Reply) -> dict[str, Any]:
    return {
        "input_tokens": r.input_tokens,
        "cache_creation_input_tokens": r.cache_write_tokens + r.cache_write_1h_tokens,
        "cache_read_input_tokens": r.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": r.cache_write_tokens,
            "ephemeral_1h_input_tokens": r.cache_write_1h_tokens,
        },
    }


def _anthropic_usage(r: Reply, output_tokens: int) -> dict[str, Any]:
    usage = _anthropic_input_usage(r)
    usage["output_tokens"] = output_tokens
    usage["service_tier"] = "standard"
    usage["inference_geo"] = "global"
    if r.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": r.reasoning_tokens}
    return usage


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


_ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def _anthropic(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path != "/v1/messages":
        return _anthropic_error(start_response, 404, "Not Found")
    if method != "POST":
        return _anthropic_error(start_response, 405, f"Method {method} not allowed")
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if not environ.get("HTTP_X_API_KEY") and not (auth.startswith("Bearer ") and auth[7:].strip()):
        return _anthropic_error(start_response, 401, "x-api-key header is required")
    if not environ.get("HTTP_ANTHROPIC_VERSION"):
        return _anthropic_error(start_response, 400, "anthropic-version: header is required")
    if not isinstance(data, dict):
        return _anthropic_error(start_response, 400, "There was an error parsing the body")
    for required in ("model", "max_tokens", "messages"):
        if required not in data:
            return _anthropic_error(start_response, 400, f"{required}: Field required")

    r = _begin(fake, environ)
    mid = f"msg_fake{_new_id()}"
    headers: _Headers = [("request-id", f"req_fake{mid[8:]}")]
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status != 200:
        return _anthropic_error(start_response, r.status, r.error_message, r.error_type, headers)

    model = str(data["model"])
    stop = _ANTHROPIC_FINISH.get(r.finish, r.finish)
    with_usage = r.fault != "no_usage"
    if data.get("stream") is not True:
        body: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": r.text}],
            "stop_reason": stop,
            "stop_sequence": None,
        }
        if with_usage:
            body["usage"] = _anthropic_usage(r, r.output_tokens)
        return _respond(start_response, 200, headers, _dumps(body))

    def events() -> Iterator[bytes | None]:
        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
        }
        if with_usage:
            message["usage"] = _anthropic_usage(r, min(1, r.output_tokens))
        yield _sse("message_start", {"type": "message_start", "message": message})
        yield _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        yield _ANTHROPIC_PING
        cut = _cut(r)
        for k, piece in enumerate(_pieces(r.text, r.chunks)):
            if k == cut:
                break
            yield _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        if cut is not None:
            if r.fault == "truncate":
                yield None
                return
            error = {"type": "overloaded_error", "message": r.error_message}
            yield _sse("error", {"type": "error", "error": error})
            return
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        for output_tokens in (r.output_tokens // 2, r.output_tokens):
            delta: dict[str, Any] = {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
            }
            if with_usage:
                usage = _anthropic_input_usage(r)
                del usage["cache_creation"]
                usage["output_tokens"] = output_tokens
                delta["usage"] = usage
            yield _sse("message_delta", delta)
        yield _sse("message_stop", {"type": "message_stop"})

    return _stream(environ, start_response, headers, events(), chunk_delay=r.chunk_delay)


# --------------------------------------------------------------------------- Gemini

_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_GEMINI_PREFIX = "/v1beta/models/"


def _gemini_error_body(
    status: int,
    message: str,
    rpc_status: str | None = None,
    retry_after: str | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": rpc_status or _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"),
    }
    if retry_after is not None:
        delay = retry_after if retry_after.endswith("s") else retry_after + "s"
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]
    return {"error": error}


def _gemini_error(
    start_response: StartResponse,
    status: int,
    message: str,
    rpc_status: str | None = None,
    retry_after: str | None = None,
) -> list[bytes]:
    body = _gemini_error_body(status, message, rpc_status, retry_after)
    return _respond(start_response, status, [], _dumps(body))


def _gemini_usage(r: Reply, final: bool) -> dict[str, Any]:
    prompt = r.input_tokens + r.cached_tokens
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    total = prompt
    if final:
        candidates = r.output_tokens - r.reasoning_tokens
        if candidates:
            usage["candidatesTokenCount"] = candidates
        total += r.output_tokens
    usage["totalTokenCount"] = total
    if r.cached_tokens:
        usage["cachedContentTokenCount"] = r.cached_tokens
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if r.cached_tokens:
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": r.cached_tokens}]
    if final and r.reasoning_tokens:
        usage["thoughtsTokenCount"] = r.reasoning_tokens
    return usage


def _gemini(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    model, _, action = path[len(_GEMINI_PREFIX) :].rpartition(":")
    if not path.startswith(_GEMINI_PREFIX) or not model:
        return _gemini_error(start_response, 404, f"Method not found: {path}", "NOT_FOUND")
    if action not in ("generateContent", "streamGenerateContent"):
        return _gemini_error(start_response, 404, f"Method not found: {action}", "NOT_FOUND")
    if method != "POST":
        return _gemini_error(start_response, 405, f"Method {method} not allowed", "UNIMPLEMENTED")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if not environ.get("HTTP_X_GOOG_API_KEY") and not query.get("key", [""])[0]:
        return _gemini_error(
            start_response,
            403,
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API.",
            "PERMISSION_DENIED",
        )
    if not isinstance(data, dict):
        return _gemini_error(start_response, 400, "Invalid JSON payload received.")
    if not data.get("contents"):
        return _gemini_error(
            start_response,
            400,
            "* GenerateContentRequest.contents: contents is not specified\n",
        )
    config = data.get("generationConfig") or data.get("generation_config") or {}
    count = config.get("candidateCount", config.get("candidate_count")) if isinstance(config, dict) else None
    count = 1 if count is None else count
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return _gemini_error(start_response, 400, "candidateCount must be a positive integer.")

    r = _begin(fake, environ)
    if r.status != 200:
        rpc = r.error_type or None
        return _gemini_error(start_response, r.status, r.error_message, rpc, r.retry_after)

    model_version = model.removeprefix("models/")
    response_id = f"fake{_new_id()}"
    finish = _GEMINI_FINISH.get(r.finish, r.finish)
    with_usage = r.fault != "no_usage"

    def response(text: str, final: bool) -> dict[str, Any]:
        candidates = []
        for i in range(count):
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
            if final:
                candidate["finishReason"] = finish
            candidate["index"] = i
            candidates.append(candidate)
        obj: dict[str, Any] = {"candidates": candidates}
        if with_usage:
            obj["usageMetadata"] = _gemini_usage(r, final)
        obj["modelVersion"] = model_version
        obj["responseId"] = response_id
        return obj

    if action == "generateContent":
        return _respond(start_response, 200, [], _dumps(response(r.text, True)))

    def objects() -> Iterator[dict[str, Any] | None]:
        pieces = _pieces(r.text, r.chunks)
        cut = _cut(r)
        last = len(pieces) - 1
        for k, piece in enumerate(pieces):
            if k == cut:
                break
            yield response(piece, k == last and cut is None)
        if cut is not None:
            if r.fault == "truncate":
                yield None
            else:
                yield _gemini_error_body(500, r.error_message)

    if query.get("alt", [""])[0] == "sse":

        def sse() -> Iterator[bytes | None]:
            for obj in objects():
                yield None if obj is None else b"data: " + _dumps(obj) + b"\n\n"

        return _stream(environ, start_response, [], sse(), chunk_delay=r.chunk_delay)

    # Without ?alt=sse the real endpoint streams one JSON array, which an SSE reader cannot parse.
    def array() -> Iterator[bytes | None]:
        sep = b"["
        for obj in objects():
            if obj is None:
                yield None
                return
            yield sep + _dumps(obj)
            sep = b",\r\n"
        yield b"]" if sep != b"[" else b"[]"

    return _stream(environ, start_response, [], array(), content_type=_JSON)


# --------------------------------------------------------------------------- WSGI app


def make_wsgi_app(fake: FakeUpstream) -> WSGIApplication:
    """The WSGI callable serving all three providers from `fake`'s queue and default reply."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path.startswith("/v1beta/"):
            provider, handler = "gemini", _gemini
        elif path.startswith("/v1/messages"):
            provider, handler = "anthropic", _anthropic
        else:
            provider, handler = "openai", _openai
        raw = _read_body(environ)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if fake.record:
            fake._record(
                RecordedRequest(
                    provider=provider,
                    path=path,
                    query=environ.get("QUERY_STRING", ""),
                    headers=_headers(environ),
                    json=data if isinstance(data, dict) else {},
                )
            )
        return handler(fake, environ, start_response, data)

    return app


def create_app() -> WSGIApplication:
    """Factory for external servers: `gunicorn 'tests.fakes.upstreams:create_app()'` (no recording)."""
    return make_wsgi_app(FakeUpstream(record=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake chat upstreams until killed.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each response")
    parser.add_argument("--chunks", type=int, default=3, help="text pieces per stream")
    args = parser.parse_args(argv)
    fake = FakeUpstream(
        Reply(delay=args.delay, chunks=args.chunks),
        host=args.host,
        port=args.port,
        record=False,
    )
    server = make_server(
        args.host,
        args.port,
        make_wsgi_app(fake),
        threaded=True,
        request_handler=_Handler,
    )
    print(
        f"fake upstreams listening on http://{args.host}:{server.socket.getsockname()[1]}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
