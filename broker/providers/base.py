"""The small interface every chat provider adapter implements, and the shapes it speaks.

Adapters translate an OpenAI-shaped chat call to the provider's wire format and back.
They never import Flask and never touch money: they only report the provider's own
usage numbers in a provider-neutral ``Usage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


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

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens + self.cache_write_1h_tokens


@dataclass
class ChatCall:
    """One chat request, already validated, in OpenAI's vocabulary.

    ``model`` is the upstream model id without the ``provider/`` prefix.
    ``max_tokens`` is the effective maximum the broker holds credits for; adapters
    must send it upstream so the provider can never bill beyond the hold.
    ``extra`` holds further OpenAI fields that the OpenAI adapter passes through.
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


@dataclass
class Choice:
    index: int
    content: str
    finish_reason: str | None


@dataclass
class ChatResult:
    id: str
    model: str
    choices: list[Choice]
    usage: Usage


@dataclass
class TextDelta:
    index: int
    text: str


@dataclass
class Finish:
    index: int
    reason: str


@dataclass
class UsageReport:
    """The provider's usage so far; the last one in a stream is the total."""

    usage: Usage


StreamEvent = TextDelta | Finish | UsageReport


class ChatProvider(Protocol):
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
    name: str

    def synthesize(
        self, model: str, text: str, voice_id: str, output_format: str, voice_settings: dict | None
    ) -> SpeechResult: ...


class ImageProvider(Protocol):
    name: str

    def generate(self, model: str, prompt: str, size: str, quality: str, n: int) -> ImageResult: ...


class MusicProvider(Protocol):
    name: str

    def submit(self, model: str, prompt: str | None, lyrics: str | None, style: str | None, instrumental: bool) -> str:
        """Start a generation; returns the provider's task id."""
        ...

    def poll(self, task_id: str) -> MusicTask: ...

    def download(self, url: str) -> MediaFile: ...
