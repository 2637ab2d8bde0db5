"""Self-serve registration, ``POST /v1/register``: the one /v1 route that takes no API key."""

from __future__ import annotations

import uuid

from flask import Blueprint, current_app, jsonify

from broker import accounts, keys, pricing
from broker.api import parse
from broker.api.openapi import operation
from broker.errors import Conflict
from broker.extensions import limiter, services
from broker.schemas import RegisterRequest, Registration

bp = Blueprint("onboarding", __name__, url_prefix="/v1")


@bp.post("/register")
@limiter.limit(lambda: current_app.config["REGISTER_RATE_LIMIT"])
@operation(
    summary="Register: an account and its first API key",
    description="The key is returned once. An email that is already registered gets the same answer without a "
    "key (log in to the dashboard to make keys). Limited per IP address.",
    tag="Account",
    body=RegisterRequest,
    response=Registration,
    status=201,
    errors=("400", "422", "429", "503"),
    auth=False,
)
def register():
    svc = services()
    req = parse(RegisterRequest)
    session = svc.db()
    trial = pricing.credits_to_ucr(current_app.config["TRIAL_CREDITS"])
    email = accounts.normalise_email(req.email)
    try:
        account = accounts.create_account(session, email, source="register")
    except Conflict:
        return _answer(email, None, trial)
    _, plain = keys.create_key(session, account, "registered", source="register")
    if trial:
        svc.ledger.grant(session, account.id, trial, f"trial-{uuid.uuid4().hex}", "trial credits")
    return _answer(email, plain, trial)


def _answer(email: str, key: str | None, trial: int):
    message = (
        "Your account is ready. Keep this key secret: it is shown only now."
        if key
        else "This email is already registered. Log in to the dashboard to create API keys."
    )
    response = jsonify(
        {
            "object": "registration",
            "email": email,
            "api_key": key,
            "trial_credits": pricing.format_credits(trial if key else 0),
            "message": message,
        }
    )
    response.status_code = 201
    response.headers["Cache-Control"] = "no-store"
    return response
