"""The public pages: landing, pricing, API reference and terms.

Each page must be valid HTML (html5lib, strict), have one <h1>, no inline script or style (the
Content-Security-Policy allows only our own origin) and show live data: prices computed here
independently from ``prices.json``, and every path of ``/openapi.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from decimal import ROUND_HALF_UP, Decimal

import html5lib
import pytest
from html5lib.html5parser import ParseError

from broker import ROOT, docs_render
from broker.api import openapi
from broker.web import enabled_models
from broker.web.docs import spec

PAGES = ["/", "/pricing", "/docs", "/terms"]
PRICES = json.loads((ROOT / "broker" / "prices.json").read_text())["models"]
MILLION = Decimal(1_000_000)


def parse(body: bytes):
    """The document tree; fails the test on the first HTML parse error."""
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    try:
        document = parser.parse(body)
    except ParseError as error:
        line, col = parser.errors[-1][0] if parser.errors else ("?", "?")
        pytest.fail(f"HTML parse error at {line}:{col}: {error}")
    assert parser.errors == []
    return document


def text_of(element) -> str:
    return re.sub(r"\s+", " ", "".join(element.itertext())).strip()


def by_id(document, element_id: str):
    found = [el for el in document.iter() if el.get("id") == element_id]
    assert len(found) == 1, f"expected one element with id {element_id!r}, found {len(found)}"
    return found[0]


def plain(value: Decimal) -> str:
    """A decimal as the pages print it: no exponent, no trailing zeros."""
    return format(value.normalize(), "f")


def rounded(value: Decimal, min_places: int) -> str:
    """As the pages show prices: to the cent from 1 up, else to 4 significant digits; thousands separated."""
    step = Decimal("0.01") if value >= 1 else Decimal(1).scaleb(min(-2, value.adjusted() - 3))
    text = f"{value.quantize(step, rounding=ROUND_HALF_UP):,f}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(min_places, "0")
    return f"{whole}.{frac}" if frac else whole


def expected(app, usd: str | Decimal) -> tuple[str, str]:
    """(credits, dollars) as the pages show a provider price in USD, with the app's markup and credit value."""
    credits = Decimal(usd) * app.config["MARKUP"] / app.config["CREDIT_USD"]
    return rounded(credits, 0), "$" + rounded(credits * app.config["CREDIT_USD"], 2)


@pytest.mark.parametrize("path", PAGES)
def test_page_is_valid_accessible_html(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    document = parse(response.data)

    assert document.get("lang") == "en"
    assert text_of(document.find("head/title"))
    assert len(list(document.iter("h1"))) == 1
    assert by_id(document, "main").tag == "main"
    assert any(a.get("href") == "#main" for a in document.iter("a")), "skip link"
    for img in document.iter("img"):
        assert img.get("alt") is not None, img.attrib
    for script in document.iter("script"):
        assert script.get("src"), "inline <script>"
        assert not text_of(script)
    assert not list(document.iter("style")), "<style> block"
    ids = [el.get("id") for el in document.iter() if el.get("id")]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for el in document.iter():
        for name in el.attrib:
            assert name != "style", f"style= on <{el.tag}>"
            assert not name.startswith("on"), f"{name}= on <{el.tag}>"
    for a in document.iter("a"):
        href = a.get("href", "")
        if href.startswith("#") and href != "#":
            assert href[1:] in ids, f"broken anchor {href}"
    for button in document.iter("button"):
        target = button.get("data-copy-target")
        if target:
            assert target in ids, f"copy button for missing #{target}"
    policy = response.headers.get("Content-Security-Policy", "")
    assert "unsafe-inline" not in policy


def test_static_assets_are_served(client):
    for path in ("/static/css/site.css", "/static/js/site.js"):
        response = client.get(path)
        assert response.status_code == 200, path
        response.close()


def test_pricing_lists_every_model_with_markup_applied(app, client):
    document = parse(client.get("/pricing").data)

    for model_id in PRICES:
        entry = by_id(document, "model-" + model_id.replace("/", "-"))
        assert model_id in text_of(entry)
        assert PRICES[model_id]["effective_from"] in text_of(entry)

    # gpt-4o-mini: $0.15 / 1M input × 1.8 ÷ $0.01 a credit = 27 credits ($0.27).
    row = text_of(by_id(document, "model-openai-gpt-4o-mini"))
    assert expected(app, "0.15") == ("27", "$0.27")
    mini = PRICES["openai/gpt-4o-mini"]
    for field in ("input", "cached_input", "output"):
        credits, usd = expected(app, mini[field])
        assert f"{credits} cr" in row and usd in row, (field, credits, usd, row)
    assert "108 cr" in row and "$1.08" in row

    # Speech: per 1k characters.
    row = text_of(by_id(document, "model-elevenlabs-eleven_flash_v2_5"))
    credits, usd = expected(app, PRICES["elevenlabs/eleven_flash_v2_5"]["usd_per_1k_chars"])
    assert (credits, usd) == ("9", "$0.09")
    assert f"{credits} cr" in row and usd in row

    # Music: per song.
    row = text_of(by_id(document, "model-suno-V5"))
    credits, usd = expected(app, PRICES["suno/V5"]["usd_per_generation"])
    assert (credits, usd) == ("14.4", "$0.144")
    assert f"{credits} cr" in row and usd in row

    # Images: per 1M tokens, and per image from the output tokens of a size and quality.
    card = text_of(by_id(document, "model-openai-gpt-image-1"))
    image = PRICES["openai/gpt-image-1"]
    credits, usd = expected(app, image["output"])
    assert f"{credits} cr" in card and usd in card
    tokens = image["image_output_tokens"]["high"]["1024x1024"]
    credits, usd = expected(app, Decimal(tokens) * Decimal(image["output"]) / MILLION)
    assert (credits, usd) == ("29.95", "$0.2995")  # exactly 29.952 credits, $0.29952: rounded to read
    assert f"{credits} cr" in card and usd in card

    # The basis of the numbers is shown.
    assert f"{plain(app.config['MARKUP'])}×" in text_of(by_id(document, "markup"))
    assert f"${plain(app.config['CREDIT_USD'])}" in text_of(by_id(document, "credit-usd"))
    for model_id in PRICES:  # the test app configures every provider
        assert "not enabled on this server" not in text_of(by_id(document, "model-" + model_id.replace("/", "-")))


def test_pricing_marks_models_whose_provider_is_not_configured(app, client):
    svc = app.extensions["broker"]
    svc.providers.pop("anthropic")
    svc.media.music.pop("suno")
    document = parse(client.get("/pricing").data)
    for model_id in PRICES:
        entry = text_of(by_id(document, "model-" + model_id.replace("/", "-")))
        off = model_id.startswith(("anthropic/", "suno/"))
        assert ("not enabled on this server" in entry) == off, model_id


def test_landing_shows_providers_prices_quick_start_and_sign_up(app, client):
    body = client.get("/").data
    document = parse(body)
    page = text_of(document)
    for name in ("OpenAI", "Anthropic", "Google Gemini", "ElevenLabs", "Suno", "Demo provider"):
        assert name in page, name
    assert "unofficial" in page.lower()
    hrefs = {a.get("href") for a in document.iter("a")}
    assert {"/pricing", "/docs", "/signup"} <= hrefs
    credits, usd = expected(app, PRICES["openai/gpt-4o-mini"]["input"])
    assert f"{credits} credits" in page and usd in page
    quick_start = text_of(by_id(document, "qs-python"))
    assert 'base_url="http://localhost/v1"' in quick_start
    assert "http://localhost/v1/chat/completions" in text_of(by_id(document, "qs-curl"))


def test_docs_cover_every_path_and_method_of_the_openapi_document(client):
    document_spec = client.get("/openapi.json").json
    document = parse(client.get("/docs").data)
    page = text_of(document)
    for path, methods in document_spec["paths"].items():
        assert path in page, path
        for method, operation in methods.items():
            section = text_of(by_id(document, "op-" + docs_render.slug(operation["operationId"])))
            assert method.upper() in section and path in section
            assert operation["summary"].replace("`", "") in section
            for code in operation["responses"]:
                assert code in section, (path, method, code)
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                schema = document_spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
                for field in schema["properties"]:
                    assert field in section, (path, field)
            for parameter in operation["parameters"]:
                assert parameter["name"] in section
            assert "curl" in section and "requests" in section
            if path in ("/v1/chat/completions", "/v1/chat"):
                assert "from openai import OpenAI" in section
    for guide in ("authentication", "errors", "streaming", "jobs"):
        by_id(document, guide)
    for status in openapi.ERRORS:
        assert status in text_of(by_id(document, "errors"))
    streaming = text_of(by_id(document, "streaming"))
    assert "cost_credits" in streaming and "[DONE]" in streaming and "estimated" in streaming
    jobs = text_of(by_id(document, "jobs"))
    assert "Prefer: wait=" in jobs and "Location" in jobs and "DELETE" in jobs and "/content" in jobs
    assert "ChatCompletionRequest" in page


def test_docs_example_bodies_are_accepted_by_the_api(app, client, tenant, worker):
    """The example builder's bodies (from the schemas) pass the API's own validation.

    A worker runs: the synchronous media routes wait for their job.
    """
    with app.test_request_context(base_url="http://localhost/"):
        models = docs_render.default_models(enabled_models())
        ref = docs_render.reference(spec(), "http://localhost/", openapi.ERRORS, models)
    posted = 0
    for op in ref.operations:
        if op.example_body is None or op.path.startswith("/webhooks/"):
            continue
        response = client.post(op.path, json=op.example_body, headers=tenant.headers)
        assert response.status_code in (200, 201, 202), (op.path, response.json)
        posted += 1
    assert posted >= 8, [op.path for op in ref.operations if op.example_body is not None]  # /v1/embeddings too


def test_docs_field_table_resolves_refs_and_constraints(client):
    document_spec = client.get("/openapi.json").json
    rows = docs_render.field_rows(
        {"$ref": "#/components/schemas/ChatCompletionRequest"}, document_spec, docs_render.FIELD_NOTES
    )
    by_name = {row.name: row for row in rows}
    assert [row.name for row in rows[:2]] == ["model", "messages"]
    assert by_name["messages"].required and by_name["messages"].type == "array of Message"
    assert by_name["messages[].role"].depth == 1
    assert "one of <code>system</code>" in str(by_name["messages[].role"].constraints[0])
    assert [str(c) for c in by_name["n"].constraints] == ["1 to 8", "default <code>1</code>"]
    assert by_name["temperature"].type == "number"


def test_terms_render_terms_md(client):
    document = parse(client.get("/terms").data)
    source = (ROOT / "TERMS.md").read_text()
    title = re.search(r"^# (.+)$", source, re.M).group(1)
    assert text_of(next(document.iter("h1"))) == title
    headings = [text_of(h) for h in document.iter("h2")]
    assert headings == re.findall(r"^## (.+)$", source, re.M)


def test_copy_buttons_and_code_tabs_work_in_a_browser(live_server):
    """site.js in Chromium, under the app's Content-Security-Policy: tabs switch, copy copies, nothing is refused."""
    from playwright import sync_api

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-quic"]
        )
        try:
            context = browser.new_context(viewport={"width": 375, "height": 800})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server)
            page = context.new_page()
            page.set_default_timeout(15_000)
            problems: list[str] = []
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))

            page.goto(live_server + "/docs")
            operation = page.locator("#op-post-v1-chat-completions")
            tabs = operation.locator("[role=tab]")
            assert tabs.all_inner_texts() == [
                "curl",
                "Python (requests)",
                "Python (openai SDK)",
                "JavaScript (fetch)",
                "JavaScript (openai SDK)",
            ]
            assert page.locator("#post-v1-chat-completions-curl").is_visible()
            assert page.locator("#post-v1-chat-completions-openai").is_hidden()
            tabs.nth(2).click()
            assert tabs.nth(2).get_attribute("aria-selected") == "true"
            assert page.locator("#post-v1-chat-completions-openai").is_visible()
            assert page.locator("#post-v1-chat-completions-curl").is_hidden()
            tabs.nth(2).press("ArrowLeft")
            assert page.locator("#post-v1-chat-completions-python").is_visible()
            assert page.evaluate("document.activeElement.textContent") == "Python (requests)"

            button = page.locator("#post-v1-chat-completions-python button[data-copy-target]")
            button.click()
            sync_api.expect(button).to_have_text("Copied")
            copied = page.evaluate("navigator.clipboard.readText()")
            assert copied == page.locator("#post-v1-chat-completions-python-code").text_content()
            assert "requests.post(" in copied

            for path in ("/", "/pricing", "/terms"):
                page.goto(live_server + path)
                assert page.locator("button[data-copy-target][hidden]").count() == 0
            page.goto(live_server + "/")
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.getAttribute('href')") == "#main"
            assert problems == []
        finally:
            browser.close()
