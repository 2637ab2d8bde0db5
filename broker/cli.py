"""Operator commands: ``flask --app app broker ...`` (names and outputs are a stable interface)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from decimal import Decimal, InvalidOperation

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import or_, select
from werkzeug.serving import run_simple

from broker import accounts, billing, keys, migrations, pricing
from broker.errors import BrokerError
from broker.extensions import services
from broker.models import Account, ApiKey

broker_cli = AppGroup("broker", help="Operate the broker: accounts, keys, credits, ledger.")


def _fail(error: BrokerError) -> None:
    raise click.ClickException(error.message)


@broker_cli.command("create-user")
@click.argument("email")
@click.option("--password", default=None, help="Password for dashboard log-in (optional).")
def create_user(email: str, password: str | None) -> None:
    """Create an account."""
    try:
        account = accounts.create_account(services().db(), email, password)
    except BrokerError as error:
        _fail(error)
    click.echo(f"created account {account.id} for {account.email}")
    if password is None:
        click.echo("it has no password: its owner sets one with the emailed link from /password/forgot")


@broker_cli.command("create-key")
@click.argument("email")
@click.option("--name", default="", help="A name to tell the key apart.")
def create_key(email: str, name: str) -> None:
    """Create an API key; prints only the key (shown this once)."""
    session = services().db()
    try:
        account = accounts.get_by_email(session, email)
        _, plain = keys.create_key(session, account, name, max_active=current_app.config["MAX_KEYS_PER_ACCOUNT"])
    except BrokerError as error:
        _fail(error)
    click.echo(plain)


@broker_cli.command("grant")
@click.argument("email")
@click.argument("credits")
@click.option("--reason", default="operator grant", help="Why; stored in the ledger.")
def grant(email: str, credits: str, reason: str) -> None:
    """Add CREDITS (decimal allowed, up to 6 places) to an account."""
    try:
        amount = pricing.credits_to_ucr(Decimal(credits))
    except (InvalidOperation, ValueError):
        raise click.BadParameter("CREDITS must be a positive decimal with at most 6 places") from None
    if amount <= 0:
        raise click.BadParameter("CREDITS must be positive")
    svc = services()
    session = svc.db()
    try:
        account = accounts.get_by_email(session, email)
    except BrokerError as error:
        _fail(error)
    balance = svc.ledger.grant(session, account.id, amount, f"cli-{uuid.uuid4().hex}", reason)
    granted, now = pricing.format_credits(amount), pricing.format_credits(balance)
    click.echo(f"granted {granted} credits to {account.email}; balance {now}")


@broker_cli.command("balance")
@click.argument("email")
def balance(email: str) -> None:
    """Print the available balance in credits."""
    try:
        account = accounts.get_by_email(services().db(), email)
    except BrokerError as error:
        _fail(error)
    click.echo(pricing.format_credits(services().ledger.balance(account.id)))


@broker_cli.command("reconcile")
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild Redis balances and holds from the SQL ledger.",
)
def reconcile(repair: bool) -> None:
    """Check the ledger invariant for every account; exit 1 if any mismatch remains.

    ``--repair`` rewrites balances and holds from SQL, which is only safe on a quiet system: a
    request in flight would have its settle dropped. So it refuses while Redis holds a live
    (unexpired) hold, and the README says to stop the web and worker processes first.
    """
    svc = services()
    if repair:
        live = svc.ledger.live_holds()
        if live:
            raise click.ClickException(
                f"{live} requests or jobs are in flight (live holds): stop the web and worker processes, "
                "or wait for them to finish, then repair. Without --repair, reconcile only checks."
            )
    mismatches = svc.ledger.reconcile(svc.db(), repair=repair)
    for mismatch in mismatches:
        click.echo(str(mismatch))
    if mismatches:
        sys.exit(1)
    click.echo("ledger consistent")


@broker_cli.command("migrate")
def migrate() -> None:
    """Apply the database migrations (Alembic upgrade to head)."""
    migrations.upgrade(current_app.config["DATABASE_URL"])
    click.echo("database at head")


@broker_cli.command("drain")
def drain() -> None:
    """Copy pending ledger entries from Redis into SQL now."""
    svc = services()
    click.echo(f"copied {svc.ledger.drain(svc.db())} entries")


@broker_cli.command("reap")
def reap() -> None:
    """Release holds past their deadline now."""
    for account_id, hold_id, amount in services().ledger.reap_expired():
        click.echo(f"released expired hold {hold_id} of account {account_id}: {pricing.format_credits(amount)} credits")


DEMO_EMAIL = "demo@example.com"


@broker_cli.command("dev")
@click.option("--host", default="127.0.0.1")
@click.option("--port", default=5000, type=int)
def dev(host: str, port: int) -> None:
    """Development: run web + worker on the embedded defaults and print a demo API key."""
    app = current_app._get_current_object()
    if app.config["BROKER_ENV"] != "development":
        raise click.ClickException("broker dev runs only with BROKER_ENV=development")
    svc = services()
    session = svc.db()
    try:
        account = accounts.get_by_email(session, DEMO_EMAIL)
    except BrokerError:
        account = accounts.create_account(session, DEMO_EMAIL, source="demo")
    demo_ucr = pricing.credits_to_ucr(app.config["DEMO_CREDITS"])
    if svc.ledger.balance(account.id) < demo_ucr // 2:
        svc.ledger.grant(
            session,
            account.id,
            demo_ucr,
            f"demo-{uuid.uuid4().hex}",
            "dev demo credits",
        )
    _, plain = keys.create_key(session, account, "dev demo key", source="dev")
    env = dict(os.environ, REDIS_URL=svc.redis_url)
    worker = subprocess.Popen([sys.executable, "worker.py"], env=env, cwd=str(_root()))
    click.echo(
        f"\n  AI API Broker (development) on http://{host}:{port}/\n"
        f"  providers: {', '.join(sorted(svc.providers))}\n"
        f"  demo API key ({pricing.format_credits(svc.ledger.balance(account.id))} credits, dev only):\n\n"
        f"    {plain}\n\n"
        f"  try: curl http://{host}:{port}/v1/chat/completions -H 'Authorization: Bearer {plain}' "
        "-H 'Content-Type: application/json' "
        '-d \'{"model": "demo/chat", "messages": [{"role": "user", "content": "Hello"}]}\'\n'
    )
    # However it is stopped (Ctrl-C or SIGTERM), stop what it started: the worker here, the
    # embedded Redis-compatible server at exit. SIGTERM's default would skip both.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        run_simple(host, port, app, threaded=True, use_reloader=False)
    finally:
        worker.terminate()
        worker.wait(10)


def _root():
    from broker import ROOT

    return ROOT


@broker_cli.command("purchases")
@click.argument("email")
def purchases(email: str) -> None:
    """Print an account's purchases, newest first."""
    session = services().db()
    try:
        account = accounts.get_by_email(session, email)
    except BrokerError as error:
        _fail(error)
    rows = billing.purchases_of(session, account.id)
    for p in rows:
        click.echo(
            f"{p.id}\t{p.created_at:%Y-%m-%d %H:%M}\t{p.provider}\t{p.external_id}\t"
            f"${Decimal(p.amount_cents) / 100}\t{pricing.format_credits(p.credits_ucr)} credits\t{p.status}"
        )
    if not rows:
        click.echo("no purchases")


@broker_cli.command("refund")
@click.argument("purchase_id", type=int)
def refund(purchase_id: int) -> None:
    """Mark a purchase refunded and take back its credits (never below zero), as the refund webhook does."""
    svc = services()
    session = svc.db()
    try:
        purchase = billing.get_purchase(session, purchase_id)
    except BrokerError as error:
        _fail(error)
    if purchase.status not in ("paid", "partially_refunded"):
        raise click.ClickException(f"purchase {purchase_id} is {purchase.status}; only paid purchases can be refunded")
    taken = billing.take_back(
        session, svc.ledger, purchase, purchase.amount_cents, f"operator-refund-{purchase.id}-{purchase.amount_cents}"
    )
    click.echo(
        f"purchase {purchase.id} refunded; took back {pricing.format_credits(taken)} credits"
        + (f", {pricing.format_credits(purchase.shortfall_ucr)} already spent" if purchase.shortfall_ucr else "")
    )


@broker_cli.command("limit-key")
@click.argument("key_id", type=int)
@click.option(
    "--per-minute", type=click.IntRange(min=1), default=None, help="Requests a minute (default: RATE_LIMIT_PER_MINUTE)."
)
@click.option(
    "--per-day", type=click.IntRange(min=1), default=None, help="Requests a day (default: RATE_LIMIT_PER_DAY)."
)
@click.option(
    "--credits-per-day",
    default=None,
    help=f"Credits a day, up to {pricing.MAX_SPEND_CAP_CREDITS:,} (default: SPEND_LIMIT_CREDITS_PER_DAY).",
)
def limit_key(key_id: int, per_minute: int | None, per_day: int | None, credits_per_day: str | None) -> None:
    """Override one API key's limits; options left out go back to the server defaults."""
    try:
        cap = pricing.spend_cap_ucr(credits_per_day) if credits_per_day is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--credits-per-day") from None
    svc = services()
    try:
        keys.set_limits(svc.db(), svc.redis, key_id, per_minute, per_day, cap)
    except BrokerError as error:
        _fail(error)
    shown = [per_minute or "default", per_day or "default", credits_per_day or "default"]
    click.echo(f"key {key_id}: {shown[0]}/minute, {shown[1]}/day, spend cap {shown[2]} credits/day")


@broker_cli.command("review-keys")
@click.option("--revoke", is_flag=True, help="Revoke every key listed.")
def review_keys(revoke: bool) -> None:
    """List the keys that may have been made by someone who logged into a passwordless account.

    Before the account-security release anyone could log into an account without a password
    (``/v1/register``, ``create-user`` without ``--password``, the dev demo). Listed: the
    unrevoked keys of such accounts that were made in a web session, or before key sources
    were recorded. Review them with their owners; ``--revoke`` (or ``revoke-key ID``) ends them.
    """
    svc = services()
    session = svc.db()
    rows = session.execute(
        select(ApiKey, Account)
        .join(Account, Account.id == ApiKey.account_id)
        .where(
            Account.legacy_passwordless.is_(True),
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.source.is_(None), ApiKey.source == "web"),
        )
        .order_by(ApiKey.id)
    ).all()
    for key, account in rows:
        last_used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never used"
        click.echo(
            f"{key.id}\t{account.email}\t{key.prefix}…\t{key.name or '-'}\t"
            f"made {key.created_at:%Y-%m-%d %H:%M} ({key.source or 'source unknown'})\t{last_used}"
        )
        if revoke:
            keys.revoke_key(session, svc.redis, account.id, key.id)
    if not rows:
        click.echo("no keys to review")
    elif revoke:
        click.echo(f"revoked {len(rows)} keys")


@broker_cli.command("revoke-key")
@click.argument("key_id", type=int)
def revoke_key(key_id: int) -> None:
    """Revoke one API key by id, effective at once."""
    svc = services()
    session = svc.db()
    row = session.get(ApiKey, key_id)
    if row is None:
        raise click.ClickException(f"no API key {key_id}")
    keys.revoke_key(session, svc.redis, row.account_id, key_id)
    click.echo(f"key {key_id} ({row.prefix}…) revoked")
