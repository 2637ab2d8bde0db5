"""OpenAI speech adapter (``tts-1``, ``tts-1-hd``, ``gpt-4o-mini-tts``): raw audio back, no usage.

``POST /v1/audio/speech`` answers with the audio bytes only, so the job is billed by
input characters at the price table's rate (``speech_cost_usd`` with no billed units).
"""

from __future__ import annotations

import requests

from broker.errors import InvalidRequest, UpstreamError
from broker.providers import _common as c
from broker.providers import registry
from broker.providers.base import MediaFile, SpeechResult
from broker.providers.openai import OPENAI_SETTINGS

# OpenAI's ``response_format`` values and the media type of each.
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
OUTPUT_FORMATS: tuple[str, ...] = tuple(CONTENT_TYPES)
# The built-in voices (a custom voice is an id such as ``voice_1234``).
VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
MAX_AUDIO_BYTES = 64 * 1024 * 1024


def takes_instructions(model: str) -> bool:
    """``instructions`` work with the gpt-4o-mini-tts family only, not ``tts-1`` / ``tts-1-hd``."""
    return model.startswith("gpt-4o-mini-tts")


class OpenAISpeechProvider:
    name = "openai"
    output_formats = OUTPUT_FORMATS

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._url = base_url.rstrip("/") + "/audio/speech"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def from_openai(self, voice: str, response_format: str) -> tuple[str, str]:
        """OpenAI's own vocabulary: the voice and format pass unchanged."""
        return voice, response_format

    def validate(
        self,
        model: str,
        output_format: str,
        voice_settings: dict | None,
        speed: float | None,
        instructions: str | None,
    ) -> None:
        """What OpenAI would refuse, refused before anything is held."""
        if output_format not in OUTPUT_FORMATS:
            raise InvalidRequest(
                f"Unknown output_format '{output_format}' for an OpenAI speech model. One of: "
                f"{', '.join(OUTPUT_FORMATS)}.",
                param="output_format",
            )
        if voice_settings is not None:
            raise InvalidRequest("voice_settings is for ElevenLabs models; use speed.", param="voice_settings")
        if instructions is not None and not takes_instructions(model):
            raise InvalidRequest(f"instructions does not work with {model}.", param="instructions")

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
        """One call; ``billed_units`` is None (the response carries no usage)."""
        body: dict = {"model": model, "input": text, "voice": voice_id, "response_format": output_format}
        if voice_id not in VOICES:
            body["voice"] = {"id": voice_id}
        if speed is not None:
            body["speed"] = speed
        if instructions is not None:
            body["instructions"] = instructions
        response = c.send(
            self.name,
            self._session,
            "POST",
            self._url,
            headers={"Authorization": f"Bearer {self._api_key}"},
            body=body,
            timeout=self._timeout,
            stream=True,
        )
        if response.status_code >= 300:
            try:
                raise c.status_error(self.name, response, self._api_key)
            finally:
                response.close()
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        audio = c.read_body(self.name, response, MAX_AUDIO_BYTES)
        if not audio:
            raise UpstreamError("openai sent no audio")
        if not content_type.startswith("audio/"):
            content_type = CONTENT_TYPES[output_format]
        return SpeechResult(
            audio=MediaFile(content_type, audio),
            billed_units=None,
            upstream_id=response.headers.get("x-request-id") or None,
        )


ADAPTERS = (
    registry.Adapter(
        "speech",
        "openai",
        registry.standard(OpenAISpeechProvider, "OPENAI_BASE_URL", "OPENAI_API_KEY"),
        "OPENAI_API_KEY",
        OPENAI_SETTINGS,
    ),
)
