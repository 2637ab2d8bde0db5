"""Google Gemini adapter: OpenAI-shaped calls to generateContent and back."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from urllib.parse import quote

import requests

from broker.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
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

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    **dict.fromkeys(
        (
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
            "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT",
            "IMAGE_RECITATION",
        ),
        "content_filter",
    ),
}
_NOT_FINISHED = (None, "", "FINISH_REASON_UNSPECIFIED")


class GeminiProvider:
    name = "gemini"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._base = base_url.rstrip("/") + "/v1beta/models/"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def complete(self, call: ChatCall) -> ChatResult:
        response = self._post(call.model, ":generateContent", _body(call), stream=False)
        data = c.read_json(self.name, response)
        candidates = [c.as_dict(x) for x in data.get("candidates") or []]
        choices = [
            Choice(_index(cand, pos), _text(cand), finish_reason(cand.get("finishReason")))
            for pos, cand in enumerate(candidates)
        ]
        if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
            reason = "content_filter" if _blocked(data) else "stop"
            choices = [Choice(i, "", reason) for i in range(call.n)]
        return ChatResult(
            id=str(data.get("responseId") or ""),
            model=str(data.get("modelVersion") or call.model),
            choices=sorted(choices, key=lambda ch: ch.index),
            usage=usage_from(c.as_dict(data.get("usageMetadata"))),
        )

    def stream(self, call: ChatCall) -> Iterator[StreamEvent]:
        body = _body(call)
        return c.run_stream(
            self.name,
            lambda: self._post(call.model, ":streamGenerateContent?alt=sse", body, stream=True),
            lambda events: _translate(events, call.n),
        )

    def _post(self, model: str, method: str, body: dict, *, stream: bool) -> requests.Response:
        model = quote(model.removeprefix("models/"), safe="-._~")
        return c.post(
            self.name,
            self._session,
            self._base + model + method,
            headers={"x-goog-api-key": self._api_key},
            body=body,
            timeout=self._timeout,
            stream=stream,
            secret=self._api_key,
        )


def _body(call: ChatCall) -> dict:
    system: list[str] = []
    contents: list[dict] = []
    for message in call.messages:
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.append(c.text_of(content))
        elif role in ("user", "assistant"):
            parts = _parts(content)
            if parts:
                contents.append({"role": "user" if role == "user" else "model", "parts": parts})
        else:
            raise InvalidRequest(f"gemini models do not accept {role!r} messages", param="messages")
    config = {
        "maxOutputTokens": call.max_tokens,
        "temperature": call.temperature,
        "topP": call.top_p,
        "stopSequences": call.stop,
        "candidateCount": call.n,
    }
    body: dict = {
        "contents": contents,
        "generationConfig": {k: v for k, v in config.items() if v is not None},
    }
    if any(system):
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(s for s in system if s)}]}
    return body


def _parts(content: object) -> list[dict]:
    if not isinstance(content, list):
        text = c.text_of(content)
        return [{"text": text}] if text else []
    parts: list[dict] = []
    for part in map(c.as_dict, content):
        if part.get("type") == "text":
            parts.append({"text": str(part.get("text", ""))})
        elif part.get("type") == "image_url" and (url := c.image_url_of(part)):
            parts.append(_image_part(url))
        else:
            raise InvalidRequest(
                f"gemini models do not accept {part.get('type')!r} content parts",
                param="messages",
            )
    return parts


def _image_part(url: str) -> dict:
    inline = c.split_data_url(url)
    if inline:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    mime = mimetypes.guess_type(url.split("?")[0])[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _index(candidate: dict, position: int) -> int:
    return c.as_int(candidate.get("index", position))


def _text(candidate: dict) -> str:
    """The visible text of a candidate; thought summaries are left out."""
    parts = c.as_dict(candidate.get("content")).get("parts") or []
    return "".join(str(p.get("text") or "") for p in map(c.as_dict, parts) if not p.get("thought"))


def _blocked(chunk: dict) -> bool:
    return bool(c.as_dict(chunk.get("promptFeedback")).get("blockReason"))


def finish_reason(reason: object) -> str | None:
    if reason in _NOT_FINISHED:
        return None
    return FINISH_REASONS.get(str(reason), "stop")


def usage_from(meta: dict) -> Usage:
    """``promptTokenCount`` includes the cached tokens; thinking is billed as output."""
    cached = c.as_int(meta.get("cachedContentTokenCount"))
    prompt = max(c.as_int(meta.get("promptTokenCount")) - cached, 0)
    return Usage(
        input_tokens=prompt + c.as_int(meta.get("toolUsePromptTokenCount")),
        cached_input_tokens=cached,
        output_tokens=c.as_int(meta.get("candidatesTokenCount")) + c.as_int(meta.get("thoughtsTokenCount")),
    )


def _translate(events: Iterator[c.SSEEvent], n: int) -> Iterator[StreamEvent]:
    """Chunks → events.

    There is no terminator: the stream is complete once every candidate seen has a
    finish reason. ``usageMetadata`` is cumulative (the last wins); it is reported
    after each chunk once something was delivered, so a break keeps the latest.
    """
    usage: dict | None = None
    seen: set[int] = set()
    finished: set[int] = set()
    started, reported = False, True
    for _, data in events:
        chunk = c.load_event(data)
        if "error" in chunk:
            raise _stream_error(c.as_dict(chunk["error"]))
        for event in _chunk_events(chunk, n, seen, finished):
            started = True
            yield event
        if isinstance(chunk.get("usageMetadata"), dict):
            usage, reported = chunk["usageMetadata"], False
        if started and not reported and usage is not None:
            yield UsageReport(usage_from(usage))
            reported = True
    if not finished or seen - finished:
        raise c.ended_early("gemini")
    if usage is not None and not reported:
        yield UsageReport(usage_from(usage))


def _chunk_events(chunk: dict, n: int, seen: set[int], finished: set[int]) -> Iterator[StreamEvent]:
    """Text and finish events of one chunk; updates ``seen`` and ``finished``."""
    candidates = [c.as_dict(x) for x in chunk.get("candidates") or []]
    for pos, cand in enumerate(candidates):
        index = _index(cand, pos)
        seen.add(index)
        if text := _text(cand):
            yield TextDelta(index, text)
        reason = finish_reason(cand.get("finishReason"))
        if reason and index not in finished:
            finished.add(index)
            yield Finish(index, reason)
    if not candidates and _blocked(chunk):
        for index in sorted(set(range(n)) - finished):
            seen.add(index)
            finished.add(index)
            yield Finish(index, "content_filter")


def _stream_error(error: dict) -> UpstreamError:
    status = str(error.get("status") or "error")
    message = f"gemini reported {status} in the stream"
    if status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        return UpstreamUnavailable(message)
    if status == "DEADLINE_EXCEEDED":
        return UpstreamTimeout(message)
    return UpstreamError(message)
