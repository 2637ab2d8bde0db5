"""The account emails (confirm an address, set a password), shared by the web pages and ``/v1/register``.

Each is rendered from ``templates/mail/`` with absolute links. A mail failure is logged
(never the body: it holds a link) and does not change the caller's answer, which must not
tell whether an address has an account.
"""

from __future__ import annotations

import logging

from flask import current_app, render_template, url_for

from broker import accounts, hosts, tokens
from broker.extensions import services
from broker.models import Account

log = logging.getLogger(__name__)


def _link(endpoint: str, **values) -> str:
    # PUBLIC_URL (or a trusted host), never the Host a client sent: a link to the sender's
    # own host would hand them the token (password-reset poisoning).
    return hosts.public_base_url() + url_for(endpoint, **values)


def send(to: str, template: str, subject: str, **context) -> None:
    text = render_template(f"mail/{template}.txt", email=to, **context)
    try:
        services().mailer.send(to, subject, text)
    except Exception as error:  # noqa: BLE001 - the answer must not tell whether mail went out
        log.error("mail not sent", extra={"template": template, "error": type(error).__name__})


def send_verification(account: Account) -> None:
    """The link that confirms the address (and, for a ``/v1/register`` account, shows its first key)."""
    token = tokens.make(current_app.config["SECRET_KEY"], tokens.VERIFY, account)
    template, subject = (
        ("register", "Your API key is one click away")
        if account.source == "register"
        else (
            "verify",
            "Confirm your email address",
        )
    )
    send(account.email, template, subject, link=_link("auth.verify", token=token))


def send_already_registered(email: str) -> None:
    send(
        email,
        "already_registered",
        "You already have an account",
        login=_link("auth.login"),
        reset=_link("auth.forgot_password"),
    )


def send_password_link(email: str) -> None:
    """A set-password link to a known address; to an unknown one, a note that it has no account."""
    account = accounts.find_by_email(services().db(), email)
    if account is None:
        send(email, "no_account", "Password request", signup=_link("auth.signup"))
        return
    token = tokens.make(current_app.config["SECRET_KEY"], tokens.PASSWORD, account)
    send(account.email, "password", "Set your password", link=_link("auth.reset_password", token=token))
