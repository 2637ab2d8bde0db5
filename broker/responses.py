"""OpenAI's Responses API (``POST /v1/responses``) for OpenAI models: a metered pass-through.

Money goes the chat way (``broker.chat``'s hold bound, settle, release and receipt):
- the hold is the input bound (the request's bytes, images at the chat bound, and the whole
  context of a ``previous_response_id``) at the input price plus ``max_output_tokens`` (or what
  the balance affords, sent upstream as ``max_output_tokens``) at the output price;
- the charge is priced from ``usage`` (``input_tokens`` less ``input_tokens_details.cached_tokens``
  at the input rate, the cached tokens at the cached rate, ``output_tokens`` with its reasoning
  tokens at the output rate); streamed, from the terminal event's (``response.completed``,
  ``response.incomplete``, ``response.failed``) ``response.usage``;
- a stream cut before its terminal event, or a client that goes away, is charged as chat's
  streams are: the prompt and the delivered text estimated, flagged ``estimated``, never above
  the hold.

Stored responses live in the broker's single OpenAI account, so every response id (and every
output item id) is bound to the account that made it, in Redis for ``BINDING_SECONDS``:
``previous_response_id``, input items given by ``id`` and ``GET /v1/responses/{id}`` reach only
the caller's own. Refused with a ``400`` before anything is held: other providers' models, built-in
tools the price table does not price (anything but ``function`` and ``custom``), ``background``,
``conversation`` and ``prompt`` (objects of the broker's account), uploaded ``file_id``s and the
other unpriced options listed in ``REFUSED``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import redis

from broker import chat, metrics, pricing
from broker.chat import ChatResponse, Metering
from broker.errors import BrokerError, InvalidRequest, NotFound, UpstreamStreamBroken, outcome_unknown
from broker.keys import Caller
from broker.ledger import HoldEnd
from broker.providers.base import ChatCall, Usage, count_of, net_count
from broker.schemas import ResponsesRequest

log = logging.getLogger(__name__)

BINDING_SECONDS = 30 * 24 * 3600  # OpenAI keeps stored responses 30 days
TOOL_TYPES = {"function", "custom"}
REFUSED = {
    "conversation": "Conversations live in the broker's provider account: send previous_response_id or the items.",
    "prompt": "Stored prompts live in the broker's provider account: send instructions and input instead.",
    "context_management": "Server-side compaction is not priced by this broker.",
    "prompt_cache_options": "prompt_cache_options is not supported by this broker.",
    "moderation": "Moderated responses are not priced by this broker.",
    "image": "Request-level image options are not supported by this broker.",
    "access_programs": "Access programs are not supported by this broker.",
}
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
# Fields of the response object that carry the client's identifiers (namespaced on the way up).
NAMESPACED = {"user": 256, "safety_identifier": 64, "prompt_cache_key": 1024}


def _binding_key(object_id: str) -> str:
    return f"respbind:{object_id}"


def bind(r: redis.Redis, account_id: int, response: dict, context_tokens: int) -> None:
    """Bind a response id and its output items' ids to the account; remember the response's context size."""
    pipe = r.pipeline(transaction=False)
    if isinstance(response.get("id"), str):
        pipe.set(_binding_key(response["id"]), f"{account_id}:{context_tokens}", ex=BINDING_SECONDS)
    for item in response.get("output") or []:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            pipe.set(_binding_key(item["id"]), f"{account_id}:0", ex=BINDING_SECONDS)
    pipe.execute()


def bound_context(r: redis.Redis, account_id: int, object_id: str) -> int | None:
    """The context tokens of a response (or 0 for an item) bound to this account; None if not this account's."""
    value = r.get(_binding_key(object_id))
    if value is None:
        return None
    owner, _, tokens = (value.decode() if isinstance(value, bytes) else value).partition(":")
    return int(tokens) if owner == str(account_id) else None


def _not_found(object_id: str, param: str | None) -> NotFound:
    # The same answer for another account's id and an unknown one.
    return NotFound(f"No response or item with id '{object_id}'.", param=param)


def _walk_input(value: object) -> Iterator[dict]:
    """Every object in the input, however deep (items, content parts)."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _walk_input(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk_input(child)


def _check(req: ResponsesRequest, r: redis.Redis, account_id: int) -> tuple[int, int]:
    """Refusals before the hold; returns (images in the input, context tokens of previous_response_id)."""
    for name, message in REFUSED.items():
        if getattr(req, name) is not None:
            raise InvalidRequest(message, param=name, code="unsupported_parameter")
    if req.background:
        raise InvalidRequest(
            "background: true is not supported: send the request without it (or stream it).",
            param="background",
            code="unsupported_parameter",
        )
    if req.service_tier is not None and req.service_tier not in chat.STANDARD_TIERS:
        raise InvalidRequest(
            f"service_tier '{req.service_tier}' is not priced; use 'auto' or 'default' (or leave it out).",
            param="service_tier",
            code="unsupported_parameter",
        )
    for index, tool in enumerate(req.tools or []):
        kind = tool.get("type")
        if kind not in TOOL_TYPES:
            raise InvalidRequest(
                f"The built-in tool '{kind}' is not priced by this broker: only function and custom tools are taken.",
                param=f"tools[{index}]",
                code="unsupported_parameter",
            )
    images = 0
    for node in _walk_input(req.input):
        if "file_id" in node:
            raise InvalidRequest(
                "Uploaded files (file_id) are not supported: send the file's data instead.",
                param="input",
                code="unsupported_parameter",
            )
        images += node.get("type") == "input_image"
    # An input item given by id (an item_reference, or an output item sent back) may be looked up
    # among the stored items of the broker's account: it must be one of this account's.
    for index, item in enumerate(req.input if isinstance(req.input, list) else []):
        object_id = item.get("id")
        if object_id is not None and (
            not isinstance(object_id, str) or bound_context(r, account_id, object_id) is None
        ):
            raise _not_found(str(object_id), f"input[{index}].id")
    context = 0
    if req.previous_response_id is not None:
        found = bound_context(r, account_id, req.previous_response_id)
        if found is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
        context = found
    return images, context


def _prompt_text(req: ResponsesRequest) -> tuple[str, int]:
    """The input's text (for estimates) and how many items it has."""
    if isinstance(req.input, str):
        items: list = [req.input]
    else:
        items = req.input or []
    texts = [req.instructions or ""]
    for node in _walk_input(items):
        for key in ("text", "arguments", "output"):
            if isinstance(node.get(key), str):
                texts.append(node[key])
    texts += [item for item in items if isinstance(item, str)]
    return "\n".join(t for t in texts if t), len(items) + 1


def _usage(data: object) -> Usage | None:
    """The Responses ``usage`` as the broker's ``Usage``; None when absent or empty."""
    if not isinstance(data, dict):
        return None
    details = data.get("input_tokens_details") if isinstance(data.get("input_tokens_details"), dict) else {}
    out = data.get("output_tokens_details") if isinstance(data.get("output_tokens_details"), dict) else {}

    def count(source: dict, name: str) -> int:
        return count_of(source.get(name))  # an odd count stays visible to chat._billable_usage

    cached, written = count(details, "cached_tokens"), count(details, "cache_write_tokens")
    usage = Usage(
        input_tokens=net_count(count(data, "input_tokens"), cached, written),
        cached_input_tokens=cached,
        cache_write_tokens=written,
        output_tokens=count(data, "output_tokens"),
        reasoning_tokens=count(out, "reasoning_tokens"),
    )
    return usage if usage.prompt_tokens or usage.output_tokens else None


def _output_text(response: dict) -> str:
    """Everything the model wrote in a response object (for estimates)."""
    parts = []
    for node in _walk_input(response.get("output") or []):
        for key in ("text", "arguments", "input"):
            if isinstance(node.get(key), str):
                parts.append(node[key])
    return "".join(parts)


def restore(response: dict, model_id: str, namespace: str) -> None:
    """The response object as the client should see it: the broker's model id, its own identifiers."""
    response["model"] = model_id
    prefix = namespace + "-"
    for name in NAMESPACED:
        if isinstance(response.get(name), str):
            response[name] = response[name].removeprefix(prefix)
    if isinstance(response.get("metadata"), dict):
        response["metadata"] = {
            k: v.removeprefix(prefix) if isinstance(v, str) else v for k, v in response["metadata"].items()
        }


class _Context:
    """One Responses call: chat's call context plus what the pass-through needs."""

    def __init__(self, m: Metering, r: redis.Redis, ctx: chat._Call, namespace: str, bound: int) -> None:
        self.m, self.r, self.ctx, self.namespace, self.bound = m, r, ctx, namespace, bound
        self.ended = HoldEnd("open", 0, 0)

    def restore(self, response: object) -> None:
        if isinstance(response, dict):
            restore(response, self.ctx.price.id, self.namespace)

    def settle(self, response: dict | None, delivered: str, finished: bool, stream: bool, error_code=None) -> int:
        """Charge from the response's usage (or the estimate), bind it, return the µcr charged."""
        reported = _usage(response.get("usage")) if response else None
        usage, estimated = chat._billable_usage(self.ctx, reported, delivered, finished=finished)
        status = "ok" if finished else "partial"
        ended, _, _ = chat._settle(self.m, self.ctx, usage, estimated or not finished, status, stream, error_code)
        if response and isinstance(response.get("id"), str):
            bind(self.r, self.ctx.caller.account_id, response, usage.prompt_tokens + usage.output_tokens)
        self.ended = ended
        return ended.charged


def start(m: Metering, r: redis.Redis, caller: Caller, req: ResponsesRequest, request_id: str) -> ChatResponse:
    """Validate, hold, call OpenAI and return the response (or its event stream)."""
    price = m.prices.resolve(req.model, set(m.providers))
    if price.kind != "chat":
        raise InvalidRequest(f"'{price.id}' is not a chat model.", param="model")
    provider = m.providers[price.provider]
    if price.provider != "openai" or not hasattr(provider, "respond"):
        raise InvalidRequest(
            f"The Responses API is served for OpenAI models only; use POST /v1/chat/completions for {price.id}.",
            param="model",
            code="unsupported_model",
        )
    images, context = _check(req, r, caller.account_id)
    requested = req.max_output_tokens
    if requested and requested > price.max_output_tokens:
        raise InvalidRequest(
            f"max_output_tokens is too large: {price.id} returns at most {price.max_output_tokens} tokens.",
            param="max_output_tokens",
        )
    prompt_text, items = _prompt_text(req)
    m.moderate(prompt_text, "input")
    sent = req.model_dump(exclude_none=True)
    priced_part = {
        k: sent[k] for k in ("input", "instructions", "tools", "tool_choice", "text", "reasoning") if k in sent
    }
    bound = (
        chat.REQUEST_OVERHEAD_TOKENS
        + pricing.text_token_bound(json.dumps(priced_part))
        + items * chat.MESSAGE_OVERHEAD_TOKENS
        + len(req.tools or []) * chat.DEFINITION_OVERHEAD_TOKENS
        + images * pricing.image_token_bound(price.rules)
        + context
    )
    hold = chat.take_hold(m, caller, price, bound, requested, request_id)
    namespace = chat.account_namespace(caller.account_id)
    for name, limit in NAMESPACED.items():
        if name in sent:
            sent[name] = chat._namespaced(namespace, sent[name], limit)
    if "metadata" in sent:
        sent["metadata"] = {k: chat._namespaced(namespace, v, 512) for k, v in sent["metadata"].items()}
    sent.pop("background", None)
    sent.update(model=price.upstream_model, max_output_tokens=hold.max_tokens)
    call = ChatCall(model=price.upstream_model, messages=[], max_tokens=hold.max_tokens)
    ctx = chat._Call(
        request_id, caller, price, call, hold.amount, datetime.now(UTC), prompt_text, items, endpoint="responses"
    )
    run = _Context(m, r, ctx, namespace, bound + hold.max_tokens)
    if req.stream:
        return _start_stream(run, provider, sent)
    try:
        response = provider.respond(sent)
    except BrokerError as error:
        chat._release(m, ctx, error)
        raise
    charged = run.settle(response, _output_text(response), finished=True, stream=False)
    run.restore(response)
    if isinstance(response.get("usage"), dict):
        response["usage"]["cost_credits"] = float(pricing.format_credits(charged))
    return ChatResponse(body=response, headers=chat._money_headers(charged, run.ended.balance, request_id))


def _sse(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


def _start_stream(run: _Context, provider, body: dict) -> ChatResponse:
    """Wait for OpenAI's first event, so a failure before it is a plain JSON error and releases the hold."""
    events = provider.respond_stream({**body, "stream": True})
    try:
        first = next(events, None)
    except BrokerError as error:
        events.close()
        chat._release(run.m, run.ctx, error)
        raise
    head = [first] if first is not None else []
    headers = {"X-Request-Id": run.ctx.request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return ChatResponse(stream=_relay(run, head, events), headers=headers)


def _relay(run: _Context, head: list, events) -> Iterator[str]:
    """OpenAI's events as sent (the response object's model and identifiers restored, the terminal
    event's usage with ``cost_credits``); settles exactly once, whatever happens."""
    delivered: list[str] = []
    settled = False
    sequence = 0
    progress = chat.StreamProgress(run.m, run.ctx)
    try:
        for name, raw, event in _chain(head, events):
            kind = event.get("type")
            if isinstance(event.get("sequence_number"), int):
                sequence = event["sequence_number"]
            response = event.get("response")
            if kind in ("response.created", "response.queued") and isinstance(response, dict):
                # Bound from the start: a cut stream's stored response is this account's too.
                bind(run.r, run.ctx.caller.account_id, response, run.bound)
            if isinstance(event.get("delta"), str):
                delivered.append(event["delta"])
                progress.beat(None, delivered)
            if kind in TERMINAL and isinstance(response, dict):
                settled = True  # sent once: a settle that failed in Redis may still land, so none follows it
                charged = run.settle(response, "".join(delivered) or _output_text(response), True, True)
                if isinstance(response.get("usage"), dict):
                    response["usage"]["cost_credits"] = float(pricing.format_credits(charged))
            if isinstance(response, dict):
                run.restore(response)
                raw = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
            yield _sse(name, raw)
    except UpstreamStreamBroken as error:
        metrics.UPSTREAM_ERRORS.labels("openai", error.code).inc()
        if not settled:
            settled = True
            run.settle(None, "".join(delivered), False, True, error.code)
        body = {"type": "error", "code": error.code, "message": error.message, "param": None}
        yield _sse("error", json.dumps({**body, "sequence_number": sequence + 1}))
    except redis.RedisError:
        log.error("Redis unavailable while settling a stream", extra={"request_id": run.ctx.request_id})
        unknown = outcome_unknown(run.ctx.request_id)
        body = {"type": "error", "code": unknown.code, "message": unknown.message, "param": None}
        yield _sse("error", json.dumps({**body, "sequence_number": sequence + 1}))
    finally:
        if not settled:
            run.settle(None, "".join(delivered), False, True, "client_disconnected")
        events.close()


def _chain(head: list, events) -> Iterator:
    yield from head
    yield from events


def retrieve(m: Metering, r: redis.Redis, caller: Caller, response_id: str) -> dict:
    """A stored response of the caller's (free); anyone else's, or an unknown one, is a 404."""
    provider = m.providers.get("openai")
    if bound_context(r, caller.account_id, response_id) is None or not hasattr(provider, "retrieve_response"):
        raise _not_found(response_id, None)
    response = provider.retrieve_response(response_id)
    upstream = str(response.get("model") or "")
    ids = [p.id for p in m.prices.models.values() if p.provider == "openai" and p.upstream_model == upstream]
    restore(response, ids[0] if ids else f"openai/{upstream}", chat.account_namespace(caller.account_id))
    return response
