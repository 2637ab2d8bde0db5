"""Metered chat: hold credits, call the provider, price its usage report, settle the exact charge.

This is the money path of every chat request. The hold is an upper bound (prompt
bytes at the dearest input rate plus the maximum output tokens), so a settled
charge never exceeds it. Policy when things break (also in the README):
- upstream failure before the first byte: the whole hold is released;
- upstream break or client disconnect mid-stream, or a finished stream without a
  usage report: the delivered tokens are charged (the provider's usage where it
  arrived, else an estimate from the delivered text, flagged ``estimated``),
  never more than the hold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from itertools import chain

from broker import metrics, pricing
from broker.errors import (
    BrokerError,
    InsufficientCredits,
    InvalidRequest,
    UpstreamStreamBroken,
)
from broker.keys import Caller, stamp_use
from broker.ledger import Hold, HoldEnd, Ledger
from broker.pricing import ModelPrice, PriceTable
from broker.providers.base import (
    ChatCall,
    ChatProvider,
    ChatResult,
    Finish,
    TextDelta,
    Usage,
    UsageReport,
)
from broker.schemas import ChatCompletionRequest

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD_TOKENS = 8
REQUEST_OVERHEAD_TOKENS = 16
IMAGE_TOKEN_BOUND = 2000


@dataclass
class Metering:
    """What the chat path needs from the app, handed in so this module stays Flask-free."""

    ledger: Ledger
    prices: PriceTable
    providers: dict[str, ChatProvider]
    markup: Decimal
    credit_usd: Decimal
    moderate: Callable[[str, str], None] = lambda text, what: None


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
) -> ChatResponse:
    """Validate, hold, call the provider and return the (possibly streamed) response."""
    price = m.prices.resolve(model_name, set(m.providers))
    if price.kind != "chat":
        raise InvalidRequest(f"'{price.id}' is not a chat model.", param="model")
    if price.provider != "openai":
        for name in req.passthrough():
            raise InvalidRequest(
                f"'{name}' is only supported for OpenAI models.",
                param=name,
                code="unsupported_parameter",
            )
    if price.provider == "anthropic" and req.n > 1:
        raise InvalidRequest("Anthropic models return one choice: n must be 1.", param="n")
    requested = req.requested_max_tokens
    if requested and requested > price.max_output_tokens:
        raise InvalidRequest(
            f"max_tokens is too large: {price.id} returns at most {price.max_output_tokens} tokens.",
            param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
        )
    messages = [msg.model_dump(exclude_none=True) for msg in req.messages]
    bound, prompt_text = input_token_bound(messages)
    m.moderate(prompt_text, "messages")
    bound += pricing.text_token_bound(json.dumps(req.passthrough())) if req.passthrough() else 0
    fixed = int((bound * _rate(price.max_input_rate, m)).to_integral_value(rounding="ROUND_CEILING"))
    per_token = pricing.ucr_per_token(price.output, m.markup, m.credit_usd) * req.n
    if caller.marketplace:
        # RapidAPI bills the marketplace caller: no hold, the call is metered only.
        hold = Hold(True, 0, requested or price.max_output_tokens, 0)
    else:
        hold = m.ledger.hold(caller.account_id, request_id, fixed, per_token, requested or 0, price.max_output_tokens)
    if not hold.ok:
        raise _insufficient(hold.balance, fixed + (requested or 1) * per_token)
    call = ChatCall(
        model=price.upstream_model,
        messages=messages,
        max_tokens=hold.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        n=req.n,
        user=req.user,
        extra=req.passthrough(),
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
    )
    provider = m.providers[price.provider]
    if req.stream:
        return _start_stream(m, ctx, provider)
    return _complete(m, ctx, provider)


def _insufficient(balance: int, needed: int) -> InsufficientCredits:
    return InsufficientCredits(
        f"Insufficient credits: this request needs up to {pricing.format_credits(needed)} credits "
        f"and the balance is {pricing.format_credits(balance)}. Lower max_tokens or add credits.",
        param=None,
    )


def _release(m: Metering, ctx: _Call, error: BrokerError) -> None:
    metrics.UPSTREAM_ERRORS.labels(ctx.price.provider, error.code).inc()
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
    delivered = "".join(choice.content for choice in result.choices)
    usage, estimated = _billable_usage(ctx, result.usage, delivered, finished=True)
    ended, cost, receipt = _settle(m, ctx, usage, estimated, "ok")
    body = _completion_body(ctx, result, usage, ended.charged)
    return ChatResponse(body=body, headers=_money_headers(ended.charged, ended.balance, ctx.request_id))


def _billable_usage(ctx: _Call, reported: Usage | None, delivered: str, finished: bool) -> tuple[Usage, bool]:
    """The provider's usage when it reported a complete one, else an estimate (flagged)."""
    if reported is not None and finished and (reported.prompt_tokens or reported.output_tokens):
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
    receipt.update(stream=stream, capped=charge > ctx.hold and not ctx.caller.marketplace, error_code=error_code)
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
        extra=lambda pipe: stamp_use(pipe, ctx.caller, charge),
    )
    metrics.CREDITS_CHARGED.labels("chat").inc(ended.charged)
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
        "endpoint": "chat",
        "provider": ctx.price.provider,
        "model": ctx.price.id,
        "status": status,
        "stream": False,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "output_tokens": usage.output_tokens,
        "cost_usd": str(cost),
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
        },
        "cost_credits": float(pricing.format_credits(charged)),
    }


def _completion_body(ctx: _Call, result: ChatResult, usage: Usage, charged: int) -> dict:
    return {
        "id": "chatcmpl-" + ctx.request_id[4:],
        "object": "chat.completion",
        "created": int(ctx.started.timestamp()),
        "model": ctx.price.id,
        "choices": [
            {
                "index": choice.index,
                "message": {
                    "role": "assistant",
                    "content": choice.content,
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": choice.finish_reason or "stop",
            }
            for choice in result.choices
        ],
        "usage": _usage_json(usage, charged),
        "request_id": ctx.request_id,
    }


def _start_stream(m: Metering, ctx: _Call, provider: ChatProvider) -> ChatResponse:
    """Wait for the provider's first event, so a failure before it is a plain JSON error."""
    events = provider.stream(ctx.call)
    try:
        first = next(events, None)
    except BrokerError as error:
        events.close()
        _release(m, ctx, error)
        raise
    head = [first] if first is not None else []
    headers = {
        "X-Request-Id": ctx.request_id,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    return ChatResponse(stream=_relay(m, ctx, chain(head, events), events), headers=headers)


def _relay(m: Metering, ctx: _Call, events, upstream) -> Iterator[str]:
    """OpenAI chunks for any provider, a usage chunk with the cost, then ``[DONE]``.

    Settles exactly once whatever happens: normal end, upstream break, or the client
    going away (``GeneratorExit`` at a ``yield``).
    """
    prefix = (
        f'data: {{"id":"chatcmpl-{ctx.request_id[4:]}","object":"chat.completion.chunk",'
        f'"created":{int(ctx.started.timestamp())},"model":{json.dumps(ctx.price.id)},"choices":['
    )
    delivered: list[str] = []
    usage: Usage | None = None
    settled = False
    try:
        for index in range(ctx.call.n):
            yield _choice_chunk(prefix, index, '{"role":"assistant","content":""}')
        for event in events:
            if isinstance(event, TextDelta):
                delivered.append(event.text)
                yield _choice_chunk(prefix, event.index, '{"content":' + json.dumps(event.text) + "}")
            elif isinstance(event, Finish):
                yield _choice_chunk(prefix, event.index, "{}", json.dumps(event.reason))
            elif isinstance(event, UsageReport):
                usage = event.usage
        billable, estimated = _billable_usage(ctx, usage, "".join(delivered), finished=True)
        ended, _, _ = _settle(m, ctx, billable, estimated, "ok", stream=True)
        settled = True
        yield _usage_chunk(prefix, billable, ended.charged)
        yield "data: [DONE]\n\n"
    except UpstreamStreamBroken as error:
        metrics.UPSTREAM_ERRORS.labels(ctx.price.provider, error.code).inc()
        billable, _ = _billable_usage(ctx, usage, "".join(delivered), finished=False)
        ended, _, _ = _settle(m, ctx, billable, True, "partial", True, error.code)
        settled = True
        yield _usage_chunk(prefix, billable, ended.charged)
        yield "data: " + json.dumps(error.body()) + "\n\n"
    finally:
        if not settled:
            billable, _ = _billable_usage(ctx, usage, "".join(delivered), finished=False)
            _settle(m, ctx, billable, True, "partial", True, "client_disconnected")
        upstream.close()


def _choice_chunk(prefix: str, index: int, delta: str, finish: str = "null") -> str:
    return f'{prefix}{{"index":{index},"delta":{delta},"finish_reason":{finish}}}]}}\n\n'


def _usage_chunk(prefix: str, usage: Usage, charged: int) -> str:
    return prefix[:-1] + f'[],"usage":{json.dumps(_usage_json(usage, charged))}}}\n\n'
