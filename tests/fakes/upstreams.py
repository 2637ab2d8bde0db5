"""Fake upstreams in one WSGI app (PROVIDERS.md §1, §2, §4-§7, §12).

Chat: OpenAI ``/v1/chat/completions``, Anthropic ``/v1/messages``, Gemini ``/v1beta/models/…``.
Media: OpenAI Images ``POST /v1/images/generations``, ElevenLabs ``POST /v1/text-to-speech/{voice_id}[/stream]``
and Suno (sunoapi.org shape) ``POST /api/v1/generate`` + ``GET /api/v1/generate/record-info?taskId=`` + the
clip files ``GET /files/{clipId}.mp3`` / ``.png``. All share one queue of `Reply` objects: each request that
produces an answer pops one (or uses `FakeUpstream.default`). Suno polls and file downloads never pop; they use
the reply remembered by the task their submit created. OpenAI speech ``POST /v1/audio/speech`` answers audio
bytes (chunked, so `Reply.chunks` / `chunk_delay` make a slow answer) and no usage, as OpenAI does.

The media bytes are deterministic; tests compare against `fake_png`, `fake_audio` and `fake_clip`, or read
`FakeUpstream.last_outputs` (the bytes most recently served).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import math
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

__all__ = [
    "FakeUpstream",
    "RecordedRequest",
    "Reply",
    "create_app",
    "fake_audio",
    "fake_clip",
    "fake_png",
    "fake_speech",
    "make_wsgi_app",
    "tts_character_cost",
]

FAULTS = (None, "reset", "truncate", "no_usage", "error_event")
SUNO_FAILURES = (None, "GENERATE_AUDIO_FAILED", "SENSITIVE_WORD_ERROR")
OMIT = -1  # Reply.character_cost value that omits the ElevenLabs character-cost header


@dataclass
class Reply:
    """What the fake answers to one request, in neutral terms rendered per provider.

    Fields shared by every provider: `status`, `error_message`, `error_type`, `retry_after`, `delay` and
    `fault="reset"`. Media notes: `fault="no_usage"` also omits the Images `usage` / ElevenLabs
    `character-cost`; `fault="truncate"` cuts an ElevenLabs body, or every Suno file download of the task,
    after `fault_after` of `chunks` pieces. For Suno, `status`/`delay`/`reset`/`suno_app_code` apply to the
    submit only.
    """

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
    error_code: str | None = None  # OpenAI error.code / Anthropic error.details.error_code / Suno errorCode
    block_reason: str | None = None  # Gemini: the prompt is blocked (200, promptFeedback.blockReason, no candidates)
    # --- chat answers beyond text (OpenAI wire format; other providers may ignore them)
    tool_calls: list[dict[str, str]] | None = None  # [{"name", "arguments" (a JSON string)}], when tools were sent
    refusal: str | None = None  # the model refuses: content null, this text in `refusal`
    annotations: list[dict[str, Any]] | None = None  # message.annotations (url_citation objects)
    # Fields sent as given over the chat usage each provider renders (OpenAI `usage`, Anthropic `usage`
    # in every event that has one, Gemini `usageMetadata`): odd counts such as -5, "12", 1e30 or None.
    raw_usage: dict[str, Any] | None = None
    # --- media
    character_cost: int | None = None  # ElevenLabs header; None -> default rule, OMIT (-1) -> no header
    image_usage: dict[str, int] | None = None  # Images usage overrides: text_tokens, image_tokens, output_tokens
    omit_usage: bool = False  # Images: no "usage" key (dall-e style)
    suno_polls_per_stage: int = 1  # record-info polls per status stage; 0 -> the first poll is final
    suno_fail: str | None = None  # None | "GENERATE_AUDIO_FAILED" | "SENSITIVE_WORD_ERROR"
    suno_app_code: int = 200  # != 200 -> submit answers HTTP 200 {"code": suno_app_code, "msg": …}

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {FAULTS}")
        if self.suno_fail not in SUNO_FAILURES:
            raise ValueError(f"unknown suno_fail {self.suno_fail!r}; expected one of {SUNO_FAILURES}")


@dataclass
class RecordedRequest:
    """One request as the fake received it; header names are lower-case."""

    provider: str  # "openai" | "anthropic" | "gemini" | "openai_images" | "openai_speech" | "elevenlabs" | "suno"
    path: str
    query: str
    headers: dict[str, str]
    json: dict[str, Any] = field(default_factory=dict)


class FakeUpstream:
    """One in-process HTTP server answering as every faked provider (chat and media)."""

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
        self.elevenlabs_base = ""  # ElevenLabs(base_url=…) / adapters append /v1/text-to-speech/…
        self.suno_base = ""  # adapters append /api/v1/generate
        self.last_outputs: list[bytes] = []  # images / audio / clip bytes of the latest media response
        # Requests being answered now, and the most at once, per provider; both count only requests
        # that arrived since the last reset (a request from an earlier test may still be sleeping).
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self._epoch = 0
        self._queue: deque[Reply] = deque()
        self._suno_tasks: dict[str, _SunoTask] = {}
        self._suno_clips: dict[str, _SunoTask] = {}
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
        self.elevenlabs_base = self.url
        self.suno_base = self.url
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
            self.last_outputs = []
            self.in_flight, self.max_in_flight = {}, {}
            self._epoch += 1
            self._suno_tasks.clear()
            self._suno_clips.clear()

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._queue.popleft() if self._queue else self.default

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _served(self, outputs: list[bytes]) -> None:
        with self._lock:
            self.last_outputs = list(outputs)

    def _enter(self, provider: str) -> int:
        with self._lock:
            now = self.in_flight[provider] = self.in_flight.get(provider, 0) + 1
            self.max_in_flight[provider] = max(self.max_in_flight.get(provider, 0), now)
            return self._epoch

    def _leave(self, provider: str, epoch: int) -> None:
        with self._lock:
            if epoch == self._epoch:
                self.in_flight[provider] -= 1


class _Answered:
    """A response body that counts its request out of ``in_flight`` once sent (WSGI calls ``close``)."""

    def __init__(self, body: Iterable[bytes], leave: Callable[[], None]) -> None:
        self._body = body
        self._leave: Callable[[], None] | None = leave

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        try:
            if close is not None:
                close()
        finally:
            if self._leave is not None:
                self._leave, leave = None, self._leave
                leave()


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
# CreateChatCompletionRequest's properties (openai-schemas.json): anything else is refused as OpenAI does.
_OPENAI_FIELDS = frozenset(
    [
        "metadata",
        "top_logprobs",
        "temperature",
        "top_p",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "messages",
        "model",
        "service_tier",
        "modalities",
        "verbosity",
        "reasoning_effort",
        "max_completion_tokens",
        "frequency_penalty",
        "presence_penalty",
        "web_search_options",
        "response_format",
        "audio",
        "store",
        "moderation",
        "stream",
        "stop",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "prediction",
        "seed",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "function_call",
        "functions",
    ]
)
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


def _openai_logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """Deterministic per-token logprobs for `text` (one token per whitespace-led word)."""
    out = []
    for k, token in enumerate(_words(text)):
        entry = {"token": token, "logprob": -0.01 * (k + 1), "bytes": list(token.encode())}
        entry["top_logprobs"] = [
            {"token": token if j == 0 else f"{token}~{j}", "logprob": -0.01 * (k + 1) - j, "bytes": None}
            for j in range(top)
        ]
        out.append(entry)
    return out


def _words(text: str) -> list[str]:
    words, current = [], ""
    for ch in text:
        if ch.isspace() and current.strip():
            words.append(current)
            current = ""
        current += ch
    return [*words, current] if current else words


def _openai_tool_calls(r: Reply, data: dict[str, Any], rid: str) -> list[dict[str, Any]]:
    """The reply's tool calls when the request offered tools; a forced function gets one call to it."""
    tools = data.get("tools") or []
    if not r.tool_calls or not tools or data.get("tool_choice") == "none":
        return []
    calls = list(r.tool_calls)
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        calls = [{"name": choice["function"]["name"], "arguments": calls[0]["arguments"]}]
    elif data.get("parallel_tool_calls") is False:
        calls = calls[:1]
    return [
        {"id": f"call_{rid[-8:]}{k}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for k, c in enumerate(calls)
    ]


def _openai_format_error(data: dict[str, Any]) -> tuple[str, str] | None:
    """OpenAI's refusals of a malformed `response_format`: (message, param)."""
    fmt = data.get("response_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        said = json.dumps(data.get("messages")).lower()
        if "json" not in said:
            return (
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
                "messages",
            )
    elif fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema")
        if not isinstance(schema, dict) or not schema.get("name"):
            return "Missing required parameter: 'response_format.json_schema.name'.", "response_format.json_schema.name"
    elif fmt.get("type") != "text":
        return f"Invalid value: {fmt.get('type')!r}. Supported values are: 'text', 'json_object' and 'json_schema'.", (
            "response_format.type"
        )
    return None


def _openai_usage(r: Reply) -> dict[str, Any]:
    prompt = r.input_tokens + r.cached_tokens + r.cache_write_tokens
    usage = {
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
    return _with_raw_usage(r, usage)


def _openai(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path in ("/v1/embeddings", "/v1/responses") or path.startswith("/v1/responses/"):
        if not environ.get("HTTP_AUTHORIZATION", "").startswith("Bearer "):
            return _openai_error(start_response, 401, "You didn't provide an API key.")
        handler = _openai_embeddings if path == "/v1/embeddings" else _openai_responses
        return handler(fake, environ, start_response, data)
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
    unknown = sorted(set(data) - _OPENAI_FIELDS)
    if unknown:
        return _openai_error(start_response, 400, f"Unrecognized request argument supplied: {unknown[0]}")
    bad_format = _openai_format_error(data)
    if bad_format:
        return _openai_error(start_response, 400, bad_format[0], code="invalid_value", param=bad_format[1])
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
    tier = {None: "default", "auto": "default", "fast": "priority"}.get(tier, tier)
    calls = _openai_tool_calls(r, data, rid)
    if calls:  # a forced function ends with "stop", as OpenAI does
        finish = "stop" if isinstance(data.get("tool_choice"), dict) else "tool_calls"
    top = data.get("top_logprobs") or 0
    want_logprobs = data.get("logprobs") is True
    content = None if (calls or r.refusal) else r.text
    if not stream:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": r.refusal,
            "annotations": r.annotations or [],
        }
        if calls:
            message["tool_calls"] = calls
        logprobs = None
        if want_logprobs:
            logprobs = {
                "content": _openai_logprobs(content, top) if content else None,
                "refusal": _openai_logprobs(r.refusal, top) if r.refusal else None,
            }
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish} for i in range(n)
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

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None, pad: str, logprobs: Any = None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": tier,
            "system_fingerprint": _FINGERPRINT,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if include_usage:
            obj["usage"] = None
        if obfuscate:
            obj["obfuscation"] = pad
        return b"data: " + _dumps(obj) + b"\n\n"

    def pieces() -> Iterator[tuple[int, dict[str, Any], Any]]:
        """(choice, delta, logprobs) after the opening chunk: text, refusal or tool-call fragments."""
        if calls:
            for c_index, call in enumerate(calls):
                fn = call["function"]
                for k, piece in enumerate(_pieces(fn["arguments"], r.chunks) if fn["arguments"] else []):
                    delta = {"index": c_index, "function": {"arguments": piece}}
                    if k == 0 and c_index > 0:
                        delta = {
                            "index": c_index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": fn["name"], "arguments": piece},
                        }
                    for i in range(n):
                        yield i, {"tool_calls": [delta]}, None
            return
        key, text = ("refusal", r.refusal) if r.refusal else ("content", r.text)
        for piece in _pieces(text, r.chunks):
            logprobs = None
            if want_logprobs:
                tokens = _openai_logprobs(piece, top)
                logprobs = (
                    {"content": tokens, "refusal": None} if key == "content" else {"content": None, "refusal": tokens}
                )
            for i in range(n):
                yield i, {key: piece}, logprobs

    def opening() -> dict[str, Any]:
        if calls:
            first = calls[0]
            head = {
                "index": 0,
                "id": first["id"],
                "type": "function",
                "function": {"name": first["function"]["name"], "arguments": ""},
            }
            return {"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}
        if r.refusal:
            return {"role": "assistant", "content": None, "refusal": ""}
        return {"role": "assistant", "content": "", "refusal": None}

    def events() -> Iterator[bytes | None]:
        cut = _cut(r)
        for i in range(n):
            yield chunk(i, opening(), None, _OBFUSCATION)
        for k, (i, delta, logprobs) in enumerate(pieces()):
            if cut is not None and k // n == cut:
                break
            yield chunk(i, delta, None, _OBFUSCATION, logprobs)
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


# --- OpenAI embeddings (`POST /v1/embeddings`) and Responses (`POST /v1/responses`, `GET /v1/responses/{id}`)

# Each model's full vector size; `dimensions` may shorten the text-embedding-3 ones.
_OPENAI_EMBEDDING_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
_EMBEDDING_FIELDS = frozenset(["input", "model", "encoding_format", "dimensions", "user"])


def fake_embedding(seed: str, dims: int) -> list[float]:
    """A deterministic unit-ish vector for `seed`; every value is a multiple of 2⁻¹⁶ in [-1, 1), so it is
    exactly a float32 and survives base64 (little-endian float32) unchanged."""
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        digest = hashlib.sha256(f"{seed}|{counter}".encode()).digest()
        counter += 1
        for k in range(0, len(digest), 2):
            out.append((int.from_bytes(digest[k : k + 2], "little") - 32768) / 65536)
    return out[:dims]


def _embedding_seed(item: Any) -> str:
    return item if isinstance(item, str) else "tokens:" + ",".join(map(str, item))


def _openai_embeddings(
    fake: FakeUpstream, environ: WSGIEnvironment, start_response: StartResponse, data: Any
) -> Iterable[bytes]:
    """CreateEmbeddingRequest → CreateEmbeddingResponse. `usage.prompt_tokens` is the reply's `input_tokens`
    per string input, and the exact length of each token array."""
    if not isinstance(data, dict):
        return _openai_error(start_response, 400, "We could not parse the JSON body of your request.")
    unknown = sorted(set(data) - _EMBEDDING_FIELDS)
    if unknown:
        return _openai_error(start_response, 400, f"Unrecognized request argument supplied: {unknown[0]}")
    model = data.get("model")
    if not model:
        return _openai_error(start_response, 400, "you must provide a model parameter")
    if model not in _OPENAI_EMBEDDING_DIMS:
        return _openai_error(
            start_response,
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    raw = data.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        return _openai_error(
            start_response, 400, "'$.input' is invalid. Please check the API reference.", param="input"
        )
    if len(items) > 2048 or any(not item or not isinstance(item, (str, list)) for item in items):
        return _openai_error(
            start_response, 400, "'$.input' is invalid. Please check the API reference.", param="input"
        )
    fmt = data.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        return _openai_error(
            start_response,
            400,
            f"Invalid value: '{fmt}'. Supported values are: 'float' and 'base64'.",
            code="invalid_value",
            param="encoding_format",
        )
    dims = _OPENAI_EMBEDDING_DIMS[model]
    if data.get("dimensions") is not None:
        asked = data["dimensions"]
        if model == "text-embedding-ada-002":
            return _openai_error(start_response, 400, "This model does not support specifying dimensions.")
        if not isinstance(asked, int) or isinstance(asked, bool) or not 1 <= asked <= dims:
            return _openai_error(start_response, 400, f"Invalid value for 'dimensions' = {asked}.", param="dimensions")
        dims = asked
    r = _begin(fake, environ)
    headers: _Headers = [("x-request-id", f"req_{_new_id()}"), ("openai-version", "2020-10-01")]
    if r.status != 200:
        return _openai_reply_error(start_response, r, headers)
    out = []
    for index, item in enumerate(items):
        vector = fake_embedding(_embedding_seed(item), dims)
        embedding: Any = vector
        if fmt == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        out.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(item) if isinstance(item, list) else r.input_tokens for item in items)
    body: dict[str, Any] = {"object": "list", "data": out, "model": model}
    if r.fault != "no_usage":
        body["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _respond(start_response, 200, headers, _dumps(body))


# CreateResponse's properties (the SDK's ResponseCreateParams): any other is refused as OpenAI does.
_RESPONSES_FIELDS = frozenset(
    [
        "access_programs",
        "background",
        "context_management",
        "conversation",
        "image",
        "include",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "model",
        "moderation",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    ]
)
# Stored responses by id (`store` not false), across every FakeUpstream: ids never repeat.
_STORED_RESPONSES: dict[str, dict[str, Any]] = {}


def _responses_usage(r: Reply) -> dict[str, Any]:
    prompt = r.input_tokens + r.cached_tokens + r.cache_write_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": r.cached_tokens, "cache_write_tokens": r.cache_write_tokens},
        "output_tokens": r.output_tokens,
        "output_tokens_details": {"reasoning_tokens": r.reasoning_tokens},
        "total_tokens": prompt + r.output_tokens,
    }


def _responses_output(r: Reply, data: dict[str, Any], rid: str) -> list[dict[str, Any]]:
    """A reasoning item when the reply reasons, then function calls (when function tools were offered and the
    reply has some) or one assistant message."""
    items: list[dict[str, Any]] = []
    if r.reasoning_tokens:
        items.append({"type": "reasoning", "id": f"rs_{rid}", "summary": []})
    functions = [t for t in data.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    if r.tool_calls and functions and data.get("tool_choice") != "none":
        for k, call in enumerate(r.tool_calls):
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{rid}{k}",
                    "call_id": f"call_{rid[-8:]}{k}",
                    "name": call["name"],
                    "arguments": call["arguments"],
                    "status": "completed",
                }
            )
        return items
    items.append(
        {
            "type": "message",
            "id": f"msg_{rid}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": r.text, "annotations": [], "logprobs": []}],
        }
    )
    return items


def _responses_object(data: dict[str, Any], rid: str, created: int) -> dict[str, Any]:
    """The response object as `response.created` shows it: in progress, no output, no usage."""
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": data.get("instructions"),
        "max_output_tokens": data.get("max_output_tokens"),
        "max_tool_calls": data.get("max_tool_calls"),
        "model": str(data["model"]),
        "output": [],
        "parallel_tool_calls": data.get("parallel_tool_calls", True),
        "previous_response_id": data.get("previous_response_id"),
        "prompt_cache_key": data.get("prompt_cache_key"),
        "reasoning": data.get("reasoning") or {"effort": None, "summary": None},
        "safety_identifier": data.get("safety_identifier"),
        "service_tier": "default",
        "store": data.get("store") is not False,
        "temperature": data.get("temperature", 1.0),
        "text": data.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": data.get("tool_choice", "auto"),
        "tools": data.get("tools") or [],
        "top_logprobs": data.get("top_logprobs", 0),
        "top_p": data.get("top_p", 1.0),
        "truncation": data.get("truncation", "disabled"),
        "usage": None,
        "user": data.get("user"),
        "metadata": data.get("metadata") or {},
    }


def _openai_responses(
    fake: FakeUpstream, environ: WSGIEnvironment, start_response: StartResponse, data: Any
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if method == "GET" and path.startswith("/v1/responses/"):
        rid = path[len("/v1/responses/") :]
        stored = _STORED_RESPONSES.get(rid)
        if stored is None:
            return _openai_error(start_response, 404, f"Response with id '{rid}' not found.")
        return _respond(start_response, 200, [], _dumps(stored))
    if path != "/v1/responses" or method != "POST":
        return _openai_error(start_response, 404, f"Invalid URL ({method} {path})")
    if not isinstance(data, dict):
        return _openai_error(start_response, 400, "We could not parse the JSON body of your request.")
    unknown = sorted(set(data) - _RESPONSES_FIELDS)
    if unknown:
        return _openai_error(
            start_response, 400, f"Unknown parameter: '{unknown[0]}'.", code="unknown_parameter", param=unknown[0]
        )
    if not data.get("model"):
        return _openai_error(start_response, 400, "Missing required parameter: 'model'.", param="model")
    previous = data.get("previous_response_id")
    if previous is not None and previous not in _STORED_RESPONSES:
        return _openai_error(
            start_response,
            400,
            f"Previous response with id '{previous}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    if data.get("max_output_tokens") is not None and data["max_output_tokens"] < 16:
        return _openai_error(
            start_response,
            400,
            "Invalid 'max_output_tokens': integer below minimum value.",
            code="integer_below_min_value",
            param="max_output_tokens",
        )
    r = _begin(fake, environ)
    headers: _Headers = [("x-request-id", f"req_{_new_id()}"), ("openai-version", "2020-10-01")]
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status != 200:
        return _openai_reply_error(start_response, r, headers)
    rid = _new_id()
    created = int(time.time())
    opening = _responses_object(data, rid, created)
    output = _responses_output(r, data, rid)
    final = {**opening, "output": output, "usage": None if r.fault == "no_usage" else _responses_usage(r)}
    if r.finish == "length":
        final.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    else:
        final["status"] = "completed"
    if final["store"]:
        _STORED_RESPONSES[final["id"]] = final
    if data.get("stream") is not True:
        return _respond(start_response, 200, headers, _dumps(final))

    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return _sse(kind, {"type": kind, **fields, "sequence_number": next(sequence)})

    def events() -> Iterator[bytes | None]:
        cut = _cut(r)
        yield event("response.created", response=opening)
        yield event("response.in_progress", response=opening)
        sent = 0
        for index, item in enumerate(output):
            if item["type"] == "reasoning":
                yield event("response.output_item.added", output_index=index, item=item)
                yield event("response.output_item.done", output_index=index, item=item)
                continue
            if item["type"] == "function_call":
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
                for piece in _pieces(item["arguments"], r.chunks) if item["arguments"] else []:
                    if cut is not None and sent == cut:
                        break
                    sent += 1
                    yield event(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=index,
                        delta=piece,
                        obfuscation=_OBFUSCATION,
                    )
                else:
                    yield event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                    yield event("response.output_item.done", output_index=index, item=item)
                    continue
                break
            opened = {**item, "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield event("response.output_item.added", output_index=index, item=opened)
            yield event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            )
            for piece in _pieces(r.text, r.chunks):
                if cut is not None and sent == cut:
                    break
                sent += 1
                yield event(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    delta=piece,
                    logprobs=[],
                    obfuscation=_OBFUSCATION,
                )
            else:
                done = item["content"][0]
                yield event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=r.text,
                    logprobs=[],
                )
                yield event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=done
                )
                yield event("response.output_item.done", output_index=index, item=item)
                continue
            break
        if cut is not None:
            if r.fault == "truncate":
                yield None
                return
            yield event("error", code="server_error", message=r.error_message, param=None)
            return
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield event(kind, response=final)

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
# MessageCreateParams (PROVIDERS.md §4): any other top-level field is refused, as the API does.
_ANTHROPIC_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "tools",
        "tool_choice",
        "thinking",
        "metadata",
        "service_tier",
        "cache_control",
        "output_config",
        "inference_geo",
    }
)
_ANTHROPIC_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# What the fake bills for media, by Anthropic's documented rules: an image is width×height/750
# tokens after scaling to a long edge of at most 1568 px and about 1.15 megapixels; an image
# by URL (not fetched here) or of a size the fake cannot read counts as the cap; a PDF page is
# its text plus the page as an image.
ANTHROPIC_URL_IMAGE_TOKENS = 1600
ANTHROPIC_PDF_PAGE_TOKENS = 1500 + 1590
ANTHROPIC_THINKING = "Let me think this through step by step."
_ANTHROPIC_SIGNING_KEY = b"fake-anthropic-thinking"


def anthropic_image_tokens(width: int, height: int) -> int:
    """Anthropic's image token rule (tokens = width × height / 750 after its resizing)."""
    scale = min(1.0, 1568 / max(width, height), math.sqrt(1_150_000 / (width * height)))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    return math.ceil(w * h / 750)


def anthropic_signature(thinking: str) -> str:
    """The signature the fake puts on a thinking block (and checks when it comes back)."""
    return base64.b64encode(hashlib.sha256(_ANTHROPIC_SIGNING_KEY + thinking.encode()).digest()).decode()


def _image_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF or JPEG header."""
    if raw.startswith(_PNG_SIGNATURE) and len(raw) >= 24:
        return struct.unpack(">II", raw[16:24])
    if raw[:6] in (b"GIF87a", b"GIF89a") and len(raw) >= 10:
        return struct.unpack("<HH", raw[6:10])
    if raw.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(raw):
            marker, length = raw[i + 1], struct.unpack(">H", raw[i + 2 : i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", raw[i + 5 : i + 9])
                return width, height
            i += 2 + length
    return None


def _anthropic_error(
    start_response: StartResponse,
    status: int,
    message: str,
    type_: str | None = None,
    headers: _Headers | None = None,
    details_code: str | None = None,
) -> list[bytes]:
    default = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    headers = headers or [("request-id", f"req_fake{_new_id()}")]
    error: dict[str, Any] = {"type": type_ or default, "message": message}
    if details_code:
        error["details"] = {"error_code": details_code}
    body = {"type": "error", "error": error, "request_id": dict(headers)["request-id"]}
    return _respond(start_response, status, headers, _dumps(body))


def _anthropic_blocks_error(content: Any, where: str) -> tuple[str | None, int]:
    """A content list's first error as the API words it, and the media tokens it bills."""
    if isinstance(content, str):
        return None, 0
    if not isinstance(content, list):
        return f"{where}.content: Input should be a valid list", 0
    tokens = 0
    for k, block in enumerate(content):
        at = f"{where}.content.{k}"
        kind = block.get("type") if isinstance(block, dict) else None
        cache = block.get("cache_control") if isinstance(block, dict) else None
        if cache is not None and (not isinstance(cache, dict) or cache.get("type") != "ephemeral"):
            return f"{at}.cache_control: Input tag does not match 'ephemeral'", 0
        if kind == "text":
            if not isinstance(block.get("text"), str) or not block["text"].strip():
                return f"{at}: text content blocks must contain non-whitespace text", 0
        elif kind == "image":
            source = block.get("source") or {}
            if source.get("type") == "url" and str(source.get("url", "")).startswith(("http://", "https://")):
                tokens += ANTHROPIC_URL_IMAGE_TOKENS
            elif source.get("type") == "base64" and source.get("media_type") in _ANTHROPIC_IMAGE_TYPES:
                size = _image_size(base64.b64decode(source.get("data") or ""))
                tokens += anthropic_image_tokens(*size) if size else ANTHROPIC_URL_IMAGE_TOKENS
            else:
                return f"{at}.source: Input tag does not match an image source", 0
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") != "base64" or source.get("media_type") != "application/pdf":
                return f"{at}.source: Input tag does not match a document source", 0
            pages = len(re.findall(rb"/Type\s*/Page(?![A-Za-z])", base64.b64decode(source.get("data") or "")))
            if not pages:
                return f"{at}.source: The PDF specified was not valid.", 0
            tokens += pages * ANTHROPIC_PDF_PAGE_TOKENS
        elif kind in ("tool_use", "tool_result", "thinking", "redacted_thinking"):
            continue
        else:
            return f"{at}.type: Input tag {kind!r} found using 'type' does not match any of the expected tags", 0
    return None, tokens


def _anthropic_request_error(data: dict[str, Any]) -> tuple[str | None, int]:
    """The first thing the real API would refuse in `data` (400 invalid_request_error), and the media tokens."""
    for name in data:
        if name not in _ANTHROPIC_FIELDS:
            return f"{name}: Extra inputs are not permitted", 0
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required", 0
    temperature, top_p, top_k = data.get("temperature"), data.get("top_p"), data.get("top_k")
    if temperature is not None and not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1", 0
    if temperature is not None and top_p is not None:
        return "`temperature` and `top_p` cannot both be specified for this model. Please use only one.", 0
    if set(data.get("metadata") or {}) - {"user_id"}:
        return "metadata: Extra inputs are not permitted", 0
    tools = data.get("tools") or []
    for k, tool in enumerate(tools):
        if not tool.get("name") or (tool.get("input_schema") or {}).get("type") != "object":
            return f"tools.{k}.input_schema: Field required (an object schema)", 0
    choice = data.get("tool_choice") or {}
    if choice and choice.get("type") not in ("auto", "any", "tool", "none"):
        return "tool_choice.type: Input tag does not match", 0
    if choice.get("type") == "tool" and choice.get("name") not in {t.get("name") for t in tools}:
        return f"Tool '{choice.get('name')}' not found in tools", 0
    thinking = data.get("thinking")
    if thinking is not None:
        budget = thinking.get("budget_tokens")
        if thinking.get("type") != "enabled" or not isinstance(budget, int) or budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024", 0
        if budget >= data["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens`.", 0
        if temperature is not None and temperature != 1:
            return "`temperature` may only be set to 1 when thinking is enabled.", 0
        if top_k is not None:
            return "`top_k` must be unset when thinking is enabled.", 0
        if top_p is not None and not 0.95 <= top_p <= 1:
            return "`top_p` must be greater than or equal to 0.95 or unset when thinking is enabled.", 0
        if choice.get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use.", 0
    tokens, pending = 0, set()
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'", 0
        empty = not content.strip() if isinstance(content, str) else not content
        if empty and not (role == "assistant" and i == last):
            return (
                f"messages.{i}: all messages must have non-empty content "
                "except for the optional final assistant message",
                0,
            )
        if role == "assistant" and i == last and isinstance(content, str) and content != content.rstrip():
            return "final assistant content cannot end with trailing whitespace", 0
        error, media = _anthropic_blocks_error(content, f"messages.{i}")
        if error:
            return error, 0
        tokens += media
        blocks = content if isinstance(content, list) else []
        results = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if pending - results:
            return (
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                + ", ".join(sorted(pending - results)),
                0,
            )
        pending = {b["id"] for b in blocks if b.get("type") == "tool_use"} if role == "assistant" else set()
    if thinking is not None:
        # A tool loop's last assistant turn must start with the thinking the fake signed.
        for message in reversed(messages):
            blocks = message["content"] if isinstance(message["content"], list) else []
            if message["role"] != "assistant" or not any(b.get("type") == "tool_use" for b in blocks):
                continue
            first = blocks[0]
            if first.get("type") != "thinking":
                return (
                    "messages: Expected `thinking` or `redacted_thinking`, but found `tool_use`. When `thinking` "
                    "is enabled, a final `assistant` message must start with a thinking block.",
                    0,
                )
            if first.get("signature") != anthropic_signature(str(first.get("thinking"))):
                return "messages: Invalid `signature` in `thinking` block", 0
            break
    return None, tokens


def _anthropic_input_usage(r: Reply, media_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": r.input_tokens + media_tokens,
        "cache_creation_input_tokens": r.cache_write_tokens + r.cache_write_1h_tokens,
        "cache_read_input_tokens": r.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": r.cache_write_tokens,
            "ephemeral_1h_input_tokens": r.cache_write_1h_tokens,
        },
    }


def _anthropic_usage(r: Reply, output_tokens: int, media_tokens: int = 0) -> dict[str, Any]:
    usage = _anthropic_input_usage(r, media_tokens)
    usage["output_tokens"] = output_tokens
    usage["service_tier"] = "standard"
    usage["inference_geo"] = "global"
    if r.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": r.reasoning_tokens}
    return _with_raw_usage(r, usage)


def _with_raw_usage(r: Reply, usage: dict[str, Any]) -> dict[str, Any]:
    """The usage with `Reply.raw_usage`'s fields over it."""
    return {**usage, **(r.raw_usage or {})}


def _anthropic_content(r: Reply, data: dict[str, Any], mid: str) -> tuple[list[dict[str, Any]], str]:
    """The answer's content blocks and stop reason.

    Thinking (when asked) comes first, signed. With tools, the reply's `tool_calls` become
    `tool_use` blocks (text first unless tool use is forced); a forced tool the reply has no
    call for (the JSON-by-tool pattern) gets the reply's text, parsed as JSON, as its input.
    """
    blocks: list[dict[str, Any]] = []
    if data.get("thinking"):
        blocks.append(
            {"type": "thinking", "thinking": ANTHROPIC_THINKING, "signature": anthropic_signature(ANTHROPIC_THINKING)}
        )
    tools = data.get("tools") or []
    choice = data.get("tool_choice") or {"type": "auto"}
    calls: list[dict[str, str]] = []
    if tools and choice["type"] != "none":
        if choice["type"] == "tool":
            arguments = r.tool_calls[0]["arguments"] if r.tool_calls else r.text
            calls = [{"name": choice["name"], "arguments": arguments}]
        elif r.tool_calls:
            calls = r.tool_calls[:1] if choice.get("disable_parallel_tool_use") else list(r.tool_calls)
        elif choice["type"] == "any":
            calls = [{"name": tools[0]["name"], "arguments": "{}"}]
    if r.text and choice["type"] not in ("any", "tool") or not calls:
        blocks.append({"type": "text", "text": r.text})
    for k, call in enumerate(calls):
        try:
            arguments = json.loads(call["arguments"])
        except ValueError:
            arguments = {"text": call["arguments"]}
        blocks.append({"type": "tool_use", "id": f"toolu_{mid[-10:]}{k}", "name": call["name"], "input": arguments})
    stop = _ANTHROPIC_FINISH.get(r.finish, r.finish)
    return blocks, "tool_use" if calls and stop == "end_turn" else stop


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


_ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def _anthropic_block_events(index: int, block: dict[str, Any], r: Reply) -> Iterator[bytes | None]:
    """One non-text block as content_block_start, its deltas and content_block_stop."""
    kind = block["type"]
    if kind == "thinking":
        start: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(block["thinking"], 2)]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:  # tool_use: the input as JSON fragments, after an empty one as the API sends
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        text = _dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in ["", *_pieces(text, r.chunks)]]
    yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
    for delta in deltas:
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})


# MessageCountTokensParams: the prompt part of a Messages request.
_ANTHROPIC_COUNT_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control", "output_config"}
)


def anthropic_token_count(data: dict[str, Any]) -> int:
    """What the fake's count_tokens answers: a quarter of the prompt's JSON bytes (system, messages
    and tools, media data left out), rounded up, plus the media tokens a call would bill."""
    prompt = {name: data.get(name) for name in ("system", "messages", "tools")}
    text = re.sub(r'"data":"[^"]*"', '"data":""', _dumps(prompt).decode())
    _, media_tokens = _anthropic_request_error({**data, "max_tokens": 1 << 30})
    return math.ceil(len(text.encode()) / 4) + media_tokens


def _anthropic_count_tokens(start_response: StartResponse, data: dict[str, Any]) -> list[bytes]:
    for name in data:
        if name not in _ANTHROPIC_COUNT_FIELDS:
            return _anthropic_error(start_response, 400, f"{name}: Extra inputs are not permitted")
    for required in ("model", "messages"):
        if required not in data:
            return _anthropic_error(start_response, 400, f"{required}: Field required")
    refused, _ = _anthropic_request_error({**data, "max_tokens": 1 << 30})
    if refused:
        return _anthropic_error(start_response, 400, refused)
    headers: _Headers = [("request-id", f"req_fake{_new_id()}")]
    return _respond(start_response, 200, headers, _dumps({"input_tokens": anthropic_token_count(data)}))


def _anthropic(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path not in ("/v1/messages", "/v1/messages/count_tokens"):
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
    if path == "/v1/messages/count_tokens":
        return _anthropic_count_tokens(start_response, data)
    for required in ("model", "max_tokens", "messages"):
        if required not in data:
            return _anthropic_error(start_response, 400, f"{required}: Field required")
    refused, media_tokens = _anthropic_request_error(data)
    if refused:
        return _anthropic_error(start_response, 400, refused)

    r = _begin(fake, environ)
    mid = f"msg_fake{_new_id()}"
    headers: _Headers = [("request-id", f"req_fake{mid[8:]}")]
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status != 200:
        return _anthropic_error(start_response, r.status, r.error_message, r.error_type, headers, r.error_code)

    model = str(data["model"])
    content, stop = _anthropic_content(r, data, mid)
    with_usage = r.fault != "no_usage"
    if data.get("stream") is not True:
        body: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
        }
        if with_usage:
            body["usage"] = _anthropic_usage(r, r.output_tokens, media_tokens)
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
            message["usage"] = _anthropic_usage(r, min(1, r.output_tokens), media_tokens)
        yield _sse("message_start", {"type": "message_start", "message": message})
        for index, block in enumerate(content):
            if block["type"] != "text":
                yield from _anthropic_block_events(index, block, r)
                continue
            yield _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            )
            yield _ANTHROPIC_PING
            cut = _cut(r)
            for k, piece in enumerate(_pieces(r.text, r.chunks)):
                if k == cut:
                    break
                yield _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}},
                )
            if cut is not None:
                if r.fault == "truncate":
                    yield None
                    return
                error = {"type": r.error_type or "overloaded_error", "message": r.error_message}
                yield _sse("error", {"type": "error", "error": error})
                return
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        for output_tokens in (r.output_tokens // 2, r.output_tokens):
            delta: dict[str, Any] = {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
            }
            if with_usage:
                usage = _anthropic_input_usage(r, media_tokens)
                del usage["cache_creation"]
                usage["output_tokens"] = output_tokens
                delta["usage"] = _with_raw_usage(r, usage)
            yield _sse("message_delta", delta)
        yield _sse("message_stop", {"type": "message_stop"})

    return _stream(environ, start_response, headers, events(), chunk_delay=r.chunk_delay)


# --------------------------------------------------------------------------- Gemini

_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
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
# GenerateContentRequest and GenerationConfig fields (REST reference, camelCase); the real API
# answers any other name with 400 "Invalid JSON payload received. Unknown name …".
_GEMINI_REQUEST = {
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "safetySettings",
    "generationConfig",
    "cachedContent",
}
_GEMINI_CONFIG = {
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "enableEnhancedCivicAnswers",
    "speechConfig",
    "thinkingConfig",
    "imageConfig",
    "mediaResolution",
}
# Gemini's Schema object (an OpenAPI subset): JSON Schema's other keys are refused.
_GEMINI_SCHEMA = {
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
}
_GEMINI_PART = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "thought", "thoughtSignature"}
_GEMINI_MODES = {"AUTO", "ANY", "NONE", "VALIDATED"}


def gemini_thought_signature(name: str, args: dict[str, Any]) -> str:
    """The signature the fake puts on a function call it makes while thinking (and checks on return)."""
    digest = hashlib.sha256(f"{name}:{json.dumps(args, sort_keys=True)}".encode()).digest()
    return base64.b64encode(b"fake-thought:" + digest[:18]).decode()


def _gemini_schema_error(node: Any, where: str) -> str | None:
    if not isinstance(node, dict):
        return f"Invalid value at '{where}': a schema must be an object."
    for key, value in node.items():
        if key not in _GEMINI_SCHEMA:
            return f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field."
        if key == "properties":
            for name, sub in (value or {}).items():
                if error := _gemini_schema_error(sub, f"{where}.properties[{name}].value"):
                    return error
        elif key == "items" or key == "anyOf":
            for k, sub in enumerate(value if key == "anyOf" else [value]):
                if error := _gemini_schema_error(sub, f"{where}.{key}[{k}]"):
                    return error
    return None


def _gemini_thinking(model: str, config: dict[str, Any]) -> bool:
    """Whether the model thinks on this request (Gemini 3 always does; 2.5 unless the budget is 0)."""
    thinking = config.get("thinkingConfig") or {}
    return model.startswith("gemini-3") or (bool(thinking) and thinking.get("thinkingBudget") != 0)


def _gemini_request_error(data: dict[str, Any], model: str) -> str | None:
    """What the real API would answer with 400 INVALID_ARGUMENT for this body, or None."""
    for key in data:
        if key not in _GEMINI_REQUEST:
            return f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
    config = data.get("generationConfig") or {}
    for key in config:
        if key not in _GEMINI_CONFIG:
            return f"Invalid JSON payload received. Unknown name \"{key}\" at 'generation_config': Cannot find field."
    if "responseSchema" in config and config.get("responseMimeType") != "application/json":
        return "response_mime_type must be application/json when response_schema is set."
    if "responseSchema" in config and (
        error := _gemini_schema_error(config["responseSchema"], "generation_config.response_schema")
    ):
        return error
    if "logprobs" in config and not config.get("responseLogprobs"):
        return "logprobs requires response_logprobs to be true."
    declared: set[str] = set()
    for t, tool in enumerate(data.get("tools") or []):
        for f, fn in enumerate(tool.get("functionDeclarations") or []):
            declared.add(fn.get("name", ""))
            if "parameters" in fn:
                where = f"tools[{t}].function_declarations[{f}].parameters"
                if error := _gemini_schema_error(fn["parameters"], where):
                    return error
    mode = ((data.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode", "AUTO")
    if mode not in _GEMINI_MODES:
        return f"Invalid value at 'tool_config.function_calling_config.mode' ({mode})"
    thinking = _gemini_thinking(model, config)
    for k, content in enumerate(data["contents"]):
        if content.get("role", "user") not in ("user", "model"):
            return f"Please use a valid role: user, model (contents[{k}])."
        if not content.get("parts"):
            return f"contents[{k}].parts must not be empty."
        for part in content["parts"]:
            if set(part) - _GEMINI_PART or not set(part) & (_GEMINI_PART - {"thought", "thoughtSignature"}):
                return f"contents[{k}]: a part must hold exactly one kind of data."
            call = part.get("functionCall")
            if call is not None:
                if content.get("role") != "model":
                    return "A functionCall part must be in a model turn."
                if call.get("name") not in declared:
                    return f"Function {call.get('name')!r} is not declared in tools."
                # Parallel calls: only the first call of a turn carries (and needs) the signature.
                first = next(p for p in content["parts"] if "functionCall" in p) is part
                signature = gemini_thought_signature(call["name"], call.get("args") or {})
                if thinking and first and part.get("thoughtSignature") != signature:
                    return (
                        "Function call is missing a thought_signature in functionCall parts. This is required for "
                        "tools to work correctly, and missing thought_signature may lead to degraded model "
                        f"performance. Additional data, function call `default_api:{call['name']}`, position {k + 1}."
                    )
            response = part.get("functionResponse")
            if response is not None and (
                content.get("role") != "user" or not isinstance(response.get("response"), dict)
            ):
                return "A functionResponse part must be in a user turn and hold a response object."
            inline = part.get("inlineData")
            if inline is not None:
                try:
                    base64.b64decode(inline.get("data", ""), validate=True)
                except ValueError:
                    return "Invalid value at 'contents.parts.inline_data.data' (TYPE_BYTES), Base64 decoding failed."
                if not inline.get("mimeType"):
                    return "inline_data.mime_type is required."
            file = part.get("fileData")
            if file is not None and not str(file.get("fileUri", "")).startswith(("https://", "gs://")):
                return "Invalid file_data.file_uri: only https:// and Files API URIs are accepted."
    return None


def _gemini_calls(r: Reply, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The reply's function calls when the request declared functions and did not say NONE."""
    calls = r.tool_calls
    config = (data.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if not calls or not data.get("tools") or config.get("mode") == "NONE":
        return []
    allowed = config.get("allowedFunctionNames")
    out = []
    for call in calls:
        name = allowed[0] if allowed and call["name"] not in allowed else call["name"]
        out.append({"name": name, "args": json.loads(call["arguments"])})
    return out


def _gemini_logprobs(text: str, top: int) -> dict[str, Any]:
    chosen, tops = [], []
    for k, token in enumerate(re.findall(r"\s*\S+", text)):
        value = -0.01 * (k + 1)
        chosen.append({"token": token, "tokenId": 1000 + k, "logProbability": value})
        others = [{"token": f"alt{j}", "tokenId": 9000 + j, "logProbability": value - j - 1} for j in range(top)]
        tops.append({"candidates": [chosen[-1], *others][: max(top, 1)]})
    return {"topCandidates": tops, "chosenCandidates": chosen}


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
    return _with_raw_usage(r, usage)


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
    if action == "batchEmbedContents" and method == "POST" and environ.get("HTTP_X_GOOG_API_KEY"):
        return _gemini_embed(fake, start_response, environ, model, data)
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

    model_version = model.removeprefix("models/")
    if error := _gemini_request_error(data, model_version):
        return _gemini_error(start_response, 400, error)

    r = _begin(fake, environ)
    if r.status != 200:
        rpc = r.error_type or None
        return _gemini_error(start_response, r.status, r.error_message, rpc, r.retry_after)

    response_id = f"fake{_new_id()}"
    finish = _GEMINI_FINISH.get(r.finish, r.finish)
    with_usage = r.fault != "no_usage"
    calls = _gemini_calls(r, data)
    signed = _gemini_thinking(model_version, config)
    top = config.get("logprobs", 1) if config.get("responseLogprobs") else 0

    def response(text: str, final: bool) -> dict[str, Any]:
        candidates = []
        for i in range(count):
            parts: list[dict[str, Any]] = [{"text": text}] if text else []
            if final:
                for k, call in enumerate(calls):
                    part: dict[str, Any] = {"functionCall": call}
                    if signed and k == 0:  # Gemini signs the first call of a turn while thinking
                        part["thoughtSignature"] = gemini_thought_signature(call["name"], call["args"])
                    parts.append(part)
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
            if final:
                candidate["finishReason"] = finish
            if top and text:
                candidate["logprobsResult"] = _gemini_logprobs(text, top)
            candidate["index"] = i
            candidates.append(candidate)
        obj: dict[str, Any] = {"candidates": candidates}
        if with_usage:
            obj["usageMetadata"] = _gemini_usage(r, final)
        obj["modelVersion"] = model_version
        obj["responseId"] = response_id
        return obj

    if r.block_reason:
        # A blocked prompt: HTTP 200, no candidates, the reason in promptFeedback.
        blocked = {
            "promptFeedback": {"blockReason": r.block_reason},
            "usageMetadata": {"promptTokenCount": r.input_tokens, "totalTokenCount": r.input_tokens},
            "modelVersion": model_version,
            "responseId": response_id,
        }
        if action == "generateContent":
            return _respond(start_response, 200, [], _dumps(blocked))
        return _stream(environ, start_response, [], iter([b"data: " + _dumps(blocked) + b"\r\n\r\n"]))

    text = "" if calls else r.text
    if action == "generateContent":
        return _respond(start_response, 200, [], _dumps(response(text, True)))

    def objects() -> Iterator[dict[str, Any] | None]:
        pieces = _pieces(text, r.chunks) if text else [""]
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


# --- Gemini embeddings: `POST /v1beta/models/{model}:batchEmbedContents`

_GEMINI_EMBEDDING_MODELS = {"gemini-embedding-001": 3072, "text-embedding-004": 768}
_GEMINI_EMBED_FIELDS = frozenset(["model", "content", "taskType", "title", "outputDimensionality"])
_GEMINI_TASK_TYPES = frozenset(
    [
        "TASK_TYPE_UNSPECIFIED",
        "RETRIEVAL_QUERY",
        "RETRIEVAL_DOCUMENT",
        "SEMANTIC_SIMILARITY",
        "CLASSIFICATION",
        "CLUSTERING",
        "QUESTION_ANSWERING",
        "FACT_VERIFICATION",
        "CODE_RETRIEVAL_QUERY",
    ]
)


def _gemini_embed(
    fake: FakeUpstream, start_response: StartResponse, environ: WSGIEnvironment, model: str, data: Any
) -> Iterable[bytes]:
    """BatchEmbedContentsRequest → BatchEmbedContentsResponse: `{"embeddings": [{"values": […]}]}`, no usage
    (the API reports none). At most 100 requests a batch; each names the URL's model."""
    name = model.removeprefix("models/")
    if name not in _GEMINI_EMBEDDING_MODELS:
        return _gemini_error(
            start_response,
            404,
            f"models/{name} is not found for API version v1beta, or is not supported for batchEmbedContents.",
            "NOT_FOUND",
        )
    if not isinstance(data, dict) or set(data) - {"requests"}:
        extra = sorted(set(data) - {"requests"}) if isinstance(data, dict) else []
        return _gemini_error(
            start_response,
            400,
            f'Invalid JSON payload received. Unknown name "{extra[0]}"' if extra else "Invalid JSON payload received.",
        )
    requests_ = data.get("requests")
    if not isinstance(requests_, list) or not requests_:
        return _gemini_error(start_response, 400, "* BatchEmbedContentsRequest.requests: requests is not specified\n")
    if len(requests_) > 100:
        return _gemini_error(
            start_response, 400, "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch\n"
        )
    seeds, dims = [], []
    for k, request in enumerate(requests_):
        if not isinstance(request, dict):
            return _gemini_error(start_response, 400, "Invalid JSON payload received.")
        unknown = sorted(set(request) - _GEMINI_EMBED_FIELDS)
        if unknown:
            return _gemini_error(
                start_response,
                400,
                f"Invalid JSON payload received. Unknown name \"{unknown[0]}\" at 'requests[{k}]': Cannot find field.",
            )
        if request.get("model") != f"models/{name}":
            return _gemini_error(
                start_response,
                400,
                f"* BatchEmbedContentsRequest.requests[{k}].model: model must be the same as the batch model\n",
            )
        if "taskType" in request and request["taskType"] not in _GEMINI_TASK_TYPES:
            return _gemini_error(start_response, 400, f"Invalid value at 'requests[{k}].task_type'")
        parts = (request.get("content") or {}).get("parts") if isinstance(request.get("content"), dict) else None
        texts = [p.get("text") for p in parts or [] if isinstance(p, dict)]
        if not texts or not all(isinstance(t, str) for t in texts) or not "".join(texts):
            return _gemini_error(
                start_response, 400, f"* BatchEmbedContentsRequest.requests[{k}].content: contents must not be empty\n"
            )
        size = request.get("outputDimensionality", _GEMINI_EMBEDDING_MODELS[name])
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= _GEMINI_EMBEDDING_MODELS[name]:
            return _gemini_error(
                start_response, 400, f"* BatchEmbedContentsRequest.requests[{k}].output_dimensionality: invalid value\n"
            )
        seeds.append("".join(texts))
        dims.append(size)
    r = _begin(fake, environ)
    if r.status != 200:
        return _gemini_error(start_response, r.status, r.error_message, r.error_type or None, r.retry_after)
    body = {"embeddings": [{"values": fake_embedding(seed, size)} for seed, size in zip(seeds, dims, strict=True)]}
    return _respond(start_response, 200, [], _dumps(body))


# --------------------------------------------------------------------------- media bytes

_DEFAULT_ERROR = Reply.error_message
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, joint stereo, no CRC: every frame is 417 bytes.
_MP3_FRAME_HEADER = b"\xff\xfb\x90\x64"
_MP3_FRAME_BYTES = 417
_ID3_HEADER = b"ID3\x04\x00\x00\x00\x00\x00\x00"  # ID3v2.4 tag with no frames


def _noise(seed: str, size: int) -> bytes:
    """`size` deterministic pseudo-random bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{counter}\0{seed}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def fake_png(prompt: str, index: int = 0) -> bytes:
    """The valid 8×8 solid-colour RGB PNG the Images fake returns as image `index` for `prompt`.

    The colour is derived from (prompt, index), so different prompts or indices give different bytes and
    the same pair always gives the same bytes. The Images response carries base64(fake_png(prompt, i)).
    """
    rgb = hashlib.sha256(f"{index}\0{prompt}".encode()).digest()[:3]
    rows = b"".join(b"\x00" + rgb * 8 for _ in range(8))  # filter byte 0, then 8 pixels per row
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)  # 8×8, 8-bit depth, colour type 2 (RGB)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def _mp3_frames(seed: str, frames: int) -> bytes:
    payload = _noise(seed, frames * (_MP3_FRAME_BYTES - 4))
    size = _MP3_FRAME_BYTES - 4
    return b"".join(_MP3_FRAME_HEADER + payload[i * size : (i + 1) * size] for i in range(frames))


def fake_audio(text: str, output_format: str = "mp3_44100_128") -> bytes:
    """The audio bytes the ElevenLabs fake returns for `text` in `output_format` (deterministic).

    mp3_*: 1 + len(text)//32 MP3 frames, each starting with an MPEG-1 Layer III frame header (FF FB 90 64);
    pcm_*: 16-bit little-endian samples; ulaw_8000/alaw_8000: 8-bit samples; opus_*: an Ogg page ("OggS")
    holding an OpusHead, then noise. Only the leading bytes are a real container; the rest is noise.
    """
    seed = f"{output_format}\0{text}"
    units = 1 + len(text) // 32
    codec = output_format.split("_", 1)[0]
    if codec == "mp3":
        return _mp3_frames(seed, units)
    if codec == "pcm":
        return _noise(seed, units * 640)
    if codec in ("ulaw", "alaw"):
        return _noise(seed, units * 320)
    rate = int(output_format.split("_")[1])  # opus_48000_<kbps>
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, rate, 0, 0)
    serial = _noise(seed, 4)
    page = b"OggS\x00\x02" + bytes(8) + serial + bytes(4) + bytes(4) + b"\x01" + bytes([len(head)]) + head
    return page + _noise(seed, units * 400)


def fake_clip(clip_id: str) -> bytes:
    """The MP3 bytes served at ``/files/{clip_id}.mp3`` (an ID3v2 header, then 6 MP3 frames)."""
    return _ID3_HEADER + _mp3_frames(f"suno\0{clip_id}", 6)


def _split(body: bytes, n: int) -> list[bytes]:
    n = max(1, min(n, len(body)))
    return [body[i * len(body) // n : (i + 1) * len(body) // n] for i in range(n)]


def _send_bytes(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    headers: _Headers,
    content_type: str,
    body: bytes,
    r: Reply,
    chunked: bool = False,
) -> Iterable[bytes]:
    """Send raw bytes; chunked (no Content-Length) for stream endpoints, cut by `fault="truncate"`."""
    if not chunked:
        headers = [*headers, ("Content-Length", str(len(body)))]
    cut = max(0, r.fault_after) if r.fault == "truncate" else None
    if cut is None and not chunked:
        start_response("200 OK", [*headers, ("Content-Type", content_type)])
        return [body]

    def pieces() -> Iterator[bytes | None]:
        for k, piece in enumerate(_split(body, r.chunks)):
            if k == cut:
                yield None
                return
            yield piece

    return _stream(environ, start_response, headers, pieces(), content_type=content_type, chunk_delay=r.chunk_delay)


def _origin(environ: WSGIEnvironment) -> str:
    """The scheme://host[:port] the client used, so URLs in responses point back at this fake."""
    host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', 80)}"
    return f"{environ.get('wsgi.url_scheme', 'http')}://{host}"


def _bearer(environ: WSGIEnvironment) -> bool:
    auth = environ.get("HTTP_AUTHORIZATION", "")
    return auth.startswith("Bearer ") and bool(auth[7:].strip())


# --------------------------------------------------------------------------- OpenAI Images

_IMAGE_TOKENS = {  # output image tokens per image (PROVIDERS.md §2)
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}


def _image_output_tokens(quality: str, size: str) -> int:
    table = _IMAGE_TOKENS.get(quality, _IMAGE_TOKENS["high"])
    if size in table:
        return table[size]
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        return table["1024x1024"]
    return max(1, round(table["1024x1024"] * width * height / (1024 * 1024)))


def _openai_images(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path != "/v1/images/generations":
        return _openai_error(start_response, 404, f"Invalid URL ({method} {path})")
    if method != "POST":
        return _openai_error(start_response, 405, f"Invalid method for URL ({method} {path})")
    if not _bearer(environ):
        return _openai_error(
            start_response,
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    if not isinstance(data, dict):
        return _openai_error(start_response, 400, "We could not parse the JSON body of your request.")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return _openai_error(
            start_response,
            400,
            "Missing required parameter: 'prompt'.",
            code="missing_required_parameter",
            param="prompt",
        )
    n = data.get("n")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        return _openai_error(
            start_response,
            400,
            f"Invalid value for 'n': {n!r}. Expected an integer between 1 and 10.",
            code="invalid_value",
            param="n",
        )
    if data.get("stream") is True:
        return _openai_error(start_response, 400, "The fake upstream does not implement image streaming.")

    r = _begin(fake, environ)
    headers: _Headers = [("x-request-id", f"req_{_new_id()}"), ("openai-version", "2020-10-01")]
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status != 200:
        return _openai_reply_error(start_response, r, headers)

    size = data.get("size") or "auto"
    size = "1024x1024" if size == "auto" else str(size)
    quality = data.get("quality") or "auto"
    quality = "high" if quality == "auto" else str(quality)
    background = data.get("background") or "auto"
    background = "opaque" if background == "auto" else str(background)
    images = [fake_png(prompt, i) for i in range(n)]
    fake._served(images)
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image).decode()} for image in images],
        "background": background,
        "output_format": str(data.get("output_format") or "png"),  # the bytes are PNG whatever is asked
        "size": size,
        "quality": quality,
    }
    if not r.omit_usage and r.fault != "no_usage":
        numbers = {
            "text_tokens": max(1, math.ceil(len(prompt) / 4)),
            "image_tokens": 0,
            "output_tokens": n * _image_output_tokens(quality, size),
            **(r.image_usage or {}),
        }
        input_tokens = numbers["text_tokens"] + numbers["image_tokens"]
        body["usage"] = {
            "total_tokens": input_tokens + numbers["output_tokens"],
            "input_tokens": input_tokens,
            "output_tokens": numbers["output_tokens"],
            "input_tokens_details": {
                "text_tokens": numbers["text_tokens"],
                "image_tokens": numbers["image_tokens"],
            },
        }
    return _respond(start_response, 200, headers, _dumps(body))


# --------------------------------------------------------------------------- OpenAI speech

_SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
_SPEECH_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
_SPEECH_FIELDS = frozenset({"model", "input", "voice", "instructions", "response_format", "speed", "stream_format"})
_SPEECH_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


def fake_speech(text: str, response_format: str = "mp3", voice: str = "alloy") -> bytes:
    """The audio bytes the OpenAI speech fake returns (deterministic; only the leading bytes are a real container).

    mp3: MPEG frames as `fake_audio`; wav: a RIFF/WAVE header (24 kHz 16-bit mono) and samples; pcm: raw
    samples; opus: an Ogg page; aac: ADTS frame headers; flac: the `fLaC` marker. 1 + len(text)//32 units.
    """
    seed = f"openai-speech\0{response_format}\0{voice}\0{text}"
    units = 1 + len(text) // 32
    if response_format == "mp3":
        return _mp3_frames(seed, units)
    samples = _noise(seed, units * 960)
    if response_format == "pcm":
        return samples
    if response_format == "wav":
        fmt = struct.pack("<HHIIHH", 1, 1, 24000, 48000, 2, 16)
        return (
            b"RIFF"
            + struct.pack("<I", 36 + len(samples))
            + b"WAVEfmt "
            + struct.pack("<I", 16)
            + fmt
            + b"data"
            + struct.pack("<I", len(samples))
            + samples
        )
    if response_format == "opus":
        return b"OggS\x00\x02" + bytes(20) + b"\x01\x13OpusHead" + samples
    if response_format == "aac":
        return b"\xff\xf1\x50\x80" + samples
    return b"fLaC" + samples


def _openai_speech(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    """``POST /v1/audio/speech``: the audio bytes, chunked as OpenAI sends them; no usage anywhere."""
    if environ["REQUEST_METHOD"] != "POST":
        return _openai_error(start_response, 405, "Invalid method for URL (GET /v1/audio/speech)")
    if not _bearer(environ):
        return _openai_error(start_response, 401, "You didn't provide an API key.", code="invalid_api_key")
    if not isinstance(data, dict):
        return _openai_error(start_response, 400, "We could not parse the JSON body of your request.")
    unknown = sorted(set(data) - _SPEECH_FIELDS)
    if unknown:
        return _openai_error(
            start_response, 400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
        )
    for name in ("model", "input", "voice"):
        if name not in data:
            return _openai_error(
                start_response, 400, f"Missing required parameter: '{name}'.", code="missing_required_parameter"
            )
    model, text, voice = data["model"], data["input"], data["voice"]
    if model not in _SPEECH_MODELS:
        return _openai_error(
            start_response,
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    if not isinstance(text, str) or len(text) > 4096:
        return _openai_error(
            start_response,
            400,
            "Invalid 'input': string too long. Expected a string with maximum length 4096.",
            code="string_above_max_length",
            param="input",
        )
    voice_id = voice.get("id") if isinstance(voice, dict) else voice
    if not isinstance(voice_id, str) or (isinstance(voice, str) and voice not in _SPEECH_VOICES):
        return _openai_error(start_response, 400, f"Invalid value for 'voice': {voice!r}.", param="voice")
    response_format = data.get("response_format", "mp3")
    if response_format not in _SPEECH_CONTENT_TYPES:
        return _openai_error(
            start_response, 400, f"Invalid value for 'response_format': {response_format!r}.", param="response_format"
        )
    speed = data.get("speed", 1.0)
    if not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        return _openai_error(start_response, 400, f"Invalid value for 'speed': {speed!r}.", param="speed")
    if "instructions" in data and not model.startswith("gpt-4o-mini-tts"):
        return _openai_error(start_response, 400, f"Instructions are not supported for {model}.", param="instructions")
    if data.get("stream_format", "audio") == "sse" and not model.startswith("gpt-4o-mini-tts"):
        return _openai_error(start_response, 400, f"stream_format 'sse' is not supported for {model}.")

    r = _begin(fake, environ)
    headers: _Headers = [("x-request-id", f"req_{_new_id()}"), ("openai-version", "2020-10-01")]
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status != 200:
        return _openai_reply_error(start_response, r, headers)
    audio = fake_speech(text, response_format, voice_id)
    fake._served([audio])
    content_type = _SPEECH_CONTENT_TYPES[response_format]
    return _send_bytes(environ, start_response, headers, content_type, audio, r, chunked=True)


# --------------------------------------------------------------------------- ElevenLabs

_TTS_PREFIX = "/v1/text-to-speech/"
_TTS_FORMATS = (
    "mp3_22050_32",
    "mp3_24000_48",
    "mp3_44100_32",
    "mp3_44100_64",
    "mp3_44100_96",
    "mp3_44100_128",
    "mp3_44100_192",
    *(f"pcm_{rate}" for rate in (8000, 16000, 22050, 24000, 32000, 44100, 48000)),
    "ulaw_8000",
    "alaw_8000",
    *(f"opus_48000_{kbps}" for kbps in (32, 64, 96, 128, 192)),
)
_TTS_CONTENT_TYPES = {"mp3": "audio/mpeg", "pcm": "audio/pcm", "ulaw": "audio/basic", "alaw": "audio/basic"}
_TTS_ERRORS = {
    400: "invalid_request",
    401: "invalid_api_key",
    402: "payment_required",
    403: "forbidden",
    404: "voice_not_found",
    429: "too_many_concurrent_requests",
    503: "system_busy",
}


def _tts_id(seed: str) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(alphabet[b % len(alphabet)] for b in hashlib.sha256(seed.encode()).digest()[:20])


def _elevenlabs_error(
    start_response: StartResponse, status: int, message: str, code: str | None = None, headers: _Headers | None = None
) -> list[bytes]:
    code = code or _TTS_ERRORS.get(status, "internal_server_error" if status >= 500 else "invalid_request")
    return _respond(start_response, status, headers or [], _dumps({"detail": {"status": code, "message": message}}))


def _elevenlabs_422(
    start_response: StartResponse,
    loc: list[str],
    msg: str,
    type_: str,
    headers: _Headers | None = None,
) -> list[bytes]:
    detail = [{"loc": loc, "msg": msg, "type": type_}]
    return _respond(start_response, 422, headers or [], _dumps({"detail": detail}))


def tts_character_cost(text: str, model_id: str | None) -> int:
    """ElevenLabs' default credit rule: 0.5 per character for flash/turbo models, 1 otherwise."""
    model = model_id or "eleven_multilingual_v2"
    if "flash" in model or "turbo" in model:
        return math.ceil(len(text) * 0.5)
    return len(text)


def _elevenlabs(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    voice_id, _, variant = path[len(_TTS_PREFIX) :].partition("/")
    if not voice_id or variant not in ("", "stream"):
        return _respond(start_response, 404, [], _dumps({"detail": "Not Found"}))
    if method != "POST":
        return _respond(start_response, 405, [], _dumps({"detail": "Method Not Allowed"}))
    if not environ.get("HTTP_XI_API_KEY", "").strip():
        return _elevenlabs_error(start_response, 401, "Invalid API key", "invalid_api_key")
    output_format = parse_qs(environ.get("QUERY_STRING", "")).get("output_format", ["mp3_44100_128"])[0]
    if output_format not in _TTS_FORMATS:
        allowed = ", ".join(f"'{f}'" for f in _TTS_FORMATS)
        return _elevenlabs_422(start_response, ["query", "output_format"], f"Input should be {allowed}", "enum")
    if data is None:
        return _elevenlabs_422(start_response, ["body"], "Field required", "missing")
    if not isinstance(data, dict):
        return _elevenlabs_422(
            start_response,
            ["body"],
            "Input should be a valid dictionary or object to extract fields from",
            "model_attributes_type",
        )
    text = data.get("text")
    if "text" not in data:
        return _elevenlabs_422(start_response, ["body", "text"], "Field required", "missing")
    if not isinstance(text, str):
        return _elevenlabs_422(start_response, ["body", "text"], "Input should be a valid string", "string_type")

    r = _begin(fake, environ)
    request_id = _tts_id(f"request\0{_new_id()}")
    headers: _Headers = [("request-id", request_id)]
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status == 422:
        type_ = r.error_type or "value_error"
        return _elevenlabs_422(start_response, ["body", "text"], r.error_message, type_, headers)
    if r.status != 200:
        return _elevenlabs_error(start_response, r.status, r.error_message, r.error_type, headers)

    audio = fake_audio(text, output_format)
    fake._served([audio])
    cost = tts_character_cost(text, data.get("model_id")) if r.character_cost is None else r.character_cost
    if cost != OMIT and r.fault != "no_usage":
        headers.append(("character-cost", str(cost)))
    headers += [
        ("history-item-id", _tts_id(f"history\0{request_id}")),
        ("current-concurrent-requests", "1"),
        ("maximum-concurrent-requests", "3"),
        (
            "access-control-expose-headers",
            "request-id, history-item-id, character-cost, current-concurrent-requests, maximum-concurrent-requests",
        ),
    ]
    content_type = _TTS_CONTENT_TYPES.get(output_format.split("_", 1)[0], "audio/opus")
    return _send_bytes(environ, start_response, headers, content_type, audio, r, chunked=variant == "stream")


# --------------------------------------------------------------------------- Suno (sunoapi.org shape)

_SUNO_STAGES = ("PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS")
_SUNO_APP_MESSAGES = {
    400: "Invalid parameters",
    401: "You do not have access permissions",
    404: "Task not found",
    405: "Rate limit exceeded",
    413: "Prompt too long",
    429: "The current credits are insufficient. Please top up.",
    430: "Your call frequency is too high. Please try again later.",
    455: "The system is currently undergoing maintenance. Please try again later.",
    500: "Server error",
}
_SUNO_FAILURE_DETAILS = {
    "GENERATE_AUDIO_FAILED": (500, "Audio generation failed."),
    "SENSITIVE_WORD_ERROR": (400, "The prompt contains sensitive words. Please modify it and try again."),
}
_SUNO_MODELS = ("V4", "V4_5", "V4_5PLUS", "V4_5ALL", "V5", "V5_5")


@dataclass
class _SunoTask:
    task_id: str
    reply: Reply
    request: dict[str, Any]
    clip_ids: list[str]
    created: float
    polls: int = 0


def _suno_body(code: int, msg: str, data: Any = None) -> bytes:
    return _dumps({"code": code, "msg": msg, "data": data})


def _suno_message(code: int, r: Reply | None = None) -> str:
    if r is not None and r.error_message != _DEFAULT_ERROR:
        return r.error_message
    return _SUNO_APP_MESSAGES.get(code, "Error")


def _suno_clip_id(task_id: str, index: int) -> str:
    h = hashlib.sha256(f"{task_id}\0{index}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _suno_clips(origin: str, task: _SunoTask, stage: int) -> list[dict[str, Any]]:
    """Clips as record-info shows them: listed from TEXT_SUCCESS, first audio at FIRST_SUCCESS, all at SUCCESS."""
    if stage < 1:
        return []
    request = task.request
    prompt = str(request.get("prompt") or "")
    model = str(request.get("model") or "V4_5ALL")
    title = str(request.get("title") or " ".join(prompt.split()[:4]) or "Untitled")
    clips = []
    for index, clip_id in enumerate(task.clip_ids):
        ready = stage >= 3 or (stage == 2 and index == 0)
        seconds = 120 + int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:2], "big") % 12000 / 100
        clips.append(
            {
                "id": clip_id,
                "audioUrl": f"{origin}/files/{clip_id}.mp3" if ready else "",
                "streamAudioUrl": f"{origin}/files/{clip_id}.mp3?stream=1",
                "imageUrl": f"{origin}/files/{clip_id}.png",
                "prompt": "" if request.get("instrumental") is True else prompt,
                "modelName": "chirp-" + model.lower().replace("_", "-"),
                "title": title,
                "tags": str(request.get("style") or ""),
                "createTime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(task.created)),
                "duration": seconds if ready else None,
            }
        )
    return clips


def _suno_submit(
    fake: FakeUpstream, environ: WSGIEnvironment, start_response: StartResponse, data: Any
) -> Iterable[bytes]:
    if not isinstance(data, dict):
        return _respond(start_response, 200, [], _suno_body(400, "Invalid JSON body"))
    custom = data.get("customMode") is True
    instrumental = data.get("instrumental") is True
    missing = [
        name
        for name, needed in (
            ("prompt", not (custom and instrumental)),
            ("style", custom),
            ("title", custom),
        )
        if needed and not data.get(name)
    ]
    if missing:
        return _respond(start_response, 200, [], _suno_body(400, f"Please enter {missing[0]}"))
    if data.get("model") is not None and data["model"] not in _SUNO_MODELS:
        return _respond(start_response, 200, [], _suno_body(400, f"Invalid model: {data['model']}"))
    limit = 5000 if custom else 500
    if len(str(data.get("prompt") or "")) > limit:
        return _respond(start_response, 200, [], _suno_body(413, _SUNO_APP_MESSAGES[413]))

    r = _begin(fake, environ)
    headers: _Headers = []
    if r.retry_after is not None:
        headers.append(("Retry-After", r.retry_after))
    if r.status != 200:
        return _respond(start_response, r.status, headers, _suno_body(r.status, _suno_message(r.status, r)))
    if r.suno_app_code != 200:
        code = r.suno_app_code
        return _respond(start_response, 200, headers, _suno_body(code, _suno_message(code, r)))
    task_id = _new_id()
    task = _SunoTask(task_id, r, dict(data), [_suno_clip_id(task_id, i) for i in range(2)], time.time())
    with fake._lock:
        fake._suno_tasks[task_id] = task
        for clip_id in task.clip_ids:
            fake._suno_clips[clip_id] = task
    return _respond(start_response, 200, headers, _suno_body(200, "success", {"taskId": task_id}))


def _suno_poll(fake: FakeUpstream, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    task_id = parse_qs(environ.get("QUERY_STRING", "")).get("taskId", [""])[0]
    if not task_id:
        return _respond(start_response, 200, [], _suno_body(400, "Please enter taskId"))
    with fake._lock:
        task = fake._suno_tasks.get(task_id)
        if task is not None:
            task.polls += 1
            poll = task.polls - 1
    if task is None:
        return _respond(start_response, 200, [], _suno_body(404, _SUNO_APP_MESSAGES[404]))
    r = task.reply
    per_stage = r.suno_polls_per_stage
    stage = 3 if per_stage <= 0 else min(poll // per_stage, 3)
    error_code: int | str | None = None
    error_message = None
    if r.suno_fail is not None and stage > 0:
        status = r.suno_fail
        default_code, default_message = _SUNO_FAILURE_DETAILS[status]
        code = r.error_code
        error_code = int(code) if code and code.isdigit() else (code or default_code)
        error_message = r.error_message if r.error_message != _DEFAULT_ERROR else default_message
        clips: list[dict[str, Any]] = []
    else:
        status = _SUNO_STAGES[stage]
        clips = _suno_clips(_origin(environ), task, stage)
    record = {
        "taskId": task_id,
        "parentMusicId": "",
        "param": json.dumps(task.request, ensure_ascii=False),
        "response": {"taskId": task_id, "sunoData": clips},
        "status": status,
        "type": "GENERATE",
        "errorCode": error_code,
        "errorMessage": error_message,
    }
    return _respond(start_response, 200, [], _suno_body(200, "success", record))


def _suno_file(
    fake: FakeUpstream, environ: WSGIEnvironment, start_response: StartResponse, path: str
) -> Iterable[bytes]:
    name = path[len("/files/") :]
    clip_id, _, extension = name.rpartition(".")
    with fake._lock:
        task = fake._suno_clips.get(clip_id)
    if task is None or extension not in ("mp3", "png"):
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"Not Found"]
    if environ["REQUEST_METHOD"] != "GET":
        start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Content-Length", "18")])
        return [b"Method Not Allowed"]
    if extension == "png":
        body, content_type = fake_png(clip_id, 0), "image/png"
    else:
        body, content_type = fake_clip(clip_id), "audio/mpeg"
    fake._served([body])
    return _send_bytes(environ, start_response, [], content_type, body, task.reply)


def _suno(
    fake: FakeUpstream,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    data: Any,
) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path.startswith("/files/"):
        return _suno_file(fake, environ, start_response, path)
    routes = {"/api/v1/generate": "POST", "/api/v1/generate/record-info": "GET"}
    if path not in routes:
        return _respond(start_response, 404, [], _suno_body(404, f"Not Found: {path}"))
    if method != routes[path]:
        return _respond(start_response, 405, [], _suno_body(405, f"Request method '{method}' not supported"))
    if not _bearer(environ):
        return _respond(start_response, 401, [], _suno_body(401, _SUNO_APP_MESSAGES[401]))
    if path == "/api/v1/generate":
        return _suno_submit(fake, environ, start_response, data)
    return _suno_poll(fake, environ, start_response)


# --------------------------------------------------------------------------- OpenAI moderations

FLAG_WORD = "FLAG_ME"  # any input containing it is flagged (harassment), everything else passes


def _moderations(
    fake: FakeUpstream, environ: WSGIEnvironment, start_response: StartResponse, data: Any
) -> Iterable[bytes]:
    """``POST /v1/moderations`` (§3): one result per input; does not consume queued replies."""
    inputs = data.get("input") if isinstance(data, dict) else None
    if inputs is None:
        return _respond(
            start_response,
            400,
            [],
            _dumps(
                {
                    "error": {
                        "message": "input is required",
                        "type": "invalid_request_error",
                        "param": "input",
                        "code": None,
                    }
                }
            ),
        )
    items = inputs if isinstance(inputs, list) else [inputs]
    results = []
    for item in items:
        text = item if isinstance(item, str) else json.dumps(item)
        flagged = FLAG_WORD in text
        results.append(
            {
                "flagged": flagged,
                "categories": {"harassment": flagged, "violence": False},
                "category_scores": {"harassment": 0.99 if flagged else 0.001, "violence": 0.001},
                "category_applied_input_types": {"harassment": ["text"], "violence": ["text"]},
            }
        )
    body = {"id": "modr-" + _new_id(), "model": data.get("model") or "omni-moderation-latest", "results": results}
    return _respond(start_response, 200, [("Content-Type", "application/json")], _dumps(body))


# --------------------------------------------------------------------------- WSGI app


def make_wsgi_app(fake: FakeUpstream) -> WSGIApplication:
    """The WSGI callable serving every faked provider from `fake`'s queue and default reply."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path.startswith("/v1beta/"):
            provider, handler = "gemini", _gemini
        elif path.startswith("/v1/messages"):
            provider, handler = "anthropic", _anthropic
        elif path.startswith("/v1/images/"):
            provider, handler = "openai_images", _openai_images
        elif path == "/v1/audio/speech":
            provider, handler = "openai_speech", _openai_speech
        elif path.startswith(_TTS_PREFIX):
            provider, handler = "elevenlabs", _elevenlabs
        elif path.startswith(("/api/v1/", "/files/")):
            provider, handler = "suno", _suno
        elif path == "/v1/moderations":
            provider, handler = "openai_moderation", _moderations
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
        epoch = fake._enter(provider)
        try:
            body = handler(fake, environ, start_response, data)
        except BaseException:
            fake._leave(provider, epoch)
            raise
        return _Answered(body, lambda: fake._leave(provider, epoch))

    return app


def create_app() -> WSGIApplication:
    """Factory for external servers: `gunicorn 'tests.fakes.upstreams:create_app()'` (no recording)."""
    return make_wsgi_app(FakeUpstream(record=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake upstreams until killed.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each response")
    parser.add_argument("--chunks", type=int, default=3, help="text pieces per stream")
    parser.add_argument(
        "--suno-polls-per-stage",
        type=int,
        default=1,
        help="Suno record-info polls per status stage (3 stages: a task is done at poll 3N+1)",
    )
    args = parser.parse_args(argv)
    fake = FakeUpstream(
        Reply(delay=args.delay, chunks=args.chunks, suno_polls_per_stage=args.suno_polls_per_stage),
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
