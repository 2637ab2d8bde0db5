"""Anthropic Messages adapter: OpenAI-shaped calls to /v1/messages and back.

What an OpenAI SDK app sends is translated, not refused, wherever Anthropic has the feature:

- tools ↔ ``tools`` with ``input_schema``; ``tool_choice`` auto/none/required/named ↔
  ``auto``/``none``/``any``/``tool``; ``parallel_tool_calls: false`` ↔ ``disable_parallel_tool_use``;
  assistant ``tool_calls`` ↔ ``tool_use`` blocks; ``tool`` messages ↔ ``tool_result`` blocks
  (consecutive ones in one user turn); streamed ``input_json_delta`` ↔ argument fragments.
- ``response_format`` json_object / json_schema: Anthropic's documented JSON-by-tool approach,
  one forced tool whose ``input_schema`` is the schema; its input comes back as the message
  content (finish ``stop``). Not combinable with the caller's own tools or with thinking (a
  forced tool is not allowed with thinking): those are a 400 naming ``response_format``.
- ``image_url`` parts (https URL or data URL) ↔ ``image`` blocks; PDF ``file`` parts ↔
  ``document`` blocks, bounded per page for the hold (``PDF_PAGE_TOKENS``).
- ``reasoning_effort`` ↔ ``thinking.budget_tokens`` (``THINKING_BUDGETS``); thinking tokens are
  part of ``output_tokens`` (billed as output, reported as ``reasoning_tokens``). Signed thinking
  blocks ride on the first tool call as ``extra_content.anthropic.thinking_blocks`` and are put
  back before the ``tool_use`` blocks on the next turn; when a tool-loop turn comes back without
  them, thinking is turned off for that request (Anthropic requires them otherwise).
- ``stop`` → ``stop_sequences``; ``user`` / ``safety_identifier`` (namespaced per account by the
  broker) → ``metadata.user_id``; ``top_k`` and ``cache_control`` on content parts pass through.

Anthropic's own rules are checked before anything is held (``check``), per model from the
price table's ``rules``: ``sampling`` (``any`` | ``temperature_or_top_p`` | ``default_only``)
and ``thinking`` (``manual`` | ``none``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import requests

from broker.errors import InvalidRequest, UpstreamError, UpstreamRejected, UpstreamUnavailable
from broker.providers import _common as c
from broker.providers import registry
from broker.providers import translate as t
from broker.providers.base import (
    ChatCall,
    ChatResult,
    Choice,
    Finish,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    Usage,
    UsageReport,
    count_of,
    net_count,
    sum_counts,
)

API_VERSION = "2023-06-01"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# reasoning_effort → thinking budget. Anthropic's minimum budget is 1,024 and it must stay
# below max_tokens; "none" leaves thinking off.
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768}
MIN_THINKING_BUDGET = 1024
# Anthropic adds a tool-use system prompt when tools are sent: 346 tokens at most on current
# models (tool_choice auto/none; 313 for any/tool), per its tool-use pricing table.
TOOL_PROMPT_TOKENS = 346
# A PDF page is billed as its text (1,500-3,000 tokens a page by Anthropic's documentation)
# plus the page as an image (at most ~1,600 tokens): bounded at 5,000 a page. A PDF whose pages
# cannot be counted, or with more than Anthropic's 100 pages, is refused.
PDF_PAGE_TOKENS = 5000
MAX_PDF_PAGES = 100
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Error texts by which Anthropic says our own account is out of credit or over its spend limit.
SPEND_LIMIT = re.compile(r"credit balance is too low|usage limits|spend limit", re.IGNORECASE)
SPEND_LIMIT_CODES = {"enforced_spend_limit_reached"}


class AnthropicProvider:
    name = "anthropic"
    # OpenAI request fields translated (or harmless: logprobs false, text modality, the
    # standard service tier, store false); any other is a 400 before anything is held.
    accepts = frozenset(
        {
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
            "reasoning_effort",
            "top_k",
            "safety_identifier",
            "logprobs",
            "modalities",
            "service_tier",
            "store",
        }
    )

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._url = base_url.rstrip("/") + "/v1/messages"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def check(self, call: ChatCall) -> int:
        """Anthropic's rules, before anything is held; the prompt tokens only we can bound."""
        body = _body(call, stream=False)
        tokens = TOOL_PROMPT_TOKENS if body.get("tools") else 0
        for message in body["messages"]:
            for block in message["content"] if isinstance(message["content"], list) else []:
                if block.get("type") == "document":
                    tokens += _pdf_pages(block["source"]["data"]) * PDF_PAGE_TOKENS
        return tokens

    def reasoning_tokens(self, call: ChatCall) -> int:
        """The thinking budget ``reasoning_effort`` asks for (spent before the answer)."""
        return THINKING_BUDGETS.get(str(call.extra.get("reasoning_effort")), 0)

    def complete(self, call: ChatCall) -> ChatResult:
        response = self._post(_body(call, stream=False), stream=False)
        data = c.read_json(self.name, response)
        return ChatResult(
            id=str(data.get("id") or ""),
            model=str(data.get("model") or call.model),
            choices=[_choice(data, _json_tool(call))],
            usage=usage_from(c.as_dict(data.get("usage"))),
        )

    def stream(self, call: ChatCall) -> Iterator[StreamEvent]:
        body = _body(call, stream=True)
        json_tool = _json_tool(call)
        return c.run_stream(self.name, lambda: self._post(body, stream=True), lambda ev: _translate(ev, json_tool))

    # -- Anthropic's Messages API as the caller sent it (``broker.messages``) ------------

    def create_message(self, body: dict, betas: list[str]) -> dict:
        """One Messages call, its JSON answer as Anthropic sent it."""
        return c.read_json(self.name, self._post(body, stream=False, betas=betas))

    def stream_message(self, body: dict, betas: list[str]) -> Iterator[RawEvent]:
        """Anthropic's events as sent: (name, data, parsed data). See ``_raw_events``."""
        return c.run_stream(self.name, lambda: self._post(body, stream=True, betas=betas), _raw_events)

    def count_tokens(self, body: dict, betas: list[str]) -> int:
        """Anthropic's count of the prompt's input tokens (its free ``count_tokens`` endpoint)."""
        response = self._post(body, stream=False, betas=betas, path="/count_tokens")
        count = c.read_json(self.name, response).get("input_tokens")
        if not isinstance(count, int):
            raise UpstreamError("anthropic sent a token count without input_tokens")
        return count

    def _post(self, body: dict, *, stream: bool, betas: list[str] | None = None, path: str = "") -> requests.Response:
        headers = {"x-api-key": self._api_key, "anthropic-version": API_VERSION}
        if betas:
            headers["anthropic-beta"] = ",".join(betas)
        response = c.send(
            self.name,
            self._session,
            "POST",
            self._url + path,
            headers=headers,
            body=body,
            timeout=self._timeout,
            stream=stream,
        )
        if response.status_code >= 300:
            try:
                raise _status_error(response, self._api_key)
            finally:
                response.close()
        return response


# -- request ------------------------------------------------------------------------


def _body(call: ChatCall, *, stream: bool) -> dict:
    """The Messages request; raises InvalidRequest for what Anthropic cannot do or forbids."""
    extra = call.extra
    if call.n != 1:
        raise InvalidRequest("anthropic models return one choice; n must be 1", param="n")
    if extra.get("logprobs"):
        raise t.unsupported("logprobs", "Anthropic models do not return logprobs.")
    _check_sampling(call)
    fmt = t.json_format(extra.get("response_format"))
    tools = _tools(extra.get("tools"))
    choice = _tool_choice(extra, tools)
    if fmt and tools:
        raise t.unsupported("response_format", "response_format with tools is not supported for Anthropic models.")
    budget = _thinking_budget(call, choice, fmt)
    system, messages = _messages(call.messages, thinking=budget is not None)
    if budget is not None and _tool_turn_without_thinking(messages):
        budget = None  # Anthropic needs the signed thinking back on a tool loop; without it, no thinking
    if fmt:
        name, schema = fmt
        tools = [{"name": name, "description": "Respond with a JSON value of this schema.", "input_schema": schema}]
        choice = {"type": "tool", "name": name}
    body: dict = {"model": call.model, "max_tokens": call.max_tokens, "messages": messages}
    if system:
        plain = all(set(block) == {"type", "text"} for block in system)
        body["system"] = "\n\n".join(b["text"] for b in system) if plain else system
    user = extra.get("safety_identifier") or call.user
    optional = {
        "temperature": call.temperature,
        "top_p": call.top_p,
        "top_k": extra.get("top_k"),
        "stop_sequences": call.stop,
        "metadata": {"user_id": user} if user else None,
        "tools": tools or None,
        "tool_choice": choice,
        "thinking": {"type": "enabled", "budget_tokens": budget} if budget is not None else None,
        "stream": True if stream else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _check_sampling(call: ChatCall) -> None:
    """Anthropic's temperature range and the model's sampling rule (price table ``rules``)."""
    top_k = call.extra.get("top_k")
    if call.temperature is not None and call.temperature > 1:
        raise InvalidRequest("temperature must be between 0 and 1 for Anthropic models.", param="temperature")
    sampling = call.rules.get("sampling", "any")
    if sampling == "default_only":
        for name, value in (("temperature", call.temperature), ("top_p", call.top_p), ("top_k", top_k)):
            if value is not None:
                raise t.unsupported(name, f"{call.model} takes no {name}: it samples with its defaults only.")
    if sampling == "temperature_or_top_p" and call.temperature is not None and call.top_p is not None:
        raise InvalidRequest(f"{call.model} takes temperature or top_p, not both.", param="top_p")


def _thinking_budget(call: ChatCall, choice: dict | None, fmt: tuple | None) -> int | None:
    """The thinking budget for ``reasoning_effort``, after Anthropic's limits on thinking."""
    effort = call.extra.get("reasoning_effort")
    if effort is None or effort == "none":
        return None
    if effort not in THINKING_BUDGETS:
        allowed = ", ".join(["none", *THINKING_BUDGETS])
        raise InvalidRequest(f"reasoning_effort must be one of {allowed}.", param="reasoning_effort")
    if call.rules.get("thinking", "manual") != "manual":
        raise t.unsupported("reasoning_effort", f"{call.model} does not take a thinking budget.")
    budget = THINKING_BUDGETS[effort]
    if call.temperature is not None and call.temperature != 1:
        raise InvalidRequest("temperature cannot be changed while thinking (reasoning_effort).", param="temperature")
    if call.extra.get("top_k") is not None:
        raise InvalidRequest("top_k cannot be set while thinking (reasoning_effort).", param="top_k")
    if call.top_p is not None and not 0.95 <= call.top_p <= 1:
        raise InvalidRequest("top_p must be between 0.95 and 1 while thinking (reasoning_effort).", param="top_p")
    if choice and choice["type"] in ("any", "tool"):
        raise InvalidRequest("tool_choice cannot force a tool while thinking (reasoning_effort).", param="tool_choice")
    if fmt:
        raise t.unsupported("response_format", "response_format cannot be combined with reasoning_effort here.")
    if budget < MIN_THINKING_BUDGET or budget >= call.max_tokens:
        raise InvalidRequest(
            f"max_tokens must be above the thinking budget of reasoning_effort {effort!r} ({budget} tokens).",
            param="max_tokens",
        )
    return budget


def _tools(tools: object) -> list[dict]:
    out: list[dict] = []
    for tool in tools if isinstance(tools, list) else []:
        if c.as_dict(tool).get("type") != "function":
            raise t.unsupported("tools", "Anthropic models take function tools only.")
        fn = c.as_dict(tool.get("function"))
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise InvalidRequest("tools[].function.name must be 1-64 letters, digits, '_' or '-'.", param="tools")
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidRequest("tools[].function.parameters must be a JSON schema of type object.", param="tools")
        entry: dict = {"name": name}
        if isinstance(fn.get("description"), str) and fn["description"]:
            entry["description"] = fn["description"]
        entry["input_schema"] = schema
        out.append(entry)
    return out


def _tool_choice(extra: dict, tools: list[dict]) -> dict | None:
    choice, parallel = extra.get("tool_choice"), extra.get("parallel_tool_calls")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
        return None
    if choice is None:
        out = {"type": "auto"} if parallel is False else None
    elif choice in ("auto", "none"):
        out = {"type": choice}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = c.as_dict(choice.get("function")).get("name")
        if name not in {tool["name"] for tool in tools}:
            raise InvalidRequest("tool_choice names a function that is not in tools.", param="tool_choice")
        out = {"type": "tool", "name": name}
    else:
        raise t.unsupported("tool_choice", "tool_choice must be auto, none, required or a function here.")
    if out and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _messages(messages: list[dict], *, thinking: bool) -> tuple[list[dict], list[dict]]:
    """(system blocks, Messages turns). Consecutive ``tool`` messages become one user turn."""
    system: list[dict] = []
    out: list[dict] = []
    tool_turn: list[dict] | None = None
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.extend(b for b in _blocks(content, f"messages[{i}]") if b["text"].strip())
            continue
        if role == "tool":
            if tool_turn is None:
                tool_turn = []
                out.append({"role": "user", "content": tool_turn})
            tool_turn.append(_tool_result(message, i))
            continue
        tool_turn = None
        if role == "user":
            turn = _user_content(content, i)
        elif role == "assistant":
            turn = _assistant_content(message, i, thinking=thinking)
        else:
            raise InvalidRequest(f"anthropic models do not accept {role!r} messages", param="messages")
        if _empty(turn):
            if role != "assistant" or i != last:
                raise InvalidRequest(
                    f"messages[{i}] is empty: only the final assistant turn (a prefill) may be.", param="messages"
                )
            turn = ""
        elif role == "assistant" and i == last and isinstance(turn, str) and turn != turn.rstrip():
            raise InvalidRequest("A final assistant turn (a prefill) cannot end with whitespace.", param="messages")
        out.append({"role": role, "content": turn})
    if not out:
        raise InvalidRequest("Anthropic models need at least one user message besides the system.", param="messages")
    return system, out


def _empty(content: str | list[dict]) -> bool:
    if isinstance(content, str):
        return not content.strip()
    return all(block.get("type") == "text" and not block["text"].strip() for block in content)


def _cache_control(part: dict) -> dict:
    """The part's ``cache_control`` (Anthropic's prompt caching), checked, to copy onto its block."""
    if "cache_control" not in part:
        return {}
    cache = part["cache_control"]
    if not isinstance(cache, dict) or cache.get("type") != "ephemeral" or cache.get("ttl", "5m") not in ("5m", "1h"):
        message = 'cache_control must be {"type": "ephemeral"} with an optional ttl "5m" or "1h".'
        raise InvalidRequest(message, param="messages")
    return {"cache_control": cache}


def _blocks(content: object, where: str) -> list[dict]:
    """Text blocks of a system / assistant / tool content (a string or text parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in map(c.as_dict, content):
        if part.get("type") not in ("text", "refusal"):
            raise InvalidRequest(f"{where} may hold text parts only.", param="messages")
        text = part.get("text", part.get("refusal", ""))
        blocks.append({"type": "text", "text": str(text), **_cache_control(part)})
    return blocks


def _user_content(content: object, i: int) -> str | list[dict]:
    """OpenAI user content (a string or parts) as Anthropic content blocks."""
    if not isinstance(content, list):
        return c.text_of(content)
    blocks: list[dict] = []
    for part in map(c.as_dict, content):
        kind = part.get("type")
        if kind == "text":
            if not str(part.get("text", "")).strip():
                continue  # Anthropic refuses blank text blocks; an all-blank turn is refused as empty
            block = {"type": "text", "text": str(part["text"])}
        elif kind == "image_url" and (url := c.image_url_of(part)):
            block = {"type": "image", "source": _image_source(url)}
        elif kind == "file":
            block = _document(part)
        else:
            raise t.unsupported("messages", f"anthropic models do not accept {kind!r} content parts (messages[{i}]).")
        blocks.append({**block, **_cache_control(part)})
    return blocks


def _image_source(url: str) -> dict:
    inline = c.split_data_url(url)
    if inline:
        if inline[0] not in IMAGE_TYPES:
            raise InvalidRequest("Images must be JPEG, PNG, GIF or WebP.", param="messages")
        return {"type": "base64", "media_type": inline[0], "data": inline[1]}
    if not url.startswith(("https://", "http://")):
        raise InvalidRequest("image_url must be an http(s) URL or a data URL.", param="messages")
    return {"type": "url", "url": url}


def _document(part: dict) -> dict:
    media_type, data, name = t.file_part(part)
    if media_type != "application/pdf":
        raise t.unsupported("messages", "Anthropic models take PDF files only.")
    _pdf_pages(data)
    block: dict = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if name:
        block["title"] = name
    return block


def _pdf_pages(data: str) -> int:
    pages = t.pdf_pages(t.decode_base64(data, "The PDF"))
    if not pages:
        raise InvalidRequest("The PDF's pages cannot be counted, so its price cannot be bounded.", param="messages")
    if pages > MAX_PDF_PAGES:
        raise InvalidRequest(f"Anthropic models take PDFs of at most {MAX_PDF_PAGES} pages.", param="messages")
    return pages


def _assistant_content(message: dict, i: int, *, thinking: bool) -> str | list[dict]:
    """Text, then ``tool_use`` blocks; the carried thinking blocks first when thinking."""
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if not calls and not isinstance(content, list):
        return c.text_of(content)
    blocks: list[dict] = []
    if thinking:
        for call in calls:
            blocks.extend(_carried_thinking(call))
    blocks.extend(b for b in _blocks(content, f"messages[{i}]") if b["text"].strip())
    for call in map(c.as_dict, calls):
        if call.get("type", "function") != "function":
            raise t.unsupported("messages", "Anthropic models take function tool calls only.")
        name = c.as_dict(call.get("function")).get("name")
        if not isinstance(call.get("id"), str) or not isinstance(name, str):
            raise InvalidRequest(f"messages[{i}].tool_calls[] needs an id and a function name.", param="messages")
        blocks.append({"type": "tool_use", "id": call["id"], "name": name, "input": t.tool_arguments(call)})
    return blocks


def _carried_thinking(call: object) -> list[dict]:
    """The signed thinking blocks a previous answer put on this tool call (``extra_content``)."""
    carried = c.as_dict(c.as_dict(c.as_dict(call).get("extra_content")).get("anthropic")).get("thinking_blocks")
    blocks = []
    for block in carried if isinstance(carried, list) else []:
        block = c.as_dict(block)
        if block.get("type") == "thinking" and isinstance(block.get("signature"), str):
            text = str(block.get("thinking", ""))
            blocks.append({"type": "thinking", "thinking": text, "signature": block["signature"]})
        elif block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
    return blocks


def _tool_turn_without_thinking(messages: list[dict]) -> bool:
    """Whether the last assistant turn calls tools without the thinking that preceded them."""
    for message in reversed(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        if not isinstance(content, list) or not any(b["type"] == "tool_use" for b in content):
            return False
        return content[0]["type"] not in ("thinking", "redacted_thinking")
    return False


def _tool_result(message: dict, i: int) -> dict:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"messages[{i}] (a tool message) needs tool_call_id.", param="messages")
    content = message.get("content")
    result: dict = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, list):
        result["content"] = _blocks(content, f"messages[{i}]")
    elif content:
        result["content"] = str(content)
    return result


def _json_tool(call: ChatCall) -> str | None:
    """The forced tool standing for ``response_format``, whose input is the answer."""
    fmt = t.json_format(call.extra.get("response_format"))
    return fmt[0] if fmt else None


# -- response -----------------------------------------------------------------------


def _choice(data: dict, json_tool: str | None) -> Choice:
    texts: list[str] = []
    calls: list[dict] = []
    thinking: list[dict] = []
    for block in map(c.as_dict, data.get("content") or []):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind in ("thinking", "redacted_thinking"):
            thinking.append(block)
        elif kind == "tool_use" and json_tool and block.get("name") == json_tool:
            texts.append(json.dumps(block.get("input"), ensure_ascii=False))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            calls.append(
                {
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {"name": str(block.get("name") or ""), "arguments": arguments},
                }
            )
    if calls and thinking:
        calls[0]["extra_content"] = {"anthropic": {"thinking_blocks": thinking}}
    reason = finish_reason(data.get("stop_reason"))
    if reason == "tool_calls" and not calls:
        reason = "stop"  # the response_format tool: its input is the answer
    content = "".join(texts) if texts or not calls else None
    return Choice(0, content, reason, tool_calls=calls or None)


def finish_reason(stop_reason: object) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(str(stop_reason), "stop")


def usage_from(usage: dict) -> Usage:
    """``input_tokens`` already excludes cache reads and writes; ``output_tokens`` includes thinking.

    Cache writes are split by TTL from ``cache_creation``; a total the breakdown
    does not account for (or a missing breakdown) is billed as the 5-minute kind.
    """
    written = count_of(usage.get("cache_creation_input_tokens"))
    split = c.as_dict(usage.get("cache_creation"))
    written_1h = count_of(split.get("ephemeral_1h_input_tokens"))
    written_5m = count_of(split.get("ephemeral_5m_input_tokens"))
    written_5m = sum_counts(written_5m, net_count(written, written_5m, written_1h))
    return Usage(
        input_tokens=count_of(usage.get("input_tokens")),
        cached_input_tokens=count_of(usage.get("cache_read_input_tokens")),
        cache_write_tokens=written_5m,
        cache_write_1h_tokens=written_1h,
        output_tokens=count_of(usage.get("output_tokens")),
        reasoning_tokens=count_of(c.as_dict(usage.get("output_tokens_details")).get("thinking_tokens")),
    )


def _translate(events: Iterator[c.SSEEvent], json_tool: str | None = None) -> Iterator[StreamEvent]:
    """Named events → events.

    Usage starts from ``message_start``; each ``message_delta`` overrides the fields it
    carries. Its counts are cumulative, so the last ``output_tokens`` is the total.
    Usage so far is reported once output has flowed (never before, so an early error
    stays a clean failure) and again at the end, after the finish.

    Blocks by index: text → text deltas; ``tool_use`` → a tool call (id and name first, then
    argument fragments), or text for the ``response_format`` tool; thinking blocks are
    collected and ride on the first tool call.
    """
    usage: dict = {}
    stop_reason = None
    started, reported = False, True
    blocks: dict[int, dict] = {}  # index → the block being streamed
    calls: dict[int, int] = {}  # block index → position in tool_calls
    thinking: list[dict] = []
    for name, data in events:
        event = c.load_event(data)
        kind = event.get("type") or name
        index = event.get("index")
        out: list[StreamEvent] = []
        if kind == "message_start":
            usage = dict(c.as_dict(c.as_dict(event.get("message")).get("usage")))
            reported = False
        elif kind == "content_block_start":
            block = dict(c.as_dict(event.get("content_block")))
            blocks[index] = block
            if block.get("type") == "text" and block.get("text"):
                out.append(TextDelta(0, str(block["text"])))
            elif block.get("type") == "tool_use" and not (json_tool and block.get("name") == json_tool):
                calls[index] = len(calls)
                carried = {"extra_content": {"anthropic": {"thinking_blocks": thinking}}} if thinking else None
                call_id, call_name = str(block.get("id") or ""), str(block.get("name") or "")
                out.append(ToolCallDelta(0, calls[index], id=call_id, name=call_name, extra=carried))
                thinking = []
        elif kind == "content_block_delta":
            out.extend(_block_delta(blocks.get(index, {}), calls.get(index), c.as_dict(event.get("delta"))))
        elif kind == "content_block_stop":
            block = blocks.pop(index, {})
            if block.get("type") in ("thinking", "redacted_thinking"):
                thinking.append(block)
        elif kind == "message_delta":
            delta = c.as_dict(event.get("delta"))
            stop_reason = delta.get("stop_reason") or stop_reason
            delta_usage = c.as_dict(event.get("usage"))
            usage.update({k: v for k, v in delta_usage.items() if v is not None})
            reported = False
        elif kind == "message_stop":
            reason = finish_reason(stop_reason) or "stop"
            yield Finish(0, "stop" if reason == "tool_calls" and not calls else reason)
            yield UsageReport(usage_from(usage))
            return
        elif kind == "error":
            raise _stream_error(c.as_dict(event.get("error")))
        for item in out:
            yield item
            started = True
        if started and not reported:
            yield UsageReport(usage_from(usage))
            reported = True
    raise c.ended_early("anthropic")


RawEvent = tuple[str, str, dict]  # (event name, its data as sent, the data parsed)
# Events that come before any output: held back, so a failure among them is a clean error.
_HEAD_EVENTS = frozenset({"message_start", "ping", "content_block_start"})


def _raw_events(events: Iterator[c.SSEEvent]) -> Iterator[RawEvent]:
    """Anthropic's events unchanged, up to ``message_stop``.

    The events before the first output (``_HEAD_EVENTS``) are yielded together with it, so an
    ``error`` event among them fails the call cleanly (nothing delivered, nothing charged). An
    ``error`` event after output is relayed, then raised (the stream broke).
    """
    head: list[RawEvent] | None = []
    for name, data in events:
        event = c.load_event(data)
        kind = str(event.get("type") or name)
        if kind == "error" and head is not None:
            raise _stream_error(c.as_dict(event.get("error")))
        item = (name or kind, data, event)
        if head is not None and kind in _HEAD_EVENTS:
            head.append(item)
            continue
        if head:
            yield from head
        head = None
        yield item
        if kind == "error":
            raise _stream_error(c.as_dict(event.get("error")))
        if kind == "message_stop":
            return
    raise c.ended_early("anthropic")


def pdf_tokens(data: str) -> int:
    """The hold's bound for a base64 PDF (``PDF_PAGE_TOKENS`` a page); 400 if it cannot be bounded."""
    return _pdf_pages(data) * PDF_PAGE_TOKENS


def check_sampling(model: str, rules: dict, temperature: float | None, top_p: float | None, top_k: int | None) -> None:
    """The model's sampling rule (price table ``rules``), for a Messages request sent as is."""
    _check_sampling(ChatCall(model, [], 1, temperature, top_p, extra={"top_k": top_k}, rules=rules))


def _block_delta(block: dict, call: int | None, delta: dict) -> list[StreamEvent]:
    """The events of one ``content_block_delta``; thinking pieces are added to their block."""
    kind = delta.get("type")
    if kind == "text_delta" and delta.get("text"):
        return [TextDelta(0, str(delta["text"]))]
    if kind == "input_json_delta" and delta.get("partial_json"):
        piece = str(delta["partial_json"])
        return [ToolCallDelta(0, call, arguments=piece)] if call is not None else [TextDelta(0, piece)]
    if kind == "thinking_delta":
        block["thinking"] = str(block.get("thinking") or "") + str(delta.get("thinking") or "")
    elif kind == "signature_delta":
        block["signature"] = str(delta.get("signature") or "")
    return []


# -- errors -------------------------------------------------------------------------


def _status_error(response: requests.Response, secret: str) -> UpstreamError:
    """Anthropic's own account limits first (a 503 and an operator alert), then the shared mapping."""
    error = c.as_dict(c.error_body(response).get("error"))
    details = c.as_dict(error.get("details"))
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    spent = details.get("error_code") in SPEND_LIMIT_CODES
    if spent or (response.status_code in (400, 429) and SPEND_LIMIT.search(message)):
        return UpstreamQuotaExceeded(c.QUOTA_MESSAGE.format(provider="anthropic"))
    return c.status_error("anthropic", response, secret)


def _stream_error(error: dict) -> UpstreamError:
    kind = str(error.get("type") or "error")
    message = f"anthropic reported {kind} in the stream"
    if kind == "rate_limit_error":
        return UpstreamRateLimited(message, headers={"Retry-After": c.DEFAULT_RETRY_AFTER})
    if kind == "overloaded_error":
        return UpstreamUnavailable(message)
    if kind == "invalid_request_error":
        return UpstreamRejected(f"anthropic rejected the request: {error.get('message') or kind}")
    return UpstreamError(message)


ADAPTERS = (
    registry.Adapter(
        "chat",
        "anthropic",
        registry.standard(AnthropicProvider, "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
        "ANTHROPIC_API_KEY",
        {"ANTHROPIC_BASE_URL": "https://api.anthropic.com"},
    ),
)
