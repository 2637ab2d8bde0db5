"""Abuse filters before any provider is paid: a configurable blocklist, and optional OpenAI moderation.

A flagged request gets ``400 content_policy_violation``, is not charged (nothing was
held yet) and is logged without its text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import requests

from broker.errors import InvalidRequest, UpstreamUnavailable

log = logging.getLogger(__name__)

Check = Callable[[str, str], None]  # (text, what) -> None, or raises


def _violation(what: str, reason: str) -> InvalidRequest:
    log.warning("request refused by content policy", extra={"what": what, "reason": reason})
    return InvalidRequest(
        "This request was refused by the content policy.", param=what, code="content_policy_violation"
    )


def blocklist(terms: list[str]) -> Check:
    """Refuse text containing any term (case-insensitive, whole words)."""
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.I) if terms else None

    def check(text: str, what: str) -> None:
        if pattern is not None and pattern.search(text):
            raise _violation(what, "blocklist")

    return check


def openai_moderation(base_url: str, api_key: str, session: requests.Session, timeout: tuple[float, float]) -> Check:
    """Ask OpenAI's free ``/v1/moderations`` endpoint; a flagged input is refused."""

    def check(text: str, what: str) -> None:
        try:
            response = session.post(
                f"{base_url.rstrip('/')}/moderations",
                json={"model": "omni-moderation-latest", "input": text[:32_000]},
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=timeout,
            )
            response.raise_for_status()
            results = response.json()["results"]
        except (requests.RequestException, KeyError, ValueError):
            raise UpstreamUnavailable("The moderation check is unavailable; nothing was charged.") from None
        if any(result.get("flagged") for result in results):
            raise _violation(what, "moderation")

    return check


def combine(checks: list[Check]) -> Check:
    def check(text: str, what: str) -> None:
        if text:
            for one in checks:
                one(text, what)

    return check
