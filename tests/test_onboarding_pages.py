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

from broker import ROOT, create_app, docs_render, pricing
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


# -- item 12: the docs -------------------------------------------------------------------------


def test_every_example_is_an_instance_of_its_model():
    from broker.schemas import EXAMPLES

    assert len(EXAMPLES) >= 12
    for model, example in EXAMPLES.items():
        model.model_validate(example)  # raises on any drift between an example and its model


def test_docs_show_an_example_response_for_every_operation_from_its_model(client):
    from broker.schemas import EXAMPLES

    spec = client.get("/openapi.json").json
    by_name = {model.__name__: example for model, example in EXAMPLES.items()}
    document = parse(client.get("/docs").data)
    seen = 0
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            section = by_id(document, "op-" + docs_render.slug(operation["operationId"]))
            blocks = [el for el in section.iter("div") if el.get("data-testid") == "example-response"]
            assert len(blocks) == 1, (method, path)
            shown = text_of(blocks[0])
            success = next(r for code, r in sorted(operation["responses"].items()) if code.startswith("2"))
            media = next(iter(success["content"].values()))
            if "example" in media:
                model = media["schema"]["$ref"].rsplit("/", 1)[1]
                assert media["example"] == by_name[model], (method, path)  # the model's own example
                code = next(el for el in blocks[0].iter("code"))
                assert json.loads("".join(code.itertext())) == media["example"]
            else:
                assert media["schema"]["format"] == "binary" and "the file's bytes" in shown, (method, path)
            seen += 1
    assert seen == sum(len(methods) for methods in spec["paths"].values()) >= 15


def keys_match(example: dict, real: dict, where: str) -> None:
    """Every field of the example is in the real answer and the other way round, one level down too."""
    assert set(example) == set(real), (where, set(example) ^ set(real))
    for name, value in example.items():
        if isinstance(value, dict) and isinstance(real[name], dict) and name not in ("pricing", "detail"):
            keys_match(value, real[name], f"{where}.{name}")
        if isinstance(value, list) and value and isinstance(value[0], dict) and real[name]:
            keys_match(value[0], real[name][0], f"{where}.{name}[]")


def test_the_examples_look_like_what_the_api_really_answers(app, client, tenant, worker):
    from broker.schemas import EXAMPLES, Balance, ChatCompletion, JobList, JobOut, ModelList, Receipt, UsageList

    h = tenant.headers
    keys_match(EXAMPLES[Balance], client.get("/v1/balance", headers=h).json, "balance")
    keys_match(EXAMPLES[ModelList], client.get("/v1/models", headers=h).json, "models")
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers=h,
    )
    real_chat = chat.json
    example_chat = json.loads(json.dumps(EXAMPLES[ChatCompletion]))
    # Fields OpenAI sends only sometimes (tools, annotations, fingerprints) are not in the example.
    for optional in ("system_fingerprint", "service_tier"):
        real_chat.pop(optional, None)
    for name in ("tool_calls", "function_call"):
        real_chat["choices"][0]["message"].pop(name, None)
    keys_match(example_chat, real_chat, "chat")
    receipt = client.get(f"/v1/requests/{chat.headers['X-Request-Id']}", headers=h).json
    keys_match(EXAMPLES[Receipt], receipt, "receipt")
    keys_match(EXAMPLES[UsageList], client.get("/v1/usage", headers=h).json, "usage")
    job = client.post(
        "/v1/image", json={"model": "demo/image", "prompt": "a dot"}, headers={**h, "Prefer": "wait=20"}
    ).json
    keys_match(EXAMPLES[JobOut], job, "job")
    keys_match(EXAMPLES[JobList], client.get("/v1/jobs", headers=h).json, "jobs")


def test_the_documented_headers_are_the_ones_the_api_sends(client, tenant):
    spec = client.get("/openapi.json").json
    page = text_of(by_id(parse(client.get("/docs").data), "headers"))
    for name in (
        "Idempotency-Key",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "Retry-After",
        "X-Credits-Charged",
        "X-Credits-Remaining",
        "X-Credits-Held",
        "X-Request-Id",
    ):
        assert name in page, name
    chat_doc = spec["paths"]["/v1/chat/completions"]["post"]
    assert "Idempotency-Key" in {p["name"] for p in chat_doc["parameters"] if p["in"] == "header"}
    documented = set(chat_doc["responses"]["200"]["headers"]) - {"Idempotent-Replayed"}  # only on a replay
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={**tenant.headers, "Idempotency-Key": "first-try"},
    )
    assert documented <= set(chat.headers.keys()), documented - set(chat.headers.keys())
    again = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={**tenant.headers, "Idempotency-Key": "first-try"},
    )
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Retry-After" in spec["paths"]["/v1/balance"]["get"]["responses"]["429"]["headers"]


def test_docs_have_javascript_examples_beside_curl_and_python(client):
    spec = client.get("/openapi.json").json
    document = parse(client.get("/docs").data)
    for path, methods in spec["paths"].items():
        for operation in methods.values():
            section = by_id(document, "op-" + docs_render.slug(operation["operationId"]))
            labels = [el.get("data-tab-label") for el in section.iter("section") if el.get("data-tab-label")]
            assert labels[:2] == ["curl", "Python (requests)"] and "JavaScript (fetch)" in labels, (path, labels)
            fetch = text_of(by_id(document, docs_render.slug(operation["operationId"]) + "-fetch"))
            assert "await fetch(" in fetch and path.split("{")[0] in fetch
    for path in ("/v1/chat/completions", "/v1/chat"):
        op_id = docs_render.slug(spec["paths"][path]["post"]["operationId"])
        sdk = text_of(by_id(document, f"{op_id}-openai-js"))
        assert 'import OpenAI from "openai"' in sdk and 'baseURL: "http://localhost/v1"' in sdk


def test_webhooks_are_in_an_operator_section_not_the_customer_api(client):
    spec = client.get("/openapi.json").json
    for path in ("/webhooks/stripe", "/webhooks/coinbase"):
        assert spec["paths"][path]["post"]["x-audience"] == "operator"
    assert all(
        "x-audience" not in op for path, ops in spec["paths"].items() if path.startswith("/v1/") for op in ops.values()
    )
    document = parse(client.get("/docs").data)
    operators = text_of(by_id(document, "operators"))
    assert "/webhooks/stripe" in operators and "/webhooks/coinbase" in operators
    customer = [el for el in document.iter("section") if (el.get("id") or "").startswith("tag-")]
    assert customer and all("/webhooks/" not in text_of(section) for section in customer)


def test_web_and_api_never_import_each_other():
    import ast

    for package, other in (("web", "broker.api"), ("api", "broker.web")):
        for path in (ROOT / "broker" / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                for name in names:
                    assert not (name == other or name.startswith(other + ".")), (str(path), name)


# -- compression ---------------------------------------------------------------------------------


def _without_csrf(page: bytes) -> bytes:
    return re.sub(rb'("X-CSRFToken": "|name="csrf_token" value=")[^"]*', rb"\1", page)


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_pages_static_files_and_the_openapi_document_are_compressed(client, encoding):
    import gzip

    import brotli

    decode = {"gzip": gzip.decompress, "br": brotli.decompress}[encoding]
    for path in ("/docs", "/openapi.json", "/static/css/site.css", "/pricing"):
        raw = client.get(path)
        raw_body = raw.get_data()
        raw.close()
        packed = client.get(path, headers={"Accept-Encoding": encoding})
        body = packed.get_data()
        packed.close()
        assert packed.headers.get("Content-Encoding") == encoding, path
        assert "Accept-Encoding" in packed.headers.get("Vary", ""), path
        # Pages carry a CSRF token signed with the time: two fetches differ in it across a second.
        assert _without_csrf(decode(body)) == _without_csrf(raw_body), path
        assert len(body) < len(raw_body) / 3, (path, len(body), len(raw_body))
    docs = client.get("/docs", headers={"Accept-Encoding": encoding})
    assert len(docs.get_data()) < 40_000  # the raw page is far over 200 KB


def test_the_api_event_streams_and_no_store_pages_are_never_compressed(app, client, tenant):
    gzip_only = {"Accept-Encoding": "gzip, br, zstd"}
    models = client.get("/v1/models", headers={**tenant.headers, **gzip_only})
    assert models.status_code == 200 and len(models.get_data()) > 1000
    assert "Content-Encoding" not in models.headers
    stream = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={**tenant.headers, **gzip_only},
    )
    assert stream.mimetype == "text/event-stream"
    assert "Content-Encoding" not in stream.headers
    assert b"data: [DONE]" in stream.get_data()

    from werkzeug.security import generate_password_hash

    from broker.models import Account

    session = app.extensions["broker"].db()
    session.get(Account, tenant.account_id).password_hash = generate_password_hash(PASSWORD)
    session.commit()
    assert login(client, tenant.email).status_code == 302
    for path in ("/dashboard/", "/dashboard/keys", "/signup"):
        page = client.get(path, headers=gzip_only)
        assert page.status_code == 200 and "no-store" in page.headers["Cache-Control"], path
        assert "Content-Encoding" not in page.headers, path
