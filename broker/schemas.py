"""Request bodies of the /v1 API as pydantic models: they validate requests and, later, the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

# Request fields beyond the basic ones every provider maps. Each adapter lists those it
# takes (``accepts``); a request that sets another one gets a 400 naming it. All of
# OpenAI's current Chat Completions fields are here, plus ``top_k`` (Anthropic, Gemini).
EXTRA_FIELDS = (
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
    "functions",
    "function_call",
    "reasoning_effort",
    "metadata",
    "prediction",
    "store",
    "verbosity",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "moderation",
    "modalities",
    "audio",
    "web_search_options",
    "top_k",
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
    functions: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=128)
    function_call: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    verbosity: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    top_k: int | None = Field(default=None, ge=0, description="Anthropic and Gemini models only")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            return [value]
        if value is not None and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > 16 or any(len(k) > 64 for k in value) or any(len(v) > 512 for v in value.values())
        ):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def extra_fields(self) -> dict[str, Any]:
        """The set fields beyond the basic ones, for the adapter (see ``EXTRA_FIELDS``)."""
        return {name: getattr(self, name) for name in EXTRA_FIELDS if getattr(self, name) is not None}


class SimpleChatRequest(ChatCompletionRequest):
    """``POST /v1/chat``: the seed's shape, ``provider`` and ``model`` given apart."""

    provider: str | None = Field(default=None, max_length=40)

    def qualified_model(self) -> str:
        if self.provider and "/" not in self.model:
            return f"{self.provider}/{self.model}"
        return self.model


class AnthropicMessageParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    """``POST /v1/messages``: Anthropic's Messages request (what the anthropic SDK and Claude Code send).

    Anthropic models get it as sent (model name and ``max_tokens`` as held, ``metadata.user_id``
    namespaced per account); OpenAI and Gemini models get it translated to a chat request.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessageParam] = Field(min_length=1, max_length=10_000)
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = Field(default=None, max_length=64)
    tools: list[dict[str, Any]] | None = Field(default=None, description="Custom and client tools; server tools: 400")
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    cache_control: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    inference_geo: Literal["global"] | None = Field(default=None, description="Regional inference is not priced")
    speed: Literal["standard"] | None = Field(default=None, description="Fast mode is not priced")
    diagnostics: dict[str, Any] | None = Field(
        default=None, description="Accepted and not sent: prompt-cache diagnostics would compare across accounts"
    )


class MessagesCountRequest(BaseModel):
    """``POST /v1/messages/count_tokens``: the prompt part of a Messages request."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    messages: list[AnthropicMessageParam] = Field(min_length=1, max_length=10_000)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None


class SpeechRequest(BaseModel):
    """``POST /v1/tts``: text-to-speech (ElevenLabs models, or ``demo/tts``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=40_000)
    voice_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    output_format: str = "mp3_44100_128"
    voice_settings: dict[str, float | bool] | None = None
    # OpenAI speech models (instructions: gpt-4o-mini-tts only); ElevenLabs takes speed 0.7-1.2.
    speed: float | None = Field(default=None, ge=0.25, le=4.0)
    instructions: str | None = Field(default=None, max_length=4096)


class ImageRequest(BaseModel):
    """``POST /v1/image``: image generation (OpenAI GPT image models, or ``demo/image``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=32_000)
    size: Literal["1024x1024", "1536x1024", "1024x1536", "auto"] = "1024x1024"
    quality: Literal["low", "medium", "high", "auto"] = "auto"
    n: int = Field(default=1, ge=1, le=10)
    output_format: Literal["png", "jpeg", "webp"] = "png"


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


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's request, models named ``provider/model``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="A string, a list of strings, or (OpenAI models only) token arrays; "
        "at most 2,048 inputs (100 for Gemini models)"
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="`base64`: each vector as little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(default=None, ge=1, description="Shorten the vectors to this many dimensions")
    user: str | None = Field(default=None, max_length=256)


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: OpenAI's Responses API (OpenAI models), passed through and metered."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=16)
    max_tool_calls: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    store: bool | None = Field(default=None, description="Stored responses are bound to your account")
    background: bool | None = Field(default=None, description="Refused when true")
    previous_response_id: str | None = Field(
        default=None, max_length=200, description="Only a response your account made"
    )
    tools: list[dict[str, Any]] | None = Field(default=None, description="`function` and `custom` tools only")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    # OpenAI's fields the broker refuses (a 400 naming them): they reach objects of the broker's
    # provider account (conversations, prompts) or are not priced.
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    prompt_cache_options: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None


class CustomVoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class OpenAISpeechRequest(BaseModel):
    """``POST /v1/audio/speech``: OpenAI's speech request (OpenAI speech models and ElevenLabs)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    input: str = Field(min_length=1, max_length=40_000)
    voice: str | CustomVoice = Field(
        description="An OpenAI voice name (alloy, ash, ballad, coral, echo, fable, onyx, nova, sage, shimmer, verse, "
        "marin, cedar), a custom voice object, or for ElevenLabs models an ElevenLabs voice id"
    )
    instructions: str | None = Field(default=None, max_length=4096)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio"] = "audio"

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


class OpenAIImageRequest(BaseModel):
    """``POST /v1/images/generations``: OpenAI's image request; ``url`` results are signed, expiring links."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="openai/gpt-image-1", min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=32_000)
    n: int = Field(default=1, ge=1, le=10)
    size: Literal["1024x1024", "1536x1024", "1024x1536", "auto"] = "auto"
    quality: Literal["low", "medium", "high", "auto"] = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = Field(default=None, max_length=256)


class SignedLinkQuery(BaseModel):
    """Query of a signed result link (``GET /v1/media/{job_id}/{index}``)."""

    model_config = ConfigDict(extra="forbid")

    expires: int = Field(description="Unix time the link stops working")
    signature: str = Field(max_length=128, description="HMAC-SHA256 of the link")


# -- query strings -------------------------------------------------------------------


class UsageQuery(BaseModel):
    """Query of ``GET /v1/usage``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    limit: int = Field(default=20, ge=1, le=100)
    cursor: int | None = Field(
        default=None, ge=1, le=2**63 - 1, description="next_cursor of a page: the page of older requests"
    )
    after: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="prev_cursor of a page: the page of newer requests"
    )
    from_: datetime | None = Field(default=None, alias="from", description="ISO 8601; requests started at or after")
    to: datetime | None = Field(default=None, description="ISO 8601; requests started before")
    model: str | None = Field(default=None, max_length=200)
    key_id: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Only this API key's requests (0: those made without a key)"
    )
    endpoint: str | None = Field(default=None, max_length=40, description="e.g. chat, tts, image, music")

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _iso(cls, value):
        if isinstance(value, str):
            return datetime.fromisoformat(value)
        return value


class JobsQuery(BaseModel):
    """Query of ``GET /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=40, description="next_cursor of the previous page")
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] | None = None
    type: Literal["tts", "image", "music"] | None = None


class ContentQuery(BaseModel):
    """Query of ``GET /v1/jobs/{job_id}/content``."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(default=0, ge=0, le=100)


# -- responses ---------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None


class ErrorResponse(BaseModel):
    """Every error: OpenAI's envelope, so its SDK raises the matching exception."""

    error: ErrorDetail


class Balance(BaseModel):
    object: Literal["balance"]
    available_credits: str
    held_credits: str
    available_ucr: int
    held_ucr: int
    credit_usd: str


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: Literal["chat", "embedding", "tts", "image", "music"]
    max_output_tokens: int | None
    context_window: int | None
    pricing: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelInfo]


class ReceiptTokens(BaseModel):
    input: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    output: int


class ReceiptFlags(BaseModel):
    estimated: bool
    capped: bool


class Receipt(BaseModel):
    """What one metered request cost, and why."""

    id: str
    object: Literal["receipt"]
    endpoint: str
    provider: str
    model: str
    status: str
    stream: bool
    tokens: ReceiptTokens
    provider_cost_usd: str
    markup: str
    credits_charged: str
    charged_ucr: int
    hold_ucr: int
    flags: ReceiptFlags
    error_code: str | None
    detail: dict[str, Any] | None
    started_at: str
    finished_at: str


class UsageList(BaseModel):
    object: Literal["list"]
    data: list[Receipt]
    has_more: bool = Field(description="Older requests exist")
    next_cursor: int | None = Field(description="Pass as cursor for the older page")
    prev_cursor: int | None = Field(description="Pass as after for the newer page; null on the newest page")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    annotations: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]
    completion_tokens_details: dict[str, int]
    cost_credits: float = Field(description="Credits charged for this request")


class ChatCompletion(BaseModel):
    """A chat completion (``stream: false``); with ``stream: true`` the body is ``text/event-stream``
    of ``chat.completion.chunk`` objects and ``data: [DONE]``; with ``stream_options.include_usage``
    a last chunk with empty ``choices`` carries the usage and ``cost_credits``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: str | None = None
    service_tier: str | None = None
    request_id: str


class EmbeddingOut(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The vector; a base64 string with `encoding_format: base64`")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    cost_credits: float = Field(description="Credits charged for this request")


class EmbeddingList(BaseModel):
    """Embeddings in OpenAI's shape, one per input, in order."""

    object: Literal["list"]
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage


class ResponseUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int
    cost_credits: float = Field(description="Credits charged for this request")


class ResponseObject(BaseModel):
    """OpenAI's response object, as OpenAI sent it (``model`` is the broker's id, ``usage`` has
    ``cost_credits``); with ``stream: true`` the body is OpenAI's named Server-Sent Events, the
    last ``response.completed`` (or ``response.incomplete`` / ``response.failed``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"]
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None


class AnthropicUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class AnthropicMessage(BaseModel):
    """Anthropic's Message (``stream: false``); with ``stream: true`` the body is Anthropic's named
    Server-Sent Events (``message_start`` … ``message_stop``). Anthropic models' answers are relayed
    as sent; the charge is in ``X-Credits-Charged`` and the receipt."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: AnthropicUsage


class MessagesTokenCount(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error on ``/v1/messages…``: Anthropic's envelope, so the anthropic SDK raises its own classes."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str


class JobResultOut(BaseModel):
    index: int
    content_type: str
    bytes: int
    url: str | None


class JobError(BaseModel):
    type: str | None
    message: str | None


class JobOut(BaseModel):
    """A media job as the client polls it."""

    id: str
    object: Literal["job"]
    type: Literal["tts", "image", "music"]
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: int | None
    hold_credits: str
    cost_credits: str | None
    request_id: str
    error: JobError | None
    media_expired: bool
    results: list[JobResultOut]


class ImageOut(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's image generation response."""

    created: int
    data: list[ImageOut]
    output_format: str | None = None
    size: str | None = None
    quality: str | None = None


class JobList(BaseModel):
    object: Literal["list"]
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None


class CheckoutRequest(BaseModel):
    """``POST /v1/checkout``: a credit pack by id, or a custom amount in US dollars."""

    model_config = ConfigDict(extra="forbid")

    pack: str | None = Field(default=None, max_length=40, description="A pack id, e.g. usd20")
    amount_usd: Decimal | None = Field(default=None, gt=0, max_digits=8, decimal_places=2)
    crypto: bool = Field(default=False, description="Also offer USDC (Stripe stablecoin payments)")


class CheckoutSession(BaseModel):
    id: str
    object: Literal["checkout.session"]
    url: str
    purchase_id: int


class PurchaseOut(BaseModel):
    id: int
    object: Literal["purchase"]
    provider: str
    external_id: str
    method: str
    pack: str | None
    amount_usd: str
    credits: str
    status: Literal["pending", "paid", "failed", "canceled", "expired", "refunded", "partially_refunded"]
    refunded_credits: str
    created_at: str | None
    paid_at: str | None
    receipt_url: str | None = Field(description="The payment's receipt at the provider, once paid (Stripe)")


class PurchaseList(BaseModel):
    object: Literal["list"]
    data: list[PurchaseOut]


class RegisterRequest(BaseModel):
    """``POST /v1/register``: an account from an email address, confirmed by an emailed link."""

    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320)


class Registration(BaseModel):
    object: Literal["registration"]
    email: str = Field(description="The address, normalised; the same answer whether or not it was known")
    message: str


class WebhookReceived(BaseModel):
    """What a payment webhook answers once the event is verified (``outcome`` says what it did)."""

    received: Literal[True]
    outcome: str


# -- examples ----------------------------------------------------------------------
# One example of each response model: /openapi.json attaches it to the operations that answer
# with that model, and the API reference shows it. tests/test_onboarding_pages.py validates
# each against its model and compares it with what the API really answers.

_RECEIPT = {
    "id": "req_5f0c3e9a8b7d4c2e9f1a0b3c4d5e6f70",
    "object": "receipt",
    "endpoint": "chat",
    "provider": "openai",
    "model": "openai/gpt-4o-mini",
    "status": "ok",
    "stream": False,
    "tokens": {"input": 9, "cached_input": 0, "cache_write": 0, "cache_write_1h": 0, "output": 12},
    "provider_cost_usd": "0.00000855",
    "markup": "1.8",
    "credits_charged": "0.001539",
    "charged_ucr": 1539,
    "hold_ucr": 12969,
    "flags": {"estimated": False, "capped": False},
    "error_code": None,
    "detail": None,
    "started_at": "2026-01-01T12:00:00.152366+00:00",
    "finished_at": "2026-01-01T12:00:00.964211+00:00",
}
_MODEL = {
    "id": "openai/gpt-4o-mini",
    "object": "model",
    "created": 1751587200,
    "owned_by": "openai",
    "kind": "chat",
    "max_output_tokens": 16384,
    "context_window": 128000,
    "pricing": {
        "markup": "1.8",
        "unit": "credits per 1M tokens",
        "input": "27",
        "cached_input": "13.5",
        "cache_write": "27",
        "output": "108",
    },
}
_JOB = {
    "id": "job_0123456789abcdef",
    "object": "job",
    "type": "image",
    "model": "openai/gpt-image-1",
    "status": "succeeded",
    "created_at": "2026-01-01T12:00:00+00:00",
    "started_at": "2026-01-01T12:00:01+00:00",
    "finished_at": "2026-01-01T12:00:09+00:00",
    "progress": 100,
    "hold_credits": "30.000000",
    "cost_credits": "3.096000",
    "request_id": "req_0123456789abcdef",
    "error": None,
    "media_expired": False,
    "results": [
        {
            "index": 0,
            "content_type": "image/png",
            "bytes": 482113,
            "url": "/v1/jobs/job_0123456789abcdef/content?index=0",
        }
    ],
}
_PURCHASE = {
    "id": 42,
    "object": "purchase",
    "provider": "stripe",
    "external_id": "cs_test_a1b2c3d4e5",
    "method": "card",
    "pack": "usd20",
    "amount_usd": "20.00",
    "credits": "2000.000000",
    "status": "paid",
    "refunded_credits": "0.000000",
    "created_at": "2026-01-01T12:00:00+00:00",
    "paid_at": "2026-01-01T12:01:10+00:00",
    "receipt_url": "https://pay.stripe.com/receipts/payment/CAcaFwoV",
}
EXAMPLES: dict[type[BaseModel], dict] = {
    ErrorResponse: {
        "error": {
            "type": "invalid_request_error",
            "code": "model_not_found",
            "message": "The model 'nope/model' does not exist or is not available. "
            "GET /v1/models lists the models you can use.",
            "param": "model",
        }
    },
    Balance: {
        "object": "balance",
        "available_credits": "1234.567890",
        "held_credits": "12.969000",
        "available_ucr": 1234567890,
        "held_ucr": 12969000,
        "credit_usd": "0.01",
    },
    ModelInfo: _MODEL,
    ModelList: {"object": "list", "data": [_MODEL]},
    Receipt: _RECEIPT,
    UsageList: {"object": "list", "data": [_RECEIPT], "has_more": True, "next_cursor": 1041, "prev_cursor": None},
    ChatCompletion: {
        "id": "chatcmpl-3f9c2a7e",
        "object": "chat.completion",
        "created": 1767268800,
        "model": "openai/gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I help you today?",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
            "cost_credits": 0.001539,
        },
        "request_id": "req_5f0c3e9a8b7d4c2e9f1a0b3c4d5e6f70",
    },
    AnthropicMessage: {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5-20251001",
        "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 11,
        },
    },
    MessagesTokenCount: {"input_tokens": 14},
    JobOut: _JOB,
    JobList: {"object": "list", "data": [_JOB], "has_more": False, "next_cursor": None},
    ImagesResponse: {
        "created": 1767268800,
        "data": [
            {
                "url": "https://broker.example.com/v1/media/job_7d1e9a2b4c6f8e0a1b3c5d7e/0"
                "?expires=1767272400&signature=3f1c…"
            }
        ],
        "output_format": "png",
        "size": "1024x1024",
        "quality": "medium",
    },
    CheckoutSession: {
        "id": "cs_test_a1b2c3d4e5",
        "object": "checkout.session",
        "url": "https://checkout.stripe.com/c/pay/cs_test_a1b2c3d4e5",
        "purchase_id": 42,
    },
    PurchaseList: {"object": "list", "data": [_PURCHASE]},
    Registration: {
        "object": "registration",
        "email": "you@example.com",
        "message": "Check your inbox: we emailed a link that confirms the address and shows your first API key "
        "once. If the address already has an account, the email says how to log in instead.",
    },
    WebhookReceived: {"received": True, "outcome": "granted"},
    EmbeddingList: {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 0.015797347]}],
        "model": "openai/text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8, "cost_credits": 0.000029},
    },
    ResponseObject: {
        "id": "resp_68af4030592c81938ec0a5fbab4a3e9f",
        "object": "response",
        "created_at": 1767268800,
        "status": "completed",
        "model": "openai/gpt-4o-mini",
        "output": [
            {
                "type": "message",
                "id": "msg_68af40337e8c8193b95e0ef8e2c2c4b5",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello! How can I help you today?", "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": 9,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 12,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 21,
            "cost_credits": 0.001539,
        },
    },
}
