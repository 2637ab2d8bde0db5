"""ElevenLabs text-to-speech adapter: raw audio back, billed credits from the ``character-cost`` header."""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from urllib.parse import quote

import requests

from broker.errors import InvalidRequest, UpstreamError, UpstreamRejected
from broker.providers import _common as c
from broker.providers import registry
from broker.providers.base import MediaFile, SpeechResult

# PROVIDERS.md §6: the ``output_format`` values the API accepts. 192 kbps MP3 needs a
# Creator plan and 44.1 kHz PCM a Pro plan; ElevenLabs refuses them on lower plans.
OUTPUT_FORMATS: tuple[str, ...] = (
    "mp3_22050_32",
    "mp3_24000_48",
    "mp3_44100_32",
    "mp3_44100_64",
    "mp3_44100_96",
    "mp3_44100_128",
    "mp3_44100_192",
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_32000",
    "pcm_44100",
    "pcm_48000",
    "ulaw_8000",
    "alaw_8000",
    "opus_48000_32",
    "opus_48000_64",
    "opus_48000_96",
    "opus_48000_128",
    "opus_48000_192",
)

# By codec prefix. PCM is headerless signed 16-bit little-endian mono; μ-law and A-law
# are headerless 8 kHz (RFC 4856 names); Opus comes in an Ogg container.
_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "pcm": "audio/pcm",
    "ulaw": "audio/pcmu",
    "alaw": "audio/pcma",
    "opus": "audio/ogg",
}
MAX_AUDIO_BYTES = 64 * 1024 * 1024

# ``POST /v1/audio/speech`` (OpenAI's shape) with an ElevenLabs model: OpenAI's voice names
# map to ElevenLabs premade voices of a similar character (any other voice is taken as an
# ElevenLabs voice id), and its ``response_format`` to an ``output_format``. ElevenLabs has
# no AAC, FLAC or WAV output: those formats are a 400.
OPENAI_VOICES = {
    "alloy": "EXAVITQu4vr4xnSDxMaL",  # Sarah
    "ash": "nPczCjzI2devNBz1zQrb",  # Brian
    "ballad": "N2lVS1w4EtoT3dr4eOWO",  # Callum
    "coral": "FGY2WhTYpPnrIDTdsKH5",  # Laura
    "echo": "TX3LPaxmHKxFdv7VOQHJ",  # Liam
    "fable": "JBFqnCBsd6RMkjVDRZzb",  # George
    "onyx": "onwK4e9ZLuTAKqWW03F9",  # Daniel
    "nova": "cgSgspJ2msm6clMCkdW9",  # Jessica
    "sage": "Xb7hH8MSUJpSbSDYk0k2",  # Alice
    "shimmer": "pFZP5JQG7iQjIQuC4Bku",  # Lily
    "verse": "cjVigY5qzO86Huf0OWal",  # Eric
    "marin": "XrExE9yKIg1WjnnlVkGX",  # Matilda
    "cedar": "pqHfZKP75CvOlQylNhV4",  # Bill
}
OPENAI_FORMATS = {"mp3": "mp3_44100_128", "opus": "opus_48000_64", "pcm": "pcm_24000"}
# ElevenLabs' ``voice_settings.speed`` range.
MIN_SPEED, MAX_SPEED = 0.7, 1.2
QUOTA_MESSAGE = "elevenlabs refused the broker's account (quota exceeded)"


def content_type_for(output_format: str) -> str:
    """The media type of audio in ``output_format``; ``application/octet-stream`` if unknown."""
    return _CONTENT_TYPES.get(output_format.partition("_")[0], "application/octet-stream")


class ElevenLabsProvider:
    name = "elevenlabs"
    output_formats = OUTPUT_FORMATS

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
        unit_usd: Decimal | None = None,
    ) -> None:
        self.unit_usd = unit_usd  # what one ElevenLabs credit costs on the operator's plan (None: the price table)
        self._base = base_url.rstrip("/") + "/v1/text-to-speech/"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def from_openai(self, voice: str, response_format: str) -> tuple[str, str]:
        """OpenAI's voice name and ``response_format`` as an ElevenLabs voice id and ``output_format``."""
        if response_format not in OPENAI_FORMATS:
            raise InvalidRequest(
                f"response_format '{response_format}' is not available for ElevenLabs models; "
                f"use one of: {', '.join(OPENAI_FORMATS)}.",
                param="response_format",
            )
        return OPENAI_VOICES.get(voice, voice), OPENAI_FORMATS[response_format]

    def validate(
        self,
        model: str,
        output_format: str,
        voice_settings: dict | None,
        speed: float | None,
        instructions: str | None,
    ) -> None:
        """What ElevenLabs would refuse, refused before anything is held."""
        if output_format not in OUTPUT_FORMATS:
            raise InvalidRequest(
                f"Unknown output_format '{output_format}'. One of: {', '.join(OUTPUT_FORMATS)}.",
                param="output_format",
            )
        if speed is not None and not MIN_SPEED <= speed <= MAX_SPEED:
            raise InvalidRequest(
                f"speed must be between {MIN_SPEED} and {MAX_SPEED} for ElevenLabs models.", param="speed"
            )
        if instructions is not None:
            raise InvalidRequest("instructions is not supported by ElevenLabs models.", param="instructions")

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
        """One non-streamed conversion; ``billed_units`` is None when the header is missing.

        The content type is the response's own when it names audio, else the one
        ``output_format`` implies. ``speed`` goes in ``voice_settings``.
        """
        self.validate(model, output_format, voice_settings, speed, instructions)
        if not voice_id:
            raise InvalidRequest("a voice id is required", param="voice_id")
        body: dict = {"text": text, "model_id": model}
        if speed is not None:
            voice_settings = {**(voice_settings or {}), "speed": speed}
        if voice_settings is not None:
            body["voice_settings"] = voice_settings
        response = c.send(
            self.name,
            self._session,
            "POST",
            self._base + quote(voice_id, safe=""),
            headers={"xi-api-key": self._api_key},
            params={"output_format": output_format},
            body=body,
            timeout=self._timeout,
            stream=True,
        )
        if response.status_code >= 300:
            try:
                raise self._error(response)
            finally:
                response.close()
        headers = response.headers
        audio = c.read_body(self.name, response, MAX_AUDIO_BYTES)
        if not audio:
            raise UpstreamError("elevenlabs sent no audio")
        content_type = headers.get("Content-Type", "")
        if not content_type.startswith("audio/"):
            content_type = content_type_for(output_format)
        return SpeechResult(
            audio=MediaFile(content_type, audio),
            billed_units=_credits(headers.get("character-cost")),
            upstream_id=headers.get("request-id") or None,
        )

    def _error(self, response: requests.Response) -> UpstreamError:
        """ElevenLabs errors: ``{"detail":{"status","message"}}``, or a FastAPI list for 422.

        ``quota_exceeded`` arrives as a 401 but is the broker's own account running dry,
        so it becomes a plain 502 that names no key. Credentials, rate limits and
        server failures take the shared mapping.
        """
        status = response.status_code
        detail = c.error_body(response).get("detail")
        if isinstance(detail, dict) and detail.get("status") == "quota_exceeded":
            return UpstreamError(QUOTA_MESSAGE)
        if not 400 <= status < 500 or status in (401, 402, 403, 408, 429):
            return c.status_error(self.name, response, self._api_key)
        message = _detail_message(detail) or f"HTTP {status}"
        return UpstreamRejected(f"elevenlabs rejected the request: {c.clip_message(message, self._api_key)}")


def _detail_message(detail: object) -> str | None:
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        return detail["message"]
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in map(c.as_dict, detail):
            loc = ".".join(str(p) for p in item.get("loc") or [] if p != "body")
            msg = item.get("msg") if isinstance(item.get("msg"), str) else "invalid"
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(parts) or None
    return None


def _credits(header: str | None) -> int | None:
    """The ``character-cost`` header as whole credits (a fraction rounds up); None when absent or garbled."""
    try:
        value = Decimal((header or "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite() or value < 0:
        return None
    return math.ceil(value)


def _build(config, session: requests.Session, timeout: tuple[float, float]) -> ElevenLabsProvider:
    credit_usd = config["ELEVENLABS_CREDIT_USD"]
    return ElevenLabsProvider(
        config["ELEVENLABS_BASE_URL"],
        config["ELEVENLABS_API_KEY"],
        session,
        timeout,
        unit_usd=Decimal(credit_usd) if credit_usd else None,
    )


ADAPTERS = (
    registry.Adapter(
        "speech",
        "elevenlabs",
        _build,
        "ELEVENLABS_API_KEY",
        # ELEVENLABS_CREDIT_USD: what one ElevenLabs credit costs on your plan; empty: from the price table.
        {"ELEVENLABS_BASE_URL": "https://api.elevenlabs.io", "ELEVENLABS_CREDIT_USD": ""},
    ),
)
