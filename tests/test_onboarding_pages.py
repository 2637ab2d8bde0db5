"""A new customer's first visit (issue 11, items 2, 5, 11 and 12): the overview's steps, money that reads
well, the pricing page, terms and privacy from configuration, the docs' examples, and compression.

Every test drives the real app (real Redis, real SQL); production apps are built as an operator
configures them.
"""

from __future__ import annotations

import secrets
import shutil

import pytest
import redis

from broker import create_app
from tests.conftest import CURRENT, OPERATOR, app_config
from tests.test_account_security import PASSWORD, link_in, path_of, post_form
from tests.test_public_pages import parse, text_of

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
