"""UNOFFICIAL Suno adapter: a third-party reseller API of the sunoapi.org shape (Suno has no official API)."""

from __future__ import annotations

import posixpath
from urllib.parse import urlsplit

import requests

from broker.errors import InvalidRequest, UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from broker.providers import _common as c
from broker.providers import registry
from broker.providers.base import MediaFile, MusicTask

PLACEHOLDER_CALLBACK = "https://example.invalid/callback"
MAX_CLIP_BYTES = 100 * 1024 * 1024
MAX_TITLE = 80
MAX_DESCRIPTION = 500  # the vendor's limit on a description-mode prompt (413 beyond)
DEFAULT_TITLE = "Untitled"

_RUNNING = {"TEXT_SUCCESS": 33, "FIRST_SUCCESS": 66}
_FAILED = {
    "CREATE_TASK_FAILED": "the task could not be created",
    "GENERATE_AUDIO_FAILED": "audio generation failed",
    "CALLBACK_EXCEPTION": "the generation failed",
    "SENSITIVE_WORD_ERROR": "the prompt was refused by the provider's content filter",
}
_AUDIO_TYPES = {".mp3": "audio/mpeg", ".wav": "audio/wav", ".m4a": "audio/mp4", ".ogg": "audio/ogg"}


class SunoProvider:
    """Music through an UNOFFICIAL reseller of Suno generations (sunoapi.org / kie.ai shape).

    Suno publishes no developer API: the vendor behind ``base_url`` replays Suno's web
    product, so terms of service and uptime are the vendor's, not Suno's
    (PROVIDERS.md §7). The flow is submit → task id → poll ``record-info`` → usually
    two clip URLs, which expire after about two weeks and must be copied.

    Vendor codes arrive both as the HTTP status and as the body's ``code``; both are
    checked. ``429`` means the broker's vendor account is out of credits, not a rate
    limit. ``callback_url`` is sent only because some vendors require one; the broker
    polls and never listens on it.
    """

    name = "suno"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: requests.Session,
        timeout: tuple[float, float],
        callback_url: str = PLACEHOLDER_CALLBACK,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._session = session
        self._timeout = timeout
        self._callback_url = callback_url
        self._origin = _origin(self._base)

    def submit(self, model: str, prompt: str | None, lyrics: str | None, style: str | None, instrumental: bool) -> str:
        """Start a generation; with ``lyrics`` in custom mode, else from the ``prompt`` description.

        Custom mode needs a ``style`` (the vendor refuses it without one, so this raises
        ``InvalidRequest`` before any call) and a title, which is the prompt's first line
        or "Untitled". In description mode a ``style`` is folded into the prompt, since
        the vendor ignores the field there, unless that would pass the 500-character limit.
        """
        body: dict = {"instrumental": instrumental, "model": model, "callBackUrl": self._callback_url}
        if lyrics:
            if not style:
                raise InvalidRequest("a style is required with lyrics", param="style")
            body.update(customMode=True, prompt=lyrics, style=style, title=_title(prompt))
        elif prompt:
            folded = f"{prompt}\nStyle: {style}" if style else prompt
            body.update(customMode=False, prompt=folded if len(folded) <= MAX_DESCRIPTION else prompt)
        else:
            raise InvalidRequest("a prompt or lyrics is required", param="prompt")
        data = self._call("POST", "/api/v1/generate", body=body)
        task_id = c.as_dict(data.get("data")).get("taskId")
        if not isinstance(task_id, str) or not task_id:
            raise UpstreamError("suno sent no task id")
        return task_id

    def poll(self, task_id: str) -> MusicTask:
        data = c.as_dict(self._call("GET", "/api/v1/generate/record-info", params={"taskId": task_id}).get("data"))
        if not data:
            raise UpstreamError("suno sent no task record")
        status = data.get("status")
        if status == "PENDING":
            return MusicTask(task_id, "pending", progress=0)
        if status in _RUNNING:
            return MusicTask(task_id, "running", progress=_RUNNING[status])
        if status == "SUCCESS":
            clips = c.as_dict(data.get("response")).get("sunoData")
            urls = [u for u in (c.as_dict(clip).get("audioUrl") for clip in clips or []) if isinstance(u, str) and u]
            if not urls:
                return MusicTask(task_id, "failed", error="suno reported success but sent no audio")
            return MusicTask(task_id, "succeeded", progress=100, clip_urls=urls)
        if status in _FAILED:
            return MusicTask(task_id, "failed", error=self._failure(status, data))
        return MusicTask(task_id, "running")  # a status this adapter does not know yet

    def download(self, url: str) -> MediaFile:
        """Fetch one clip; the vendor key goes only to the vendor's own host, never to a CDN."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UpstreamError("suno sent a clip URL that is not http(s)")
        headers = {"Authorization": f"Bearer {self._api_key}"} if _origin(url) == self._origin else {}
        response = c.send(
            self.name,
            self._session,
            "GET",
            url,
            headers=headers,
            timeout=self._timeout,
            stream=True,
            allow_redirects=True,  # requests drops Authorization when a redirect changes host
        )
        if response.status_code >= 300:
            try:
                status = response.status_code
                if status in (408, 429, 503, 504):
                    raise c.status_error(self.name, response, self._api_key)
                raise UpstreamError(f"suno clip download failed with HTTP {status}")
            finally:
                response.close()
        declared = response.headers.get("Content-Type", "").split(";")[0].strip()
        data = c.read_body(self.name, response, MAX_CLIP_BYTES)
        if not data:
            raise UpstreamError("suno sent an empty clip")
        return MediaFile(declared if declared.startswith("audio/") else _guess_type(parts.path), data)

    def _call(self, method: str, path: str, *, body: dict | None = None, params: dict | None = None) -> dict:
        """One JSON call; a vendor failure in the HTTP status or in the body ``code`` raises."""
        response = c.send(
            self.name,
            self._session,
            method,
            self._base + path,
            headers={"Authorization": f"Bearer {self._api_key}"},
            body=body,
            params=params,
            timeout=self._timeout,
        )
        if response.status_code >= 300:
            data = c.error_body(response)
            code = data.get("code")
            code = code if isinstance(code, int) and code != 200 else response.status_code
            raise self._vendor_error(code, data, response)
        data = c.read_json(self.name, response)
        code = data.get("code")
        if code != 200:
            raise self._vendor_error(code if isinstance(code, int) else 0, data, response)
        return data

    def _vendor_error(self, code: int, data: dict, response: requests.Response) -> UpstreamError:
        """Map a sunoapi.org vendor code (PROVIDERS.md §7) to the broker's errors."""
        retry_after = response.headers.get("Retry-After")
        headers = {"Retry-After": retry_after} if retry_after else None
        if code in (401, 403):
            return UpstreamError(c.CREDENTIALS_MESSAGE)
        if code in (402, 429):
            return UpstreamError("suno refused the broker's vendor account (out of credits)")
        if code in (405, 430):
            return UpstreamUnavailable("suno is rate limiting; retry later", headers=headers)
        if code == 455:
            return UpstreamUnavailable("suno is under maintenance; retry later", headers=headers)
        if code in (503, 529):
            return UpstreamUnavailable("suno is overloaded; retry later", headers=headers)
        if code in (408, 504):
            return UpstreamTimeout("suno timed out")
        if code == 404:
            return UpstreamError("suno answered 404 (unknown task or endpoint)")
        if code == 413:
            return UpstreamRejected("suno rejected the request: prompt too long", param="prompt")
        if 400 <= code < 500:
            message = data.get("msg") if isinstance(data.get("msg"), str) else f"code {code}"
            return UpstreamRejected(f"suno rejected the request: {c.clip_message(message, self._api_key)}")
        if code == 0:
            return UpstreamError("suno sent a response without a status code")
        return UpstreamError(f"suno failed with code {code}")

    def _failure(self, status: str, data: dict) -> str:
        message = data.get("errorMessage") or c.as_dict(data.get("response")).get("errorMessage")
        text = f"{_FAILED[status]} ({status})"
        if isinstance(message, str) and message:
            text += f": {message}"
        return c.clip_message(text, self._api_key)


def _title(prompt: str | None) -> str:
    lines = (prompt or "").strip().splitlines()
    return lines[0].strip()[:MAX_TITLE] if lines else DEFAULT_TITLE


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port made explicit, for the same-host check."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    except ValueError:  # a port out of range never matches
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port


def _guess_type(path: str) -> str:
    return _AUDIO_TYPES.get(posixpath.splitext(path)[1].lower(), "audio/mpeg")


ADAPTERS = (
    registry.Adapter(
        "music",
        "suno",
        registry.standard(SunoProvider, "SUNO_BASE_URL", "SUNO_API_KEY"),
        "SUNO_API_KEY",
        # An unofficial third-party Suno-style API (sunoapi.org shape).
        {"SUNO_BASE_URL": "https://api.sunoapi.org"},
        # Its 429 means "out of credits", and RQ retries the job anyway: no transport retries.
        transport_retries=False,
    ),
)
