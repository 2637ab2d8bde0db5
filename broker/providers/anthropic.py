"""Anthropic Messages adapter: OpenAI-shaped calls to /v1/messages and back."""

from __future__ import annotations

from collections.abc import Iterator

import requests

from broker.errors import InvalidRequest, UpstreamError, UpstreamUnavailable
from broker.providers import _common as c
from broker.providers.base import (
    ChatCall,
    ChatResult,
    Choice,
    Finish,
    StreamEvent,
    TextDelta,
    Usage,
    UsageReport,
)

API_VERSION = "2023-06-01"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._url = base_url.rstrip("/") + "/v1/messages"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def complete(self, call: ChatCall) -> ChatResult:
        response = self._post(_body(call, stream=False), stream=False)
        data = c.read_json(self.name, response)
        text = "".join(
            block.get("text") or ""
            for block in map(c.as_dict, data.get("content") or [])
            if block.get("type") == "text"
        )
        return ChatResult(
            id=str(data.get("id") or ""),
            model=str(data.get("model") or call.model),
            choices=[Choice(0, text, finish_reason(data.get("stop_reason")))],
            usage=usage_from(c.as_dict(data.get("usage"))),
        )

    def stream(self, call: ChatCall) -> Iterator[StreamEvent]:
        body = _body(call, stream=True)
        return c.run_stream(self.name, lambda: self._post(body, stream=True), _translate)

    def _post(self, body: dict, *, stream: bool) -> requests.Response:
        return c.post(
            self.name,
            self._session,
            self._url,
            headers={"x-api-key": self._api_key, "anthropic-version": API_VERSION},
            body=body,
            timeout=self._timeout,
            stream=stream,
            secret=self._api_key,
        )


def _body(call: ChatCall, *, stream: bool) -> dict:
    """The Messages request; raises InvalidRequest for what Anthropic cannot do."""
    if call.n != 1:
        raise InvalidRequest("anthropic models return one choice; n must be 1", param="n")
    system: list[str] = []
    messages: list[dict] = []
    for message in call.messages:
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.append(c.text_of(content))
        elif role in ("user", "assistant"):
            if content is not None:
                messages.append({"role": role, "content": _content(content)})
        else:
            raise InvalidRequest(f"anthropic models do not accept {role!r} messages", param="messages")
    body: dict = {
        "model": call.model,
        "max_tokens": call.max_tokens,
        "messages": messages,
    }
    if any(system):
        body["system"] = "\n\n".join(s for s in system if s)
    optional = {
        "temperature": call.temperature,
        "top_p": call.top_p,
        "stop_sequences": call.stop,
        "metadata": {"user_id": call.user} if call.user else None,
        "stream": True if stream else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _content(content: object) -> str | list[dict]:
    """OpenAI content (a string or parts) as Anthropic content blocks."""
    if not isinstance(content, list):
        return c.text_of(content)
    blocks: list[dict] = []
    for part in map(c.as_dict, content):
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif part.get("type") == "image_url" and (url := c.image_url_of(part)):
            blocks.append({"type": "image", "source": _image_source(url)})
        else:
            raise InvalidRequest(
                f"anthropic models do not accept {part.get('type')!r} content parts",
                param="messages",
            )
    return blocks


def _image_source(url: str) -> dict:
    inline = c.split_data_url(url)
    if inline:
        return {"type": "base64", "media_type": inline[0], "data": inline[1]}
    return {"type": "url", "url": url}


def finish_reason(stop_reason: object) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(str(stop_reason), "stop")


def usage_from(usage: dict) -> Usage:
    """``input_tokens`` already excludes cache reads and writes.

    Cache writes are split by TTL from ``cache_creation``; a total the breakdown
    does not account for (or a missing breakdown) is billed as the 5-minute kind.
    """
    written = c.as_int(usage.get("cache_creation_input_tokens"))
    split = c.as_dict(usage.get("cache_creation"))
    written_1h = c.as_int(split.get("ephemeral_1h_input_tokens"))
    written_5m = c.as_int(split.get("ephemeral_5m_input_tokens"))
    written_5m += max(written - written_5m - written_1h, 0)
    return Usage(
        input_tokens=c.as_int(usage.get("input_tokens")),
        cached_input_tokens=c.as_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=written_5m,
        cache_write_1h_tokens=written_1h,
        output_tokens=c.as_int(usage.get("output_tokens")),
    )


def _translate(events: Iterator[c.SSEEvent]) -> Iterator[StreamEvent]:
    """Named events → events.

    Usage starts from ``message_start``; each ``message_delta`` overrides the fields it
    carries. Its counts are cumulative, so the last ``output_tokens`` is the total.
    Usage so far is reported once text has flowed (never before, so an early error
    stays a clean failure) and again at the end, after the finish.
    """
    usage: dict = {}
    stop_reason = None
    started, reported = False, True
    for name, data in events:
        event = c.load_event(data)
        kind = event.get("type") or name
        if kind == "message_start":
            usage = dict(c.as_dict(c.as_dict(event.get("message")).get("usage")))
            reported = False
        elif kind in ("content_block_start", "content_block_delta"):
            block = c.as_dict(event.get("delta") or event.get("content_block"))
            if block.get("type") in ("text", "text_delta") and block.get("text"):
                yield TextDelta(0, str(block["text"]))
                started = True
        elif kind == "message_delta":
            delta = c.as_dict(event.get("delta"))
            stop_reason = delta.get("stop_reason") or stop_reason
            delta_usage = c.as_dict(event.get("usage"))
            usage.update({k: v for k, v in delta_usage.items() if v is not None})
            reported = False
        elif kind == "message_stop":
            yield Finish(0, finish_reason(stop_reason) or "stop")
            yield UsageReport(usage_from(usage))
            return
        elif kind == "error":
            raise _stream_error(c.as_dict(event.get("error")))
        if started and not reported:
            yield UsageReport(usage_from(usage))
            reported = True
    raise c.ended_early("anthropic")


def _stream_error(error: dict) -> UpstreamError:
    kind = str(error.get("type") or "error")
    message = f"anthropic reported {kind} in the stream"
    if kind in ("overloaded_error", "rate_limit_error"):
        return UpstreamUnavailable(message)
    return UpstreamError(message)
