"""Anthropic's Messages shape ↔ the broker's chat shape (OpenAI's), for OpenAI and Gemini models
called through ``POST /v1/messages``.

Request: ``system`` → a system message; text, ``image`` (base64 or URL) and PDF ``document``
blocks → text, ``image_url`` and ``file`` parts; ``tool_result`` blocks → ``tool`` messages
(before the rest of their user turn); assistant ``tool_use`` blocks → ``tool_calls``, thinking
blocks dropped (no other provider can take them back); custom tools → function tools;
``tool_choice`` auto/any/tool/none → auto/required/named/none, ``disable_parallel_tool_use`` →
``parallel_tool_calls: false``; ``stop_sequences`` → ``stop``; ``metadata.user_id`` → ``user``;
``thinking`` with a budget → ``reasoning_effort`` (``THINKING_EFFORTS``); ``output_config.format``
→ ``response_format``. Fields that only steer Anthropic's own machinery (``cache_control``,
``context_management``, ``service_tier``, ``output_config.effort``) are left out.

Response: the completion → a Message (text, then ``tool_use`` blocks; ``finish_reason`` →
``stop_reason``; the usage split as Anthropic reports it, ``input_tokens`` without cache reads
and writes); a chunk stream → Anthropic's named events, ``message_start`` to ``message_stop``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

from broker.errors import InvalidRequest
from broker.providers import _common as c

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# A thinking budget as the nearest reasoning effort: at most 2,048 tokens is low, at most
# 8,192 medium, more is high.
THINKING_EFFORTS = ((2048, "low"), (8192, "medium"))
MAX_USER_CHARS = 256


def _unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


# -- request ------------------------------------------------------------------------


def chat_request(body: dict, model: str) -> dict:
    """The chat request (OpenAI's shape) for a Messages request; 400 for what has no counterpart."""
    messages: list[dict] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body["messages"]):
        if message["role"] == "user":
            messages.extend(_user_turn(message["content"], i))
        else:
            messages.append(_assistant_turn(message["content"], i))
    out: dict = {"model": model, "max_tokens": body["max_tokens"], "messages": messages}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    user = c.as_dict(body.get("metadata")).get("user_id")
    if isinstance(user, str) and user:
        out["user"] = user if len(user) <= MAX_USER_CHARS else hashlib.sha256(user.encode()).hexdigest()
    tools = [_tool(tool, i) for i, tool in enumerate(body.get("tools") or [])]
    if tools:
        out["tools"] = tools
    out.update(_tool_choice(body.get("tool_choice"), bool(tools)))
    effort = _effort(body.get("thinking"))
    if effort:
        out["reasoning_effort"] = effort
    fmt = c.as_dict(c.as_dict(body.get("output_config")).get("format"))
    if fmt:
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise _unsupported("output_config", "output_config.format must be a json_schema with a schema.")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _system_text(system: object) -> str:
    if isinstance(system, str):
        return system
    texts = []
    for block in system if isinstance(system, list) else []:
        if c.as_dict(block).get("type") != "text":
            raise InvalidRequest("system may hold text blocks only.", param="system")
        texts.append(str(block.get("text", "")))
    return "\n\n".join(texts)


def _user_turn(content: str | list[dict], i: int) -> list[dict]:
    """Tool results as ``tool`` messages first (OpenAI wants them right after the calls), then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results, parts = [], []
    for k, block in enumerate(content):
        where = f"messages[{i}].content[{k}]"
        if block.get("type") == "tool_result":
            results.append(_tool_result(block, where))
        else:
            parts.append(_part(block, where))
    return results + ([{"role": "user", "content": parts}] if parts else [])


def _part(block: dict, where: str) -> dict:
    kind = block.get("type")
    source = c.as_dict(block.get("source"))
    if kind == "text":
        return {"type": "text", "text": str(block.get("text", ""))}
    if kind == "image" and source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data', '')}"
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "image" and source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": str(source.get("url", ""))}}
    if kind == "document" and source.get("type") == "base64" and source.get("media_type") == "application/pdf":
        name = str(block.get("title") or "document.pdf")
        data = f"data:application/pdf;base64,{source.get('data', '')}"
        return {"type": "file", "file": {"filename": name, "file_data": data}}
    if kind == "document" and source.get("type") == "text":
        return {"type": "text", "text": str(source.get("data", ""))}
    raise _unsupported("messages", f"{where}: {kind!r} blocks of this kind are for Anthropic models only.")


def _tool_result(block: dict, where: str) -> dict:
    content = block.get("content")
    if isinstance(content, list):
        texts = []
        for part in map(c.as_dict, content):
            if part.get("type") != "text":
                raise _unsupported("messages", f"{where}: tool results hold text only for this model.")
            texts.append(str(part.get("text", "")))
        content = "\n".join(texts)
    text = str(content or "")
    if block.get("is_error"):
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text}


def _assistant_turn(content: str | list[dict], i: int) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for k, block in enumerate(content):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            name = str(block.get("name", ""))
            calls.append(
                {"id": str(block.get("id", "")), "type": "function", "function": {"name": name, "arguments": arguments}}
            )
        elif kind not in ("thinking", "redacted_thinking"):
            raise _unsupported(
                "messages", f"messages[{i}].content[{k}]: {kind!r} blocks are for Anthropic models only."
            )
    turn: dict = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _tool(tool: dict, i: int) -> dict:
    if tool.get("type") not in (None, "custom"):
        raise _unsupported("tools", f"tools[{i}]: {tool.get('type')!r} tools are for Anthropic models only.")
    fn: dict = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _tool_choice(choice: object, has_tools: bool) -> dict:
    choice = c.as_dict(choice)
    kind = choice.get("type")
    if not kind:
        return {}
    out: dict = {}
    if kind in ("auto", "none"):
        out["tool_choice"] = kind
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        raise InvalidRequest("tool_choice.type must be auto, any, tool or none.", param="tool_choice")
    if choice.get("disable_parallel_tool_use") and has_tools:
        out["parallel_tool_calls"] = False
    return out


def _effort(thinking: object) -> str | None:
    thinking = c.as_dict(thinking)
    if thinking.get("type") != "enabled":
        return None  # disabled, or adaptive: the model's own default
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int):
        raise InvalidRequest("thinking.budget_tokens must be an integer.", param="thinking")
    return next((effort for limit, effort in THINKING_EFFORTS if budget <= limit), "high")


# -- response -----------------------------------------------------------------------


def usage(chat_usage: dict) -> dict:
    """OpenAI's usage as Anthropic reports it: ``input_tokens`` without cache reads and writes."""
    details = c.as_dict(chat_usage.get("prompt_tokens_details"))
    cached = c.as_int(details.get("cached_tokens"))
    written = c.as_int(details.get("cache_write_tokens"))
    return {
        "input_tokens": max(c.as_int(chat_usage.get("prompt_tokens")) - cached - written, 0),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "output_tokens": c.as_int(chat_usage.get("completion_tokens")),
    }


def _stop_reason(finish: object) -> str:
    return STOP_REASONS.get(str(finish), "end_turn")


def _input(arguments: object) -> dict:
    try:
        value = json.loads(str(arguments or "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def message(completion: dict, message_id: str, model: str) -> dict:
    """A chat completion as Anthropic's Message."""
    choice = completion["choices"][0]
    answer = choice["message"]
    content: list[dict] = []
    text = answer.get("content") or answer.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    for call in answer.get("tool_calls") or []:
        fn = c.as_dict(call.get("function"))
        content.append(
            {"type": "tool_use", "id": call["id"], "name": fn.get("name"), "input": _input(fn.get("arguments"))}
        )
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": usage(completion["usage"]),
    }


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Blocks:
    """The content blocks of a translated stream: one open at a time, indexed in order."""

    def __init__(self) -> None:
        self.count = 0
        self.open: tuple[str, int] | None = None  # ("text", -1) or ("tool", call index)

    def start(self, key: tuple[str, int], block: dict) -> list[str]:
        events = self.stop()
        self.open = key
        events.append(
            _event("content_block_start", {"type": "content_block_start", "index": self.count, "content_block": block})
        )
        return events

    def delta(self, delta: dict) -> str:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.count, "delta": delta})

    def stop(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        self.count += 1
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.count - 1})]


def events(chunks: Iterator[str], message_id: str, model: str) -> Iterator[str]:
    """The chat path's ``data:`` chunks as Anthropic's named events; closing this closes ``chunks``
    (so the chat path settles a client that went away)."""
    start = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    blocks = _Blocks()
    stop_reason, final = "end_turn", {"input_tokens": 0, "output_tokens": 0}
    try:
        yield _event("message_start", {"type": "message_start", "message": start})
        for chunk in chunks:
            data = chunk.removeprefix("data: ").strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                error = c.as_dict(obj["error"])
                yield from blocks.stop()
                body = {"type": "error", "error": {"type": "api_error", "message": str(error.get("message", ""))}}
                yield _event("error", body)
                return
            if obj.get("usage") and not obj.get("choices"):
                final = usage(obj["usage"])
            for choice in obj.get("choices") or []:
                yield from _choice_events(blocks, choice["delta"])
                if choice.get("finish_reason"):
                    stop_reason = _stop_reason(choice["finish_reason"])
        yield from blocks.stop()
        delta = {"stop_reason": stop_reason, "stop_sequence": None}
        yield _event("message_delta", {"type": "message_delta", "delta": delta, "usage": final})
        yield _event("message_stop", {"type": "message_stop"})
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()


def _choice_events(blocks: _Blocks, delta: dict) -> Iterator[str]:
    text = delta.get("content") or delta.get("refusal")
    if text:
        if blocks.open != ("text", -1):
            yield from blocks.start(("text", -1), {"type": "text", "text": ""})
        yield blocks.delta({"type": "text_delta", "text": text})
    for call in delta.get("tool_calls") or []:
        fn = c.as_dict(call.get("function"))
        key = ("tool", int(call.get("index", 0)))
        if call.get("id") and blocks.open != key:
            block = {"type": "tool_use", "id": call["id"], "name": fn.get("name"), "input": {}}
            yield from blocks.start(key, block)
        if fn.get("arguments") and blocks.open == key:
            yield blocks.delta({"type": "input_json_delta", "partial_json": fn["arguments"]})
