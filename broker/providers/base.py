"""The small interface every chat provider adapter implements, and the shapes it speaks.

Adapters translate an OpenAI-shaped chat call to the provider's wire format and back.
They never import Flask and never touch money: they only report the provider's own
usage numbers in a provider-neutral ``Usage``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from broker.errors import UpstreamError, UpstreamUnavailable


@dataclass
class Usage:
    """Token counts as the provider billed them, split by price class.

    ``input_tokens`` excludes cache reads and writes; ``output_tokens`` includes
    reasoning / thinking tokens.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    # Parts of ``output_tokens``, reported back to the caller but not priced apart.
    reasoning_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

    # Set by the broker (``pricing.usage_in_range``), never by an adapter: a count was cut to its bound.
    capped: bool = False

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens + self.cache_write_1h_tokens


# Provider usage is read with these, so that an odd count reaches the one check of every kind's
# usage (``pricing.usage_in_range``) instead of silently becoming 0: -1 marks an invalid count.
INVALID_COUNT = -1
# A count at or above 2**53 is past what a JSON reader keeps exactly; usage_in_range cuts it.
MAX_COUNT = 2**53


def count_of(value: object) -> int:
    """A token count from a provider's JSON: absent or null is 0, a whole number is itself (a huge
    one too: it is cut later), infinity is ``MAX_COUNT``; a string, a bool, a fraction or NaN is
    ``INVALID_COUNT``, and so is a negative number (kept as is)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return INVALID_COUNT
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == math.inf:
        return MAX_COUNT
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return INVALID_COUNT


def net_count(total: int, *parts: int) -> int:
    """``total`` less its ``parts`` (never below 0); invalid when any of them is (negative)."""
    if total < 0 or min(parts, default=0) < 0:
        return INVALID_COUNT
    return max(total - sum(parts), 0)


def sum_counts(*counts: int) -> int:
    """The sum of counts; invalid when any of them is (negative)."""
    return INVALID_COUNT if min(counts, default=0) < 0 else sum(counts)


@dataclass
class ChatCall:
    """One chat request, already validated, in OpenAI's vocabulary.

    ``model`` is the upstream model id without the ``provider/`` prefix.
    ``max_tokens`` is the effective maximum the broker holds credits for; adapters
    must send it upstream so the provider can never bill beyond the hold.
    ``extra`` holds the further OpenAI fields of the request (tools, response_format, …),
    already checked against the adapter's ``accepts``; identifiers in it are namespaced.
    """

    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    n: int = 1
    user: str | None = None
    extra: dict = field(default_factory=dict)
    # The model's provider rules from the price table (``rules`` of its row), for the adapter.
    rules: dict = field(default_factory=dict)


@dataclass
class Choice:
    """One answer, in OpenAI's message vocabulary.

    ``tool_calls`` are OpenAI-shaped (``{"id", "type": "function", "function": {"name",
    "arguments"}}``); ``logprobs`` is OpenAI's ``{"content": [...], "refusal": [...]}``.
    """

    index: int
    content: str | None
    finish_reason: str | None
    refusal: str | None = None
    tool_calls: list[dict] | None = None
    function_call: dict | None = None
    annotations: list[dict] | None = None
    logprobs: dict | None = None


@dataclass
class ChatResult:
    id: str
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: str | None = None


@dataclass
class StreamMeta:
    """Response-wide fields a stream reports before any delta (relayed on every chunk)."""

    system_fingerprint: str | None = None
    service_tier: str | None = None


@dataclass
class TextDelta:
    """A piece of the answer; ``refusal`` when it is a piece of the model's refusal instead."""

    index: int
    text: str
    logprobs: dict | None = None
    refusal: bool = False


@dataclass
class ToolCallDelta:
    """A piece of one tool call of choice ``index``; ``call`` is its position in ``tool_calls``.

    The first piece of a call carries ``id`` and ``name``; later pieces carry argument
    fragments only. ``type`` is ``function`` (or OpenAI's ``custom``, whose text is ``input``).
    """

    index: int
    call: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    type: str = "function"
    # Further fields of the call, sent with its first piece (Gemini's ``extra_content``).
    extra: dict | None = None


@dataclass
class FunctionCallDelta:
    """A piece of a deprecated ``function_call`` (OpenAI models asked with ``functions``)."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class Finish:
    index: int
    reason: str


@dataclass
class UsageReport:
    """The provider's usage so far; the last one in a stream is the total."""

    usage: Usage


StreamEvent = StreamMeta | TextDelta | ToolCallDelta | FunctionCallDelta | Finish | UsageReport


class ChatProvider(Protocol):
    """``accepts``: the OpenAI request fields beyond the basic ones (``tools``,
    ``response_format``, …) the adapter takes; any other set field is a 400
    ``unsupported_parameter`` before anything is held. An adapter without it takes none.

    An adapter may also have ``check(call) -> int``, run before anything is held: it raises
    ``InvalidRequest`` for what the provider's rules (``call.rules``) forbid and returns the
    prompt tokens of parts only it can bound (media by the provider's token rules), added to
    the hold's bound. ``call.max_tokens`` is then the requested (or the model's) maximum.
    And ``reasoning_tokens(call) -> int``: the thinking budget the request asks for, which a call
    without ``max_tokens`` must be able to afford on top of ``MIN_OUTPUT_TOKENS`` (else 402).
    """

    name: str

    def complete(self, call: ChatCall) -> ChatResult:
        """Run a non-streamed call; raise an ``UpstreamError`` subclass on failure."""
        ...

    def stream(self, call: ChatCall) -> Iterator[StreamEvent]:
        """Yield events as they arrive.

        Before the first event a failure raises an ``UpstreamError`` subclass other
        than ``UpstreamStreamBroken``; after it, ``UpstreamStreamBroken``. Closing
        the generator closes the upstream connection.
        """
        ...


# -- upstream outcomes every adapter maps the same way ---------------------------------


class UpstreamRateLimited(UpstreamError):
    """The provider still rate limits after the session's retries: the caller should back off."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamQuotaExceeded(UpstreamUnavailable):
    """The broker's own provider account is out of quota or over its spend limit: an operator must act."""

    code = "upstream_quota_exceeded"


class UpstreamModelNotFound(UpstreamError):
    """The provider does not know the model the price table names."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


# -- media (slow generations run by the worker) --------------------------------


@dataclass
class MediaFile:
    content_type: str
    data: bytes


@dataclass
class SpeechResult:
    """``billed_units`` is the provider's own charge unit (ElevenLabs credits from the
    ``character-cost`` header), or None when the provider did not report it."""

    audio: MediaFile
    billed_units: int | None
    upstream_id: str | None = None


@dataclass
class ImageUsage:
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    text_output_tokens: int = 0


@dataclass
class ImageResult:
    images: list[MediaFile]
    usage: ImageUsage | None  # None when the provider reported no usage


@dataclass
class MusicTask:
    """A music generation as the provider reports it while polling.

    ``status``: ``pending`` | ``running`` | ``succeeded`` | ``failed``; ``progress``
    0–100 where known; ``clip_urls`` once succeeded; ``error`` when failed.
    """

    task_id: str
    status: str
    progress: int | None = None
    clip_urls: list[str] = field(default_factory=list)
    error: str | None = None


class SpeechProvider(Protocol):
    """``output_formats``: what ``output_format`` may be. ``validate`` refuses (``InvalidRequest``),
    before anything is held, what the provider would; ``from_openai`` maps OpenAI's voice name and
    ``response_format`` (``POST /v1/audio/speech``) to this provider's voice id and output format."""

    name: str
    output_formats: tuple[str, ...]

    def from_openai(self, voice: str, response_format: str) -> tuple[str, str]: ...

    def validate(
        self, model: str, output_format: str, voice_settings: dict | None, speed: float | None, instructions: str | None
    ) -> None: ...

    def synthesize(
        self,
        model: str,
        text: str,
        voice_id: str,
        output_format: str,
        voice_settings: dict | None,
        speed: float | None = None,
        instructions: str | None = None,
    ) -> SpeechResult: ...


class ImageProvider(Protocol):
    name: str

    def generate(
        self, model: str, prompt: str, size: str, quality: str, n: int, output_format: str = "png"
    ) -> ImageResult: ...


class MusicProvider(Protocol):
    name: str

    def submit(self, model: str, prompt: str | None, lyrics: str | None, style: str | None, instrumental: bool) -> str:
        """Start a generation; returns the provider's task id."""
        ...

    def poll(self, task_id: str) -> MusicTask: ...

    def download(self, url: str) -> MediaFile: ...
