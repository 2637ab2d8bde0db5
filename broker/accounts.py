"""Accounts: creation and lookup by email (passwords hashed with werkzeug's scrypt)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import generate_password_hash

from broker.errors import Conflict, NotFound, ValidationFailed
from broker.models import Account


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    local, at, domain = email.partition("@")
    if not at or not local or "." not in domain or len(email) > 320 or " " in email:
        raise ValidationFailed("Enter a valid email address.", param="email")
    return email


def create_account(session: Session, email: str, password: str | None = None, source: str = "cli") -> Account:
    email = normalise_email(email)
    if session.scalar(select(Account).where(Account.email == email)):
        raise Conflict(f"An account for {email} already exists.", param="email")
    account = Account(
        email=email,
        password_hash=generate_password_hash(password) if password else None,
        source=source,
    )
    session.add(account)
    session.commit()
    return account


def get_by_email(session: Session, email: str) -> Account:
    account = session.scalar(select(Account).where(Account.email == normalise_email(email)))
    if account is None:
        raise NotFound(f"No account for {email}.", param="email")
    return account
