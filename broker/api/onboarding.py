"""Self-serve registration, ``POST /v1/register``: the one /v1 route that takes no API key.

It always answers ``202`` the same way, so it tells nobody whether an address has an
account. A new address gets an email with a single-use link that confirms it and shows
the first API key once, on the page (a key never travels in an email); a known address
gets a note to log in or set a password.
"""

from __future__ import annotations

import hashlib

from flask import Blueprint, current_app, jsonify, request

from broker import account_mail, accounts
from broker.api import parse
from broker.api.openapi import operation
from broker.errors import Conflict
from broker.extensions import limiter, services
from broker.schemas import RegisterRequest, Registration

bp = Blueprint("onboarding", __name__, url_prefix="/v1")

REGISTERED = (
    "Check your inbox: we emailed a link that confirms the address and shows your first API key once. "
    "If the address already has an account, the email says how to log in instead."
)


def _email_key() -> str:
    body = request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    return "register:" + hashlib.sha256(str(email).strip().lower().encode()).hexdigest()[:32]


@bp.post("/register")
@limiter.limit(lambda: current_app.config["REGISTER_RATE_LIMIT"])
@limiter.limit("3/hour", key_func=_email_key)
@operation(
    summary="Register: an account, confirmed by email, and its first API key",
    description="Always `202`, whether or not the address is known. The email holds a single-use link "
    "(valid 48 h) that confirms the address, grants any trial credits and shows the first API key once. "
    "Limited per IP address and per email address.",
    tag="Account",
    body=RegisterRequest,
    response=Registration,
    status=202,
    errors=("400", "422", "429", "503"),
    auth=False,
)
def register():
    req = parse(RegisterRequest)
    email = accounts.normalise_email(req.email)
    try:
        account = accounts.create_account(services().db(), email, source="register", verified=False)
    except Conflict:
        account_mail.send_already_registered(email)
    else:
        account_mail.send_verification(account)
    response = jsonify({"object": "registration", "email": email, "message": REGISTERED})
    response.status_code = 202
    response.headers["Cache-Control"] = "no-store"
    return response
