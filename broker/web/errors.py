"""Error pages for people: 404, 405, 429, 500 (and any other HTTP error) in the site's layout.

The app-level HTTP error handler lives with the API (``broker.api.errors``) and answers ``/v1``
with its JSON envelope. For every other path it calls the function stored under
``HTML_ERROR_HOOK`` in ``app.extensions``, which is ``render_error`` below: so the API never
imports the web layer, nor the web layer the API.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, make_response, render_template, request
from flask_login import current_user
from flask_wtf.csrf import CSRFError
from jinja2 import TemplateNotFound
from werkzeug.exceptions import HTTPException

from broker.extensions import login_manager

log = logging.getLogger(__name__)

# The key both layers agree on (a string, so neither imports the other).
HTML_ERROR_HOOK = "broker.html_error"

TITLES = {
    404: "Page not found",
    405: "Method not allowed",
    429: "Too many requests",
    500: "Something went wrong",
}


def render_error(error: HTTPException) -> Response | HTTPException:
    """The error as a page of the site, with the error's own headers (Allow, Retry-After …)."""
    if isinstance(error, CSRFError) and request.headers.get("HX-Request") and not current_user.is_authenticated:
        # A tab left open after logging out (the session, and its CSRF token, are gone): to log-in,
        # as for any other HTMX request without a session, not a 400 that htmx would drop.
        return login_manager.unauthorized()
    code = error.code or 500
    headers = [(name, value) for name, value in error.get_headers() if name.lower() != "content-type"]
    context = {
        "code": code,
        "title": TITLES.get(code, error.name),
        "description": error.description,
        "retry_after": dict(headers).get("Retry-After"),
    }
    try:
        try:
            body = render_template(f"errors/{code}.html", **context)
        except TemplateNotFound:
            body = render_template("errors/error.html", **context)
    except Exception:
        # The page itself failed (say the database is down behind current_user): the bare error is still an answer.
        log.exception("error page failed to render", extra={"status": code})
        return error
    response = make_response(body, code)
    for name, value in headers:
        response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    app.extensions[HTML_ERROR_HOOK] = render_error
