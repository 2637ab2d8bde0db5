"""A new customer's first visit (issue 11, items 2, 5, 11 and 12): the overview's steps, money that reads
well, the pricing page, terms and privacy from configuration, the docs' examples, and compression.

Every test drives the real app (real Redis, real SQL); production apps are built as an operator
configures them.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from decimal import Decimal

import pytest
import redis

from broker import ROOT, create_app, pricing
from tests.conftest import CURRENT, OPERATOR, app_config
from tests.test_account_security import PASSWORD, csrf_from, link_in, login, make_account, path_of, post_form
from tests.test_public_pages import by_id, parse, text_of

PUBLIC = "https://broker.example"


@pytest.fixture
def build_app(tmp_path, monkeypatch, redis_server, upstream, stripe_fake, migrated_db):
    """``build_app(**overrides)``: an app on the test services; ``OPERATOR_*`` unset unless given."""
    redis.Redis(port=redis_server.port).flushall()
    built = []

    def build(**overrides):
        shutil.copy(migrated_db, tmp_path / "broker.db")
        settings = app_config(
            tmp_path, redis_server.url, upstream, f"sqlite:///{tmp_path / 'broker.db'}", stripe_fake.url
        )
        for name in OPERATOR:
            monkeypatch.delenv(name, raising=False)
            settings[name] = ""
        settings.update(overrides)
        app = create_app(settings)
        built.append(app)
        CURRENT["app"] = app
        return app

    yield build
    CURRENT.pop("app", None)
    for app in built:
        app.extensions["broker"].db.remove()
        app.extensions["broker"].engine.dispose()


def production_settings(**overrides) -> dict:
    return {"BROKER_ENV": "production", "SECRET_KEY": secrets.token_urlsafe(48), "PUBLIC_URL": PUBLIC, **overrides}


# -- item 11: terms and privacy ------------------------------------------------------------


@pytest.mark.parametrize("missing", sorted(OPERATOR))
def test_production_refuses_to_start_without_each_operator_setting(build_app, missing):
    with pytest.raises(RuntimeError, match=f"{missing}.* must be set when BROKER_ENV=production"):
        build_app(**production_settings(**{**OPERATOR, missing: ""}))


def test_production_refuses_an_operator_contact_that_is_not_an_email(build_app):
    with pytest.raises(RuntimeError, match="OPERATOR_CONTACT must be an email address"):
        build_app(**production_settings(**{**OPERATOR, "OPERATOR_CONTACT": "call us"}))


def test_production_terms_and_privacy_name_the_configured_operator_and_no_placeholder(build_app):
    operator = {
        "OPERATOR_NAME": "Acme <Broker> & Sons",
        "OPERATOR_CONTACT": "legal@acme.example",
        "OPERATOR_JURISDICTION": "the State of *Delaware*",
    }
    client = build_app(**production_settings(**operator)).test_client()
    terms = client.get("/terms", base_url=PUBLIC)
    privacy = client.get("/privacy", base_url=PUBLIC)
    for response in (terms, privacy):
        assert response.status_code == 200
        body = response.get_data(as_text=True)
        assert "[Operator" not in body and "Operator:" not in body
        assert 'data-testid="operator-demo"' not in body
        page = text_of(parse(response.data))
        assert "Acme <Broker> & Sons" in page  # as text: escaped, never markup
        assert "the State of *Delaware*" in page
        assert 'href="mailto:legal@acme.example"' in body
    terms_page = text_of(parse(terms.data))
    assert "operated by Acme <Broker> & Sons" in terms_page
    assert "governed by the laws of the State of *Delaware*" in terms_page
    footer = parse(privacy.data).find(".//footer")
    links = {text_of(a): a.get("href") for a in footer.iter("a")}
    assert links["Privacy"] == "/privacy" and links["Terms of use"] == "/terms"
    assert links["Contact"] == "mailto:legal@acme.example"


def test_development_shows_clearly_marked_demo_operator_values(build_app):
    client = build_app(BROKER_ENV="development").test_client()
    for path in ("/terms", "/privacy"):
        response = client.get(path)
        assert response.status_code == 200
        body = response.get_data(as_text=True)
        assert "[Operator" not in body
        document = parse(response.data)
        banner = [el for el in document.iter() if el.get("data-testid") == "operator-demo"]
        assert len(banner) == 1 and "Demo values" in text_of(banner[0])
        assert "Example Operator (demo)" in text_of(document)


def test_sign_up_requires_accepting_the_terms_and_links_them(app, client, mailbox):
    page = client.get("/signup").get_data(as_text=True)
    document = parse(page.encode())
    box = [el for el in document.iter("input") if el.get("name") == "accept_terms"]
    assert len(box) == 1 and box[0].get("type") == "checkbox" and box[0].get("required") is not None
    label = [el for el in document.iter("label") if el.get("for") == "accept_terms"][0]
    assert {a.get("href") for a in label.iter("a")} == {"/terms", "/privacy"}

    refused = post_form(client, "/signup", {"email": "new@example.com", "password": PASSWORD})
    assert refused.status_code == 400
    assert "Accept the terms of use" in refused.get_data(as_text=True)
    assert mailbox.messages_to("new@example.com") == []
    with app.app_context():
        from broker import accounts

        assert accounts.find_by_email(app.extensions["broker"].db(), "new@example.com") is None

    accepted = post_form(client, "/signup", {"email": "new@example.com", "password": PASSWORD, "accept_terms": "y"})
    assert accepted.status_code == 302


def test_the_register_link_page_says_confirming_accepts_the_terms(app, client, mailbox):
    assert client.post("/v1/register", json={"email": "api@example.com"}).status_code == 202
    link = link_in(mailbox.wait_for("api@example.com"))
    page = client.get(path_of(link))
    assert page.status_code == 200
    document = parse(page.data)
    note = [el for el in document.iter() if el.get("data-testid") == "accept-terms"][0]
    assert "By confirming you accept the terms of use" in text_of(note)
    assert "/terms" in {a.get("href") for a in note.iter("a")}


# -- item 2: a new account leads somewhere ----------------------------------------------------


def steps_of(client) -> dict[str, bool] | None:
    """The overview's first steps as {step: done}, or None when the overview shows none."""
    document = parse(client.get("/dashboard/").data)
    found = {
        el.get("data-testid").removeprefix("step-"): el.get("data-done") == "true"
        for el in document.iter("li")
        if (el.get("data-testid") or "").startswith("step-")
    }
    return found or None


def test_the_overview_leads_a_new_account_step_by_step_until_its_first_call(app, client, mailbox):
    from broker import accounts, keys

    app.config["TRIAL_CREDITS"] = Decimal("2.5")
    app.config["PUBLIC_URL"] = "https://api.broker.example"
    signed = post_form(client, "/signup", {"email": "first@example.com", "password": PASSWORD, "accept_terms": "y"})
    assert signed.status_code == 302
    assert login(client, "first@example.com").status_code == 302

    page = client.get("/dashboard/").get_data(as_text=True)  # asked for on http://localhost/
    assert 'data-testid="verify-email"' in page  # the banner with its resend button stays
    document = parse(page.encode())
    assert steps_of(client) == {"verify": False, "credits": False, "key": False, "call": False}
    steps = text_of(by_id(document, "getting-started"))
    assert "2.50 free trial credits" in steps
    hrefs = {a.get("href") for a in by_id(document, "getting-started").iter("a")}
    assert {"/dashboard/billing", "/dashboard/keys", "/docs#quick-start"} <= hrefs
    # The first call to copy holds this server's public base URL, never the Host the request came with.
    curl = text_of(by_id(document, "first-call-curl"))
    assert "https://api.broker.example/v1/chat/completions" in curl and "localhost" not in curl
    assert 'base_url="https://api.broker.example/v1"' in text_of(by_id(document, "first-call-python"))
    copy = [b.get("data-copy-target") for b in document.iter("button")]
    assert {"first-call-curl", "first-call-python"} <= set(copy)

    link = link_in(mailbox.wait_for("first@example.com"))
    confirm = client.get(path_of(link)).get_data(as_text=True)
    assert client.post(path_of(link), data={"csrf_token": csrf_from(confirm)}).status_code == 200
    assert steps_of(client) == {"verify": True, "credits": True, "key": False, "call": False}

    session = app.extensions["broker"].db()
    account = accounts.find_by_email(session, "first@example.com")
    _, key = keys.create_key(session, account, "first key")
    assert steps_of(client) == {"verify": True, "credits": True, "key": True, "call": False}

    call = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert call.status_code == 200, call.json
    assert steps_of(client) is None  # every step done: the overview is the dashboard again
    assert "demo/chat" in client.get("/dashboard/").get_data(as_text=True)


def test_a_spent_balance_asks_for_credits_again(app, client):
    account = make_account(app, "spent@example.com")
    assert login(client, "spent@example.com").status_code == 302
    steps = steps_of(client)
    assert steps["verify"] and not steps["credits"]
    document = parse(client.get("/dashboard/").data)
    balance = by_id(document, "balance")
    assert "/dashboard/billing" in {a.get("href") for a in balance.iter("a")}
    assert account.id


def test_the_docs_have_the_quick_start_the_landing_and_overview_link_to(client):
    landing = parse(client.get("/").data)
    assert "/docs#quick-start" in {a.get("href") for a in landing.iter("a")}
    docs = parse(client.get("/docs").data)
    quick = by_id(docs, "quick-start")
    text = text_of(quick)
    assert "Quick start" in text and "http://localhost/v1/chat/completions" in text
    labels = [el.get("data-tab-label") for el in quick.iter("section") if el.get("data-tab-label")]
    assert labels == ["curl", "Python (openai SDK)", "JavaScript (openai SDK)", "JavaScript (fetch)"]
    assert 'baseURL: "http://localhost/v1"' in text and "process.env.BROKER_API_KEY" in text


# -- item 5: money that reads well ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0", "0.00"),
        ("12.000345", "12.00"),
        ("1234.5678", "1,234.57"),
        ("0.29952", "0.2995"),
        ("0.0039168", "0.003917"),
        ("0.004050", "0.00405"),
        ("0.000001", "0.000001"),
        ("0.99996", "1.00"),
        ("-3.5", "-3.50"),
    ],
)
def test_readable_numbers_round_to_the_cent_or_four_significant_digits(value, shown):
    assert pricing.readable_number(Decimal(value)) == shown


def test_short_credits_and_dollars_leave_format_credits_untouched():
    assert pricing.format_credits(12_000_345) == "12.000345"  # the API, receipts and CSV keep every µcr
    assert pricing.format_credits_short(12_000_345) == "12.00"
    assert pricing.format_credits_short(4_050) == "0.00405"
    assert pricing.format_usd(pricing.ucr_to_usd(12_345_678, Decimal("0.01"))) == "$0.1235"
    assert pricing.format_usd(Decimal("-1")) == "-$1.00"
    assert pricing.readable_number(Decimal("27"), min_places=0) == "27"


def test_the_balance_shows_its_dollar_value_and_receipts_keep_full_precision(app, client, tenant):
    from werkzeug.security import generate_password_hash

    from broker.models import Account

    session = app.extensions["broker"].db()
    account = session.get(Account, tenant.account_id)
    account.password_hash = generate_password_hash(PASSWORD)
    session.commit()
    app.extensions["broker"].ledger.grant(session, tenant.account_id, 2_345_678, "odd-amount", "test")
    assert login(client, tenant.email).status_code == 302
    call = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20},
        headers=tenant.headers,
    )
    assert call.status_code == 200
    charged = call.headers["X-Credits-Charged"]  # full precision, six decimals
    assert re.fullmatch(r"\d+\.\d{6}", charged)
    remaining = pricing.credits_to_ucr(Decimal(call.headers["X-Credits-Remaining"]))

    document = parse(client.get("/dashboard/").data)
    shown = text_of(by_id(document, "balance"))
    assert pricing.format_credits_short(remaining) in shown
    assert pricing.format_credits(remaining) not in shown  # no six-decimal noise in the card
    assert f"worth {pricing.format_usd(pricing.ucr_to_usd(remaining, Decimal('0.01')))}" in shown
    request_id = call.headers["X-Request-Id"]
    receipt = client.get(f"/dashboard/requests/{request_id}").get_data(as_text=True)
    assert charged in receipt  # the receipt keeps every micro-credit


def test_pricing_shows_no_operator_notes_and_no_long_fractions(client):
    prices = json.loads((ROOT / "broker" / "prices.json").read_text())["models"]
    body = client.get("/pricing").get_data(as_text=True)
    page = text_of(parse(body.encode()))
    notes = {
        (row["source"].partition(" ")[2] if row["source"].startswith("https://") else row["source"]).strip()
        for row in prices.values()
    } - {""}
    assert notes, "the price table has notes to keep from customers"
    for note in notes:
        assert note not in page and note.strip("()") not in page, note
    assert "set to your vendor" not in page
    document = parse(body.encode())
    prices_shown = [text_of(el) for el in document.iter("span") if el.get("class") in ("credits", "usd")]
    assert len(prices_shown) > 100
    numbers = [re.fullmatch(r"(\$?[\d,]+(?:\.\d+)?)(?: cr)?", shown).group(1) for shown in prices_shown]
    for number in numbers:
        whole, _, fraction = number.lstrip("$").partition(".")
        if whole.replace(",", "") not in ("0", ""):
            assert len(fraction) <= 2, number  # from 1 up: to the cent
        else:
            assert len(fraction.lstrip("0")) <= 4, number  # below 1: four significant digits at most
