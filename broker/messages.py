"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) for every chat model.

Anthropic models: the request goes to Anthropic as the caller sent it (every content block,
tool, thinking block and ``cache_control``), with the model's upstream name, ``max_tokens`` as
held and ``metadata.user_id`` namespaced per account; the answer and the streamed events come
back unchanged. It is metered by ``broker.chat``'s own hold → settle → receipt from Anthropic's
usage (input, output, cache writes by TTL and cache reads at the price table's rates).

What would cost more than the price table says, or reach the broker's own provider account,
is refused before anything is held (``400``): server tools (web search, web fetch, code
execution, MCP), uploaded files (``file`` sources, ``container_upload``), PDFs by URL (their
pages cannot be counted for the hold), regional inference, fast mode, and the betas in
``REFUSED_BETAS`` (long context among them). ``anthropic-beta`` flags in ``BETAS`` are
forwarded; any other flag is left out and named in ``X-Anthropic-Beta-Ignored``.

OpenAI and Gemini models: the request is translated to a chat request
(``broker.providers.anthropic_messages``), runs the chat path unchanged, and its answer or
stream is translated back.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from itertools import chain

import redis
from pydantic import ValidationError

from broker import chat, pricing
from broker.chat import ChatResponse, Metering
from broker.errors import BrokerError, InvalidRequest, NotFound, UpstreamStreamBroken, outcome_unknown
from broker.keys import Caller
from broker.pricing import ModelPrice
from broker.providers import _common as c
from broker.providers import anthropic
from broker.providers import anthropic_messages as translate
from broker.providers.anthropic import AnthropicProvider, RawEvent
from broker.schemas import ChatCompletionRequest, MessagesCountRequest, MessagesRequest

log = logging.getLogger(__name__)

ENDPOINT = "messages"
# anthropic-beta flags forwarded to Anthropic: none changes the price beyond the table (1-hour
# cache writes are priced: cache_write_1h; output-128k is still bounded by the hold).
BETAS = frozenset(
    {
        "claude-code-20250219",
        "interleaved-thinking-2025-05-14",
        "fine-grained-tool-streaming-2025-05-14",
        "prompt-caching-2024-07-31",
        "extended-cache-ttl-2025-04-11",
        "token-efficient-tools-2025-02-19",
        "token-counting-2024-11-01",
        "pdfs-2024-09-25",
        "output-128k-2025-02-19",
        "context-management-2025-06-27",
        "effort-2025-11-24",
        "structured-outputs-2025-11-13",
        "model-context-window-exceeded-2025-08-26",
        "computer-use-2024-10-22",
        "computer-use-2025-01-24",
        "computer-use-2025-11-24",
    }
)
# Flags (by prefix) refused with a 400: priced beyond the table, or reaching the broker's account.
REFUSED_BETAS = {
    "context-1m-": "long-context rates are not in the price table",
    "fast-mode-": "fast mode is not in the price table",
    "files-api-": "uploaded files live in the broker's provider account",
    "code-execution-": "server tools are not in the price table",
    "web-fetch-": "server tools are not in the price table",
    "web-search-": "server tools are not in the price table",
    "advisor-tool-": "server tools are not in the price table",
    "mcp-client-": "MCP servers would be called from the broker's provider account",
    "skills-": "skills run in containers of the broker's provider account",
    "message-batches-": "batches are not offered",
}
# Anthropic-defined tools the client runs itself (priced as tokens); every other typed tool is a
# server tool. Their definitions and system prompt are held at CLIENT_TOOL_TOKENS each (Anthropic
# documents 245 for bash, 700 for the text editor, about 1,200 for computer use).
CLIENT_TOOLS = ("bash_", "text_editor_", "computer_", "memory_")
CLIENT_TOOL_TOKENS = 1500
DATED = re.compile(r"-\d{8}$")  # claude-haiku-4-5-20251001 → claude-haiku-4-5
# The estimate of a prompt's tokens where no provider counts them (as chat estimates usage).
ESTIMATE_TOKENS_PER_MESSAGE = 4


def betas_of(values: list[str]) -> tuple[list[str], list[str]]:
    """(flags forwarded, flags ignored) of ``anthropic-beta`` header values; 400 for a refused one."""
    flags = [flag.strip() for value in values for flag in value.split(",") if flag.strip()]
    for flag in flags:
        for prefix, reason in REFUSED_BETAS.items():
            if flag.startswith(prefix):
                raise InvalidRequest(f"anthropic-beta '{flag}' is not supported: {reason}.", param="anthropic-beta")
    forwarded = list(dict.fromkeys(flag for flag in flags if flag in BETAS))
    return forwarded, [flag for flag in flags if flag not in BETAS]


def resolve(m: Metering, name: str) -> ModelPrice:
    """The chat model named ``name``: the broker's id, a bare upstream name, or a dated one."""
    try:
        price = m.prices.resolve(name, set(m.providers))
    except NotFound:
        if not DATED.search(name):
            raise
        try:
            price = m.prices.resolve(DATED.sub("", name), set(m.providers))
        except NotFound:
            raise NotFound(
                f"The model '{name}' does not exist or is not available. GET /v1/models lists the models you can use.",
                param="model",
                code="model_not_found",
            ) from None
    if price.kind != "chat":
        raise InvalidRequest(f"'{price.id}' is not a chat model.", param="model")
    return price


# -- POST /v1/messages --------------------------------------------------------------


def create(m: Metering, caller: Caller, req: MessagesRequest, beta_headers: list[str], request_id: str) -> ChatResponse:
    """Validate, hold, call and return the Message (or its event stream) with the money headers."""
    price = resolve(m, req.model)
    betas, ignored = betas_of(beta_headers)
    body = req.model_dump(exclude_unset=True, exclude_none=True)
    if price.provider != "anthropic":
        result = _translated(m, caller, body, price, request_id)
    else:
        result = _anthropic(m, caller, body, price, betas, request_id)
    if ignored:
        result.headers["X-Anthropic-Beta-Ignored"] = ",".join(ignored)
    return result


def _anthropic(
    m: Metering, caller: Caller, body: dict, price: ModelPrice, betas: list[str], request_id: str
) -> ChatResponse:
    provider: AnthropicProvider = m.providers["anthropic"]  # type: ignore[assignment]
    if body["max_tokens"] > price.max_output_tokens:
        message = f"max_tokens is too large: {price.id} returns at most {price.max_output_tokens} tokens."
        raise InvalidRequest(message, param="max_tokens")
    anthropic.check_sampling(
        price.upstream_model, price.rules, body.get("temperature"), body.get("top_p"), body.get("top_k")
    )
    thinking = c.as_dict(body.get("thinking")).get("type")
    if thinking == "enabled" and price.rules.get("thinking", "manual") != "manual":
        raise InvalidRequest(
            f"{price.id} does not take a thinking budget.", param="thinking", code="unsupported_parameter"
        )
    prompt = Prompt.of(body)
    m.moderate(prompt.text, "messages")
    ctx = chat.open_call(
        m,
        caller,
        price,
        request_id,
        bound=prompt.tokens,
        max_tokens=body["max_tokens"],
        prompt_text=prompt.text,
        message_count=len(body["messages"]),
        endpoint=ENDPOINT,
    )
    body.update(model=price.upstream_model, max_tokens=ctx.call.max_tokens)
    # Claude Code asks why a prompt missed the cache compared with an earlier message id: in our
    # one provider account that could compare with another customer's request, so it is not sent.
    body.pop("diagnostics", None)
    user = c.as_dict(body.get("metadata")).get("user_id")
    if isinstance(user, str) and user:
        body["metadata"] = {**body["metadata"], "user_id": chat.namespaced_id(caller.account_id, user, 256)}
    if body.get("stream"):
        return _start_stream(m, ctx, provider, body, betas)
    try:
        data = provider.create_message(body, betas)
    except BrokerError as error:
        chat.release_call(m, ctx, error)
        raise
    reported = c.as_dict(data.get("usage"))
    delivered = json.dumps(data.get("content") or [], ensure_ascii=False)
    usage = anthropic.usage_from(reported) if reported else None
    ended, _ = chat.settle_call(m, ctx, usage, delivered, finished=True, stream=False)
    return ChatResponse(body=data, headers=chat.money_headers(ended, request_id))


def _start_stream(
    m: Metering, ctx: chat.MeteredCall, provider: AnthropicProvider, body: dict, betas: list[str]
) -> ChatResponse:
    """Wait for the first output, so that a failure before it is a plain JSON error and free."""
    events = provider.stream_message(body, betas)
    try:
        first = next(events)
    except BrokerError as error:
        events.close()
        chat.release_call(m, ctx, error)
        raise
    headers = {"X-Request-Id": ctx.request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return ChatResponse(stream=_relay(m, ctx, chain([first], events), events), headers=headers)


def _relay(m: Metering, ctx: chat.MeteredCall, events: Iterator[RawEvent], upstream: Iterator) -> Iterator[str]:
    """Anthropic's events unchanged; settles exactly once, before ``message_stop`` is relayed, or
    on a broken stream or a client that went away (``GeneratorExit`` at a ``yield``)."""
    usage: dict = {}
    delivered: list[str] = []
    settled = relayed_error = False
    progress = chat.StreamProgress(m, ctx)

    def settle(finished: bool, error_code: str | None = None) -> None:
        nonlocal settled
        settled = True  # sent once: a settle that failed in Redis may still land, so none follows it
        reported = anthropic.usage_from(usage) if usage else None
        chat.settle_call(m, ctx, reported, "".join(delivered), finished=finished, stream=True, error_code=error_code)

    try:
        for name, data, event in events:
            kind = event.get("type")
            if kind == "message_start":
                usage = dict(c.as_dict(c.as_dict(event.get("message")).get("usage")))
            elif kind == "message_delta":
                usage.update({k: v for k, v in c.as_dict(event.get("usage")).items() if v is not None})
            elif kind == "content_block_delta":
                delta = c.as_dict(event.get("delta"))
                delivered.append(str(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""))
                progress.beat(anthropic.usage_from(usage) if usage else None, delivered)
            elif kind == "error":
                relayed_error = True
            elif kind == "message_stop":
                settle(finished=True)
            yield f"event: {name}\ndata: {data}\n\n"
    except UpstreamStreamBroken as error:
        settle(finished=False, error_code=error.code)
        if not relayed_error:
            body = {"type": "error", "error": {"type": "api_error", "message": error.message}}
            yield f"event: error\ndata: {json.dumps(body)}\n\n"
    except redis.RedisError:
        log.error("Redis unavailable while settling a stream", extra={"request_id": ctx.request_id})
        message = outcome_unknown(ctx.request_id).message
        body = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
    finally:
        if not settled:
            settle(finished=False, error_code="client_disconnected")
        upstream.close()


def _translated(m: Metering, caller: Caller, body: dict, price: ModelPrice, request_id: str) -> ChatResponse:
    """OpenAI and Gemini models: through the chat path, its answer or stream translated back."""
    req = _chat_request(body, price)
    result = chat.start(m, caller, req, price.id, request_id, endpoint=ENDPOINT)
    message_id = "msg_" + request_id.removeprefix("req_")
    if result.stream is not None:
        result.stream = translate.events(result.stream, message_id, price.id)
        return result
    result.body = translate.message(result.body or {}, message_id, price.id)
    return result


def _chat_request(body: dict, price: ModelPrice) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(translate.chat_request(body, price.id))
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequest(f"{first['msg']}: {param}", param=param, code=first["type"]) from None


# -- POST /v1/messages/count_tokens ---------------------------------------------------


def count_tokens(m: Metering, req: MessagesCountRequest, beta_headers: list[str]) -> dict:
    """``{"input_tokens": N}``: Anthropic's own count for its models, the broker's estimate otherwise. Free."""
    price = resolve(m, req.model)
    betas, _ = betas_of(beta_headers)
    body = req.model_dump(exclude_unset=True, exclude_none=True)
    if price.provider == "anthropic":
        provider: AnthropicProvider = m.providers["anthropic"]  # type: ignore[assignment]
        Prompt.of(body)  # the same refusals as a call (server tools, uploaded files)
        body["model"] = price.upstream_model
        return {"input_tokens": provider.count_tokens(body, betas)}
    req_chat = _chat_request({**body, "max_tokens": 1}, price)
    messages = [message.model_dump(exclude_none=True) for message in req_chat.messages]
    _, text = chat.input_token_bound(messages)
    if req_chat.tools:
        text += "\n" + json.dumps(req_chat.tools)
    return {"input_tokens": pricing.text_token_estimate(text) + ESTIMATE_TOKENS_PER_MESSAGE * len(messages)}


# -- the prompt's bound --------------------------------------------------------------


class Prompt:
    """An upper bound on a Messages prompt's tokens (as chat bounds its own: bytes of text,
    ``chat.IMAGE_TOKEN_BOUND`` an image, ``anthropic.PDF_PAGE_TOKENS`` a PDF page, tool
    definitions with their overheads) and its text, for moderation and estimates. Refuses
    what cannot be bounded or would reach the broker's own provider account."""

    def __init__(self) -> None:
        self.tokens = chat.REQUEST_OVERHEAD_TOKENS
        self.texts: list[str] = []

    @property
    def text(self) -> str:
        return "\n".join(self.texts)

    @classmethod
    def of(cls, body: dict) -> Prompt:
        prompt = cls()
        system = body.get("system")
        if isinstance(system, str):
            prompt.add_text(system)
        else:
            prompt.blocks(system or [], "system")
        for i, message in enumerate(body["messages"]):
            prompt.tokens += chat.MESSAGE_OVERHEAD_TOKENS
            content = message["content"]
            if isinstance(content, str):
                prompt.add_text(content)
            else:
                prompt.blocks(content, f"messages[{i}].content")
        prompt.tools(body.get("tools") or [])
        return prompt

    def add_text(self, text: str) -> None:
        self.tokens += pricing.text_token_bound(text)
        self.texts.append(text)

    def tools(self, tools: list[dict]) -> None:
        if tools:
            self.tokens += anthropic.TOOL_PROMPT_TOKENS
        for i, tool in enumerate(tools):
            kind = tool.get("type")
            if isinstance(kind, str) and kind.startswith(CLIENT_TOOLS):
                self.tokens += CLIENT_TOOL_TOKENS
            elif kind not in (None, "custom"):
                raise InvalidRequest(
                    f"tools[{i}]: '{kind}' is a server tool, which the price table does not price.",
                    param="tools",
                    code="unsupported_parameter",
                )
            self.tokens += chat.DEFINITION_OVERHEAD_TOKENS
            self.add_text(json.dumps(tool, ensure_ascii=False))

    def blocks(self, blocks: list, where: str) -> None:
        for k, block in enumerate(blocks):
            if not isinstance(block, dict):
                raise InvalidRequest(f"{where}[{k}] must be a content block object.", param="messages")
            self.block(block, f"{where}[{k}]")

    def block(self, block: dict, where: str) -> None:
        kind = block.get("type")
        source = c.as_dict(block.get("source"))
        if source.get("type") == "file" or "file_id" in source or kind == "container_upload":
            raise _unsupported(where, "uploaded files live in the broker's provider account")
        if kind == "text":
            self.add_text(str(block.get("text", "")))
        elif kind == "image":
            self.image(source, where)
        elif kind == "document":
            self.document(block, source, where)
        elif kind == "tool_result":
            content = block.get("content")
            if isinstance(content, list):
                self.blocks(content, f"{where}.content")
            else:
                self.add_text(str(content or ""))
            self.add_text(str(block.get("tool_use_id", "")))
        elif kind == "thinking":
            self.add_text(str(block.get("thinking", "")))
        else:  # tool_use, redacted_thinking, search results…: their JSON bounds them
            self.add_text(json.dumps(block, ensure_ascii=False))

    def image(self, source: dict, where: str) -> None:
        if source.get("type") == "base64":
            if source.get("media_type") not in anthropic.IMAGE_TYPES:
                raise InvalidRequest(f"{where}: images must be JPEG, PNG, GIF or WebP.", param="messages")
        elif source.get("type") != "url" or not str(source.get("url", "")).startswith(("https://", "http://")):
            raise InvalidRequest(f"{where}: an image source is base64 data or an http(s) URL.", param="messages")
        self.tokens += chat.IMAGE_TOKEN_BOUND

    def document(self, block: dict, source: dict, where: str) -> None:
        kind = source.get("type")
        if kind == "base64" and source.get("media_type") == "application/pdf":
            self.tokens += anthropic.pdf_tokens(str(source.get("data", "")))
        elif kind == "text":
            self.add_text(str(source.get("data", "")))
        elif kind == "content":
            content = source.get("content")
            if isinstance(content, list):
                self.blocks(content, f"{where}.source.content")
            else:
                self.add_text(str(content or ""))
        else:
            raise _unsupported(where, "a document is a base64 PDF, text or content (a URL's pages cannot be bounded)")
        for name in ("title", "context"):
            if isinstance(block.get(name), str):
                self.add_text(block[name])


def _unsupported(where: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: not supported: {reason}.", param="messages", code="unsupported_parameter")
