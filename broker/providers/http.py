"""Pooled HTTP sessions for upstream calls, retrying only before the first byte."""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

RETRY_STATUSES = (429, 500, 502, 503, 504, 529)


class UpstreamRetry(Retry):
    """urllib3 retry that honours Retry-After but never sleeps longer than a cap."""

    max_retry_after: float = 2.0

    def get_retry_after(self, response):  # type: ignore[override]
        seconds = super().get_retry_after(response)
        if seconds is None:
            return None
        return min(seconds, self.max_retry_after)


def make_session(retries: int = 2, pool_size: int = 256) -> requests.Session:
    """A ``requests.Session`` with a connection pool sized for concurrent calls (a gevent
    worker holds up to 250 at once).

    Retries cover connect errors and 429/5xx answers (which arrive before any body
    byte); a read error after the request was sent is never retried (``read=False``
    also lets the original ReadTimeout through), so a
    provider is never asked twice for a generation it may already have billed.
    """
    retry = UpstreamRetry(
        total=retries,
        connect=retries,
        read=False,
        status=retries,
        other=0,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,
        backoff_factor=0.1,
        backoff_max=2.0,
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=retry)
    session = requests.Session()
    # Proxies and CA bundles are not read from the environment on every call (~0.2 ms each);
    # set them on the session here if a deployment needs them.
    session.trust_env = False
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
