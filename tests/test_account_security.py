"""Account security, tried as an attacker would (issue 9, items 1, 3, 4, 5 and 8).

Every test drives the real app (real Redis, real SQL) and reads mail from the real local
SMTP server; links are followed as a person would follow them from the email.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import create_engine, func, select, text
from werkzeug.security import check_password_hash

from broker import accounts, keys, migrations, tokens
from broker.models import Account, ApiKey
from tests.conftest import RAPIDAPI_SECRET

PASSWORD = "correct horse battery"
OLD_DUMMY_PASSWORD = "not-a-real-password"  # the literal the old code checked passwordless accounts against


def csrf_from(html: str) -> str:
    return re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html).group(1)


def post_form(client, path: str, data: dict, **kwargs):
    """GET the page for its CSRF token, then POST the form, as a browser does."""
    token = csrf_from(client.get(path, **kwargs).get_data(as_text=True))
    return client.post(path, data={**data, "csrf_token": token}, **kwargs)


def login(client, email: str, password: str = PASSWORD, addr: str = "127.0.0.1"):
    return post_form(client, "/login", {"email": email, "password": password}, environ_base={"REMOTE_ADDR": addr})


def logout(client) -> None:
    client.post("/logout", data={"csrf_token": csrf_from(client.get("/dashboard/").get_data(as_text=True))})


def link_in(message) -> str:
    body = message.get_content() if message.is_multipart() is False else message.get_body(("plain",)).get_content()
    return re.search(r"https?://\S+", body).group(0)


def path_of(link: str) -> str:
    return re.sub(r"^https?://[^/]+", "", link)


def db(app):
    return app.extensions["broker"].db()


def make_account(app, email: str, password: str | None = PASSWORD, verified: bool = True) -> Account:
    return accounts.create_account(db(app), email, password, verified=verified)


def is_logged_in(client) -> bool:
    return client.get("/dashboard/keys").status_code == 200


# -- 1. passwordless accounts -------------------------------------------------------------


@pytest.mark.parametrize("guess", [OLD_DUMMY_PASSWORD, "", " ", "None", "x" * 200])
def test_a_passwordless_account_cannot_be_logged_into_with_any_password(app, client, guess):
    make_account(app, "nopass@example.com", password=None)
    response = login(client, "nopass@example.com", guess)
    assert response.status_code == 400
    assert not is_logged_in(client)


def test_the_timing_hash_is_made_at_start_from_a_random_secret(app):
    from broker.web import auth

    assert not check_password_hash(auth._TIMING_HASH, OLD_DUMMY_PASSWORD)
    assert OLD_DUMMY_PASSWORD not in Path(auth.__file__).read_text()


def test_session_cookies_from_before_the_release_are_logged_out(app, client):
    """The old cookie named "account id:last 12 characters of the password hash": it must not work."""
    account = make_account(app, "old@example.com")
    signer = app.session_interface.get_signing_serializer(app)
    old = signer.dumps({"_user_id": f"{account.id}:{account.password_hash[-12:]}", "_fresh": True})
    client.set_cookie("session", old)
    response = client.get("/dashboard/keys")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_review_keys_lists_web_keys_of_accounts_that_had_no_password(app, client, runner):
    victim = make_account(app, "victim@example.com", password=None)
    owner = make_account(app, "owner@example.com")
    session = db(app)
    for account in (victim, owner):
        account.legacy_passwordless = account is victim
    session.commit()
    _, before_release = keys.create_key(session, victim, "minted by intruder", source=None)
    _, web = keys.create_key(session, victim, "web", source="web")
    _, registered = keys.create_key(session, victim, "registered", source="register")
    _, owners = keys.create_key(session, owner, "laptop", source="web")

    listed = runner.invoke(args=["broker", "review-keys"])
    assert listed.exit_code == 0
    assert "minted by intruder" in listed.output and "\tweb\t" in listed.output
    assert "registered" not in listed.output and "owner@example.com" not in listed.output

    revoked = runner.invoke(args=["broker", "review-keys", "--revoke"])
    assert "revoked 2 keys" in revoked.output
    for key, status in ((before_release, 401), (web, 401), (registered, 200), (owners, 200)):
        assert client.get("/v1/balance", headers={"X-API-Key": key}).status_code == status
    assert runner.invoke(args=["broker", "review-keys"]).output.strip() == "no keys to review"


def test_revoke_key_command_ends_a_key_at_once(app, client, runner):
    account = make_account(app, "ops@example.com")
    row, plain = keys.create_key(db(app), account, "ci")
    assert client.get("/v1/balance", headers={"X-API-Key": plain}).status_code == 200
    assert runner.invoke(args=["broker", "revoke-key", str(row.id)]).exit_code == 0
    assert client.get("/v1/balance", headers={"X-API-Key": plain}).status_code == 401


def test_the_migration_marks_existing_accounts_verified_and_flags_passwordless_ones(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrations.upgrade(url, "0005")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO accounts (email, password_hash, source, created_at) VALUES "
                "('a@example.com', NULL, 'register', '2026-11-01'), ('b@example.com', 'scrypt:x', 'web', '2026-11-01')"
            )
        )
    migrations.upgrade(url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT email, email_verified_at IS NOT NULL, legacy_passwordless FROM accounts ORDER BY email")
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("a@example.com", 1, 1), ("b@example.com", 1, 0)]


# -- 3. password links and verification ---------------------------------------------------------


def test_a_passwordless_account_gets_a_password_by_emailed_link_that_works_once(app, client, mailbox):
    make_account(app, "api-user@example.com", password=None)
    asked = post_form(client, "/password/forgot", {"email": "api-user@example.com"})
    assert asked.status_code == 302
    link = link_in(mailbox.wait_for("api-user@example.com"))
    assert "/password/reset/" in link

    page = client.get(path_of(link))
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    new_password = "a brand new password"
    done = post_form(client, path_of(link), {"new": new_password, "confirm": new_password})
    assert done.status_code == 302 and done.headers["Location"].endswith("/dashboard/")
    assert is_logged_in(client)

    again = client.get(path_of(link))
    assert again.status_code == 400 and "already used" in again.get_data(as_text=True)
    logout(client)
    assert login(client, "api-user@example.com", new_password).status_code == 302


def test_changing_the_password_invalidates_every_outstanding_link(app, client, mailbox):
    make_account(app, "two-links@example.com")
    links = []
    for _ in range(2):
        post_form(client, "/password/forgot", {"email": "two-links@example.com"})
        links.append(path_of(link_in(mailbox.wait_for("two-links@example.com"))))
        mailbox.reset()
    assert post_form(client, links[0], {"new": "first new password", "confirm": "first new password"}).status_code == (
        302
    )
    assert client.get(links[1]).status_code == 400
    stale = client.post(links[1], data={"new": "attacker password", "confirm": "attacker password"})
    assert stale.status_code == 400
    assert check_password_hash(
        accounts.get_by_email(db(app), "two-links@example.com").password_hash, "first new password"
    )


def test_an_old_or_altered_link_is_refused(app, client):
    account = make_account(app, "old-link@example.com")
    secret = app.config["SECRET_KEY"]

    class PastSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - tokens.MAX_AGE[tokens.PASSWORD] - 5

    with app.app_context():
        fresh = tokens.make(secret, tokens.PASSWORD, account)
    payload = URLSafeTimedSerializer(secret, salt="broker-password-link").loads(fresh)
    expired = URLSafeTimedSerializer(secret, salt="broker-password-link", signer=PastSigner).dumps(payload)
    assert "expired" in client.get(f"/password/reset/{expired}").get_data(as_text=True)
    assert client.get(f"/password/reset/{expired}").status_code == 400
    assert client.get(f"/password/reset/{fresh[:-2]}xx").status_code == 400
    forged = URLSafeTimedSerializer("guessed-secret", salt="broker-password-link").dumps(payload)
    assert client.get(f"/password/reset/{forged}").status_code == 400
    # A verification link is not a password link, and the other way round.
    assert client.get(f"/verify/{fresh}").status_code == 400


def test_the_password_request_answers_the_same_for_known_and_unknown_emails(app, client, mailbox):
    make_account(app, "known@example.com")
    answers = [post_form(client, "/password/forgot", {"email": e}) for e in ("known@example.com", "who@example.com")]
    assert [(a.status_code, a.headers["Location"]) for a in answers] == [(302, "/login")] * 2
    assert "/password/reset/" in link_in(mailbox.wait_for("known@example.com"))
    unknown = mailbox.wait_for("who@example.com").get_content()
    assert "no account" in unknown and "/password/reset/" not in unknown


def test_emailed_links_point_at_public_url_whatever_host_the_request_names(app, client, mailbox):
    """Password-reset poisoning: a forged Host must not receive the victim's token."""
    app.config["PUBLIC_URL"] = "https://broker.example"
    make_account(app, "victim@example.com")
    post_form(client, "/password/forgot", {"email": "victim@example.com"}, headers={"Host": "evil.example"})
    assert link_in(mailbox.wait_for("victim@example.com")).startswith("https://broker.example/password/reset/")
    client.post("/v1/register", json={"email": "new@example.com"}, headers={"Host": "evil.example"})
    assert link_in(mailbox.wait_for("new@example.com")).startswith("https://broker.example/verify/")


def test_password_requests_are_limited_per_email_and_per_client(app, client, mailbox):
    make_account(app, "bombed@example.com")
    statuses = [post_form(client, "/password/forgot", {"email": "bombed@example.com"}).status_code for _ in range(4)]
    assert statuses == [302, 302, 302, 429]
    time.sleep(0.5)
    assert len(mailbox.messages_to("bombed@example.com")) == 3
    per_client = [
        post_form(client, "/password/forgot", {"email": f"other{i}@example.com"}).status_code for i in range(8)
    ]
    assert per_client[:7] == [302] * 7 and per_client[7] == 429  # 10 an hour from one client, 3 used above


def test_sign_up_needs_the_emailed_link_before_keys_and_buying_and_grants_trial_credits_then(app, client, mailbox):
    app.config["TRIAL_CREDITS"] = Decimal("3")
    signed = post_form(client, "/signup", {"email": "fresh@example.com", "password": PASSWORD, "accept_terms": "y"})
    assert signed.status_code == 302
    account = accounts.get_by_email(db(app), "fresh@example.com")
    assert account.email_verified_at is None
    assert app.extensions["broker"].ledger.balance(account.id) == 0  # not at sign-up

    assert login(client, "fresh@example.com").status_code == 302
    overview = client.get("/dashboard/").get_data(as_text=True)
    assert 'data-testid="verify-email"' in overview
    token = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))
    refused = client.post("/dashboard/keys", data={"name": "x"}, headers={"HX-Request": "true", "X-CSRFToken": token})
    assert refused.status_code == 204 and refused.headers["HX-Redirect"] == "/dashboard/"
    buy = client.post("/dashboard/billing/checkout", data={"pack": "usd5", "csrf_token": token})
    assert buy.status_code == 302 and buy.headers["Location"] == "/dashboard/"
    assert db(app).scalar(select(func.count()).select_from(ApiKey).where(ApiKey.account_id == account.id)) == 0

    link = path_of(link_in(mailbox.wait_for("fresh@example.com")))
    assert client.get(link).status_code == 200
    db(app).expire_all()
    assert accounts.get_by_email(db(app), "fresh@example.com").email_verified_at is None  # a GET changes nothing
    confirmed = post_form(client, link, {})
    assert confirmed.status_code == 200 and "3.000000 trial credits" in confirmed.get_data(as_text=True)
    assert app.extensions["broker"].ledger.balance(account.id) == 3_000_000
    assert post_form(client, link, {}).status_code == 400  # used
    assert app.extensions["broker"].ledger.balance(account.id) == 3_000_000  # granted once

    token = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))
    created = client.post("/dashboard/keys", data={"name": "ok"}, headers={"HX-Request": "true", "X-CSRFToken": token})
    assert created.status_code == 200 and "brk_live_" in created.get_data(as_text=True)


def test_operator_and_marketplace_accounts_count_as_verified(app, client, runner):
    assert runner.invoke(args=["broker", "create-user", "op@example.com"]).exit_code == 0
    assert accounts.get_by_email(db(app), "op@example.com").email_verified_at is not None
    headers = {"X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET, "X-RapidAPI-User": "market-1"}
    assert client.get("/v1/balance", headers=headers).status_code == 200
    db(app).expire_all()
    marketplace = db(app).scalar(select(Account).where(Account.source == "rapidapi"))
    assert marketplace.email_verified_at is not None


# -- 4. sessions ------------------------------------------------------------------------------------


@pytest.fixture
def owner(app):
    return make_account(app, "owner@example.com")


def test_log_out_ends_the_session_even_when_its_cookie_is_replayed(app, client, owner):
    assert login(client, owner.email).status_code == 302
    stolen = client.get_cookie("session").value
    token = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302

    replay = app.test_client()
    replay.set_cookie("session", stolen)
    response = replay.get("/dashboard/keys")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_log_out_everywhere_ends_every_session_at_once(app, owner):
    laptop, phone = app.test_client(), app.test_client()
    for device in (laptop, phone):
        assert login(device, owner.email).status_code == 302
    token = csrf_from(phone.get("/dashboard/keys").get_data(as_text=True))
    assert phone.post("/account/logout-everywhere", data={"csrf_token": token}).status_code == 302
    assert not is_logged_in(laptop) and not is_logged_in(phone)
    assert login(laptop, owner.email).status_code == 302 and is_logged_in(laptop)


def test_a_password_change_ends_every_other_session(app, owner):
    laptop, phone = app.test_client(), app.test_client()
    for device in (laptop, phone):
        login(device, owner.email)
    changed = post_form(
        phone,
        "/account/password",
        {"current": PASSWORD, "new": "another long password", "confirm": "another long password"},
    )
    assert changed.status_code == 302
    assert is_logged_in(phone) and not is_logged_in(laptop)


def test_log_in_rotates_the_csrf_token_and_the_cookie_holds_nothing_of_the_password(app, client, owner):
    before = csrf_from(client.get("/login").get_data(as_text=True))
    client.post("/login", data={"email": owner.email, "password": PASSWORD, "csrf_token": before})
    after = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))
    assert after != before
    assert client.post("/dashboard/keys", data={"name": "x", "csrf_token": before}).status_code == 400

    cookie = app.session_interface.get_signing_serializer(app).loads(client.get_cookie("session").value)
    password_hash = accounts.get_by_email(db(app), owner.email).password_hash
    flat = repr(cookie)
    assert not any(password_hash[i : i + 6] in flat for i in range(len(password_hash) - 5))


def test_dashboard_pages_and_the_new_key_are_not_cached(app, client, owner):
    login(client, owner.email)
    for path in ("/dashboard/", "/dashboard/keys", "/dashboard/usage", "/dashboard/billing", "/account/password"):
        assert client.get(path).headers["Cache-Control"] == "no-store", path
    token = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))
    created = client.post("/dashboard/keys", data={"name": "x"}, headers={"HX-Request": "true", "X-CSRFToken": token})
    assert "brk_live_" in created.get_data(as_text=True) and created.headers["Cache-Control"] == "no-store"


def test_log_in_follows_only_a_relative_next(app, client, owner):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    for target, expected in (
        ("/dashboard/usage", "/dashboard/usage"),
        ("https://evil.example/", "/dashboard/"),
        ("//evil.example/", "/dashboard/"),
        ("/\\evil.example", "/dashboard/"),
    ):
        response = client.post(
            f"/login?next={target}", data={"email": owner.email, "password": PASSWORD, "csrf_token": token}
        )
        assert response.headers["Location"] == expected, target
        token = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))


# -- 5. guessing without lock-out ---------------------------------------------------------------


def test_guesses_from_one_client_do_not_lock_the_owner_out(app, owner):
    owner_browser, attacker = app.test_client(), app.test_client()
    assert login(owner_browser, owner.email, addr="198.51.100.7").status_code == 302  # a browser they used before
    owner_browser.post(
        "/logout", data={"csrf_token": csrf_from(owner_browser.get("/dashboard/").get_data(as_text=True))}
    )

    statuses = [login(attacker, owner.email, f"guess {i}", addr="203.0.113.9").status_code for i in range(12)]
    assert statuses[:5] == [400] * 5 and statuses[-1] == 429
    # The owner, from another address, in a browser that logged in before, gets in at once.
    assert login(owner_browser, owner.email, addr="198.51.100.7").status_code == 302
    # Their success does not reopen the door for the attacker's address (its own limit holds).
    assert login(attacker, owner.email, "again", addr="203.0.113.9").status_code == 429


def test_many_clients_guessing_one_email_meet_a_growing_delay(app, owner):
    def guess(n: int):
        return login(app.test_client(), owner.email, f"guess {n}", addr=f"192.0.2.{n + 1}")

    assert [guess(n).status_code for n in range(5)] == [400] * 5  # five free failures, each from a new address
    waits = []
    for n in range(5, 8):
        refused = guess(100 + n)
        assert refused.status_code == 429
        waits.append(int(refused.headers["Retry-After"]))
        time.sleep(waits[-1] + 0.1)
        assert guess(n).status_code == 400  # after the wait, the next guess is heard (and fails)
    assert waits == [1, 2, 4]


def test_the_emailed_link_works_while_log_in_is_delayed_and_clears_the_delay(app, client, owner, mailbox):
    for i in range(7):
        login(app.test_client(), owner.email, f"guess {i}", addr=f"192.0.2.{i + 1}")
    assert login(app.test_client(), owner.email, addr="192.0.2.100").status_code == 429  # delayed, no device cookie
    post_form(client, "/password/forgot", {"email": owner.email})
    link = path_of(link_in(mailbox.wait_for(owner.email)))
    assert post_form(client, link, {"new": "fresh long password", "confirm": "fresh long password"}).status_code == 302
    assert login(app.test_client(), owner.email, "fresh long password", addr="192.0.2.101").status_code == 302


def test_successful_logins_from_one_address_do_not_use_up_its_limit(app, owner):
    """Behind a proxy with PROXY_HOPS=0 every user shares one address: only failures count."""
    for _ in range(55):
        browser = app.test_client()
        assert login(browser, owner.email).status_code == 302


# -- 8. /v1/register -------------------------------------------------------------------------------


def test_register_answers_the_same_for_new_and_known_emails_and_never_returns_a_key(app, client, mailbox):
    make_account(app, "known@example.com")
    new = client.post("/v1/register", json={"email": "New@Example.com"})
    known = client.post("/v1/register", json={"email": "known@example.com"})
    assert new.status_code == known.status_code == 202
    assert set(new.json) == set(known.json) == {"object", "email", "message"}
    assert new.json["message"] == known.json["message"]
    assert "brk_live_" not in new.get_data(as_text=True)
    for address in ("new@example.com", "known@example.com"):
        assert "brk_live_" not in mailbox.wait_for(address).as_string()
    assert "already has one" in mailbox.wait_for("known@example.com").get_content()


def test_the_register_link_confirms_the_address_and_shows_the_first_key_once(app, client, mailbox):
    app.config["TRIAL_CREDITS"] = Decimal("2.5")
    client.post("/v1/register", json={"email": "dev@example.com"})
    link = path_of(link_in(mailbox.wait_for("dev@example.com")))
    confirm_page = client.get(link).get_data(as_text=True)
    assert "brk_live_" not in confirm_page
    shown = post_form(client, link, {})
    assert shown.status_code == 200 and shown.headers["Cache-Control"] == "no-store"
    key = re.search(r"brk_live_\w+", shown.get_data(as_text=True)).group(0)
    balance = client.get("/v1/balance", headers={"X-API-Key": key})
    assert balance.status_code == 200 and balance.json["available_credits"] == "2.500000"
    again = client.get(link)  # the used link offers no form any more, and no key
    assert again.status_code == 400 and "brk_live_" not in again.get_data(as_text=True)
    replayed = client.post(link, data={"csrf_token": csrf_from(confirm_page)})
    assert replayed.status_code == 400 and "brk_live_" not in replayed.get_data(as_text=True)
    assert db(app).scalar(select(func.count()).select_from(ApiKey)) == 1


BAD_EMAILS = ["<b>x</b>@example.com", "a\u0007b@example.com", "p\u0430ypal@example.com", "ops@users.rapidapi.invalid"]


@pytest.mark.parametrize("email", BAD_EMAILS)
def test_one_validator_refuses_html_control_characters_look_alikes_and_reserved_domains(app, client, runner, email):
    assert client.post("/v1/register", json={"email": email}).status_code == 422
    assert post_form(client, "/signup", {"email": email, "password": PASSWORD, "accept_terms": "y"}).status_code == 400
    assert runner.invoke(args=["broker", "create-user", email]).exit_code != 0
    assert db(app).scalar(select(func.count()).select_from(Account)) == 0


def test_nobody_can_stand_in_for_a_marketplace_user(app, client):
    squatter = Account(email="market-2@users.rapidapi.invalid", source="web", email_verified_at=datetime.now(UTC))
    db(app).add(squatter)
    db(app).commit()
    headers = {"X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET, "X-RapidAPI-User": "market-2"}
    assert client.get("/v1/usage", headers=headers).status_code == 401


def test_register_is_limited_per_email(app, client, mailbox):
    statuses = [client.post("/v1/register", json={"email": "spam@example.com"}).status_code for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
