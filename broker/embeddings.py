"""Metered embeddings (``POST /v1/embeddings``) in OpenAI's shape, for OpenAI and Gemini models.

The same hold → call → settle → receipt as chat (``broker.chat``'s settle and release):
- the hold is an upper bound on the input tokens (a string's bytes, since a token is never
  shorter than a byte; a token array's length) at the model's input price; nothing is
  output-priced;
- OpenAI models are charged from the ``usage.prompt_tokens`` OpenAI reports;
- Gemini's ``batchEmbedContents`` reports no usage, so Gemini embeddings are charged at the
  broker's estimate (about four bytes a token, rounded up per input) and the receipt is
  flagged ``estimated``; never above the hold;
- a provider failure releases the whole hold.

``encoding_format: base64`` is passed to OpenAI, whose strings are relayed as sent; for Gemini
the broker encodes each vector itself, as OpenAI does: little-endian float32, base64.
"""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime

from broker import chat, limits, pricing
from broker.chat import ChatResponse, Metering
from broker.errors import BrokerError, InvalidRequest
from broker.keys import Caller
from broker.ledger import Hold
from broker.providers.base import ChatCall, Usage
from broker.schemas import EmbeddingRequest


def _inputs(req: EmbeddingRequest) -> list:
    """The request's inputs as a list: strings, or token arrays (lists of ints)."""
    value = req.input
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]  # one token array
    return list(value)


def _check(req: EmbeddingRequest, rules: dict, model_id: str, inputs: list) -> None:
    """Refuse, before anything is held, what the model's rules (price table) or OpenAI refuse."""
    if not inputs:
        raise InvalidRequest("input must not be empty.", param="input")
    tokens = not isinstance(inputs[0], str)
    if tokens and not rules.get("token_arrays"):
        raise InvalidRequest(
            f"{model_id} takes text only: send strings, not token arrays.", param="input", code="unsupported_parameter"
        )
    if any(len(item) == 0 for item in inputs):
        raise InvalidRequest("input must not contain an empty string or an empty token array.", param="input")
    most = int(rules.get("max_inputs", 2048))
    if len(inputs) > most:
        raise InvalidRequest(f"{model_id} embeds at most {most} inputs in one request.", param="input")
    low, high = rules.get("dimensions", [1, 1 << 16])
    if req.dimensions is not None and not low <= req.dimensions <= high:
        raise InvalidRequest(f"dimensions must be between {low} and {high} for {model_id}.", param="dimensions")


def _bound(inputs: list) -> int:
    """An upper bound on the input tokens: a string's bytes, a token array's length."""
    return sum(len(item) if isinstance(item, list) else pricing.text_token_bound(item) for item in inputs)


def estimate(inputs: list[str]) -> int:
    """The documented count for a provider that reports none: about four bytes a token, per input."""
    return sum(pricing.text_token_estimate(text) for text in inputs)


def encode_base64(vector: list[float]) -> str:
    """A vector as OpenAI's ``base64`` encoding: little-endian float32 bytes, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def start(m: Metering, caller: Caller, req: EmbeddingRequest, request_id: str) -> ChatResponse:
    """Validate, hold, call the provider, settle, and answer OpenAI's embedding list."""
    price = m.prices.resolve(req.model, set(m.providers))
    provider = m.providers[price.provider]
    if price.kind != "embedding" or not hasattr(provider, "embed"):
        raise InvalidRequest(f"'{price.id}' is not an embedding model.", param="model")
    inputs = _inputs(req)
    _check(req, price.rules, price.id, inputs)
    texts = [item for item in inputs if isinstance(item, str)]
    if texts:
        m.moderate("\n".join(texts), "input")
    bound = _bound(inputs)
    fixed = int((bound * price.input * m.markup / m.credit_usd).to_integral_value(rounding="ROUND_CEILING"))
    if caller.marketplace:
        hold = Hold(True, 0, 1, 0)  # RapidAPI bills the marketplace caller: metered only
    else:
        hold = m.ledger.hold(
            caller.account_id, request_id, fixed, 0, 1, 1, key_id=caller.key_id, spend_cap_ucr=caller.spend_cap_ucr
        )
        if not hold.ok:
            raise limits.hold_refusal(hold.why, caller.spend_cap_ucr) or chat._insufficient(hold.balance, fixed)
    ctx = chat._Call(
        request_id,
        caller,
        price,
        ChatCall(model=price.upstream_model, messages=[], max_tokens=0),
        hold.amount,
        datetime.now(UTC),
        "\n".join(texts),
        0,
        endpoint="embeddings",
    )
    user = None
    if req.user and price.provider == "openai":
        user = chat._namespaced(chat.account_namespace(caller.account_id), req.user, 256)
    try:
        vectors, reported = provider.embed(price.upstream_model, inputs, req.dimensions, req.encoding_format, user)
    except BrokerError as error:
        chat._release(m, ctx, error)
        raise
    # The reported count passes chat's check: invalid, the estimate; above what the model takes
    # (its context window per input), cut and flagged.
    most = price.context_window * len(inputs) or pricing.MAX_COUNT
    usage = pricing.usage_in_range(Usage(input_tokens=reported), most, 0) if reported is not None else None
    estimated = usage is None
    if usage is None:
        usage = Usage(input_tokens=estimate(texts) + sum(len(item) for item in inputs if isinstance(item, list)))
    tokens = usage.input_tokens
    ended, _, _ = chat._settle(m, ctx, usage, estimated, "ok")
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": encode_base64(v) if req.encoding_format == "base64" and isinstance(v, list) else v,
        }
        for index, v in enumerate(vectors)
    ]
    body = {
        "object": "list",
        "data": data,
        "model": price.id,
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "cost_credits": float(pricing.format_credits(ended.charged)),
        },
    }
    return ChatResponse(body=body, headers=chat._money_headers(ended.charged, ended.balance, request_id))
