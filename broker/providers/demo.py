"""Deterministic, clearly labelled stand-in providers (chat, speech, images, music) for when no key is set."""

from __future__ import annotations

import array
import base64
import hashlib
import io
import json
import math
import re
import struct
import sys
import threading
import wave
import zlib
from collections import OrderedDict
from collections.abc import Iterator

from broker.errors import InvalidRequest, UpstreamError
from broker.providers import registry
from broker.providers._common import text_of
from broker.providers.base import (
    ChatCall,
    ChatResult,
    Choice,
    Finish,
    ImageResult,
    ImageUsage,
    MediaFile,
    MusicTask,
    SpeechResult,
    StreamEvent,
    TextDelta,
    Usage,
    UsageReport,
)
from broker.providers.elevenlabs import OUTPUT_FORMATS as ELEVENLABS_FORMATS
from broker.providers.openai_speech import OUTPUT_FORMATS as OPENAI_FORMATS

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


# -- media stand-ins (no network; deterministic; small but valid files) ---------------

SAMPLE_RATE = 8000
MAX_SECONDS = 2.0
IMAGE_SIDE = 64
# Output image tokens per image (PROVIDERS.md §2) by quality and size; "auto" is medium
# at 1024x1024, other sizes scale by pixel area.
IMAGE_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
_QUALITY_ALIASES = {"auto": "medium", "standard": "medium", "hd": "high"}
_TASK_PREFIX = "demo-"
_CLIP_SCHEME = "demo://"
_MAX_TRACKED_TASKS = 10_000
_polled: OrderedDict[str, int] = OrderedDict()
_polled_lock = threading.Lock()


class DemoSpeech:
    """A sine tone instead of speech: 8 kHz mono 16-bit WAV, longer for longer text (≤ 2 s).

    ``billed_units`` is one per character, like a 1-credit-per-character model.
    """

    name = "demo"
    output_formats = (*ELEVENLABS_FORMATS, *OPENAI_FORMATS)  # whichever is asked, the demo answers WAV

    def from_openai(self, voice: str, response_format: str) -> tuple[str, str]:
        return voice, response_format

    def validate(self, model: str, output_format: str, voice_settings, speed, instructions) -> None:
        if output_format not in self.output_formats:
            raise InvalidRequest(f"Unknown output_format '{output_format}'.", param="output_format")

    def synthesize(
        self,
        model: str,
        text: str,
        voice_id: str,
        output_format: str,
        voice_settings: dict | None,
        speed: float | None = None,
        instructions: str | None = None,
    ) -> SpeechResult:
        seconds = min(MAX_SECONDS, 0.25 + 0.05 * len(text))
        digest = _digest(model, voice_id, text)
        audio = wav_tone(220 + int(digest[:4], 16) % 440, seconds)
        return SpeechResult(MediaFile("audio/wav", audio), billed_units=len(text), upstream_id=f"demo-{digest[:20]}")


class DemoImages:
    """``n`` small PNGs coloured by the prompt; usage follows the real token tables.

    Text input tokens are ceil(prompt characters / 4); output tokens per image come from
    ``IMAGE_TOKENS`` for the requested size and quality.
    """

    name = "demo"

    def generate(
        self, model: str, prompt: str, size: str, quality: str, n: int, output_format: str = "png"
    ) -> ImageResult:
        digest = _digest(model, prompt)
        base = bytes.fromhex(digest[:6])
        images = [MediaFile("image/png", png_solid(IMAGE_SIDE, IMAGE_SIDE, _shade(base, i))) for i in range(n)]
        usage = ImageUsage(
            text_input_tokens=math.ceil(len(prompt) / 4),
            image_output_tokens=image_tokens(size, quality) * n,
        )
        return ImageResult(images=images, usage=usage)


class DemoMusic:
    """A two-clip "song" of tones: the first poll of a task reports running, later ones success.

    The task id encodes the request (model, mode and a digest), so any instance in any
    process can answer for it; the poll count is kept per process, so a task polled
    from a fresh process runs once more before it succeeds.
    """

    name = "demo"

    def submit(self, model: str, prompt: str | None, lyrics: str | None, style: str | None, instrumental: bool) -> str:
        if not prompt and not lyrics:
            raise InvalidRequest("a prompt or lyrics is required", param="prompt")
        request = {
            "model": model,
            "mode": "custom" if lyrics else "description",
            "instrumental": instrumental,
            "digest": _digest(model, prompt or "", lyrics or "", style or "", str(instrumental))[:16],
        }
        encoded = base64.urlsafe_b64encode(json.dumps(request, separators=(",", ":")).encode()).decode()
        return _TASK_PREFIX + encoded.rstrip("=")

    def poll(self, task_id: str) -> MusicTask:
        if _decode_task(task_id) is None:
            return MusicTask(task_id, "failed", error="unknown demo task id")
        with _polled_lock:
            count = _polled.pop(task_id, 0) + 1
            _polled[task_id] = count
            while len(_polled) > _MAX_TRACKED_TASKS:
                _polled.popitem(last=False)
        if count == 1:
            return MusicTask(task_id, "running", progress=50)
        clips = [f"{_CLIP_SCHEME}{task_id}/{k}.wav" for k in (1, 2)]
        return MusicTask(task_id, "succeeded", progress=100, clip_urls=clips)

    def download(self, url: str) -> MediaFile:
        if not url.startswith(_CLIP_SCHEME):
            raise UpstreamError("the demo provider serves only demo:// clips")
        frequency = 196 + int(_digest(url)[:4], 16) % 392
        return MediaFile("audio/wav", wav_tone(frequency, MAX_SECONDS))


def image_tokens(size: str, quality: str) -> int:
    """Output tokens for one image; unknown sizes scale the 1024x1024 count by area."""
    table = IMAGE_TOKENS.get(_QUALITY_ALIASES.get(quality, quality), IMAGE_TOKENS["medium"])
    if size in table:
        return table[size]
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not match:
        return table["1024x1024"]
    area = int(match.group(1)) * int(match.group(2))
    return max(1, math.ceil(table["1024x1024"] * area / (1024 * 1024)))


def wav_tone(frequency: float, seconds: float) -> bytes:
    """A sine tone as a complete 8 kHz mono 16-bit PCM WAV file."""
    frames = int(SAMPLE_RATE * seconds)
    samples = array.array(
        "h", (int(12000 * math.sin(2 * math.pi * frequency * i / SAMPLE_RATE)) for i in range(frames))
    )
    if sys.byteorder == "big":
        samples.byteswap()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def png_solid(width: int, height: int, rgb: bytes) -> bytes:
    """A complete 8-bit RGB PNG of one colour."""
    row = b"\x00" + rgb * width  # filter type 0 per scanline
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row * height))
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _shade(rgb: bytes, index: int) -> bytes:
    """The prompt's colour, shifted a little per image so the ``n`` images differ."""
    return bytes((value + 37 * index) % 256 for value in rgb)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _decode_task(task_id: str) -> dict | None:
    if not task_id.startswith(_TASK_PREFIX):
        return None
    encoded = task_id[len(_TASK_PREFIX) :]
    try:
        request = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


# The demo stand-ins: on when DEMO_PROVIDER is (by default when no provider key is set).
ADAPTERS = (
    registry.Adapter("chat", "demo", lambda config, session, timeout: DemoProvider(), None),
    registry.Adapter("speech", "demo", lambda config, session, timeout: DemoSpeech(), None),
    registry.Adapter("images", "demo", lambda config, session, timeout: DemoImages(), None),
    registry.Adapter("music", "demo", lambda config, session, timeout: DemoMusic(), None),
)
