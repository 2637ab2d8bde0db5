"""Accounts in the browser: sign up, log in, log out, change password (flask-login sessions, CSRF on every form)."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import UserMixin, current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, Email, EqualTo, Length

from broker import accounts
from broker.errors import BrokerError
from broker.extensions import limiter, login_manager, services
from broker.models import Account

bp = Blueprint("auth", __name__)

# Checked against when the email is unknown, so both answers take as long.
_DUMMY_HASH = generate_password_hash("not-a-real-password")


class SessionUser(UserMixin):
    """The logged-in account. The session id carries a fingerprint of the password hash,
    so changing the password ends every other session."""

    def __init__(self, account: Account) -> None:
        self.account_id = account.id
        self.email = account.email
        self._fingerprint = (account.password_hash or "")[-12:]

    def get_id(self) -> str:
        return f"{self.account_id}:{self._fingerprint}"


@login_manager.user_loader
def load_user(session_id: str) -> SessionUser | None:
    account_id, _, fingerprint = session_id.partition(":")
    account = services().db().get(Account, int(account_id)) if account_id.isdigit() else None
    if account is None or (account.password_hash or "")[-12:] != fingerprint:
        return None
    return SessionUser(account)


def _email_key() -> str:
    return "email:" + request.form.get("email", "").strip().lower()


class SignupForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Email(), Length(max=320)])
    password = PasswordField("Password", validators=[DataRequired(), Length(min=10, max=200)])


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Email(), Length(max=320)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired()])
    new = PasswordField("New password", validators=[DataRequired(), Length(min=10, max=200)])
    confirm = PasswordField("Repeat the new password", validators=[DataRequired(), EqualTo("new")])


SIGNUP_DONE = "If that email was new, its account is ready. Log in to continue."


@bp.route("/signup", methods=["GET", "POST"])
@limiter.limit("10/hour", methods=["POST"])
@limiter.limit("5/hour", key_func=_email_key, methods=["POST"])
def signup():
    form = SignupForm()
    if form.validate_on_submit():
        try:
            accounts.create_account(services().db(), form.email.data, form.password.data, source="web")
        except BrokerError:
            # Already registered: hash anyway so the answer takes as long, and answer the same.
            generate_password_hash(form.password.data)
        flash(SIGNUP_DONE, "info")
        return redirect(url_for("auth.login"))
    return render_template("auth/signup.html", form=form), 400 if form.errors else 200


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit("20/hour", methods=["POST"])
@limiter.limit("10/hour", key_func=_email_key, methods=["POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        try:
            account = accounts.get_by_email(services().db(), form.email.data)
        except BrokerError:
            account = None
        stored = account.password_hash if account and account.password_hash else _DUMMY_HASH
        if check_password_hash(stored, form.password.data) and account is not None:
            login_user(SessionUser(account))
            return redirect(url_for("dashboard.overview"))
        form.password.errors.append("Wrong email or password.")
    return render_template("auth/login.html", form=form), 400 if form.errors else 200


@bp.post("/logout")
def logout():
    logout_user()
    return redirect(url_for("public.landing"))


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
@limiter.limit("10/hour", methods=["POST"])
def change_password():
    form = PasswordForm()
    if form.validate_on_submit():
        session = services().db()
        account = session.get(Account, current_user.account_id)
        if account.password_hash and check_password_hash(account.password_hash, form.current.data):
            account.password_hash = generate_password_hash(form.new.data)
            session.commit()
            login_user(SessionUser(account))
            flash("Password changed. Other sessions are logged out.", "info")
            return redirect(url_for("dashboard.overview"))
        form.current.errors.append("That is not your current password.")
    return render_template("auth/password.html", form=form), 400 if form.errors else 200
