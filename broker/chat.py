"""Metered chat: hold credits, call the provider, price its usage report, settle the exact charge.

This is the money path of every chat request. The hold is an upper bound (prompt
bytes at the dearest input rate plus the maximum output tokens), so a settled
charge never exceeds it. Policy when things break (also in the README):
- upstream failure before the first byte: the whole hold is released;
- upstream break or client disconnect mid-stream, or a finished stream without a
  usage report: the delivered tokens are charged (the provider's usage where it
  arrived, else an estimate from the delivered text, flagged ``estimated``),
  never more than the hold.
- the provider rate limiting us (after our retries), our provider account out of quota,
  an unknown model, a refused request: nothing is charged.

Streams follow OpenAI: a last chunk with empty ``choices`` (the usage, with
``cost_credits``) only when the client set ``stream_options.include_usage``; the receipt
at ``GET /v1/requests/{X-Request-Id}`` always has the cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from itertools import chain

import redis

from broker import limits, metrics, pricing
from broker.errors import (
    BrokerError,
    InsufficientCredits,
    InvalidRequest,
    UpstreamStreamBroken,
    outcome_unknown,
)
from broker.keys import Caller, stamp_use
from broker.ledger import Hold, HoldEnd, Ledger
from broker.pricing import ModelPrice, PriceTable
from broker.providers.base import (
    ChatCall,
    ChatProvider,
    ChatResult,
    Choice,
    Finish,
    FunctionCallDelta,
    StreamMeta,
    TextDelta,
    ToolCallDelta,
    UpstreamQuotaExceeded,
    Usage,
    UsageReport,
)
from broker.schemas import ChatCompletionRequest

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD_TOKENS = 8
REQUEST_OVERHEAD_TOKENS = 16
IMAGE_TOKEN_BOUND = pricing.IMAGE_TOKEN_BOUND  # a model may bound its images higher (its adapter's check)
# Tool definitions and a response format are rendered into the prompt with some framing
# around their JSON (a namespace, a type line): a generous allowance per definition.
DEFINITION_OVERHEAD_TOKENS = 32
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
# Identifiers that reach our single provider account: namespaced per customer account,
# with the longest value the provider takes.
NAMESPACED_FIELDS = {"safety_identifier": 64, "prompt_cache_key": 1024}
# Fields that change the provider's price; none is priced in the price table yet, so a
# request that sets one gets a 400 rather than a charge the hold did not cover.
STANDARD_TIERS = {"auto", "default"}


@dataclass
class Metering:
    """What the chat path needs from the app, handed in so this module stays Flask-free."""

    ledger: Ledger
    prices: PriceTable
    providers: dict[str, ChatProvider]
    markup: Decimal
    credit_usd: Decimal
    moderate: Callable[[str, str], None] = lambda text, what: None
    min_output_tokens: int = 1024  # the least a call without max_tokens holds (MIN_OUTPUT_TOKENS)
    progress_seconds: float = 10.0  # how often a live stream records what it delivered (STREAM_PROGRESS_SECONDS)


@dataclass
class ChatResponse:
    """Either a JSON body or an SSE stream of ``str`` events, plus response headers."""

    body: dict | None = None
    stream: Iterator[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Call:
    request_id: str
    caller: Caller
    price: ModelPrice
    call: ChatCall
    hold: int
    started: datetime
    prompt_text: str
    message_count: int
    include_usage: bool = False
    # The receipt's endpoint: the Responses and embeddings routes settle through this module too.
    endpoint: str = "chat"


def _text_of(content) -> tuple[str, int]:
    """The text of a message's content and how many images it carries."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts, images = [], 0
    for part in content:
        if part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif part.get("type") in ("image_url", "input_image", "image"):
            images += 1
        else:
            texts.append(json.dumps(part))
    return "\n".join(texts), images


def input_token_bound(messages: list[dict]) -> tuple[int, str]:
    """An upper bound on prompt tokens, and the prompt text (for estimates)."""
    bound, texts = REQUEST_OVERHEAD_TOKENS, []
    for message in messages:
        text, images = _text_of(message.get("content"))
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        if extra:
            text += json.dumps(extra)
        texts.append(text)
        bound += pricing.text_token_bound(text) + MESSAGE_OVERHEAD_TOKENS + images * IMAGE_TOKEN_BOUND
    return bound, "\n".join(texts)


def _rate(usd_per_million: Decimal, m: Metering) -> Decimal:
    return usd_per_million * m.markup / m.credit_usd


def start(
    m: Metering,
    caller: Caller,
    req: ChatCompletionRequest,
    model_name: str,
    request_id: str,
    endpoint: str = "chat",
) -> ChatResponse:
    """Validate, hold, call the provider and return the (possibly streamed) response.

    ``endpoint`` names the route on the receipt (``messages`` for the translated Messages API)."""
    price = m.prices.resolve(model_name, set(m.providers))
    if price.kind != "chat":
        raise InvalidRequest(f"'{price.id}' is not a chat model.", param="model")
    provider = m.providers[price.provider]
    extra = req.extra_fields()
    _check_extra(price, provider, extra)
    requested = req.requested_max_tokens
    if requested and requested > price.max_output_tokens:
        raise InvalidRequest(
            f"max_tokens is too large: {price.id} returns at most {price.max_output_tokens} tokens.",
            param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
        )
    messages = [msg.model_dump(exclude_none=True) for msg in req.messages]
    bound, prompt_text = input_token_bound(messages)
    m.moderate(prompt_text, "messages")
    if extra:
        # Tools, functions and a response format are prompt tokens too (and the estimate's text).
        definitions = {k: v for k, v in extra.items() if k in ("tools", "functions", "response_format")}
        count = len(extra.get("tools") or []) + len(extra.get("functions") or []) + ("response_format" in extra)
        bound += pricing.text_token_bound(json.dumps(extra)) + count * DEFINITION_OVERHEAD_TOKENS
        if definitions:
            prompt_text += "\n" + json.dumps(definitions)
    media_tokens, reasoning_tokens = _adapter_check(provider, price, req, messages, extra)
    bound += media_tokens
    hold = take_hold(m, caller, price, bound, requested, request_id, req.n, reasoning_tokens)
    namespace = account_namespace(caller.account_id)
    call = ChatCall(
        model=price.upstream_model,
        messages=messages,
        max_tokens=hold.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        n=req.n,
        user=_namespaced(namespace, req.user, 256) if req.user else None,
        extra=_namespace_extra(namespace, extra),
        rules=price.rules,
    )
    ctx = _Call(
        request_id,
        caller,
        price,
        call,
        hold.amount,
        datetime.now(UTC),
        prompt_text,
        len(messages),
        req.include_usage,
        endpoint=endpoint,
    )
    if req.stream:
        return _start_stream(m, ctx, provider)
    return _complete(m, ctx, provider)


def take_hold(
    m: Metering,
    caller: Caller,
    price: ModelPrice,
    bound: int,
    requested: int | None,
    request_id: str,
    n: int = 1,
    reasoning_tokens: int = 0,
) -> Hold:
    """Hold ``bound`` prompt tokens at the dearest input rate plus the output tokens (402 if unaffordable)."""
    fixed = int((bound * _rate(price.max_input_rate, m)).to_integral_value(rounding="ROUND_CEILING"))
    per_token = pricing.ucr_per_token(price.output, m.markup, m.credit_usd) * n
    if caller.marketplace:
        # RapidAPI bills the marketplace caller: no hold, the call is metered only.
        return Hold(True, 0, requested or price.max_output_tokens, 0)
    # Without max_tokens a small balance would silently cut the answer to a few tokens: hold at
    # least a useful floor (plus the thinking budget a reasoning request spends first), or answer
    # 402 saying what that needs.
    floor = 1 if requested else min(m.min_output_tokens + reasoning_tokens, price.max_output_tokens)
    hold = m.ledger.hold(
        caller.account_id,
        request_id,
        fixed,
        per_token,
        requested or 0,
        price.max_output_tokens,
        min_tokens=floor,
        key_id=caller.key_id,
        spend_cap_ucr=caller.spend_cap_ucr,
    )
    if not hold.ok:
        needed = fixed + (requested or floor) * per_token
        raise limits.hold_refusal(hold.why, caller.spend_cap_ucr) or _insufficient(
            hold.balance, needed, floor if not requested else None
        )
    return hold


# -- metering for routes that call a provider in its own wire format ----------------------
# (``broker.messages`` relays Anthropic's Messages API as is): the same hold, settle and
# receipt as chat, with the route doing the call.

MeteredCall = _Call


def open_call(
    m: Metering,
    caller: Caller,
    price: ModelPrice,
    request_id: str,
    *,
    bound: int,
    max_tokens: int,
    prompt_text: str,
    message_count: int,
    endpoint: str,
) -> MeteredCall:
    """Take the hold for a call of at most ``bound`` prompt and ``max_tokens`` output tokens."""
    hold = take_hold(m, caller, price, bound, max_tokens, request_id)
    call = ChatCall(model=price.upstream_model, messages=[], max_tokens=hold.max_tokens, rules=price.rules)
    started = datetime.now(UTC)
    return _Call(request_id, caller, price, call, hold.amount, started, prompt_text, message_count, endpoint=endpoint)


def settle_call(
    m: Metering,
    ctx: MeteredCall,
    reported: Usage | None,
    delivered: str,
    *,
    finished: bool,
    stream: bool,
    error_code: str | None = None,
) -> tuple[HoldEnd, Usage]:
    """Settle once: the provider's usage if complete, else an estimate from ``delivered`` (flagged)."""
    usage, estimated = _billable_usage(ctx, reported, delivered, finished)
    status = "ok" if finished else "partial"
    ended, _, _ = _settle(m, ctx, usage, estimated or not finished, status, stream, error_code)
    return ended, usage


def release_call(m: Metering, ctx: MeteredCall, error: BrokerError) -> None:
    """The provider failed before delivering anything: the whole hold comes back."""
    _release(m, ctx, error)


def money_headers(ended: HoldEnd, request_id: str) -> dict[str, str]:
    return _money_headers(ended.charged, ended.balance, request_id)


def namespaced_id(account_id: int, value: str, limit: int) -> str:
    """An identifier for the provider, tagged with the account's namespace (see ``_namespaced``)."""
    return _namespaced(account_namespace(account_id), value, limit)


def _adapter_check(
    provider: ChatProvider, price: ModelPrice, req: ChatCompletionRequest, messages: list[dict], extra: dict
) -> tuple[int, int]:
    """The adapter's own checks (its provider's rules, data in the price table) before anything is
    held; returns the prompt tokens of the parts only it can bound (media) and the thinking budget
    the request asks for (output tokens spent before the answer). See ``ChatProvider``."""
    check = getattr(provider, "check", None)
    reasoning = getattr(provider, "reasoning_tokens", None)
    if check is None and reasoning is None:
        return 0, 0
    draft = ChatCall(
        model=price.upstream_model,
        messages=messages,
        max_tokens=req.requested_max_tokens or price.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        n=req.n,
        extra=extra,
        rules=price.rules,
    )
    return (check(draft) if check else 0), (reasoning(draft) if reasoning else 0)


def _unsupported(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=name, code="unsupported_parameter")


def _check_extra(price: ModelPrice, provider: ChatProvider, extra: dict) -> None:
    """Refuse, before anything is held, the fields the provider does not take, those that
    would change the price beyond the table, and ``store: true``."""
    accepts = getattr(provider, "accepts", frozenset())
    for name in extra:
        if name not in accepts:
            raise _unsupported(name, f"'{name}' is not supported for {price.provider} models.")
    tier = extra.get("service_tier")
    if tier is not None and tier not in STANDARD_TIERS:
        raise _unsupported(
            "service_tier",
            f"service_tier '{tier}' is not priced for {price.id}; use 'auto' or 'default' (or leave it out).",
        )
    if "audio" in (extra.get("modalities") or []) or "audio" in extra:
        name = "audio" if "audio" in extra else "modalities"
        raise _unsupported(name, f"Audio output is not priced for {price.id}.")
    if "web_search_options" in extra:
        raise _unsupported("web_search_options", f"Web search is not priced for {price.id}.")
    if extra.get("store"):
        raise _unsupported(
            "store",
            "store: true is not supported: completions would be stored in the broker's provider account.",
        )


def account_namespace(account_id: int) -> str:
    """A stable tag per customer account for identifiers sent to our shared provider account."""
    return hashlib.sha256(f"broker-account:{account_id}".encode()).hexdigest()[:16]


def _namespaced(namespace: str, value: str, limit: int) -> str:
    """``<namespace>-<value>``; a value too long for the provider's limit is replaced by its digest."""
    tagged = f"{namespace}-{value}"
    if len(tagged) <= limit:
        return tagged
    return f"{namespace}-{hashlib.sha256(value.encode()).hexdigest()}"[:limit]


def _namespace_extra(namespace: str, extra: dict) -> dict:
    out = dict(extra)
    for name, limit in NAMESPACED_FIELDS.items():
        if name in out:
            out[name] = _namespaced(namespace, out[name], limit)
    if "metadata" in out:
        out["metadata"] = {k: _namespaced(namespace, v, 512) for k, v in out["metadata"].items()}
    out.pop("store", None)  # only store: false gets here, which is the default
    return out


def _insufficient(balance: int, needed: int, floor: int | None = None) -> InsufficientCredits:
    how = (
        f"Without max_tokens at least {floor:,} output tokens are held: set a lower max_tokens or add credits."
        if floor
        else "Lower max_tokens or add credits."
    )
    return InsufficientCredits(
        f"Insufficient credits: this request needs up to {pricing.format_credits(needed)} credits "
        f"and the balance is {pricing.format_credits(balance)}. {how}",
        param=None,
    )


def _release(m: Metering, ctx: _Call, error: BrokerError) -> None:
    metrics.UPSTREAM_ERRORS.labels(ctx.price.provider, error.code).inc()
    if isinstance(error, UpstreamQuotaExceeded):
        # The receipt's error code feeds the operator alert (broker.alerts.findings).
        log.error("provider account out of quota", extra={"provider": ctx.price.provider, "request_id": ctx.request_id})
    receipt = _receipt(m, ctx, Usage(), Decimal(0), "error", estimated=False)
    receipt["error_code"] = error.code
    if ctx.caller.marketplace:
        m.ledger.record_metered(ctx.caller.account_id, ctx.request_id, receipt)
        return
    m.ledger.release(ctx.caller.account_id, ctx.request_id, receipt)


def _complete(m: Metering, ctx: _Call, provider: ChatProvider) -> ChatResponse:
    try:
        result = provider.complete(ctx.call)
    except BrokerError as error:
        _release(m, ctx, error)
        raise
    delivered = "".join(_choice_text(choice) for choice in result.choices)
    usage, estimated = _billable_usage(ctx, result.usage, delivered, finished=True)
    ended, cost, receipt = _settle(m, ctx, usage, estimated, "ok")
    body = _completion_body(ctx, result, usage, ended.charged)
    return ChatResponse(body=body, headers=_money_headers(ended.charged, ended.balance, ctx.request_id))


def _billable_usage(ctx: _Call, reported: Usage | None, delivered: str, finished: bool) -> tuple[Usage, bool]:
    """The provider's usage when it reported a complete, valid one, else an estimate (flagged).

    A report with an invalid count (negative, not a whole number) is not a usage: it is replaced by
    the estimate as a whole. A count above what the model can take (its context window) or write
    (``max_tokens`` × ``n``) is cut to that, flagged ``capped`` (``pricing.usage_in_range``). A
    report of no output for delivered text is incomplete: its output is estimated."""
    if reported is not None:
        output_bound = ctx.call.max_tokens * ctx.call.n
        reported = pricing.usage_in_range(reported, ctx.price.context_window or pricing.MAX_COUNT, output_bound)
    complete = reported is not None and reported.prompt_tokens > 0 and (reported.output_tokens > 0 or not delivered)
    if reported is not None and finished and complete:
        return reported, False
    usage = reported or Usage()
    if not usage.prompt_tokens:
        usage.input_tokens = pricing.text_token_estimate(ctx.prompt_text) + 4 * ctx.message_count
    usage.output_tokens = max(usage.output_tokens, pricing.text_token_estimate(delivered))
    return usage, True


def _settle(
    m: Metering,
    ctx: _Call,
    usage: Usage,
    estimated: bool,
    status: str,
    stream: bool = False,
    error_code: str | None = None,
):
    cost = pricing.chat_cost_usd(ctx.price, usage)
    charge = pricing.charge_ucr(cost, m.markup, m.credit_usd)
    receipt = _receipt(m, ctx, usage, cost, status, estimated)
    capped = usage.capped or (charge > ctx.hold and not ctx.caller.marketplace)
    receipt.update(stream=stream, capped=capped, error_code=error_code)
    if ctx.caller.marketplace:
        receipt["detail"] = json.dumps({"marketplace": "rapidapi", "plan": ctx.caller.marketplace, "list_ucr": charge})
        m.ledger.record_metered(ctx.caller.account_id, ctx.request_id, receipt)
        log.info("marketplace request metered", extra={"request_id": ctx.request_id, "cost_usd": str(cost)})
        return HoldEnd("ended", 0, 0), cost, receipt
    ended = m.ledger.end_hold(
        ctx.caller.account_id,
        ctx.request_id,
        charge,
        receipt,
        extra=lambda pipe: stamp_use(pipe, ctx.caller),
    )
    metrics.CREDITS_CHARGED.labels(ctx.endpoint).inc(ended.charged)
    if ended.status != "ended":
        log.error(
            "settle found no open hold",
            extra={"request_id": ctx.request_id, "status": ended.status},
        )
    return ended, cost, receipt


def _receipt(m: Metering, ctx: _Call, usage: Usage, cost: Decimal, status: str, estimated: bool) -> dict:
    return {
        "request_id": ctx.request_id,
        "key_id": ctx.caller.key_id,
        "endpoint": ctx.endpoint,
        "provider": ctx.price.provider,
        "model": ctx.price.id,
        "status": status,
        "stream": False,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "output_tokens": usage.output_tokens,
        "cost_usd": format(cost, "f"),  # never exponent form (6E-7) for tiny costs
        "markup": str(m.markup),
        "hold_ucr": ctx.hold,
        "estimated": estimated,
        "started_at": ctx.started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
    }


def _money_headers(charged: int, balance: int, request_id: str) -> dict[str, str]:
    return {
        "X-Credits-Charged": pricing.format_credits(charged),
        "X-Credits-Remaining": pricing.format_credits(balance),
        "X-Request-Id": request_id,
    }


def _usage_json(usage: Usage, charged: int) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens + usage.cache_write_1h_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": usage.accepted_prediction_tokens,
            "rejected_prediction_tokens": usage.rejected_prediction_tokens,
        },
        "cost_credits": float(pricing.format_credits(charged)),
    }


def _choice_text(choice: Choice) -> str:
    """Everything the model wrote in a choice (for estimates): text, refusal, tool calls."""
    parts = [choice.content or "", choice.refusal or ""]
    if choice.tool_calls:
        parts.append(json.dumps(choice.tool_calls))
    if choice.function_call:
        parts.append(json.dumps(choice.function_call))
    return "".join(parts)


def _finish(reason: str | None) -> str:
    return reason if reason in FINISH_REASONS else "stop"


def _message(choice: Choice) -> dict:
    message: dict = {
        "role": "assistant",
        "content": choice.content,
        "refusal": choice.refusal,
        "annotations": choice.annotations or [],
    }
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    if choice.function_call:
        message["function_call"] = choice.function_call
    return message


def _completion_body(ctx: _Call, result: ChatResult, usage: Usage, charged: int) -> dict:
    body = {
        "id": "chatcmpl-" + ctx.request_id[4:],
        "object": "chat.completion",
        "created": int(ctx.started.timestamp()),
        "model": ctx.price.id,
        "choices": [
            {
                "index": choice.index,
                "message": _message(choice),
                "logprobs": choice.logprobs,
                "finish_reason": _finish(choice.finish_reason),
            }
            for choice in result.choices
        ],
        "usage": _usage_json(usage, charged),
    }
    if result.service_tier:
        body["service_tier"] = result.service_tier
    if result.system_fingerprint:
        body["system_fingerprint"] = result.system_fingerprint
    body["request_id"] = ctx.request_id
    return body


class StreamProgress:
    """A live stream's heartbeat on its hold: every ``progress_seconds`` it records what it has
    delivered so far (priced as an estimate, at most the hold) and moves the hold's deadline on.

    So the reaper never expires the hold of a stream that is still running however slowly its
    client reads, and one whose process died (a crash, a restart that cut it) is charged what it
    delivered rather than nothing. A Redis error here does not break the stream: the settle at
    its end is what counts.
    """

    def __init__(self, m: Metering, ctx: _Call) -> None:
        self.m, self.ctx = m, ctx
        self.due = time.monotonic() + m.progress_seconds

    def beat(self, reported: Usage | None, delivered: list[str]) -> None:
        if self.ctx.caller.marketplace or time.monotonic() < self.due:
            return
        self.due = time.monotonic() + self.m.progress_seconds
        usage, _ = _billable_usage(self.ctx, reported, "".join(delivered), finished=False)
        estimate = pricing.charge_ucr(pricing.chat_cost_usd(self.ctx.price, usage), self.m.markup, self.m.credit_usd)
        try:
            self.m.ledger.record_progress(self.ctx.caller.account_id, self.ctx.request_id, min(estimate, self.ctx.hold))
        except redis.RedisError as error:
            log.warning("stream progress not recorded", extra={"request_id": self.ctx.request_id, "error": str(error)})


def _start_stream(m: Metering, ctx: _Call, provider: ChatProvider) -> ChatResponse:
    """Wait for the provider's first event, so a failure before it is a plain JSON error."""
    events = provider.stream(ctx.call)
    try:
        first = next(events, None)
    except BrokerError as error:
        events.close()
        _release(m, ctx, error)
        raise
    meta = first if isinstance(first, StreamMeta) else StreamMeta()
    head = [first] if first is not None and first is not meta else []
    headers = {
        "X-Request-Id": ctx.request_id,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    return ChatResponse(stream=_relay(m, ctx, chain(head, events), events, meta), headers=headers)


class _Chunks:
    """OpenAI ``chat.completion.chunk`` lines for one stream, built from a fixed prefix."""

    def __init__(self, ctx: _Call, meta: StreamMeta) -> None:
        head = (
            f'data: {{"id":"chatcmpl-{ctx.request_id[4:]}","object":"chat.completion.chunk",'
            f'"created":{int(ctx.started.timestamp())},"model":{json.dumps(ctx.price.id)}'
        )
        if meta.service_tier:
            head += f',"service_tier":{json.dumps(meta.service_tier)}'
        if meta.system_fingerprint:
            head += f',"system_fingerprint":{json.dumps(meta.system_fingerprint)}'
        self.head = head
        # With include_usage OpenAI sends "usage": null on every chunk but the last.
        self.tail = ',"usage":null}\n\n' if ctx.include_usage else "}\n\n"
        self.opened: set[int] = set()

    def choice(self, index: int, delta: str, finish: str = "null", logprobs: str = "null") -> str:
        return (
            f'{self.head},"choices":[{{"index":{index},"delta":{delta},"logprobs":{logprobs},'
            f'"finish_reason":{finish}}}]{self.tail}'
        )

    def usage(self, usage: Usage, charged: int) -> str:
        return f'{self.head},"choices":[],"usage":{json.dumps(_usage_json(usage, charged))}}}\n\n'

    def role(self, index: int, opening: str) -> list[str]:
        """The chunk that opens choice ``index`` (once), as OpenAI sends it."""
        if index in self.opened:
            return []
        self.opened.add(index)
        return [self.choice(index, '{"role":"assistant",' + opening + "}")]

    def render(self, event) -> tuple[list[str], str]:
        """The chunks for one event, and the text it delivered (for estimates)."""
        if isinstance(event, TextDelta):
            key = "refusal" if event.refusal else "content"
            opening = '"content":null,"refusal":""' if event.refusal else '"content":"","refusal":null'
            logprobs = json.dumps(event.logprobs) if event.logprobs else "null"
            delta = f'{{"{key}":{json.dumps(event.text)}}}'
            return [*self.role(event.index, opening), self.choice(event.index, delta, logprobs=logprobs)], event.text
        if isinstance(event, ToolCallDelta):
            call: dict = {"index": event.call}
            if event.id is not None:
                call.update(id=event.id, type=event.type)
            if event.extra:
                call.update(event.extra)
            fn: dict = {"name": event.name} if event.name is not None else {}
            fn["input" if event.type == "custom" else "arguments"] = event.arguments
            call[event.type] = fn
            tool_calls = '"tool_calls":' + json.dumps([call])
            if event.index not in self.opened:
                self.opened.add(event.index)
                delta = '{"role":"assistant","content":null,' + tool_calls + "}"
            else:
                delta = "{" + tool_calls + "}"
            return [self.choice(event.index, delta)], (event.name or "") + event.arguments
        if isinstance(event, FunctionCallDelta):
            fn = {"name": event.name} if event.name is not None else {}
            fn["arguments"] = event.arguments
            function_call = '"function_call":' + json.dumps(fn)
            if event.index not in self.opened:
                self.opened.add(event.index)
                delta = '{"role":"assistant","content":null,' + function_call + "}"
            else:
                delta = "{" + function_call + "}"
            return [self.choice(event.index, delta)], (event.name or "") + event.arguments
        if isinstance(event, Finish):
            finish = self.choice(event.index, "{}", json.dumps(_finish(event.reason)))
            return [*self.role(event.index, '"content":"","refusal":null'), finish], ""
        return [], ""


def _relay(m: Metering, ctx: _Call, events, upstream, meta: StreamMeta) -> Iterator[str]:
    """OpenAI chunks for any provider, the usage chunk (with the cost) if asked, then ``[DONE]``.

    Settles exactly once whatever happens: normal end, upstream break, or the client
    going away (``GeneratorExit`` at a ``yield``).
    """
    chunks = _Chunks(ctx, meta)
    delivered: list[str] = []
    usage: Usage | None = None
    settled = False
    progress = StreamProgress(m, ctx)

    def settle(finished: bool, error_code: str | None = None) -> tuple[Usage, HoldEnd]:
        nonlocal settled
        # Sent once: a settle that failed in Redis may still land, so none follows it.
        settled = True
        billable, estimated = _billable_usage(ctx, usage, "".join(delivered), finished=finished)
        status = "ok" if finished else "partial"
        ended, _, _ = _settle(m, ctx, billable, estimated or not finished, status, True, error_code)
        return billable, ended

    try:
        for event in events:
            if isinstance(event, UsageReport):
                usage = event.usage
                continue
            lines, text = chunks.render(event)
            delivered.append(text)
            progress.beat(usage, delivered)
            yield from lines
        billable, ended = settle(finished=True)
        if ctx.include_usage:
            yield chunks.usage(billable, ended.charged)
        yield "data: [DONE]\n\n"
    except UpstreamStreamBroken as error:
        metrics.UPSTREAM_ERRORS.labels(ctx.price.provider, error.code).inc()
        billable, ended = settle(finished=False, error_code=error.code)
        if ctx.include_usage:
            yield chunks.usage(billable, ended.charged)
        yield "data: " + json.dumps(error.body()) + "\n\n"
    except redis.RedisError:
        log.error("Redis unavailable while settling a stream", extra={"request_id": ctx.request_id})
        yield "data: " + json.dumps(outcome_unknown(ctx.request_id).body()) + "\n\n"
    finally:
        if not settled:
            settle(finished=False, error_code="client_disconnected")
        upstream.close()
