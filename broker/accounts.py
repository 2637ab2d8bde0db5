"""Accounts: the one email validator, creation, lookup, verification and password changes.

Passwords are hashed with werkzeug's scrypt. An account without a password (made by
``/v1/register``, the CLI without ``--password``, the marketplace or the dev demo) can
never be logged into with any password: its owner sets one through an emailed link.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from confusable_homoglyphs import categories
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import generate_password_hash

from broker.errors import Conflict, NotFound, ValidationFailed
from broker.models import Account

# The marketplace's synthetic users live here; nobody may register an address in it.
MARKETPLACE_DOMAIN = "users.rapidapi.invalid"
# Characters that have no business in an address we show in HTML pages and emails.
UNSAFE = set("<>\"'`&\\()[]{};,")


def _mixed_script(part: str) -> bool:
    """True when one label mixes scripts (Latin 'paypal' with a Cyrillic 'а'): a look-alike."""
    return len(categories.unique_aliases(part) - {"COMMON", "INHERITED"}) > 1


def normalise_email(email: str) -> str:
    """The canonical form of an address, or ``ValidationFailed``.

    Shared by web sign-up, ``/v1/register`` and ``create-user``: refuses HTML and other
    unsafe characters, control and invisible characters, mixed-script look-alikes in any
    label, special-use domains (``.invalid``, ``.test``, ``.local`` …) and the marketplace's
    reserved domain.
    """
    email = (email or "").strip()
    invalid = ValidationFailed("Enter a valid email address.", param="email")
    if not email or len(email) > 320 or any(c in UNSAFE for c in email):
        raise invalid
    if any(unicodedata.category(c)[0] in "CZ" for c in email):  # control, format, separators
        raise invalid
    try:
        checked = validate_email(email, check_deliverability=False, allow_quoted_local=False)
    except EmailNotValidError:
        raise invalid from None
    local, domain = checked.local_part.lower(), checked.domain.lower()
    labels = [local, *domain.split(".")]
    if any(_mixed_script(label) for label in labels) or domain == MARKETPLACE_DOMAIN:
        raise invalid
    return f"{local}@{domain}"


def create_account(
    session: Session, email: str, password: str | None = None, source: str = "cli", verified: bool = True
) -> Account:
    """Create and commit an account; ``verified=False`` for self-service sign-ups until their link is used."""
    email = normalise_email(email)
    if session.scalar(select(Account).where(Account.email == email)):
        raise Conflict(f"An account for {email} already exists.", param="email")
    account = Account(
        email=email,
        password_hash=generate_password_hash(password) if password else None,
        source=source,
        email_verified_at=datetime.now(UTC) if verified else None,
    )
    session.add(account)
    session.commit()
    return account


def find_by_email(session: Session, email: str) -> Account | None:
    """The account of a well-formed address, or None (for anything unknown or malformed)."""
    try:
        normal = normalise_email(email)
    except ValidationFailed:
        return None
    return session.scalar(select(Account).where(Account.email == normal))


def get_by_email(session: Session, email: str) -> Account:
    account = find_by_email(session, email)
    if account is None:
        raise NotFound(f"No account for {email}.", param="email")
    return account


def set_password(session: Session, account: Account, password: str) -> None:
    """Set a new password and end every web session of the account (and every emailed link)."""
    account.password_hash = generate_password_hash(password)
    account.session_generation += 1
    if account.email_verified_at is None:
        account.email_verified_at = datetime.now(UTC)  # only the owner of the address got the link
    session.commit()


def end_sessions(session: Session, account: Account) -> None:
    """Log out everywhere: every session cookie issued so far stops working at once."""
    account.session_generation += 1
    session.commit()


def mark_verified(session: Session, account: Account) -> bool:
    """Mark the email verified; True only the first time (the caller grants trial credits then)."""
    if account.email_verified_at is not None:
        return False
    account.email_verified_at = datetime.now(UTC)
    session.commit()
    return True
