"""Shared pieces of the browser tests: Chromium, a watch on everything a page logs, and axe-core.

``Watch`` records console errors and warnings, uncaught page errors, CSP violations (the
``securitypolicyviolation`` event, seen from a script added before any page script) and
failed or 4xx/5xx requests; ``assert_clean`` fails a test on any of them. ``axe_violations``
runs the vendored axe-core (``tests/vendor/axe-core``, pinned, with its licence) against the
page for WCAG 2.2 AA. It is evaluated through the DevTools protocol, which the site's CSP
does not govern, so the test needs no ``bypass_csp`` and still sees every real violation.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
AXE_SOURCE = Path(__file__).resolve().parent / "vendor" / "axe-core" / "axe.min.js"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]

# Runs in every document before its own scripts: CSP violations land in a list the test reads.
_CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  const where = e.sourceFile + ':' + e.lineNumber;
  window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline') + ' ' + where);
});
"""


@contextmanager
def chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watch:
    """Everything a page complained about while a test drove it."""

    problems: list[str] = field(default_factory=list)
    allowed_statuses: set[int] = field(default_factory=set)

    def attach(self, page) -> None:
        page.add_init_script(_CSP_LISTENER)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("requestfailed", self._request_failed)
        page.on("response", self._response)

    def _console(self, message) -> None:
        if message.type not in ("error", "warning"):
            return
        status = re.match(r"Failed to load resource: the server responded with a status of (\d+)", message.text)
        if status and int(status.group(1)) in self.allowed_statuses:
            return  # Chromium's own line for a status the test expects (e.g. the 404 it asked for)
        self.problems.append(f"console {message.type}: {message.text}")

    def _request_failed(self, request) -> None:
        # A navigation that replaces a page in flight aborts its pending requests: not a fault.
        if request.failure and "ERR_ABORTED" not in request.failure:
            self.problems.append(f"request failed: {request.method} {request.url} ({request.failure})")

    def _response(self, response) -> None:
        if response.status >= 400 and response.status not in self.allowed_statuses:
            self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    def collect(self, page) -> None:
        """Take the CSP violations of the document now shown (each document starts its own list)."""
        for violation in page.evaluate("window.__cspViolations ? window.__cspViolations.splice(0) : []"):
            self.problems.append(f"CSP violation on {page.url}: {violation}")

    def assert_clean(self, page) -> None:
        self.collect(page)
        assert not self.problems, "the page logged problems:\n" + "\n".join(self.problems)


def new_page(browser, viewport: dict = DESKTOP, **context_options):
    """A page in a fresh context (its own cookies), watched; returns (page, watch)."""
    context = browser.new_context(viewport=viewport, **context_options)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("dialog", lambda dialog: dialog.accept())
    watch = Watch()
    watch.attach(page)
    return page, watch


def axe_violations(page) -> list[str]:
    """WCAG 2.2 AA violations axe-core finds on the page as it is now, one line each."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE_SOURCE.read_text())
    result = page.evaluate(
        "async (tags) => (await axe.run(document, {runOnly: {type: 'tag', values: tags}})).violations"
        ".map(v => v.id + ' (' + v.impact + '): ' + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '))",
        WCAG_TAGS,
    )
    return list(result)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
