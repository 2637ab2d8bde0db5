"""An odd provider's usage report never reaches SQL as is, never crashes a request and never gives tokens away.

Each fake provider answers a usage count of -5, "12", 3e9, 1e30 or null, in its prompt count or
its output count, for a streamed and a non-streamed chat, on SQLite and PostgreSQL: the client
gets its answer with a charge no larger than the hold, the receipt says ``estimated`` (an invalid
count: the delivered-text estimate) or ``capped`` (a count past its bound, cut), the drain copies
every entry, the usage list answers, and ``reconcile`` finds every account consistent (issue 10, item 10).
Embeddings and image jobs get the same odd counts.
"""

from __future__ import annotations

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from broker import migrations
from broker.db import Base
from tests.conftest import DB_BACKENDS, assert_invariant
from tests.fakes.upstreams import Reply

# Per provider: the model, and the names its usage gives the prompt and the output counts.
PROVIDERS = {
    "openai": ("openai/gpt-4o-mini", "prompt_tokens", "completion_tokens"),
    "anthropic": ("anthropic/claude-haiku-4-5", "input_tokens", "output_tokens"),
    "gemini": ("gemini/gemini-2.5-flash", "promptTokenCount", "candidatesTokenCount"),
}
# An odd count → the receipt's flag: an invalid one is replaced by the estimate, a huge one is cut.
ODD_COUNTS = [(-5, "estimated"), ("12", "estimated"), (3_000_000_000, "capped"), (1e30, "capped")]
# null is "no count": a null prompt count is estimated, and so is a null output count for delivered text.
NULL = (None, "estimated")
MAX_TOKENS = 50


def _ask(client, tenant, model: str, stream: bool) -> tuple[str, int]:
    """One chat; the request id and the µcr the client was told it was charged."""
    body = {"model": model, "messages": [{"role": "user", "content": "Count me oddly."}], "max_tokens": MAX_TOKENS}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    response = client.post("/v1/chat/completions", json=body, headers=tenant.headers)
    text = response.get_data(as_text=True)
    assert response.status_code == 200, text
    if not stream:
        answer = json.loads(text)
        assert answer["choices"][0]["message"]["content"] == Reply().text
        return response.headers["X-Request-Id"], _ucr(response.headers["X-Credits-Charged"])
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text
    chunks = [json.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks), text
    delivered = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert delivered == Reply().text
    cost = chunks[-1]["usage"]["cost_credits"]
    return response.headers["X-Request-Id"], round(cost * 1_000_000)


def _ucr(credits: str) -> int:
    whole, _, fraction = credits.partition(".")
    return int(whole) * 1_000_000 + int(fraction)


@pytest.mark.parametrize("db_backend", DB_BACKENDS, indirect=True)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_odd_usage_is_estimated_or_capped_and_never_breaks_the_money(
    provider, stream, db_backend, app, client, tenant, upstream
):
    model, prompt_field, output_field = PROVIDERS[provider]
    cases = [(field, value, flag) for field in (prompt_field, output_field) for value, flag in [*ODD_COUNTS, NULL]]
    ledger = app.extensions["broker"].ledger
    seen = []
    for field, value, flag in cases:
        upstream.queue(Reply(raw_usage={field: value}))
        before = ledger.balance(tenant.account_id)
        request_id, told = _ask(client, tenant, model, stream)
        spent = before - ledger.balance(tenant.account_id)

        response = client.get(f"/v1/requests/{request_id}", headers=tenant.headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        receipt = response.get_json()
        case = f"{field}={value!r}"
        assert receipt["status"] == "ok", case
        assert receipt["flags"] == {"estimated": flag == "estimated", "capped": flag == "capped"}, case
        # Tokens were delivered: never free; never more than the hold; the client was told the charge.
        assert 0 < receipt["charged_ucr"] <= receipt["hold_ucr"], case
        assert told == spent == receipt["charged_ucr"], case
        tokens = receipt["tokens"]
        assert all(0 <= count < 2**31 for count in tokens.values()), (case, tokens)
        if field == output_field and flag == "capped":
            assert tokens["output"] == MAX_TOKENS, case  # cut to what the call could write
        if field == output_field and flag == "estimated":
            assert tokens["output"] > 0, case  # the delivered text's estimate, never a free answer
        seen.append(request_id)

    # The drain copied every entry: the usage list shows every request, and every account reconciles.
    listed = client.get("/v1/usage?limit=100", headers=tenant.headers)
    assert listed.status_code == 200, listed.get_data(as_text=True)
    assert {row["id"] for row in listed.get_json()["data"]} >= set(seen)
    assert_invariant(app)


@pytest.mark.parametrize("db_backend", DB_BACKENDS, indirect=True)
@pytest.mark.parametrize("value", [-5, 3_000_000_000, 10**30], ids=["negative", "3e9", "1e30"])
def test_embeddings_count_out_of_range(value, db_backend, app, client, tenant, upstream):
    """OpenAI's embeddings ``prompt_tokens`` passes the same check: estimated, or cut (the charge to the hold)."""
    upstream.queue(Reply(input_tokens=value))
    text = "Embed me, whatever you say I cost."
    response = client.post(
        "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": text}, headers=tenant.headers
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    receipt = client.get(f"/v1/requests/{response.headers['X-Request-Id']}", headers=tenant.headers).get_json()
    if value < 0:
        assert receipt["flags"] == {"estimated": True, "capped": False}
    else:
        assert receipt["flags"] == {"estimated": False, "capped": True}
        assert receipt["tokens"]["input"] == 8192  # cut to what the model takes: its context window, one input
    assert 0 < receipt["charged_ucr"] <= receipt["hold_ucr"]
    assert_invariant(app)


def test_postgresql_counts_and_ids_are_64_bit(postgres_url):
    """Migration 0009: on PostgreSQL the token counts and the two growing tables' ids are BIGINT (sequences too)."""
    migrations.upgrade(postgres_url)
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            columns = {c["name"]: str(c["type"]) for c in inspect(connection).get_columns("usage_records")}
            for name in ("id", "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens"):
                assert columns[name] == "BIGINT", name
            for table in ("ledger_entries", "usage_records"):
                kind = connection.exec_driver_sql(
                    "SELECT data_type FROM information_schema.sequences WHERE sequence_name = %s", (f"{table}_id_seq",)
                ).scalar()
                assert kind == "bigint", table
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_backend", DB_BACKENDS, indirect=True)
@pytest.mark.parametrize(
    ("value", "estimated"), [(-5, True), (12.5, True), (10**30, False)], ids=["negative", "fraction", "1e30"]
)
def test_image_job_usage_out_of_range(value, estimated, db_backend, app, client, tenant, upstream, worker):
    """An image's usage goes through the adapter's check: an invalid count prices the job at its
    bound (flagged ``estimated``); a huge one is charged no more than the hold and stored."""
    upstream.queue(Reply(image_usage={"text_tokens": 9, "image_tokens": 0, "output_tokens": value}))
    response = client.post(
        "/v1/images/generations",
        json={"model": "openai/gpt-image-1", "prompt": "a kite", "size": "1024x1024", "quality": "low"},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    request_id = response.headers["X-Request-Id"]
    receipts = client.get("/v1/usage?endpoint=image", headers=tenant.headers)
    assert receipts.status_code == 200, receipts.get_data(as_text=True)
    (receipt,) = receipts.get_json()["data"]
    assert receipt["flags"]["estimated"] is estimated, (request_id, receipt)
    assert 0 < receipt["charged_ucr"] <= receipt["hold_ucr"]
    assert all(0 <= count < 2**63 for count in receipt["tokens"].values())
    assert_invariant(app)
