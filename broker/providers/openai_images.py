"""OpenAI Images adapter (GPT image models): base64 images back, token usage by price class."""

from __future__ import annotations

import base64
import binascii

import requests

from broker.errors import UpstreamError, UpstreamRejected
from broker.providers import _common as c
from broker.providers import registry
from broker.providers.base import MAX_COUNT, ImageResult, ImageUsage, MediaFile, count_of, net_count
from broker.providers.openai import OPENAI_SETTINGS

_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
# ``moderation_blocked`` for GPT image models; DALL·E used ``content_policy_violation``.
_POLICY_CODES = ("moderation_blocked", "content_policy_violation")
POLICY_CODE = "content_policy_violation"


class OpenAIImagesProvider:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._url = base_url.rstrip("/") + "/images/generations"
        self._api_key = api_key
        self._session = session
        self._timeout = timeout

    def generate(
        self, model: str, prompt: str, size: str, quality: str, n: int, output_format: str = "png"
    ) -> ImageResult:
        """Generate ``n`` images; every one must come back as ``b64_json`` or the call fails.

        ``model`` is always sent: without it OpenAI falls back to ``dall-e-2``. ``output_format``
        (png, jpeg, webp) is sent when it is not OpenAI's default, png.
        """
        body: dict = {"model": model, "prompt": prompt, "n": n, "size": size, "quality": quality}
        if output_format != "png":
            body["output_format"] = output_format
        response = c.send(
            self.name,
            self._session,
            "POST",
            self._url,
            headers={"Authorization": f"Bearer {self._api_key}"},
            body=body,
            timeout=self._timeout,
        )
        if response.status_code >= 300:
            raise self._error(response)
        data = c.read_json(self.name, response)
        content_type = _FORMATS.get(str(data.get("output_format") or "png").lower(), "image/png")
        items = data.get("data")
        if not isinstance(items, list) or not items:
            raise UpstreamError("openai returned no images")
        images = [MediaFile(content_type, _decode(item)) for item in items]
        usage = data.get("usage")
        return ImageResult(images=images, usage=usage_from(usage) if isinstance(usage, dict) else None)

    def _error(self, response: requests.Response) -> UpstreamError:
        """A safety-system refusal keeps its own code so callers can tell it from a bad parameter."""
        error = c.as_dict(c.error_body(response).get("error"))
        if 400 <= response.status_code < 500 and error.get("code") in _POLICY_CODES:
            message = error.get("message") if isinstance(error.get("message"), str) else "content policy"
            return UpstreamRejected(
                f"openai refused the prompt: {c.clip_message(message, self._api_key)}",
                code=POLICY_CODE,
            )
        return c.status_error(self.name, response, self._api_key)


def usage_from(usage: dict) -> ImageUsage | None:
    """Input split by ``input_tokens_details``; output by ``output_tokens_details`` when sent.

    Without output details every output token is an image token (gpt-image-1). None (the job is
    priced at its bound, flagged estimated) when a count is invalid (``base.count_of``); a huge
    count is cut below ``MAX_COUNT`` (the job's cost is cut to its bound by ``broker.media``).
    """
    inputs = c.as_dict(usage.get("input_tokens_details"))
    image_in = count_of(inputs.get("image_tokens"))
    text_in = count_of(inputs.get("text_tokens")) if "text_tokens" in inputs else None
    if text_in is None:
        text_in = net_count(count_of(usage.get("input_tokens")), image_in)
    output = count_of(usage.get("output_tokens"))
    outputs = c.as_dict(usage.get("output_tokens_details"))
    has_image, has_text = "image_tokens" in outputs, "text_tokens" in outputs
    if has_image or has_text:
        image_out = count_of(outputs.get("image_tokens")) if has_image else None
        text_out = count_of(outputs.get("text_tokens")) if has_text else None
        if image_out is None:
            image_out = net_count(output, text_out or 0)
        if text_out is None:
            text_out = net_count(output, image_out)
    else:
        image_out, text_out = output, 0
    counts = (text_in, image_in, image_out, text_out)
    if min(counts) < 0:
        return None
    return ImageUsage(*(min(count, MAX_COUNT - 1) for count in counts))


def _decode(item: object) -> bytes:
    b64 = c.as_dict(item).get("b64_json")
    if not isinstance(b64, str) or not b64:
        raise UpstreamError("openai returned an image without b64_json data")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UpstreamError("openai returned malformed image data") from None


ADAPTERS = (
    registry.Adapter(
        "images",
        "openai",
        registry.standard(OpenAIImagesProvider, "OPENAI_BASE_URL", "OPENAI_API_KEY"),
        "OPENAI_API_KEY",
        OPENAI_SETTINGS,
    ),
)
