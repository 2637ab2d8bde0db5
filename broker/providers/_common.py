"""Plumbing shared by the network adapters: posting, error mapping and SSE reading."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import requests
import urllib3
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from broker.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from broker.providers.base import (
    StreamEvent,
    UpstreamModelNotFound,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
)

CREDENTIALS_MESSAGE = "the provider refused the broker's credentials"
QUOTA_MESSAGE = "{provider} refused the broker's account (quota or spend limit reached); the operator has been alerted"
DEFAULT_RETRY_AFTER = "1"
# Error codes by which a provider says our own account, not the request, is out of quota.
QUOTA_CODES = {"insufficient_quota"}
MAX_ERROR_MESSAGE = 500

# Everything that can go wrong while reading a response body: transport failures and
# bodies that are not the JSON (or UTF-8) the provider promised.
READ_FAILURES: tuple[type[BaseException], ...] = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    ValueError,  # json.JSONDecodeError and UnicodeDecodeError included
    LookupError,
    TypeError,
    AttributeError,
)

SSEEvent = tuple[str, str]  # (event name, "" when absent; joined data lines)
Translator = Callable[[Iterator[SSEEvent]], Iterator[StreamEvent]]


def as_dict(value: Any) -> dict:
    """``value`` if it is a JSON object, else an empty dict (tolerates nulls)."""
    return value if isinstance(value, dict) else {}


def as_int(value: Any) -> int:
    """A token count from a JSON field; absent, null or malformed counts are 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def post(
    provider: str,
    session: requests.Session,
    url: str,
    *,
    headers: dict[str, str],
    body: dict,
    timeout: tuple[float, float],
    stream: bool,
    secret: str,
) -> requests.Response:
    """POST ``body`` and return a 2xx response; any other outcome raises an UpstreamError.

    ``secret`` (the provider key) is scrubbed from every message taken from the body.
    """
    response = send(provider, session, "POST", url, headers=headers, body=body, timeout=timeout, stream=stream)
    if response.status_code >= 300:
        try:
            raise status_error(provider, response, secret)
        finally:
            response.close()
    return response


def send(
    provider: str,
    session: requests.Session,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    timeout: tuple[float, float],
    body: dict | None = None,
    params: dict[str, str] | None = None,
    stream: bool = False,
    allow_redirects: bool = False,
) -> requests.Response:
    """Send one request and return the response whatever its status; transport failures raise.

    For callers that map statuses themselves (media adapters with their own error shapes).
    """
    try:
        adapter = session.get_adapter(url)
        if params is None and not allow_redirects and not session.proxies and type(adapter) is HTTPAdapter:
            return _urlopen(session, adapter, method, url, headers, body, timeout, stream)
        return session.request(
            method,
            url,
            json=body,
            params=params,
            headers=headers,
            timeout=timeout,
            stream=stream,
            allow_redirects=allow_redirects,
        )
    except READ_FAILURES as exc:
        raise transport_error(provider, exc) from None


# -- the direct path: the session's own urllib3 pool, without requests' per-call machinery --------
# requests spends about as much CPU per call as urllib3 itself (merging settings, preparing the
# request, cookies, hooks, building the response): a quarter of the broker's CPU per chat call
# (issue 14). A plain call (JSON body, no query, no redirects, no proxy) goes straight to the pool
# requests would pick, with the same headers, TLS checks, timeouts and retry policy, and comes back
# as a ``requests.Response`` over the same urllib3 response, so callers and streaming are unchanged.


@lru_cache(maxsize=256)
def _target(url: str) -> tuple[requests.PreparedRequest, str]:
    """A prepared stand-in for ``url`` (requests picks the pool by it) and the request line's path."""
    prepared = requests.Request("POST", url).prepare()
    return prepared, prepared.path_url


def _urlopen(
    session: requests.Session,
    adapter: HTTPAdapter,
    method: str,
    url: str,
    headers: dict[str, str],
    body: dict | None,
    timeout: tuple[float, float],
    stream: bool,
) -> requests.Response:
    prepared, path = _target(url)
    pool = adapter.get_connection_with_tls_context(prepared, session.verify)
    adapter.cert_verify(pool, url, session.verify, None)  # the CA bundle requests would use
    sent = CaseInsensitiveDict(session.headers)  # User-Agent, Accept-Encoding, Accept, Connection
    sent.update(headers)
    data = None
    if body is not None:
        data = json.dumps(body, allow_nan=False).encode()  # as requests encodes json=
        sent.setdefault("Content-Type", "application/json")
    raw = pool.urlopen(
        method,
        path,
        body=data,
        headers=sent,
        redirect=False,
        assert_same_host=False,
        preload_content=False,
        decode_content=False,
        retries=adapter.max_retries,
        timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
    )
    response = requests.Response()
    response.status_code = raw.status
    response.headers = CaseInsensitiveDict(raw.headers)
    response.encoding = get_encoding_from_headers(response.headers)
    response.reason = raw.reason
    response.raw = raw
    response.url = url
    response.connection = adapter
    if not stream:
        response.content  # noqa: B018  (read the body now and hand the connection back, as requests does)
    return response


def read_body(provider: str, response: requests.Response, limit: int) -> bytes:
    """The raw body of a streamed 2xx response, at most ``limit`` bytes; the response is closed."""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_content(chunk_size=64 * 1024):
            size += len(chunk)
            if size > limit:
                raise UpstreamError(f"{provider} sent a file larger than {limit} bytes")
            chunks.append(chunk)
    except READ_FAILURES as exc:
        raise transport_error(provider, exc) from None
    finally:
        response.close()
    return b"".join(chunks)


def read_json(provider: str, response: requests.Response) -> dict:
    """The JSON object of a non-streamed 2xx response."""
    try:
        data = response.json()
    except READ_FAILURES as exc:
        if isinstance(exc, ValueError):
            raise UpstreamError(f"{provider} sent a response that is not JSON") from None
        raise transport_error(provider, exc) from None
    if not isinstance(data, dict):
        raise UpstreamError(f"{provider} sent a response that is not a JSON object")
    return data


def is_timeout(exc: BaseException | None) -> bool:
    """Whether a transport failure was a timeout, however requests/urllib3 wrapped it.

    With ``read=0`` retries urllib3 reports a read timeout as ``MaxRetryError`` which
    requests turns into ``ConnectionError``; requests also re-raises a read timeout
    met while reading the body as ``ConnectionError``. So the causes are walked.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            return False  # urllib3 files "connection refused" under ConnectTimeoutError
        if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
            return True
        if isinstance(exc, TimeoutError):
            return True
        nested = getattr(exc, "reason", None)
        if not isinstance(nested, BaseException) and exc.args:
            nested = exc.args[0] if isinstance(exc.args[0], BaseException) else None
        exc = nested if isinstance(nested, BaseException) else exc.__cause__
    return False


def transport_error(provider: str, exc: BaseException) -> UpstreamError:
    """Map a failure met before the first event: timeouts, resets, garbage."""
    if is_timeout(exc):
        return UpstreamTimeout(f"{provider} did not answer in time")
    if isinstance(
        exc,
        (
            requests.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError,
            # From the direct path: retries used up on connect errors, refused connections, TLS, a closed pool.
            urllib3.exceptions.PoolError,
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.SSLError,
            urllib3.exceptions.ProxyError,
            http.client.HTTPException,
            OSError,
        ),
    ):
        return UpstreamUnavailable(f"{provider} could not be reached")
    if isinstance(exc, ValueError):
        return UpstreamError(f"{provider} sent a malformed response")
    return UpstreamError(f"the call to {provider} failed ({type(exc).__name__})")


def status_error(provider: str, response: requests.Response, secret: str) -> UpstreamError:
    """Map a non-2xx answer (after the session's own retries) to an UpstreamError."""
    status = response.status_code
    body = error_body(response)
    retry_after = response.headers.get("Retry-After") or _retry_delay(body)
    headers = {"Retry-After": retry_after} if retry_after else None
    if status < 400:
        return UpstreamError(f"{provider} answered with a redirect (HTTP {status})")
    if status in (401, 403) or _is_key_error(body):
        return UpstreamError(CREDENTIALS_MESSAGE)
    error = as_dict(body.get("error"))
    if status == 402 or _is_quota_error(error):
        return UpstreamQuotaExceeded(QUOTA_MESSAGE.format(provider=provider))
    if status == 429:
        return UpstreamRateLimited(
            f"{provider} is rate limiting the broker; retry later",
            headers={"Retry-After": retry_after or DEFAULT_RETRY_AFTER},
        )
    if status in (503, 529):
        return UpstreamUnavailable(f"{provider} is overloaded; retry later", headers=headers)
    if status in (408, 504):
        return UpstreamTimeout(f"{provider} timed out")
    if status >= 500:
        return UpstreamError(f"{provider} failed with HTTP {status}")
    message = error.get("message") if isinstance(error.get("message"), str) else None
    message = clip_message(message or f"HTTP {status}", secret)
    if status == 404:
        return UpstreamModelNotFound(f"{provider} does not know this model: {message}", param="model")
    param = error.get("param") if isinstance(error.get("param"), str) else None
    return UpstreamRejected(f"{provider} rejected the request: {message}", param=param)


def _is_quota_error(error: dict) -> bool:
    """OpenAI answers an exhausted account with a 429 whose code (and type) is ``insufficient_quota``."""
    return error.get("code") in QUOTA_CODES or error.get("type") in QUOTA_CODES


def error_body(response: requests.Response) -> dict:
    """The JSON object of an error response, or an empty dict."""
    try:
        return as_dict(response.json())
    except READ_FAILURES:
        return {}


def _error_details(body: dict) -> list[dict]:
    details = as_dict(body.get("error")).get("details")
    return [as_dict(d) for d in details] if isinstance(details, list) else []


def _is_key_error(body: dict) -> bool:
    """Gemini reports a bad key as a 400 INVALID_ARGUMENT with reason API_KEY_INVALID."""
    return any(d.get("reason") == "API_KEY_INVALID" for d in _error_details(body))


def _retry_delay(body: dict) -> str | None:
    """Gemini's retry hint, ``RetryInfo.retryDelay`` ("26s"), as Retry-After seconds."""
    for detail in _error_details(body):
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and (m := re.fullmatch(r"(\d+)(?:\.(\d+))?s", delay)):
            return str(int(m.group(1)) + (1 if m.group(2) else 0))
    return None


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def clip_message(text: str, secret: str) -> str:
    """An upstream message fit to show a caller: the key scrubbed, the length capped."""
    return _scrub(text, secret)[:MAX_ERROR_MESSAGE]


def iter_sse(response: requests.Response) -> Iterator[SSEEvent]:
    """Server-sent events as (event, data); comments and unknown fields are skipped.

    Lines are split as bytes so that U+2028 and friends inside JSON never split a line.
    """
    event, data = "", []
    for raw in response.iter_lines(chunk_size=1024):
        if not raw:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
            continue
        name, _, value = raw.decode("utf-8").partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event, "\n".join(data)


def load_event(data: str) -> dict:
    """Parse one event's JSON object; malformed data raises ValueError or TypeError."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise TypeError("stream event is not a JSON object")
    return obj


def run_stream(
    provider: str, open_response: Callable[[], requests.Response], translate: Translator
) -> Iterator[StreamEvent]:
    """Drive ``translate`` over the SSE of a response that is opened on first use.

    A failure before the first yielded event keeps its own class (timeout, unavailable,
    error); after it, every failure becomes ``UpstreamStreamBroken``. The response is
    closed in ``finally``, so closing this generator frees the pooled connection.
    """
    response = open_response()
    started = False
    try:
        events = iter_sse(response)
        for event in translate(events):
            started = True
            yield event
        _finish_body(events)
    except UpstreamError as exc:
        broken = isinstance(exc, UpstreamStreamBroken)
        if started and not broken:
            raise UpstreamStreamBroken(exc.message) from None
        if not started and broken:
            raise UpstreamError(exc.message) from None
        raise
    except READ_FAILURES as exc:
        if started:
            raise UpstreamStreamBroken(f"the {provider} stream broke ({type(exc).__name__})") from None
        raise transport_error(provider, exc) from None
    finally:
        response.close()


def _finish_body(events: Iterator[SSEEvent]) -> None:
    """Read what follows the stream's last event (the chunked terminator), so the connection
    goes back to the pool instead of being closed: a new TCP (and TLS) handshake per stream
    otherwise. The same event iterator is drained: a fresh ``iter_content`` would leave the
    line reader suspended inside urllib3's chunked read, and its clean-up closes the socket."""
    try:
        for _ in events:
            pass
    except READ_FAILURES:
        pass
    except (UnicodeDecodeError, ValueError):
        pass  # garbage after the terminal event is not the caller's concern


def ended_early(provider: str) -> UpstreamStreamBroken:
    return UpstreamStreamBroken(f"the {provider} stream ended before it was complete")


def text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def image_url_of(part: dict) -> str | None:
    """The URL of an OpenAI ``image_url`` content part (object or bare string form)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    return url if isinstance(url, str) and url else None


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a ``data:<type>;base64,<data>`` URL, else None."""
    m = re.fullmatch(r"data:([\w.+/-]+);base64,(.*)", url, flags=re.DOTALL)
    return (m.group(1), m.group(2)) if m else None
