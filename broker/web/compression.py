"""Compressed pages, static files and ``/openapi.json`` (Flask-Compress); never the API's answers.

Not compressed: ``/v1`` (the hot path: its answers are small JSON or streams, and the time
is better spent elsewhere) and ``/webhooks``; event streams (each event must leave at
once); and any answer marked ``Cache-Control: no-store`` — the dashboard, log-in and the
pages that show a new key — because compressing a secret beside text an attacker can
reflect leaks it through the compressed length (BREACH).
"""

from __future__ import annotations

from flask import Flask, Response, request
from flask_compress import Compress

SKIPPED_PATHS = ("/v1/", "/webhooks/")


def compressible(response: Response) -> bool:
    """Whether this answer may be compressed (Flask-Compress then decides by type, size and Accept-Encoding)."""
    path = request.path
    if path == "/v1" or path.startswith(SKIPPED_PATHS):
        return False
    if response.mimetype == "text/event-stream":
        return False
    return "no-store" not in (response.headers.get("Cache-Control") or "")


def init_app(app: Flask) -> None:
    """Register the compressing ``after_request``; call it first, so that it runs after every other one."""
    # Our own hook decides what may be compressed; Flask-Compress does the compressing.
    app.config.setdefault("COMPRESS_REGISTER", False)
    # Static files are sent as streams: allow gzip for them too (Flask-Compress leaves it out by default).
    app.config.setdefault("COMPRESS_ALGORITHM_STREAMING", ["zstd", "br", "gzip", "deflate"])
    compress = Compress(app)

    @app.after_request
    def _compress(response: Response) -> Response:
        return compress.after_request(response) if compressible(response) else response
