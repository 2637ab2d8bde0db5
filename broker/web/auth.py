"""Accounts in the browser: sign up and verify, log in and out, set, reset and change the password.

Sessions are server-side (``broker.web_sessions``): the cookie carries an account id, its
session generation and a random session id, never anything of the password. Emailed
links (``broker.tokens``) verify an address and set a password; an account without a
password can only be entered through such a link.
"""

from __future__ import annotations

import hashlib
import secrets
from functools import wraps
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import UserMixin, current_user, login_required, login_url, login_user, logout_user
from flask_wtf import FlaskForm
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import BooleanField, EmailField, PasswordField
from wtforms.validators import DataRequired, EqualTo, Length, ValidationError

from broker import account_mail, accounts, keys, login_guard, pricing, tokens, web_sessions
from broker.errors import BrokerError, Conflict, ValidationFailed
from broker.extensions import limiter, login_manager, services
from broker.models import Account

bp = Blueprint("auth", __name__)

# Checked against when the email is unknown or has no password, so every answer takes as long.
# Its password is random and made at start: no typed password can ever match it.
_TIMING_HASH = generate_password_hash(secrets.token_urlsafe(32))
DEVICE_COOKIE = "broker_device"
DEVICE_DAYS = 90


class SessionUser(UserMixin):
    """The logged-in account, named by "account id:session generation:session id"."""

    def __init__(self, account: Account, session_id: str) -> None:
        self.account_id = account.id
        self.email = account.email
        self.verified = account.email_verified_at is not None
        self.has_password = account.password_hash is not None
        self.session_id = session_id
        self._id = f"{account.id}:{account.session_generation}:{session_id}"

    def get_id(self) -> str:
        return self._id


@login_manager.user_loader
def load_user(user_id: str) -> SessionUser | None:
    parts = user_id.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None  # a cookie from before server-side sessions, or forged: logged out
    account_id, generation, session_id = int(parts[0]), int(parts[1]), parts[2]
    svc = services()
    if not web_sessions.alive(svc.redis, session_id, account_id):
        return None
    account = svc.db().get(Account, account_id)
    if account is None or account.session_generation != generation or account.password_hash is None:
        return None
    return SessionUser(account, session_id)


@login_manager.unauthorized_handler
def unauthorized() -> Response:
    """Log in first, then come back to the page. An HTMX request (a fragment, a poll) sends the
    whole browser to log-in with ``HX-Redirect``: its answer must not be swapped into a card."""
    flash(login_manager.login_message, login_manager.login_message_category)
    if not request.headers.get("HX-Request"):
        return redirect(login_url(login_manager.login_view, next_url=request.url))
    # The page the browser shows, not the fragment's URL; anything off-site falls back to the dashboard.
    shown = urlsplit(request.headers.get("HX-Current-URL", ""))
    page = shown.path + (f"?{shown.query}" if shown.query else "")
    same_site = not shown.netloc or shown.netloc == request.host
    next_path = (_safe_next(page) if same_site else None) or url_for("dashboard.overview")
    response = make_response("", 401)
    response.headers["HX-Redirect"] = url_for("auth.login", next=next_path)
    return response


def start_session(account: Account) -> None:
    """Log in: a fresh cookie session (new CSRF token, nothing carried over) and a new server-side id."""
    session.clear()
    login_user(SessionUser(account, web_sessions.start(services().redis, account.id)))


def verified_required(view):
    """Buying and making keys need a verified email."""

    @wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.verified:
            flash("Verify your email first: we sent you a link (you can send it again from the overview).", "error")
            response = redirect(url_for("dashboard.overview"))
            if request.headers.get("HX-Request"):
                response = make_response("", 204)
                response.headers["HX-Redirect"] = url_for("dashboard.overview")
            return response
        return view(*args, **kwargs)

    return wrapped


@bp.after_request
def _no_store(response: Response) -> Response:
    """Pages with forms, links or keys are never cached, nor kept in the browser's history cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


# -- forms ------------------------------------------------------------------------------


def valid_email(_form, field) -> None:
    """The one email validator (``accounts.normalise_email``), for WTForms."""
    try:
        field.data = accounts.normalise_email(field.data or "")
    except ValidationFailed as error:
        raise ValidationError(error.message) from None


class SignupForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=320), valid_email])
    password = PasswordField("Password", validators=[DataRequired(), Length(min=10, max=200)])
    # The terms bind from sign-up on (TERMS.md 1.1): an account is made only when they are accepted.
    accept_terms = BooleanField(
        "I accept the terms of use", validators=[DataRequired("Accept the terms of use to create an account.")]
    )


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=320)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


class EmailForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=320), valid_email])


class NewPasswordForm(FlaskForm):
    new = PasswordField("New password", validators=[DataRequired(), Length(min=10, max=200)])
    confirm = PasswordField("Repeat the new password", validators=[DataRequired(), EqualTo("new")])


class PasswordForm(NewPasswordForm):
    current = PasswordField("Current password", validators=[DataRequired()])


class ConfirmForm(FlaskForm):
    """A button that spends an emailed link (a GET never does: mail scanners open links)."""


def _email_key() -> str:
    return "email:" + hashlib.sha256(request.form.get("email", "").strip().lower().encode()).hexdigest()[:32]


def _email_client_key() -> str:
    return f"{_email_key()}:{request.remote_addr}"


def _failed(response: Response) -> bool:
    return response.status_code != 302


# -- sign up and verify -------------------------------------------------------------------

SIGNUP_DONE = "Check your inbox: we sent a link to confirm your address. Then log in."


@bp.route("/signup", methods=["GET", "POST"])
@limiter.limit("10/hour", methods=["POST"])
@limiter.limit("3/hour", key_func=_email_key, methods=["POST"])
def signup():
    form = SignupForm()
    if form.validate_on_submit():
        try:
            account = accounts.create_account(
                services().db(), form.email.data, form.password.data, source="web", verified=False
            )
        except Conflict:
            # Already registered: hash anyway so the answer takes as long, tell the owner by mail only.
            generate_password_hash(form.password.data)
            account_mail.send_already_registered(form.email.data)
        else:
            account_mail.send_verification(account)
        flash(SIGNUP_DONE, "info")
        return redirect(url_for("auth.login"))
    return render_template("auth/signup.html", form=form), 400 if form.errors else 200


@bp.route("/verify/<token>", methods=["GET", "POST"])
@limiter.limit("30/hour", methods=["POST"])
def verify(token: str):
    """Confirm an address; for a ``/v1/register`` account also make and show its first key, once."""
    svc = services()
    form = ConfirmForm()
    db = svc.db()
    try:
        account = tokens.redeem(current_app.config["SECRET_KEY"], tokens.VERIFY, token, db)
    except BrokerError as error:
        return render_template("auth/link_invalid.html", message=error.message), 400
    if not form.validate_on_submit():
        return render_template("auth/verify.html", form=form, email=account.email)
    if not accounts.mark_verified(db, account):
        return render_template("auth/link_invalid.html", message="This link was already used."), 400
    trial = pricing.credits_to_ucr(current_app.config["TRIAL_CREDITS"])
    if trial:
        svc.ledger.grant(db, account.id, trial, f"trial-{account.id}", "trial credits")
    first_key = None
    if account.source == "register":
        _, first_key = keys.create_key(db, account, "registered", source="register")
    return render_template(
        "auth/verified.html",
        email=account.email,
        key=first_key,
        trial=pricing.format_credits(trial) if trial else None,
        has_password=account.password_hash is not None,
    )


@bp.post("/account/verify/resend")
@login_required
@limiter.limit("3/hour", methods=["POST"], key_func=lambda: f"resend:{current_user.account_id}")
def resend_verification():
    account = services().db().get(Account, current_user.account_id)
    if account.email_verified_at is None:
        account_mail.send_verification(account)
        flash(f"We sent a new link to {account.email}.", "info")
    return redirect(url_for("dashboard.overview"))


# -- log in and out ------------------------------------------------------------------------


def _safe_next(target: str | None) -> str | None:
    """A relative path on this site, or None (no scheme, no host, no ``//`` or backslash tricks)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _device_serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt="broker-device")


def _email_digest(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]


def _trusted_device(email: str) -> bool:
    """This browser logged into ``email`` before (a signed cookie): the per-email delay does not apply."""
    cookie = request.cookies.get(DEVICE_COOKIE, "")
    try:
        known = _device_serializer().loads(cookie, max_age=DEVICE_DAYS * 86400)
    except BadSignature:
        return False
    return isinstance(known, list) and _email_digest(email) in known


def _remember_device(response: Response, email: str) -> None:
    try:
        known = _device_serializer().loads(request.cookies.get(DEVICE_COOKIE, ""), max_age=DEVICE_DAYS * 86400)
    except BadSignature:
        known = []
    known = [d for d in known if d != _email_digest(email)][-4:] + [_email_digest(email)]
    response.set_cookie(
        DEVICE_COOKIE,
        _device_serializer().dumps(known),
        max_age=DEVICE_DAYS * 86400,
        httponly=True,
        secure=current_app.config["BROKER_ENV"] == "production",
        samesite="Lax",
    )


WRONG = "Wrong email or password."


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit("50/hour", methods=["POST"], deduct_when=_failed)
@limiter.limit("10/15 minutes", key_func=_email_client_key, methods=["POST"], deduct_when=_failed)
def login():
    form = LoginForm()
    next_url = _safe_next(request.values.get("next"))
    if form.validate_on_submit():
        svc = services()
        email = form.email.data
        wait = 0 if _trusted_device(email) else login_guard.wait_seconds(svc.redis, email)
        if wait:
            form.password.errors.append(
                f"Too many attempts for this email: wait {wait} s, or set a new password by email."
            )
            response = make_response(render_template("auth/login.html", form=form, next=next_url), 429)
            g.retry_after = wait  # kept over flask-limiter's header (see extensions.init_web)
            return response
        account = accounts.find_by_email(svc.db(), email)
        # Every path checks one scrypt hash, so the answer takes as long for each.
        stored = account.password_hash if account is not None and account.password_hash else None
        matches = check_password_hash(stored or _TIMING_HASH, form.password.data)
        if account is not None and stored is not None and matches:
            login_guard.clear(svc.redis, email)
            start_session(account)
            response = redirect(next_url or url_for("dashboard.overview"))
            _remember_device(response, email)
            return response
        login_guard.record_failure(svc.redis, email)
        form.password.errors.append(WRONG)
    return render_template("auth/login.html", form=form, next=next_url), 400 if form.errors else 200


def _end_this_session() -> None:
    if current_user.is_authenticated:
        web_sessions.end(services().redis, current_user.session_id)
    logout_user()
    session.clear()


@bp.post("/logout")
def logout():
    _end_this_session()
    return redirect(url_for("public.landing"))


@bp.post("/account/logout-everywhere")
@login_required
def logout_everywhere():
    account = services().db().get(Account, current_user.account_id)
    accounts.end_sessions(services().db(), account)
    _end_this_session()
    flash("You are logged out on every device.", "info")
    return redirect(url_for("auth.login"))


# -- passwords -----------------------------------------------------------------------------

PASSWORD_LINK_SENT = "If an account uses that address, we emailed it a link to set a password (valid for 1 hour)."


@bp.route("/password/forgot", methods=["GET", "POST"])
@limiter.limit("10/hour", methods=["POST"])
@limiter.limit("3/hour", key_func=_email_key, methods=["POST"])
def forgot_password():
    form = EmailForm()
    if form.validate_on_submit():
        account_mail.send_password_link(form.email.data)
        flash(PASSWORD_LINK_SENT, "info")
        return redirect(url_for("auth.login"))
    return render_template("auth/forgot.html", form=form), 400 if form.errors else 200


@bp.route("/password/reset/<token>", methods=["GET", "POST"])
@limiter.limit("20/hour", methods=["POST"])
def reset_password(token: str):
    """Set a password from an emailed link: works once, ends every session, logs this browser in."""
    svc = services()
    db = svc.db()
    try:
        account = tokens.redeem(current_app.config["SECRET_KEY"], tokens.PASSWORD, token, db)
    except BrokerError as error:
        return render_template("auth/link_invalid.html", message=error.message), 400
    form = NewPasswordForm()
    if form.validate_on_submit():
        accounts.set_password(db, account, form.new.data)
        login_guard.clear(svc.redis, account.email)
        start_session(account)
        flash("Your password is set. Every other session was logged out.", "info")
        response = redirect(url_for("dashboard.overview"))
        _remember_device(response, account.email)
        return response
    return render_template("auth/reset.html", form=form, email=account.email), 400 if form.errors else 200


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
@limiter.limit("10/hour", methods=["POST"])
def change_password():
    form = PasswordForm()
    if form.validate_on_submit():
        db = services().db()
        account = db.get(Account, current_user.account_id)
        if account.password_hash and check_password_hash(account.password_hash, form.current.data):
            web_sessions.end(services().redis, current_user.session_id)
            accounts.set_password(db, account, form.new.data)
            start_session(account)
            flash("Password changed. Other sessions are logged out.", "info")
            return redirect(url_for("dashboard.overview"))
        form.current.errors.append("That is not your current password.")
    return render_template("auth/password.html", form=form), 400 if form.errors else 200
