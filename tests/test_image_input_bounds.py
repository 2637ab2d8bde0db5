"""An input image is held at what its model can bill for it (issue 12 item 3): never a hold below the charge.

gpt-4o-mini bills a high-detail image at up to 2,833 + 8 × 5,667 = 48,169 prompt tokens, far
above the broker's generic 2,000-token bound; its price-table row says so
(``rules.image_tokens_max``) and the OpenAI adapter's check adds the difference to the hold.
"""

from __future__ import annotations

import openai
import pytest

from broker import pricing
from tests.conftest import assert_invariant, make_tenant

IMAGE = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
WITH_IMAGE = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": IMAGE}}],
    }
]


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def test_the_price_table_bounds_gpt_4o_mini_images_at_their_documented_maximum(app):
    rules = app.extensions["broker"].prices.models["openai/gpt-4o-mini"].rules
    assert pricing.image_token_bound(rules) == 2833 + 8 * 5667
    assert pricing.image_token_bound(app.extensions["broker"].prices.models["openai/gpt-4o"].rules) == 2000


def test_an_image_on_gpt_4o_mini_is_held_at_its_maximum(app, live_server, upstream):
    # 48,169 tokens × 27 µcr ≈ 1.3 credits for the image alone: 0.5 credits cannot hold it.
    tenant = make_tenant("0.5")
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(
            model="openai/gpt-4o-mini", messages=WITH_IMAGE, max_tokens=10
        )
    assert raised.value.status_code == 402 and upstream.requests == []
    text_only = [{"role": "user", "content": "What is this?"}]
    sdk(live_server, tenant.key).chat.completions.create(model="openai/gpt-4o-mini", messages=text_only, max_tokens=10)
    assert_invariant(app)


def test_with_enough_credits_the_image_goes_through_and_is_charged_as_billed(app, live_server, upstream):
    tenant = make_tenant("3")
    raw = sdk(live_server, tenant.key).chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=WITH_IMAGE, max_tokens=10
    )
    sent = upstream.requests[-1].json["messages"][0]["content"][1]
    assert sent["image_url"]["url"] == IMAGE
    usage = raw.parse().usage
    expected = pricing.charge_ucr(
        usage.prompt_tokens * pricing.Decimal("0.15") / 1_000_000
        + usage.completion_tokens * pricing.Decimal("0.60") / 1_000_000,
        app.config["MARKUP"],
        app.config["CREDIT_USD"],
    )
    assert raw.headers["X-Credits-Charged"] == pricing.format_credits(expected)
    assert_invariant(app)
