"""The price table (a data file) and the cost arithmetic: USD from usage, micro-credits from USD."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path

from broker.errors import NotFound
from broker.providers.base import MAX_COUNT, ImageUsage, Usage

UCR_PER_CREDIT = 1_000_000
MILLION = Decimal(1_000_000)


ZERO = Decimal(0)


@dataclass(frozen=True)
class ModelPrice:
    """One model's prices as listed in the price table (USD).

    Chat, embedding and image tokens: USD per 1M tokens. Text-to-speech: USD per 1k characters
    and the provider's billing units per character. Music: USD per generation.
    Fields a kind does not use are zero.
    """

    id: str
    provider: str
    upstream_model: str
    kind: str
    effective_from: str
    source: str
    input: Decimal = ZERO
    cached_input: Decimal = ZERO
    cache_write: Decimal = ZERO
    cache_write_1h: Decimal = ZERO
    output: Decimal = ZERO
    max_output_tokens: int = 0
    context_window: int = 0
    image_input: Decimal = ZERO
    text_output: Decimal = ZERO
    image_output_tokens: dict = field(default_factory=dict)
    max_images: int = 0
    usd_per_1k_chars: Decimal = ZERO
    units_per_char: Decimal = ZERO
    max_chars: int = 0
    usd_per_generation: Decimal = ZERO
    # Provider rules the adapter checks before calling (chat), as the row's ``rules`` object.
    rules: dict = field(default_factory=dict)

    @property
    def max_input_rate(self) -> Decimal:
        """The dearest way an input token can be billed (cache writes cost more)."""
        return max(self.input, self.cache_write, self.cache_write_1h)


DECIMAL_FIELDS = ("output", "image_input", "text_output", "usd_per_1k_chars", "units_per_char", "usd_per_generation")
INT_FIELDS = ("max_output_tokens", "context_window", "max_images", "max_chars")


def _model(model_id: str, row: dict) -> ModelPrice:
    provider, _, upstream = model_id.partition("/")
    values: dict = {name: Decimal(row[name]) for name in DECIMAL_FIELDS if name in row}
    values.update({name: int(row[name]) for name in INT_FIELDS if name in row})
    if "input" in row:
        values["input"] = Decimal(row["input"])
        values["cached_input"] = Decimal(row.get("cached_input", row["input"]))
        values["cache_write"] = Decimal(row.get("cache_write", row["input"]))
        values["cache_write_1h"] = Decimal(row.get("cache_write_1h", row.get("cache_write", row["input"])))
    return ModelPrice(
        id=model_id,
        provider=provider,
        upstream_model=upstream,
        kind=row["kind"],
        effective_from=row["effective_from"],
        source=row["source"],
        image_output_tokens=row.get("image_output_tokens", {}),
        rules=row.get("rules", {}),
        **values,
    )


class PriceTable:
    """All priced models, resolvable by ``provider/model`` or by a bare name that is unique."""

    def __init__(self, models: dict[str, ModelPrice]) -> None:
        self.models = models
        bare: dict[str, list[str]] = {}
        for model_id, price in models.items():
            bare.setdefault(price.upstream_model, []).append(model_id)
        self._bare = {name: ids[0] for name, ids in bare.items() if len(ids) == 1}

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        data = json.loads(Path(path).read_text())
        return cls({model_id: _model(model_id, row) for model_id, row in data["models"].items()})

    def resolve(self, name: str, providers: set[str] | None = None) -> ModelPrice:
        """The model named ``name``; ``NotFound`` (param ``model``) if unknown or not served."""
        price = self.models.get(name) or self.models.get(self._bare.get(name, ""))
        if price is None or (providers is not None and price.provider not in providers):
            raise NotFound(
                f"The model '{name}' does not exist or is not available. GET /v1/models lists the models you can use.",
                param="model",
                code="model_not_found",
            )
        return price


def chat_cost_usd(price: ModelPrice, usage: Usage) -> Decimal:
    """Provider cost of a chat call from its usage report, exact in Decimal."""
    total = (
        usage.input_tokens * price.input
        + usage.cached_input_tokens * price.cached_input
        + usage.cache_write_tokens * price.cache_write
        + usage.cache_write_1h_tokens * price.cache_write_1h
        + usage.output_tokens * price.output
    )
    return total / MILLION


PROMPT_CLASSES = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens")
OUTPUT_PARTS = ("reasoning_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens")


def usage_in_range(usage: Usage, prompt_bound: int, output_bound: int) -> Usage | None:
    """Every kind's provider usage passes here before it is priced or stored.

    None when a count is invalid (negative, or not a whole number: the adapters read those as
    negative, see ``base.count_of``): the caller then estimates. Else the usage with the prompt
    classes together cut to ``prompt_bound`` and the output to ``output_bound`` (each bound below
    ``MAX_COUNT``), flagged ``capped`` when anything was cut.
    """
    counts = [getattr(usage, name) for name in (*PROMPT_CLASSES, "output_tokens", *OUTPUT_PARTS)]
    if any(not isinstance(count, int) or isinstance(count, bool) or count < 0 for count in counts):
        return None
    cut: dict[str, int] = {}
    room = min(prompt_bound, MAX_COUNT - 1)
    for name in PROMPT_CLASSES:
        cut[name] = min(getattr(usage, name), room)
        room -= cut[name]
    cut["output_tokens"] = min(usage.output_tokens, output_bound, MAX_COUNT - 1)
    for name in OUTPUT_PARTS:
        cut[name] = min(getattr(usage, name), cut["output_tokens"])
    capped = usage.capped or any(cut[name] != getattr(usage, name) for name in cut)
    return replace(usage, **cut, capped=capped)


# An input image is held at this many prompt tokens, unless its model's price-table rules say
# it can cost more (``image_tokens_max``: gpt-4o-mini bills one high-detail image at up to
# 2,833 + 8 × 5,667 tokens; the patch-based minis and nanos at 1,536 patches × 1.62 or 2.46).
IMAGE_TOKEN_BOUND = 2000


def image_token_bound(rules: dict) -> int:
    """The most prompt tokens one input image can cost on a model with these price-table rules."""
    return max(IMAGE_TOKEN_BOUND, int(rules.get("image_tokens_max", 0)))


def image_cost_usd(price: ModelPrice, usage: ImageUsage) -> Decimal:
    """Provider cost of an image generation from its usage report."""
    total = (
        usage.text_input_tokens * price.input
        + usage.image_input_tokens * price.image_input
        + usage.image_output_tokens * price.output
        + usage.text_output_tokens * (price.text_output or price.output)
    )
    return total / MILLION


def image_output_bound(price: ModelPrice, size: str, quality: str) -> int:
    """The most output tokens one image of this size and quality can cost ("auto": the dearest)."""
    qualities = [quality] if quality in price.image_output_tokens else list(price.image_output_tokens)
    sizes = [size] if size != "auto" else None
    return max(
        tokens for q in qualities for s, tokens in price.image_output_tokens[q].items() if sizes is None or s in sizes
    )


def speech_cost_usd(price: ModelPrice, characters: int, billed_units: int | None, unit_usd: Decimal | None) -> Decimal:
    """Provider cost of speech: its billed units × the unit price, else characters at the table's rate.

    ``unit_usd`` is what one billing unit costs us (the ElevenLabs plan's USD per
    credit); without it, the price table's per-character rate gives it.
    """
    if unit_usd is None:
        unit_usd = price.usd_per_1k_chars / 1000 / price.units_per_char
    if billed_units is None:
        return characters * price.usd_per_1k_chars / 1000
    return billed_units * unit_usd


def charge_ucr(cost_usd: Decimal, markup: Decimal, credit_usd: Decimal) -> int:
    """Micro-credits to charge for a provider cost: cost × markup, rounded up to the µcr."""
    ucr = cost_usd * markup / credit_usd * UCR_PER_CREDIT
    return int(ucr.to_integral_value(rounding=ROUND_CEILING))


def ucr_per_token(usd_per_million: Decimal, markup: Decimal, credit_usd: Decimal) -> int:
    """Upper bound in whole µcr of one token at a per-1M-token USD price (for holds)."""
    return int((usd_per_million * markup / credit_usd).to_integral_value(rounding=ROUND_CEILING))


def credits_to_ucr(credits: Decimal) -> int:
    """Whole micro-credits in a decimal credit amount; more than 6 decimals is refused."""
    ucr = credits * UCR_PER_CREDIT
    if ucr != ucr.to_integral_value():
        raise ValueError("credits have at most 6 decimal places")
    return int(ucr)


MAX_SPEND_CAP_CREDITS = 1_000_000  # a key's daily spend cap: $10,000 a day at $0.01 a credit
SPEND_CAP_RULE = (
    f"The spend cap is in credits a day, more than 0 and at most {MAX_SPEND_CAP_CREDITS:,}, at most 6 decimals."
)


def spend_cap_ucr(text: str) -> int:
    """A per-key daily spend cap given in credits, as micro-credits; ValueError with ``SPEND_CAP_RULE`` otherwise."""
    try:
        credits = Decimal(text.strip())
    except ArithmeticError:
        raise ValueError(SPEND_CAP_RULE) from None
    if not credits.is_finite() or not 0 < credits <= MAX_SPEND_CAP_CREDITS:
        raise ValueError(SPEND_CAP_RULE)
    try:
        return credits_to_ucr(credits)
    except ValueError:
        raise ValueError(SPEND_CAP_RULE) from None


def format_credits(ucr: int) -> str:
    """Micro-credits as a decimal credit string with six places, e.g. ``12.000345``."""
    sign = "-" if ucr < 0 else ""
    whole, frac = divmod(abs(ucr), UCR_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


def readable_number(value: Decimal, significant: int = 4, min_places: int = 2) -> str:
    """An amount for people to read, not to reconcile: ``1,234.57``, ``0.2995``, ``0.000123``.

    At least 1: two decimals. Below 1: ``significant`` significant digits. Trailing zeros go,
    down to ``min_places`` decimals. Receipts, CSV and the API keep full precision
    (``format_credits``); this is for lists, balances and prices.
    """
    if not value:
        return f"{0:.{min_places}f}"
    magnitude = abs(value)
    places = 2 if magnitude >= 1 else max(2, significant - 1 - magnitude.adjusted())
    rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    text = f"{rounded:,.{places}f}"
    while places > min_places and text.endswith("0"):
        text, places = text[:-1], places - 1
    return text.removesuffix(".")


def format_credits_short(ucr: int) -> str:
    """Micro-credits as credits to read in a list or a balance: ``12.35``, ``0.00405`` (see ``readable_number``)."""
    return readable_number(Decimal(ucr) / UCR_PER_CREDIT)


def format_usd(amount: Decimal) -> str:
    """US dollars to read: ``$12.35``, ``$0.2995``, ``-$1.00`` (see ``readable_number``)."""
    text = readable_number(abs(amount))
    return f"-${text}" if amount < 0 and text.strip("0.,") else f"${text}"


def ucr_to_usd(ucr: int, credit_usd: Decimal) -> Decimal:
    """The US-dollar value of an amount of micro-credits at ``credit_usd`` a credit."""
    return Decimal(ucr) * credit_usd / UCR_PER_CREDIT


def text_token_bound(text: str) -> int:
    """An upper bound on the tokens a text can be: a BPE token is never shorter than one byte."""
    return len(text.encode())


def text_token_estimate(text: str) -> int:
    """A typical token count for a text (about four bytes a token), used when usage is missing."""
    return math.ceil(len(text.encode()) / 4)


def price_summary(price: ModelPrice, markup: Decimal, credit_usd: Decimal) -> dict:
    """A model's prices in credits (markup applied) by its kind: what /v1/models and the pricing page show."""

    def credits(usd: Decimal) -> str:
        return format((usd * markup / credit_usd).normalize(), "f")

    if price.kind == "chat":
        rates = {n: credits(getattr(price, n)) for n in ("input", "cached_input", "cache_write", "output")}
        return {"unit": "credits per 1M tokens", **rates}
    if price.kind == "image":
        per_image = {
            quality: {size: credits(tokens * price.output / MILLION) for size, tokens in sizes.items()}
            for quality, sizes in price.image_output_tokens.items()
        }
        return {
            "unit": "credits per 1M tokens",
            "text_input": credits(price.input),
            "image_input": credits(price.image_input),
            "image_output": credits(price.output),
            "per_image_output": per_image,
        }
    if price.kind == "tts":
        return {"unit": "credits per 1k characters", "per_1k_characters": credits(price.usd_per_1k_chars)}
    if price.kind == "embedding":
        return {"unit": "credits per 1M tokens", "input": credits(price.input)}
    return {"unit": "credits per generation", "per_generation": credits(price.usd_per_generation)}
