"""OpenAI Chat Completions adapter: the broker's own shape, so mostly a pass-through."""

from __future__ import annotations

from collections.abc import Iterator

import requests

from broker.errors import UpstreamStreamBroken
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

# Fields of ``call.extra`` the adapter owns: the broker's hold depends on them.
_OWNED = {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "n"}


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def complete(self, call: ChatCall) -> ChatResult:
        response = self._post(_body(call, stream=False), stream=False)
        data = c.read_json(self.name, response)
        choices = [
            Choice(
                index=c.as_int(ch.get("index")),
                content=_message_text(c.as_dict(ch.get("message"))),
                finish_reason=ch.get("finish_reason"),
            )
            for ch in map(c.as_dict, data.get("choices") or [])
        ]
        return ChatResult(
            id=str(data.get("id") or ""),
            model=str(data.get("model") or call.model),
            choices=choices,
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
            headers={"Authorization": f"Bearer {self._api_key}"},
            body=body,
            timeout=self._timeout,
            stream=stream,
            secret=self._api_key,
        )


def _body(call: ChatCall, *, stream: bool) -> dict:
    body = {k: v for k, v in call.extra.items() if k not in _OWNED}
    body.pop("stream_options", None)
    body.update(
        model=call.model,
        messages=call.messages,
        max_completion_tokens=call.max_tokens,
    )
    optional = {
        "temperature": call.temperature,
        "top_p": call.top_p,
        "stop": call.stop,
        "user": call.user,
        "n": call.n if call.n != 1 else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if stream:
        options = c.as_dict(call.extra.get("stream_options"))
        body.update(stream=True, stream_options={**options, "include_usage": True})
    return body


def usage_from(usage: dict) -> Usage:
    """``cached_tokens`` and ``cache_write_tokens`` are parts of ``prompt_tokens``."""
    details = c.as_dict(usage.get("prompt_tokens_details"))
    cached = c.as_int(details.get("cached_tokens"))
    written = c.as_int(details.get("cache_write_tokens"))
    return Usage(
        input_tokens=max(c.as_int(usage.get("prompt_tokens")) - cached - written, 0),
        cached_input_tokens=cached,
        cache_write_tokens=written,
        output_tokens=c.as_int(usage.get("completion_tokens")),
    )


def _message_text(message: dict) -> str:
    """The reply text; a refusal stands in for content the model declined to give."""
    content = message.get("content")
    if content is None and isinstance(message.get("refusal"), str):
        return message["refusal"]
    return c.text_of(content)


def _translate(events: Iterator[c.SSEEvent]) -> Iterator[StreamEvent]:
    """Chunks → events; the usage chunk is the last before ``[DONE]``."""
    for _, data in events:
        if data.strip() == "[DONE]":
            return
        chunk = c.load_event(data)
        if "error" in chunk:
            raise UpstreamStreamBroken("openai reported an error in the stream")
        for choice in map(c.as_dict, chunk.get("choices") or []):
            index = c.as_int(choice.get("index"))
            delta = c.as_dict(choice.get("delta"))
            text = delta.get("content") or delta.get("refusal")
            if isinstance(text, str) and text:
                yield TextDelta(index, text)
            if isinstance(choice.get("finish_reason"), str):
                yield Finish(index, choice["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            yield UsageReport(usage_from(chunk["usage"]))
    raise c.ended_early("openai")
