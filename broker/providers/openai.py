"""OpenAI Chat Completions adapter: the broker's own shape, so mostly a pass-through.

Every field of OpenAI's answer a client can use is relayed as sent: tool calls (and the
deprecated ``function_call``), ``refusal`` (never moved into ``content``), ``logprobs``,
``annotations``, ``system_fingerprint`` and ``service_tier``; streamed tool calls keep their
index, id, name and argument fragments.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import requests

from broker import pricing
from broker.errors import NotFound, UpstreamError, UpstreamStreamBroken
from broker.providers import _common as c
from broker.providers import registry
from broker.providers.base import (
    ChatCall,
    ChatResult,
    Choice,
    Finish,
    FunctionCallDelta,
    StreamEvent,
    StreamMeta,
    TextDelta,
    ToolCallDelta,
    Usage,
    UsageReport,
    count_of,
    net_count,
)
from broker.schemas import EXTRA_FIELDS

# Fields of ``call.extra`` the adapter owns: the broker's hold depends on them.
_OWNED = {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "n"}
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


class OpenAIProvider:
    name = "openai"
    # Every field of OpenAI's Chat Completions, passed through (the broker refuses the
    # price-changing ones it cannot bill before they get here); ``top_k`` is not OpenAI's.
    accepts = frozenset(EXTRA_FIELDS) - {"top_k"}

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._base = base_url.rstrip("/")
        self._url = self._base + "/chat/completions"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def check(self, call: ChatCall) -> int:
        """The prompt tokens images cost beyond the broker's generic per-image bound, on models
        whose price-table rules bound them higher (``image_tokens_max``)."""
        surplus = pricing.image_token_bound(call.rules) - pricing.IMAGE_TOKEN_BOUND
        images = sum(
            1
            for message in call.messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if isinstance(part, dict) and part.get("type") == "image_url"
        )
        return surplus * images

    def complete(self, call: ChatCall) -> ChatResult:
        response = self._post(_body(call, stream=False), stream=False)
        data = c.read_json(self.name, response)
        return ChatResult(
            id=str(data.get("id") or ""),
            model=str(data.get("model") or call.model),
            choices=[_choice(ch) for ch in map(c.as_dict, data.get("choices") or [])],
            usage=usage_from(c.as_dict(data.get("usage"))),
            system_fingerprint=_str(data.get("system_fingerprint")),
            service_tier=_str(data.get("service_tier")),
        )

    def stream(self, call: ChatCall) -> Iterator[StreamEvent]:
        body = _body(call, stream=True)
        return c.run_stream(self.name, lambda: self._post(body, stream=True), _translate)

    # -- embeddings and the Responses API (broker.embeddings, broker.responses) -------------

    def embed(
        self, model: str, inputs: list, dimensions: int | None, encoding_format: str, user: str | None
    ) -> tuple[list, int | None]:
        """``POST /embeddings``: the vectors (float lists, or base64 strings as OpenAI sent them) in
        input order, and the reported ``usage.prompt_tokens`` (None when missing)."""
        body: dict = {"model": model, "input": inputs, "encoding_format": encoding_format}
        if dimensions is not None:
            body["dimensions"] = dimensions
        if user is not None:
            body["user"] = user
        data = c.read_json(self.name, self._post(body, stream=False, path="/embeddings"))
        items = sorted(map(c.as_dict, data.get("data") or []), key=lambda item: c.as_int(item.get("index")))
        vectors = [item.get("embedding") for item in items]
        if len(vectors) != len(inputs) or not all(isinstance(v, (list, str)) for v in vectors):
            raise UpstreamError("openai sent embeddings that do not match the inputs")
        usage = data.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        return vectors, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None

    def respond(self, body: dict) -> dict:
        """``POST /responses`` (not streamed): OpenAI's response object."""
        return c.read_json(self.name, self._post(body, stream=False, path="/responses"))

    def respond_stream(self, body: dict) -> Iterator[tuple[str, str, dict]]:
        """``POST /responses`` with ``stream: true``: (event name, raw data, parsed data) per event, up to
        the terminal one; failures as in ``stream`` (a stream that stops before it is ``UpstreamStreamBroken``)."""
        return c.run_stream(self.name, lambda: self._post(body, stream=True, path="/responses"), _response_events)

    def retrieve_response(self, response_id: str) -> dict:
        """``GET /responses/{id}``: a stored response."""
        response = c.send(
            self.name,
            self._session,
            "GET",
            f"{self._base}/responses/{quote(response_id, safe='')}",
            headers={"Authorization": f"Bearer {self._api_key}"},
            timeout=self._timeout,
        )
        if response.status_code == 404:  # not stored (store: false), or gone
            response.close()
            raise NotFound(f"No response with id '{response_id}'.")
        if response.status_code >= 300:
            try:
                raise c.status_error(self.name, response, self._api_key)
            finally:
                response.close()
        return c.read_json(self.name, response)

    def _post(self, body: dict, *, stream: bool, path: str | None = None) -> requests.Response:
        return c.post(
            self.name,
            self._session,
            self._base + path if path else self._url,
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
        # Usage is always asked for (it is what we bill); the broker decides what the client sees.
        options = c.as_dict(call.extra.get("stream_options"))
        body.update(stream=True, stream_options={**options, "include_usage": True})
    return body


def usage_from(usage: dict) -> Usage:
    """``cached_tokens`` and ``cache_write_tokens`` are parts of ``prompt_tokens``; reasoning and
    rejected-prediction tokens are parts of ``completion_tokens`` (billed as output)."""
    details = c.as_dict(usage.get("prompt_tokens_details"))
    cached = count_of(details.get("cached_tokens"))
    written = count_of(details.get("cache_write_tokens"))
    out = c.as_dict(usage.get("completion_tokens_details"))
    return Usage(
        # An invalid count stays invalid (see count_of): the chat path then bills an estimate instead.
        input_tokens=net_count(count_of(usage.get("prompt_tokens")), cached, written),
        cached_input_tokens=cached,
        cache_write_tokens=written,
        output_tokens=count_of(usage.get("completion_tokens")),
        reasoning_tokens=count_of(out.get("reasoning_tokens")),
        accepted_prediction_tokens=count_of(out.get("accepted_prediction_tokens")),
        rejected_prediction_tokens=count_of(out.get("rejected_prediction_tokens")),
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _list(value: object) -> list[dict] | None:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else None


def _finish(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value if value in FINISH_REASONS else "stop"


def _choice(choice: dict) -> Choice:
    message = c.as_dict(choice.get("message"))
    content = message.get("content")
    return Choice(
        index=c.as_int(choice.get("index")),
        content=c.text_of(content) if content is not None else None,
        finish_reason=_finish(choice.get("finish_reason")),
        refusal=_str(message.get("refusal")),
        tool_calls=_list(message.get("tool_calls")) or None,
        function_call=message.get("function_call") if isinstance(message.get("function_call"), dict) else None,
        annotations=_list(message.get("annotations")),
        logprobs=c.as_dict(choice.get("logprobs")) or None,
    )


def _tool_call_deltas(index: int, calls: object) -> Iterator[ToolCallDelta]:
    for call in map(c.as_dict, calls if isinstance(calls, list) else []):
        kind = _str(call.get("type")) or "function"
        fn = c.as_dict(call.get("custom" if kind == "custom" else "function"))
        text = fn.get("input" if kind == "custom" else "arguments")
        yield ToolCallDelta(
            index=index,
            call=c.as_int(call.get("index")),
            id=_str(call.get("id")),
            name=_str(fn.get("name")),
            arguments=text if isinstance(text, str) else "",
            type=kind,
        )


def _translate(events: Iterator[c.SSEEvent]) -> Iterator[StreamEvent]:
    """Chunks → events; the usage chunk is the last before ``[DONE]``.

    ``StreamMeta`` goes just before the first other event, so a stream that fails before
    any content still fails cleanly (nothing yielded).
    """
    meta: StreamMeta | None = None
    for _, data in events:
        if data.strip() == "[DONE]":
            return
        chunk = c.load_event(data)
        if "error" in chunk:
            raise UpstreamStreamBroken("openai reported an error in the stream")
        out = list(_chunk_events(chunk))
        if out and meta is None:
            meta = StreamMeta(_str(chunk.get("system_fingerprint")), _str(chunk.get("service_tier")))
            yield meta
        yield from out
    raise c.ended_early("openai")


def _chunk_events(chunk: dict) -> Iterator[StreamEvent]:
    for choice in map(c.as_dict, chunk.get("choices") or []):
        index = c.as_int(choice.get("index"))
        delta = c.as_dict(choice.get("delta"))
        logprobs = c.as_dict(choice.get("logprobs")) or None
        for key, refusal in (("content", False), ("refusal", True)):
            text = delta.get(key)
            if isinstance(text, str) and (text or logprobs):
                yield TextDelta(index, text, logprobs, refusal)
                logprobs = None
        yield from _tool_call_deltas(index, delta.get("tool_calls"))
        fn = c.as_dict(delta.get("function_call"))
        if fn:
            args = fn.get("arguments")
            yield FunctionCallDelta(index, _str(fn.get("name")), args if isinstance(args, str) else "")
        reason = _finish(choice.get("finish_reason"))
        if reason:
            yield Finish(index, reason)
    if isinstance(chunk.get("usage"), dict):
        yield UsageReport(usage_from(chunk["usage"]))


RESPONSE_TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def _response_events(events: Iterator[c.SSEEvent]) -> Iterator[tuple[str, str, dict]]:
    """The Responses API's named events as (name, raw data, parsed data), ending with the terminal
    one (there is no ``[DONE]``); an ``error`` event, or an end before the terminal event, breaks it."""
    for name, data in events:
        event = c.load_event(data)
        kind = event.get("type") if isinstance(event.get("type"), str) else name
        if kind == "error":
            message = event.get("message") if isinstance(event.get("message"), str) else "an error event"
            raise UpstreamStreamBroken(f"openai reported an error in the stream: {message}"[: c.MAX_ERROR_MESSAGE])
        yield name or kind, data, event
        if kind in RESPONSE_TERMINAL:
            return
    raise c.ended_early("openai")


# The settings every OpenAI adapter (chat, speech, images) reads.
OPENAI_SETTINGS = {"OPENAI_BASE_URL": "https://api.openai.com/v1"}

ADAPTERS = (
    registry.Adapter(
        "chat",
        "openai",
        registry.standard(OpenAIProvider, "OPENAI_BASE_URL", "OPENAI_API_KEY"),
        "OPENAI_API_KEY",
        OPENAI_SETTINGS,
    ),
)
