"""Google Gemini adapter: OpenAI-shaped calls to generateContent and back."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import requests

from broker.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from broker.providers import _common as c
from broker.providers import gemini_translate as t
from broker.providers import registry
from broker.providers.base import (
    ChatCall,
    ChatResult,
    Choice,
    Finish,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
    UsageReport,
    count_of,
    net_count,
    sum_counts,
)

UNSUPPORTED = "unsupported_parameter"
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
    # OpenAI fields translated to Gemini's; the rest are a 400 before anything is held.
    # ``store`` (only false gets here), ``service_tier`` (standard tiers only) and
    # ``modalities`` (text only) change nothing on Gemini.
    accepts = frozenset(
        {
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
            "reasoning_effort",
            "seed",
            "top_k",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "top_logprobs",
            "store",
            "service_tier",
            "modalities",
        }
    )

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

    def check(self, call: ChatCall) -> int:
        """The model's rules (price table) and the request's shapes, before the hold; the
        prompt tokens of its media parts by Gemini's token rules."""
        check_rules(call)
        _body(call)
        return t.media_token_bound(call.messages, call.rules)

    def reasoning_tokens(self, call: ChatCall) -> int:
        """The thinking budget ``reasoning_effort`` asks for on models with budgets (levels have none)."""
        budgets = c.as_dict(c.as_dict(call.rules.get("thinking")).get("budgets"))
        return int(budgets.get(str(call.extra.get("reasoning_effort")), 0))

    def complete(self, call: ChatCall) -> ChatResult:
        response = self._post(call.model, ":generateContent", _body(call), stream=False)
        data = c.read_json(self.name, response)
        candidates = [c.as_dict(x) for x in data.get("candidates") or []]
        if not candidates and _blocked(data):
            raise blocked_error(data)
        ids = _CallIds(data)
        choices = [_choice(cand, pos, ids) for pos, cand in enumerate(candidates)]
        if not choices:
            choices = [Choice(i, "", "stop") for i in range(call.n)]
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

    def embed(
        self, model: str, inputs: list, dimensions: int | None, encoding_format: str, user: str | None
    ) -> tuple[list, int | None]:
        """``batchEmbedContents``: one request per input, vectors (float lists) in input order. The
        response reports no usage; a ``usageMetadata.promptTokenCount`` is used if one ever comes.
        ``encoding_format`` and ``user`` are the broker's business: Gemini has neither."""
        name = "models/" + model.removeprefix("models/")
        requests_ = []
        for text in inputs:
            request: dict = {"model": name, "content": {"parts": [{"text": text}]}}
            if dimensions is not None:
                request["outputDimensionality"] = dimensions
            requests_.append(request)
        response = self._post(model, ":batchEmbedContents", {"requests": requests_}, stream=False)
        data = c.read_json(self.name, response)
        vectors = [c.as_dict(item).get("values") for item in data.get("embeddings") or []]
        if len(vectors) != len(inputs) or not all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            for v in vectors
        ):
            raise UpstreamError("gemini sent embeddings that do not match the inputs")
        tokens = c.as_dict(data.get("usageMetadata")).get("promptTokenCount")
        return vectors, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None

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


def _range(rules: dict, name: str, default: list) -> list:
    value = rules.get(name, default)
    return value if isinstance(value, list) and len(value) == 2 else default


def check_rules(call: ChatCall) -> None:
    """Refuse what the model's rules (``rules`` of its price-table row) forbid, naming the field."""
    rules, extra = call.rules, call.extra
    low, high = _range(rules, "temperature", [0, 2])
    if call.temperature is not None and not low <= call.temperature <= high:
        raise InvalidRequest(f"temperature must be between {low} and {high} for this model.", param="temperature")
    top_k = extra.get("top_k")
    low, high = _range(rules, "top_k", [1, 64])
    if top_k is not None and not low <= top_k <= high:
        raise InvalidRequest(f"top_k must be between {low} and {high} for this model.", param="top_k")
    if call.n > int(rules.get("max_candidates", 8)):
        raise InvalidRequest(f"n must be at most {rules.get('max_candidates', 8)} for this model.", param="n")
    top = extra.get("top_logprobs")
    if extra.get("logprobs") or top is not None:
        most = rules.get("logprobs")
        if not most:
            name = "logprobs" if extra.get("logprobs") else "top_logprobs"
            raise InvalidRequest("Log probabilities are not available for this model.", param=name, code=UNSUPPORTED)
        if top is not None and (not extra.get("logprobs") or top > most):
            raise InvalidRequest(f"top_logprobs needs logprobs: true and is at most {most}.", param="top_logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if extra.get(name) is not None and not rules.get("penalties", True):
            raise InvalidRequest(f"{name} is not supported for this model.", param=name, code=UNSUPPORTED)


def _body(call: ChatCall) -> dict:
    contents, system = t.contents(call.messages)
    if not contents:
        # Only a system message: Gemini needs a user turn, so the instructions become it.
        contents, system = [{"role": "user", "parts": [{"text": system or " "}]}], ""
    extra = call.extra
    config = {
        "maxOutputTokens": call.max_tokens,
        "temperature": call.temperature,
        "topP": call.top_p,
        "topK": extra.get("top_k"),
        "stopSequences": call.stop,
        "candidateCount": call.n,
        "seed": extra.get("seed"),
        "presencePenalty": extra.get("presence_penalty"),
        "frequencyPenalty": extra.get("frequency_penalty"),
    }
    if extra.get("logprobs"):
        config.update(responseLogprobs=True, logprobs=extra.get("top_logprobs"))
    config.update(t.response_format(extra))
    config["thinkingConfig"] = t.thinking(extra.get("reasoning_effort"), call.rules, call.max_tokens)
    body: dict = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if tools := t.tools(extra):
        body["tools"] = tools
    if tool_config := t.tool_config(extra):
        body["toolConfig"] = tool_config
    body["generationConfig"] = {k: v for k, v in config.items() if v is not None}
    return body


class _CallIds:
    """Tool call ids for one response: Gemini's own ``functionCall.id`` when it sends one, else
    ``call_<response>_<n>``, unique across turns so a conversation can answer each by id."""

    def __init__(self, chunk: dict) -> None:
        seed = str(chunk.get("responseId") or "") or uuid.uuid4().hex
        self.prefix = "call_" + hashlib.sha256(seed.encode()).hexdigest()[:12] + "_"
        self.count = 0

    def next(self, call: dict) -> str:
        given = call.get("id")
        self.count += 1
        return given if isinstance(given, str) and given else f"{self.prefix}{self.count - 1}"


def _tool_call(part: dict, call_id: str) -> dict:
    """A ``functionCall`` part as an OpenAI tool call; its ``thoughtSignature`` rides in
    ``extra_content.google.thought_signature`` (as Google's OpenAI-compatible endpoint does)."""
    fn = c.as_dict(part.get("functionCall"))
    call: dict = {
        "id": call_id,
        "type": "function",
        "function": {"name": str(fn.get("name") or ""), "arguments": json.dumps(c.as_dict(fn.get("args")))},
    }
    if signature := part.get("thoughtSignature"):
        call["extra_content"] = {"google": {"thought_signature": signature}}
    return call


def _parts(candidate: dict) -> list[dict]:
    return [c.as_dict(p) for p in c.as_dict(candidate.get("content")).get("parts") or []]


def _choice(candidate: dict, position: int, ids: _CallIds) -> Choice:
    calls = [_tool_call(p, ids.next(c.as_dict(p["functionCall"]))) for p in _parts(candidate) if "functionCall" in p]
    text = _text(candidate)
    reason = finish_reason(candidate.get("finishReason"))
    if calls and reason == "stop":
        reason = "tool_calls"
    return Choice(
        _index(candidate, position),
        None if calls and not text else text,
        reason,
        tool_calls=calls or None,
        logprobs=logprobs_from(c.as_dict(candidate.get("logprobsResult"))),
    )


def logprobs_from(result: dict) -> dict | None:
    """Gemini's ``logprobsResult`` in OpenAI's shape (``content`` entries with their top tokens)."""
    chosen = [c.as_dict(x) for x in result.get("chosenCandidates") or []]
    if not chosen:
        return None
    tops = [c.as_dict(x) for x in result.get("topCandidates") or []]
    content = []
    for k, token in enumerate(chosen):
        top = [c.as_dict(x) for x in (tops[k].get("candidates") if k < len(tops) else None) or []]
        content.append({**_logprob(token), "top_logprobs": [_logprob(x) for x in top]})
    return {"content": content, "refusal": None}


def _logprob(token: dict) -> dict:
    text = str(token.get("token") or "")
    value = token.get("logProbability")
    return {
        "token": text,
        "logprob": float(value) if isinstance(value, (int, float)) else 0.0,
        "bytes": list(text.encode()),
    }


def blocked_error(chunk: dict) -> UpstreamRejected:
    """A prompt Gemini blocked before any output: a 400 ``content_policy_violation``, nothing charged."""
    reason = str(c.as_dict(chunk.get("promptFeedback")).get("blockReason"))
    return UpstreamRejected(
        f"gemini blocked the prompt ({reason}); nothing was generated or charged.",
        param="messages",
        code="content_policy_violation",
    )


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
    cached = count_of(meta.get("cachedContentTokenCount"))
    prompt = net_count(count_of(meta.get("promptTokenCount")), cached)
    thoughts = count_of(meta.get("thoughtsTokenCount"))
    return Usage(
        input_tokens=sum_counts(prompt, count_of(meta.get("toolUsePromptTokenCount"))),
        cached_input_tokens=cached,
        output_tokens=sum_counts(count_of(meta.get("candidatesTokenCount")), thoughts),
        reasoning_tokens=thoughts,
    )


def _translate(events: Iterator[c.SSEEvent], n: int) -> Iterator[StreamEvent]:
    """Chunks → events.

    There is no terminator: the stream is complete once every candidate seen has a
    finish reason. ``usageMetadata`` is cumulative (the last wins); it is reported
    after each chunk once something was delivered, so a break keeps the latest.
    A prompt blocked before any output raises ``content_policy_violation``.
    """
    state = _StreamState()
    usage: dict | None = None
    started, reported = False, True
    for _, data in events:
        chunk = c.load_event(data)
        if "error" in chunk:
            raise _stream_error(c.as_dict(chunk["error"]))
        if not chunk.get("candidates") and _blocked(chunk) and not started:
            raise blocked_error(chunk)
        for event in state.events(chunk, n):
            started = True
            yield event
        if isinstance(chunk.get("usageMetadata"), dict):
            usage, reported = chunk["usageMetadata"], False
        if started and not reported and usage is not None:
            yield UsageReport(usage_from(usage))
            reported = True
    if not state.finished or state.seen - state.finished:
        raise c.ended_early("gemini")
    if usage is not None and not reported:
        yield UsageReport(usage_from(usage))


class _StreamState:
    """What one stream has seen: candidates, finished candidates, tool calls per candidate."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.finished: set[int] = set()
        self.calls: dict[int, int] = {}
        self.ids: _CallIds | None = None

    def events(self, chunk: dict, n: int) -> Iterator[StreamEvent]:
        """Text, tool call and finish events of one chunk."""
        if self.ids is None:
            self.ids = _CallIds(chunk)
        candidates = [c.as_dict(x) for x in chunk.get("candidates") or []]
        for pos, cand in enumerate(candidates):
            index = _index(cand, pos)
            self.seen.add(index)
            if text := _text(cand):
                yield TextDelta(index, text, logprobs=logprobs_from(c.as_dict(cand.get("logprobsResult"))))
            for part in _parts(cand):
                if "functionCall" in part:
                    call = _tool_call(part, self.ids.next(c.as_dict(part["functionCall"])))
                    number = self.calls.get(index, 0)
                    self.calls[index] = number + 1
                    yield ToolCallDelta(
                        index,
                        number,
                        id=call["id"],
                        name=call["function"]["name"],
                        arguments=call["function"]["arguments"],
                        extra={"extra_content": call["extra_content"]} if "extra_content" in call else None,
                    )
            reason = finish_reason(cand.get("finishReason"))
            if reason and index not in self.finished:
                self.finished.add(index)
                yield Finish(index, "tool_calls" if reason == "stop" and self.calls.get(index) else reason)
        if not candidates and _blocked(chunk):
            for index in sorted(set(range(n)) - self.finished):
                self.seen.add(index)
                self.finished.add(index)
                yield Finish(index, "content_filter")


def _stream_error(error: dict) -> UpstreamError:
    status = str(error.get("status") or "error")
    message = f"gemini reported {status} in the stream"
    if status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        return UpstreamUnavailable(message)
    if status == "DEADLINE_EXCEEDED":
        return UpstreamTimeout(message)
    return UpstreamError(message)


ADAPTERS = (
    registry.Adapter(
        "chat",
        "gemini",
        registry.standard(GeminiProvider, "GEMINI_BASE_URL", "GOOGLE_API_KEY"),
        "GOOGLE_API_KEY",
        {"GEMINI_BASE_URL": "https://generativelanguage.googleapis.com"},
    ),
)
