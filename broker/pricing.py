"""The price table (a data file) and the cost arithmetic: USD from usage, micro-credits from USD."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

from broker.errors import NotFound
from broker.providers.base import Usage

UCR_PER_CREDIT = 1_000_000
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class ModelPrice:
    """One model's prices in USD per 1M tokens, as listed in the price table."""

    id: str
    provider: str
    upstream_model: str
    kind: str
    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    output: Decimal
    max_output_tokens: int
    context_window: int
    effective_from: str
    source: str

    @property
    def max_input_rate(self) -> Decimal:
        """The dearest way an input token can be billed (cache writes cost more)."""
        return max(self.input, self.cache_write, self.cache_write_1h)


def _model(model_id: str, row: dict) -> ModelPrice:
    provider, _, upstream = model_id.partition("/")
    input_price = Decimal(row["input"])
    return ModelPrice(
        id=model_id,
        provider=provider,
        upstream_model=upstream,
        kind=row["kind"],
        input=input_price,
        cached_input=Decimal(row.get("cached_input", row["input"])),
        cache_write=Decimal(row.get("cache_write", row["input"])),
        cache_write_1h=Decimal(row.get("cache_write_1h", row.get("cache_write", row["input"]))),
        output=Decimal(row["output"]),
        max_output_tokens=int(row["max_output_tokens"]),
        context_window=int(row["context_window"]),
        effective_from=row["effective_from"],
        source=row["source"],
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


def format_credits(ucr: int) -> str:
    """Micro-credits as a decimal credit string with six places, e.g. ``12.000345``."""
    sign = "-" if ucr < 0 else ""
    whole, frac = divmod(abs(ucr), UCR_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


def usd_per_million_in_credits(usd: Decimal, markup: Decimal, credit_usd: Decimal) -> str:
    """Credits charged per 1M tokens at a USD price, as a plain decimal string ("13.5")."""
    return format((usd * markup / credit_usd).normalize(), "f")


def text_token_bound(text: str) -> int:
    """An upper bound on the tokens a text can be: a BPE token is never shorter than one byte."""
    return len(text.encode())


def text_token_estimate(text: str) -> int:
    """A typical token count for a text (about four bytes a token), used when usage is missing."""
    return math.ceil(len(text.encode()) / 4)
