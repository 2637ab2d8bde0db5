"""Which Host a request may name, and the public base URL every link the app builds starts with.

With ``TRUSTED_HOSTS`` set (always in production: from the setting or ``PUBLIC_URL``), Flask
answers any other Host with a 400 before a view runs, so no link the app builds (the Stripe
return URL, the docs' examples) can point at a host a client chose. Two callers rightly name a
host that is not ours: health probes (``Host: <pod IP>``) and RapidAPI's proxy (its gateway's
host). ``AdmitInfrastructure`` gives those requests our own host before Flask checks it. Both
``broker.web`` and ``broker.api`` build their links with ``public_base_url`` from here.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from flask import current_app, request, url_for

# Probes and scrapers name the pod's address; none of these views builds a link.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
PROXY_SECRET = "HTTP_X_RAPIDAPI_PROXY_SECRET"  # X-RapidAPI-Proxy-Secret, as WSGI names it


def public_base_url() -> str:
    """``PUBLIC_URL``, else the request's scheme and host (in production a host in ``TRUSTED_HOSTS``)."""
    return current_app.config["PUBLIC_URL"].rstrip("/") or request.host_url.rstrip("/")


def return_url() -> str:
    """Where Stripe sends a buyer back to after Checkout."""
    return public_base_url() + url_for("dashboard.checkout_return")


def canonical_host(public_url: str, trusted: list[str]) -> str:
    """The host admitted requests are given: PUBLIC_URL's, else the first trusted name."""
    return urlsplit(public_url).netloc if public_url else trusted[0].lstrip(".")


class AdmitInfrastructure:
    """WSGI middleware: health probes and RapidAPI's proxy are served under our own host, not theirs.

    It runs inside ``ProxyFix``, so it sees the Host that ``PROXY_HOPS`` allows to be forwarded.
    A marketplace request counts only with the right ``X-RapidAPI-Proxy-Secret``.
    """

    def __init__(self, wsgi_app: Callable, host: str, marketplace_secret: str) -> None:
        self.wsgi_app = wsgi_app
        self.host = host
        self.secret = marketplace_secret.encode()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in PROBE_PATHS or self._from_marketplace(environ):
            environ["HTTP_HOST"] = self.host
        return self.wsgi_app(environ, start_response)

    def _from_marketplace(self, environ: dict) -> bool:
        given = environ.get(PROXY_SECRET)
        # WSGI header values are latin-1 strings: encoding back gives the bytes that were sent.
        return bool(self.secret and given) and hmac.compare_digest(given.encode("latin-1", "replace"), self.secret)
