"""A deterministic, clearly labelled stand-in provider used when no provider key is set."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator

from broker.providers._common import text_of
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

LABEL = "[demo provider — not a real model] "
SNIPPET_WORDS = 8


class DemoProvider:
    """Answers without any network call; the same call always gets the same answer.

    Usage is a fixed estimate: per message ceil(UTF-8 bytes / 4) + 4 input tokens,
    and ceil(characters / 4) output tokens per choice, capped at ``max_tokens``.
    """

    name = "demo"

    def __init__(self) -> None:
        pass

    def complete(self, call: ChatCall) -> ChatResult:
        text, reason = _reply(call)
        digest = hashlib.sha256(json.dumps(call.messages, sort_keys=True, default=str).encode()).hexdigest()
        return ChatResult(
            id=f"demo-{digest[:24]}",
            model=call.model,
            choices=[Choice(i, text, reason) for i in range(call.n)],
            usage=_usage(call, text),
        )

    def stream(self, call: ChatCall) -> Iterator[StreamEvent]:
        text, reason = _reply(call)
        return _events(call, text, reason)


def _events(call: ChatCall, text: str, reason: str) -> Iterator[StreamEvent]:
    for index in range(call.n):
        for piece in re.findall(r"\s*\S+\s*|\s+", text):
            yield TextDelta(index, piece)
        yield Finish(index, reason)
    yield UsageReport(_usage(call, text))


def _reply(call: ChatCall) -> tuple[str, str]:
    """The labelled reply and its finish reason, cut to ``max_tokens`` × 4 characters."""
    last_user = next(
        (text_of(m.get("content")) for m in reversed(call.messages) if m.get("role") == "user"),
        "",
    )
    words = last_user.split()
    snippet = " ".join(words[:SNIPPET_WORDS]) + (" …" if len(words) > SNIPPET_WORDS else "")
    sentence = f'You said "{snippet}" ({len(words)} words).' if words else "You said nothing."
    text = LABEL + sentence
    limit = max(call.max_tokens, 0) * 4
    if len(text) > limit:
        return text[:limit], "length"
    return text, "stop"


def _usage(call: ChatCall, text: str) -> Usage:
    prompt = sum(math.ceil(len(text_of(m.get("content")).encode()) / 4) + 4 for m in call.messages)
    per_choice = min(math.ceil(len(text) / 4), call.max_tokens)
    return Usage(input_tokens=prompt, output_tokens=per_choice * call.n)
