"""Public pages: landing, pricing (from the price table), terms (from TERMS.md), privacy, and health checks."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

import markdown
from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request
from markupsafe import Markup
from rq import Queue
from sqlalchemy import func, select, text

from broker import ROOT, docs_render, hosts, metrics
from broker.extensions import services
from broker.ledger import EXPIRY
from broker.models import Job
from broker.pricing import (
    ModelPrice,
    format_credits_short,
    format_usd,
    price_summary,
    readable_number,
    ucr_to_usd,
)
from broker.web import errors

bp = Blueprint("public", __name__)
# HTTP errors outside /v1 become pages in the site's layout (the API's handler calls this hook).
bp.record_once(lambda state: errors.init_app(state.app))

KINDS = {
    "chat": "Chat",
    "embedding": "Embeddings",
    "image": "Images",
    "tts": "Text-to-speech",
    "music": "Music",
}
LANDING_MODELS = (
    "openai/gpt-4o-mini",
    "anthropic/claude-haiku-4-5",
    "gemini/gemini-2.5-flash",
    "openai/gpt-image-1",
    "elevenlabs/eleven_flash_v2_5",
    "suno/V5",
)
IMAGE_QUALITIES = ("low", "medium", "high")


@dataclass
class Money:
    """A price in credits (markup applied) and the same in US dollars."""

    credits: str
    usd: str


@dataclass
class PricedModel:
    id: str
    provider: str
    kind: str
    enabled: bool
    effective_from: str
    source_url: str
    rates: dict[str, Money]
    image_sizes: list[str] = field(default_factory=list)
    per_image: list[tuple[str, list[Money | None]]] = field(default_factory=list)
    max_output_tokens: int = 0
    context_window: int = 0
    max_chars: int = 0
    max_images: int = 0

    @property
    def breakable_id(self) -> Markup:
        """The model id with a line-break opportunity after the provider."""
        provider, _, name = self.id.partition("/")
        return Markup("{}/<wbr>{}").format(provider, name)

    @property
    def source_host(self) -> str:
        return self.source_url.split("/")[2] if self.source_url else ""

    @property
    def source_label(self) -> str:
        """Where the price comes from, for customers: the price table's own notes are the operator's."""
        if self.source_url:
            return self.source_host
        return "a simulation, no provider cost" if self.demo else "set by this service"

    @property
    def demo(self) -> bool:
        return self.provider == "demo"

    @property
    def headline(self) -> list[tuple[str, Money]]:
        """The one or two prices that sum the model up (the landing page's summary)."""
        if self.kind == "chat":
            return [("per 1M input tokens", self.rates["input"]), ("per 1M output tokens", self.rates["output"])]
        if self.kind == "image":
            for quality, prices in self.per_image:
                if quality == "medium" and "1024x1024" in self.image_sizes:
                    found = prices[self.image_sizes.index("1024x1024")]
                    if found:
                        return [("per 1024×1024 image, medium quality", found)]
            return [("per 1M image output tokens", self.rates["image_output"])]
        if self.kind == "tts":
            return [("per 1,000 characters", self.rates["per_1k_characters"])]
        return [("per song (one generation)", self.rates["per_generation"])]


def money(credits: str, credit_usd: Decimal) -> Money:
    """A price to read: credits without trailing zeros (``27``, ``29.95``), dollars to the cent or 4 digits."""
    amount = Decimal(credits)
    return Money(readable_number(amount, min_places=0), format_usd(amount * credit_usd))


@bp.app_template_filter("credits")
def credits_filter(value: int | str | Decimal) -> str:
    """``{{ ucr | credits }}`` (an int is micro-credits; a string or Decimal is credits), for lists and balances."""
    if isinstance(value, int):
        return format_credits_short(value)
    return readable_number(Decimal(value))


@bp.app_template_filter("credits_usd")
def credits_usd_filter(ucr: int) -> str:
    """``{{ ucr | credits_usd }}``: what an amount of micro-credits is worth in US dollars (``CREDIT_USD``)."""
    return format_usd(ucr_to_usd(ucr, current_app.config["CREDIT_USD"]))


def enabled_providers() -> dict[str, set[str]]:
    """The providers configured on this server, by kind."""
    svc = services()
    return {
        "chat": set(svc.providers),
        "embedding": {name for name, provider in svc.providers.items() if hasattr(provider, "embed")},
        "tts": set(svc.media.speech),
        "image": set(svc.media.images),
        "music": set(svc.media.music),
    }


def enabled_models() -> dict[str, list[str]]:
    """The model ids this server can serve, by kind, in price-table order."""
    enabled = enabled_providers()
    result: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for price in services().prices.models.values():
        if price.provider in enabled.get(price.kind, set()):
            result.setdefault(price.kind, []).append(price.id)
    return result


def priced(price: ModelPrice, markup: Decimal, credit_usd: Decimal, enabled: dict[str, set[str]]) -> PricedModel:
    """One model's prices in credits and USD (markup applied), from ``price_summary``."""
    summary = price_summary(price, markup, credit_usd)
    # Only the source's address is shown: the rest of the price table's "source" is the operator's note.
    url = price.source.partition(" ")[0]
    if not url.startswith("https://"):
        url = ""
    model = PricedModel(
        id=price.id,
        provider=price.provider,
        kind=price.kind,
        enabled=price.provider in enabled.get(price.kind, set()),
        effective_from=price.effective_from,
        source_url=url,
        rates={},
        max_output_tokens=price.max_output_tokens,
        context_window=price.context_window,
        max_chars=price.max_chars,
        max_images=price.max_images,
    )
    per_image = summary.pop("per_image_output", None)
    for name, value in summary.items():
        if name != "unit":
            model.rates[name] = money(value, credit_usd)
    if per_image:
        sizes = sorted({size for by_size in per_image.values() for size in by_size})
        model.image_sizes = sizes
        qualities = [q for q in IMAGE_QUALITIES if q in per_image] + [q for q in per_image if q not in IMAGE_QUALITIES]
        for quality in qualities:
            by_size = per_image[quality]
            cells = [money(by_size[size], credit_usd) if size in by_size else None for size in sizes]
            model.per_image.append((quality, cells))
    return model


def price_list() -> tuple[list[tuple[str, str, list[PricedModel]]], Decimal, Decimal]:
    """Every model in the price table grouped by kind, with the markup and credit value used."""
    svc = services()
    markup, credit_usd = svc.metering.markup, svc.metering.credit_usd
    enabled = enabled_providers()
    groups: dict[str, list[PricedModel]] = {kind: [] for kind in KINDS}
    for price in svc.prices.models.values():
        groups.setdefault(price.kind, []).append(priced(price, markup, credit_usd, enabled))
    return [(kind, KINDS.get(kind, kind), models) for kind, models in groups.items() if models], markup, credit_usd


# TERMS.md names the operator with placeholders, filled from configuration (config.OPERATOR_SETTINGS).
OPERATOR_PLACEHOLDER = re.compile(r"\[Operator: ([^\]]+)\]")
PLACEHOLDER_SETTINGS = {
    "legal name": "OPERATOR_NAME",
    "contact email": "OPERATOR_CONTACT",
    "jurisdiction": "OPERATOR_JURISDICTION",
}


def _markdown_text(value: str) -> str:
    """A configured value as literal Markdown text: no HTML, no emphasis or links of its own."""
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]#])", r"\\\1", value)


def fill_operator(source: str, operator: dict[str, str]) -> str:
    """TERMS.md with every ``[Operator: …]`` placeholder replaced; an unknown one is an error, never shown."""

    def replace(match: re.Match) -> str:
        setting = PLACEHOLDER_SETTINGS.get(match.group(1).strip())
        if setting is None:
            raise RuntimeError(f"TERMS.md has a placeholder no setting fills: {match.group(0)}")
        value = _markdown_text(operator[setting])
        if setting == "OPERATOR_CONTACT":
            return f"[{value}](mailto:{quote(operator[setting], safe='@')})"
        return value

    return OPERATOR_PLACEHOLDER.sub(replace, source)


@lru_cache(maxsize=4)
def _render_markdown(path: Path, mtime: float, operator: tuple[tuple[str, str], ...]) -> Markup:
    source = fill_operator(path.read_text(encoding="utf-8"), dict(operator))
    html = markdown.markdown(source, extensions=["tables", "sane_lists", "toc"])
    return Markup(html)


def operator_settings() -> dict[str, str]:
    return {name: current_app.config[name] for name in PLACEHOLDER_SETTINGS.values()}


def terms_html() -> Markup:
    path = ROOT / "TERMS.md"
    return _render_markdown(path, path.stat().st_mtime, tuple(sorted(operator_settings().items())))


@bp.get("/")
def landing():
    groups, markup, credit_usd = price_list()
    by_id = {model.id: model for _, _, models in groups for model in models}
    featured = [by_id[model_id] for model_id in LANDING_MODELS if model_id in by_id]
    enabled = enabled_providers()
    return render_template(
        "public/landing.html",
        featured=featured,
        markup=markup,
        credit_usd=credit_usd,
        enabled=enabled,
        quickstart=docs_render.quickstart(
            hosts.public_base_url(), docs_render.default_models(enabled_models())["chat"]
        ),
        model_count=len(by_id),
    )


@bp.get("/pricing")
def pricing():
    groups, markup, credit_usd = price_list()
    count = sum(len(models) for _, _, models in groups)
    return render_template(
        "public/pricing.html", groups=groups, markup=markup, credit_usd=credit_usd, model_count=count
    )


@bp.get("/terms")
def terms():
    return render_template("public/terms.html", terms=terms_html())


@bp.get("/privacy")
def privacy():
    return render_template("public/privacy.html", media_days=current_app.config["MEDIA_TTL_DAYS"])


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    svc = services()
    svc.redis.ping()
    svc.db().execute(text("SELECT 1"))
    return jsonify({"status": "ready"})


@bp.get("/metrics")
def metrics_endpoint():
    """Prometheus metrics, only with ``Authorization: Bearer METRICS_TOKEN``."""
    token = current_app.config["METRICS_TOKEN"]
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        abort(404)
    svc = services()

    def live_state() -> dict:
        session = svc.db()
        jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        queues = {name: Queue(name, connection=svc.queue_redis).count for name in ("media", "housekeeping")}
        return {"open_holds": svc.redis.zcard(EXPIRY), "queues": queues, "jobs": jobs}

    return Response(metrics.exposition(live_state), mimetype="text/plain; version=0.0.4")
