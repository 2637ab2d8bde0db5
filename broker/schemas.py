"""Request bodies of the /v1 API as pydantic models: they validate requests and, later, the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI request fields that reach OpenAI models unchanged. Other providers have no
# equivalent, so a request that sets one of them for a non-OpenAI model gets a 400.
OPENAI_PASSTHROUGH = (
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "metadata",
    "prediction",
    "store",
    "verbosity",
)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's request, models named ``provider/model``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=2048)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    verbosity: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            return [value]
        if value is not None and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def passthrough(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OPENAI_PASSTHROUGH if getattr(self, name) is not None}


class SimpleChatRequest(ChatCompletionRequest):
    """``POST /v1/chat``: the seed's shape, ``provider`` and ``model`` given apart."""

    provider: str | None = Field(default=None, max_length=40)

    def qualified_model(self) -> str:
        if self.provider and "/" not in self.model:
            return f"{self.provider}/{self.model}"
        return self.model


class SpeechRequest(BaseModel):
    """``POST /v1/tts``: text-to-speech (ElevenLabs models, or ``demo/tts``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=40_000)
    voice_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    output_format: str = "mp3_44100_128"
    voice_settings: dict[str, float | bool] | None = None


class ImageRequest(BaseModel):
    """``POST /v1/image``: image generation (OpenAI GPT image models, or ``demo/image``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=32_000)
    size: Literal["1024x1024", "1536x1024", "1024x1536", "auto"] = "1024x1024"
    quality: Literal["low", "medium", "high", "auto"] = "auto"
    n: int = Field(default=1, ge=1, le=10)


class MusicRequest(BaseModel):
    """``POST /v1/music``: a song through an unofficial Suno-style API (or ``demo/music``).

    Either ``prompt`` (a description, up to 500 characters) or ``lyrics`` with ``style``.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    prompt: str | None = Field(default=None, min_length=1, max_length=500)
    lyrics: str | None = Field(default=None, min_length=1, max_length=5000)
    style: str | None = Field(default=None, min_length=1, max_length=200)
    title: str | None = Field(default=None, max_length=100)
    instrumental: bool = False
