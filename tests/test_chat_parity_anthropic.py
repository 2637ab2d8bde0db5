"""Chat parity on Anthropic models with the official ``openai`` SDK: what an OpenAI app sends is
translated to the Messages API (asserted on the exact body the fake Anthropic received), answered
in OpenAI's shape (validated against OpenAI's schemas), and charged exactly the priced usage.

Anthropic's own rules are refused before anything is held; so is what it cannot do.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
import zlib
from decimal import Decimal

import openai
import pydantic
import pytest
import requests

from broker import alerts
from broker.chat import account_namespace
from broker.errors import InvalidRequest
from broker.providers.anthropic import PDF_PAGE_TOKENS, THINKING_BUDGETS, TOOL_PROMPT_TOKENS, AnthropicProvider
from broker.providers.base import ChatCall
from tests.conftest import assert_invariant
from tests.fakes.upstreams import (
    ANTHROPIC_PDF_PAGE_TOKENS,
    ANTHROPIC_THINKING,
    ANTHROPIC_URL_IMAGE_TOKENS,
    Reply,
    anthropic_image_tokens,
    anthropic_signature,
)
from tests.test_chat_billing import PRICES, expected_ucr, sdk
from tests.test_chat_parity_openai import (
    CHUNK,
    COMPLETION,
    ERROR,
    PARIS,
    ROME,
    TIME,
    TWO_CALLS,
    WEATHER,
    balance,
    receipt,
    tool_calls_of,
    valid,
)

MODEL = "anthropic/claude-haiku-4-5"
UPSTREAM_MODEL = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
ASK = {"role": "user", "content": "What is the weather in Paris and in Rome?"}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": WEATHER["function"]["parameters"],
}
TIME_TOOL = {"name": "get_time", "input_schema": TIME["function"]["parameters"]}


# -- helpers ------------------------------------------------------------------------


def create(live_server: str, key: str, **kwargs):
    """A non-streamed completion through the SDK: (parsed, raw body validated, headers)."""
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("max_tokens", 100)
    raw = sdk(live_server, key).chat.completions.with_raw_response.create(**kwargs)
    return raw.parse(), valid(COMPLETION, raw.http_response.json()), dict(raw.headers)


def sse(live_server: str, key: str, body: dict) -> tuple[list[dict], requests.Response]:
    """A streamed call's chunks (each validated) with the usage chunk asked for."""
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "stream_options": {"include_usage": True}, **body}
    response = requests.post(
        live_server + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        stream=True,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    lines = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [valid(CHUNK, json.loads(line)) for line in lines[:-1]], response


def sent(upstream) -> dict:
    """The body the fake Anthropic received last."""
    last = upstream.requests[-1]
    assert last.provider == "anthropic" and last.path == "/v1/messages"
    return last.json


def content_of(chunks: list[dict]) -> str:
    return "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])


def finishes(chunks: list[dict]) -> list[str]:
    return [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]


def with_media(reply: Reply, tokens: int) -> Reply:
    """The reply as the fake bills it once the media tokens are added to its input."""
    return dataclasses.replace(reply, input_tokens=reply.input_tokens + tokens)


def assert_charged(app, client, tenant, before: int, request_id: str, reply: Reply) -> None:
    """The charge is the priced usage to the micro-credit, within its hold, and the ledger balances."""
    want = expected_ucr(MODEL, reply)
    assert before - balance(app, tenant) == want
    rec = receipt(client, tenant, request_id)
    assert rec["charged_ucr"] == want and rec["flags"] == {"estimated": False, "capped": False}
    assert rec["hold_ucr"] >= want
    assert_invariant(app)


def png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of that size (all black, so it compresses to almost nothing)."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


def pdf(pages: int) -> bytes:
    kids = " ".join(f"{3 + k} 0 R" for k in range(pages))
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>",
        *["<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * pages,
    ]
    body = "%PDF-1.4\n" + "".join(f"{k + 1} 0 obj {o} endobj\n" for k, o in enumerate(objects))
    return (body + "trailer << /Root 1 0 R >>\n%%EOF\n").encode()


def data_url(media_type: str, raw: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


def held(client, tenant) -> int:
    return client.get("/v1/balance", headers=tenant.headers).json["held_ucr"]


# -- tools --------------------------------------------------------------------------


def test_tools_become_anthropic_tools_and_tool_use_comes_back_as_tool_calls(app, live_server, tenant, upstream, client):
    upstream.queue(TWO_CALLS)
    before = balance(app, tenant)
    completion, _, headers = create(live_server, tenant.key, messages=MESSAGES, tools=[WEATHER, TIME])
    assert sent(upstream) == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 100,
        "messages": [ASK],
        "tools": [WEATHER_TOOL, TIME_TOOL],
    }
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == Reply().text  # Claude's words before its tool calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", json.loads(PARIS)),
        ("get_weather", json.loads(ROME)),
    ]
    assert all(c.id.startswith("toolu_") and c.type == "function" for c in choice.message.tool_calls)
    assert_charged(app, client, tenant, before, headers["x-request-id"], TWO_CALLS)


def test_streamed_tool_use_becomes_tool_call_deltas_with_index_id_name_and_fragments(
    app, live_server, tenant, upstream, client
):
    upstream.queue(TWO_CALLS)
    before = balance(app, tenant)
    chunks, response = sse(live_server, tenant.key, {"messages": MESSAGES, "tools": [WEATHER]})
    assert sent(upstream)["tools"] == [WEATHER_TOOL] and sent(upstream)["stream"] is True
    calls = tool_calls_of(chunks)
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in (0, 1)] == [
        ("get_weather", json.loads(PARIS)),
        ("get_weather", json.loads(ROME)),
    ]
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["id"].startswith("toolu_")
    fragments = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert len(fragments) > 4  # id and name first, then the argument pieces
    assert all("id" not in d for d in fragments if d["function"].get("name") is None)
    assert content_of(chunks) == Reply().text
    assert finishes(chunks) == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == TWO_CALLS.output_tokens
    assert_charged(app, client, tenant, before, response.headers["X-Request-Id"], TWO_CALLS)


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "anthropic_choice", "names"),
    [
        ("auto", None, {"type": "auto"}, ["get_weather", "get_weather"]),
        ("none", None, {"type": "none"}, []),
        ("required", None, {"type": "any"}, ["get_weather", "get_weather"]),
        (
            {"type": "function", "function": {"name": "get_time"}},
            None,
            {"type": "tool", "name": "get_time"},
            ["get_time"],
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}, ["get_weather"]),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}, ["get_weather"]),
    ],
)
def test_tool_choice_and_parallel_tool_calls_map_to_anthropic(
    live_server, tenant, upstream, tool_choice, parallel, anthropic_choice, names
):
    upstream.queue(TWO_CALLS)
    extra = {"tool_choice": tool_choice} if tool_choice else {}
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    completion, _, _ = create(live_server, tenant.key, messages=MESSAGES, tools=[WEATHER, TIME], **extra)
    assert sent(upstream)["tool_choice"] == anthropic_choice
    calls = completion.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == names
    assert completion.choices[0].finish_reason == ("tool_calls" if names else "stop")


def test_tool_results_of_several_tool_messages_go_back_as_one_user_turn(app, live_server, tenant, upstream, client):
    answer = Reply(text="Paris is sunny, Rome is cloudy.", input_tokens=90, output_tokens=12)
    upstream.queue(answer, answer)
    turn = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": ROME}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": '{"sky":"sunny"}'},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": '{"sky":"cloudy"}'}]},
    ]
    before = balance(app, tenant)
    completion, _, headers = create(live_server, tenant.key, messages=turn, tools=[WEATHER])
    assert completion.choices[0].message.content == answer.text
    assert sent(upstream)["messages"] == [
        ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"sky":"sunny"}'},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": '{"sky":"cloudy"}'}],
                },
            ],
        },
    ]
    assert_charged(app, client, tenant, before, headers["x-request-id"], answer)
    chunks, _ = sse(live_server, tenant.key, {"messages": turn, "tools": [WEATHER]})
    assert content_of(chunks) == answer.text and finishes(chunks) == ["stop"]
    assert sent(upstream)["messages"][2]["content"][1]["tool_use_id"] == "toolu_2"


class GetWeather(pydantic.BaseModel):
    city: str


def test_sdk_stream_helper_assembles_anthropic_tool_calls(live_server, tenant, upstream):
    upstream.queue(Reply(tool_calls=[{"name": "GetWeather", "arguments": PARIS}], chunks=4))
    with sdk(live_server, tenant.key).chat.completions.stream(
        model=MODEL, messages=MESSAGES, max_tokens=100, tools=[openai.pydantic_function_tool(GetWeather)]
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.parsed_arguments for e in done] == [GetWeather(city="Paris")]
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == GetWeather(city="Paris")
    assert final.choices[0].finish_reason == "tool_calls"
    assert sent(upstream)["tools"][0]["input_schema"]["required"] == ["city"]


def test_the_hold_covers_tool_definitions_and_anthropics_tool_prompt(live_server, tenant, upstream, client):
    tools = [
        {**WEATHER, "function": {**WEATHER["function"], "name": f"tool_{k}", "description": "d" * 2000}}
        for k in range(10)
    ]
    holds = []
    for extra in ({}, {"tools": tools}):
        _, _, headers = create(live_server, tenant.key, messages=MESSAGES, max_tokens=50, **extra)
        holds.append(receipt(client, tenant, headers["x-request-id"])["hold_ucr"])
    price = PRICES[MODEL]
    dearest = max(Decimal(price[k]) for k in ("input", "cache_write", "cache_write_1h"))
    assert holds[1] - holds[0] >= (len(json.dumps(tools)) + TOOL_PROMPT_TOKENS) * dearest * Decimal(180)


# -- structured output --------------------------------------------------------------


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


ANSWER = '{"city": "Paris", "celsius": 21}'


def test_json_schema_is_a_forced_tool_whose_input_is_the_content(app, live_server, tenant, upstream, client):
    reply = Reply(text=ANSWER, input_tokens=70, output_tokens=15)
    upstream.queue(reply, dataclasses.replace(reply, chunks=4))
    before = balance(app, tenant)
    parsed = sdk(live_server, tenant.key).chat.completions.parse(
        model=MODEL, messages=MESSAGES, max_tokens=100, response_format=Weather
    )
    assert parsed.choices[0].message.parsed == Weather(city="Paris", celsius=21)
    assert parsed.choices[0].finish_reason == "stop" and parsed.choices[0].message.tool_calls in (None, [])
    body = sent(upstream)
    schema = body["tools"][0]["input_schema"]
    assert body["tools"] == [
        {"name": "Weather", "description": "Respond with a JSON value of this schema.", "input_schema": schema}
    ]
    assert schema["required"] == ["city", "celsius"] and schema["type"] == "object"
    assert body["tool_choice"] == {"type": "tool", "name": "Weather"}
    assert "response_format" not in body
    rec = receipt(client, tenant, "req_" + parsed.id.removeprefix("chatcmpl-"))
    assert rec["charged_ucr"] == expected_ucr(MODEL, reply) == before - balance(app, tenant)
    with sdk(live_server, tenant.key).chat.completions.stream(
        model=MODEL, messages=MESSAGES, max_tokens=100, response_format=Weather
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == Weather(city="Paris", celsius=21)
    assert final.choices[0].finish_reason == "stop"
    assert_invariant(app)


@pytest.mark.parametrize("streamed", [False, True])
def test_json_object_mode_is_a_forced_tool_taking_any_object(live_server, tenant, upstream, streamed):
    upstream.queue(Reply(text='{"ok": true}'))
    fmt = {"type": "json_object"}
    if streamed:
        chunks, _ = sse(live_server, tenant.key, {"messages": MESSAGES, "response_format": fmt})
        content, reason = content_of(chunks), finishes(chunks)[0]
    else:
        completion, _, _ = create(live_server, tenant.key, messages=MESSAGES, response_format=fmt)
        content, reason = completion.choices[0].message.content, completion.choices[0].finish_reason
    assert json.loads(content) == {"ok": True} and reason == "stop"
    assert sent(upstream)["tools"][0]["input_schema"] == {"type": "object"}
    assert sent(upstream)["tool_choice"] == {"type": "tool", "name": "json_object"}


# -- inputs: images and PDFs ---------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_images_by_url_and_data_url_are_image_blocks_billed_by_anthropics_rule(
    app, live_server, tenant, upstream, client, streamed
):
    big = png(3000, 2000)
    parts = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": data_url("image/png", big)}},
    ]
    reply = Reply(input_tokens=20, output_tokens=9)
    upstream.queue(reply)
    before = balance(app, tenant)
    messages = [{"role": "user", "content": parts}]
    if streamed:
        chunks, response = sse(live_server, tenant.key, {"messages": messages})
        request_id, content = response.headers["X-Request-Id"], content_of(chunks)
    else:
        completion, _, headers = create(live_server, tenant.key, messages=messages)
        request_id, content = headers["x-request-id"], completion.choices[0].message.content
    assert content == reply.text
    assert sent(upstream)["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(big).decode()},
                },
            ],
        }
    ]
    media = ANTHROPIC_URL_IMAGE_TOKENS + anthropic_image_tokens(3000, 2000)
    assert anthropic_image_tokens(3000, 2000) <= 1600  # scaled down first, whatever its size
    assert_charged(app, client, tenant, before, request_id, with_media(reply, media))


@pytest.mark.parametrize("streamed", [False, True])
def test_a_pdf_file_part_is_a_document_block_held_per_page(app, live_server, tenant, upstream, client, streamed):
    doc = pdf(3)
    part = {"type": "file", "file": {"filename": "report.pdf", "file_data": data_url("application/pdf", doc)}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Summarise."}, part]}]
    reply = Reply(input_tokens=15, output_tokens=40)
    upstream.queue(reply)
    before = balance(app, tenant)
    if streamed:
        chunks, response = sse(live_server, tenant.key, {"messages": messages})
        request_id = response.headers["X-Request-Id"]
        assert content_of(chunks) == reply.text
    else:
        completion, _, headers = create(live_server, tenant.key, messages=messages)
        request_id = headers["x-request-id"]
        assert completion.choices[0].message.content == reply.text
    assert sent(upstream)["messages"][0]["content"][1] == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(doc).decode()},
        "title": "report.pdf",
    }
    assert_charged(app, client, tenant, before, request_id, with_media(reply, 3 * ANTHROPIC_PDF_PAGE_TOKENS))
    dearest = Decimal(PRICES[MODEL]["cache_write_1h"]) * Decimal(180)
    assert receipt(client, tenant, request_id)["hold_ucr"] >= 3 * PDF_PAGE_TOKENS * dearest


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (
            {"type": "file", "file": {"file_data": data_url("application/pdf", b"%PDF-1.7\n" + bytes(range(256)))}},
            "cannot be counted",
        ),
        ({"type": "file", "file": {"file_data": data_url("application/pdf", pdf(101))}}, "at most 100 pages"),
        ({"type": "file", "file": {"file_id": "file-abc123"}}, "file_id"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
    ],
)
def test_inputs_that_cannot_be_bounded_or_sent_are_refused_before_the_hold(
    app, live_server, tenant, upstream, client, part, message
):
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        create(live_server, tenant.key, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}])
    assert message in raised.value.body["message"] and raised.value.body["param"] == "messages"
    valid(ERROR, raised.value.response.json())
    assert balance(app, tenant) == before and held(client, tenant) == 0 and upstream.requests == []


# -- reasoning ----------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_reasoning_effort_is_a_thinking_budget_and_thinking_is_billed_as_output(
    app, live_server, tenant, upstream, client, streamed
):
    reply = Reply(input_tokens=30, output_tokens=250, reasoning_tokens=200)
    upstream.queue(reply)
    before = balance(app, tenant)
    body = {"messages": MESSAGES, "max_tokens": 4000, "reasoning_effort": "low"}
    if streamed:
        chunks, response = sse(live_server, tenant.key, body)
        request_id, content, usage = response.headers["X-Request-Id"], content_of(chunks), chunks[-1]["usage"]
    else:
        completion, raw, headers = create(live_server, tenant.key, **body)
        request_id, content, usage = headers["x-request-id"], completion.choices[0].message.content, raw["usage"]
    assert content == reply.text  # the thinking itself is not the answer
    assert sent(upstream) == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 4000,
        "messages": [ASK],
        "thinking": {"type": "enabled", "budget_tokens": THINKING_BUDGETS["low"]},
        **({"stream": True} if streamed else {}),
    }
    assert usage["completion_tokens"] == 250 and usage["completion_tokens_details"]["reasoning_tokens"] == 200
    assert_charged(app, client, tenant, before, request_id, reply)


def test_signed_thinking_rides_on_the_tool_call_and_goes_back_on_the_next_turn(live_server, tenant, upstream):
    first = Reply(tool_calls=[{"name": "get_weather", "arguments": PARIS}], reasoning_tokens=20, output_tokens=40)
    upstream.queue(first, Reply(text="Sunny."))
    client = sdk(live_server, tenant.key)
    asked = {"model": MODEL, "tools": [WEATHER], "max_tokens": 10000, "reasoning_effort": "medium"}
    completion = client.chat.completions.create(messages=MESSAGES, **asked)
    message = completion.choices[0].message
    [call] = message.tool_calls
    carried = call.model_extra["extra_content"]["anthropic"]["thinking_blocks"]
    signed = {"type": "thinking", "thinking": ANTHROPIC_THINKING, "signature": anthropic_signature(ANTHROPIC_THINKING)}
    assert carried == [signed]
    # The app appends the SDK's message object as it is, then its tool result.
    turn = [*MESSAGES, message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    assert client.chat.completions.create(messages=turn, **asked).choices[0].message.content == "Sunny."
    body = sent(upstream)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": THINKING_BUDGETS["medium"]}
    assert body["messages"][1]["content"][0] == signed  # the fake checks the signature
    assert body["messages"][1]["content"][-1]["type"] == "tool_use"


def test_streamed_thinking_rides_on_the_first_tool_call_delta(live_server, tenant, upstream):
    upstream.queue(Reply(tool_calls=[{"name": "get_weather", "arguments": PARIS}], reasoning_tokens=20))
    body = {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 4000, "reasoning_effort": "minimal"}
    chunks, _ = sse(live_server, tenant.key, body)
    deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert deltas[0]["extra_content"]["anthropic"]["thinking_blocks"] == [
        {"type": "thinking", "thinking": ANTHROPIC_THINKING, "signature": anthropic_signature(ANTHROPIC_THINKING)}
    ]
    assert all("extra_content" not in d for d in deltas[1:])
    assert json.loads(tool_calls_of(chunks)[0]["arguments"]) == {"city": "Paris"}


def test_a_tool_turn_that_comes_back_without_its_thinking_is_sent_without_thinking(live_server, tenant, upstream):
    upstream.queue(Reply(text="Sunny."))
    turn = [
        *MESSAGES,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "toolu_9", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_9", "content": "sunny"},
    ]
    completion, _, _ = create(
        live_server, tenant.key, messages=turn, tools=[WEATHER], max_tokens=4000, reasoning_effort="low"
    )
    assert completion.choices[0].message.content == "Sunny."
    assert "thinking" not in sent(upstream)


# -- parameters ---------------------------------------------------------------------


def test_stop_user_top_k_and_cache_control_are_mapped(app, live_server, tenant, upstream, client):
    reply = Reply(
        input_tokens=40, cached_tokens=2000, cache_write_tokens=300, cache_write_1h_tokens=100, output_tokens=9
    )
    upstream.queue(reply)
    cached = {"type": "ephemeral", "ttl": "1h"}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse. " * 200, "cache_control": cached}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]},
    ]
    before = balance(app, tenant)
    completion, raw, headers = create(
        live_server,
        tenant.key,
        messages=messages,
        stop=["END"],
        user="end-user-7",
        temperature=0.3,
        extra_body={"top_k": 40},
    )
    ns = account_namespace(tenant.account_id)
    assert sent(upstream) == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 100,
        "system": [{"type": "text", "text": "You are terse. " * 200, "cache_control": cached}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}
        ],
        "temperature": 0.3,
        "top_k": 40,
        "stop_sequences": ["END"],
        "metadata": {"user_id": f"{ns}-end-user-7"},
    }
    details = raw["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == 2000 and details["cache_write_tokens"] == 400
    assert raw["usage"]["prompt_tokens"] == 40 + 2000 + 400
    # Cache reads at the cache-read rate, 5-minute and 1-hour writes at theirs.
    assert_charged(app, client, tenant, before, headers["x-request-id"], reply)
    create(live_server, tenant.key, messages=MESSAGES, user="end-user-7", safety_identifier="person-1")
    assert sent(upstream)["metadata"] == {"user_id": f"{ns}-person-1"}  # OpenAI's successor to user wins


def test_fields_with_nothing_to_translate_are_accepted_and_not_sent(live_server, tenant, upstream):
    harmless = {"logprobs": False, "modalities": ["text"], "service_tier": "auto", "store": False}
    completion, _, _ = create(live_server, tenant.key, messages=MESSAGES, extra_body=harmless)
    assert completion.choices[0].message.content == Reply().text
    assert sent(upstream) == {"model": UPSTREAM_MODEL, "max_tokens": 100, "messages": [ASK]}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": 7}, "seed"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"metadata": {"team": "a"}}, "metadata"),
        ({"prompt_cache_key": "k"}, "prompt_cache_key"),
        ({"verbosity": "low"}, "verbosity"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "response_format"),
        ({"n": 2}, "n"),
    ],
)
def test_what_anthropic_cannot_do_is_a_400_naming_it_before_anything_is_held(
    app, live_server, tenant, upstream, client, fields, param
):
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=fields)
    assert raised.value.body["param"] == param
    if param != "n":
        assert raised.value.body["code"] == "unsupported_parameter"
    valid(ERROR, raised.value.response.json())
    assert balance(app, tenant) == before and held(client, tenant) == 0 and upstream.requests == []


# -- Anthropic's rules, before anything is held ----------------------------------------

THINK = {"reasoning_effort": "low", "max_tokens": 4000}


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"temperature": 1.5}, "temperature", "between 0 and 1"),
        ({"temperature": 0.5, "top_p": 0.9}, "top_p", "temperature or top_p, not both"),
        ({**THINK, "temperature": 0.5}, "temperature", "thinking"),
        ({**THINK, "top_k": 5}, "top_k", "thinking"),
        ({**THINK, "top_p": 0.5}, "top_p", "0.95"),
        ({**THINK, "tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "thinking"),
        ({**THINK, "response_format": {"type": "json_object"}}, "response_format", "reasoning_effort"),
        ({"reasoning_effort": "low", "max_tokens": 2048}, "max_tokens", "thinking budget"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", "one of"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"messages": [{"role": "system", "content": "Be terse."}]}, "messages", "at least one user message"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages", "empty"),
        (
            {"messages": [ASK, {"role": "assistant", "content": ""}, {"role": "user", "content": "Again?"}]},
            "messages",
            "empty",
        ),
        ({"messages": [ASK, {"role": "assistant", "content": "Sure "}]}, "messages", "whitespace"),
    ],
)
def test_anthropics_rules_are_a_400_naming_the_parameter_and_nothing_is_held(
    app, live_server, tenant, upstream, client, fields, param, message
):
    body = {"model": MODEL, "messages": MESSAGES, **fields}
    extra_body = {"top_k": body.pop("top_k")} if "top_k" in body else None  # not in the SDK's signature
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(**body, extra_body=extra_body)
    assert raised.value.body["param"] == param and message in raised.value.body["message"]
    valid(ERROR, raised.value.response.json())
    assert balance(app, tenant) == before and held(client, tenant) == 0 and upstream.requests == []


def test_an_empty_final_assistant_turn_is_a_valid_prefill(live_server, tenant, upstream):
    completion, _, _ = create(live_server, tenant.key, messages=[ASK, {"role": "assistant", "content": ""}])
    assert completion.choices[0].message.content == Reply().text
    assert sent(upstream)["messages"] == [ASK, {"role": "assistant", "content": ""}]
    create(live_server, tenant.key, messages=[ASK, {"role": "assistant", "content": "Paris:"}])
    assert sent(upstream)["messages"][-1] == {"role": "assistant", "content": "Paris:"}


def test_temperature_alone_and_top_p_alone_pass(live_server, tenant, upstream):
    create(live_server, tenant.key, messages=MESSAGES, temperature=1.0)
    assert sent(upstream)["temperature"] == 1.0 and "top_p" not in sent(upstream)
    create(live_server, tenant.key, messages=MESSAGES, top_p=0.97, max_tokens=4000, reasoning_effort="low")
    assert sent(upstream)["top_p"] == 0.97 and sent(upstream)["thinking"]["budget_tokens"] == THINKING_BUDGETS["low"]


# -- finish reasons and errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_reason", "finish"), [("max_tokens", "length"), ("refusal", "content_filter"), ("stop_sequence", "stop")]
)
@pytest.mark.parametrize("streamed", [False, True])
def test_stop_reasons_map_to_finish_reasons(live_server, tenant, upstream, stop_reason, finish, streamed):
    upstream.queue(Reply(finish=stop_reason))
    if streamed:
        chunks, _ = sse(live_server, tenant.key, {"messages": MESSAGES})
        assert finishes(chunks) == [finish]
    else:
        completion, _, _ = create(live_server, tenant.key, messages=MESSAGES)
        assert completion.choices[0].finish_reason == finish


def test_anthropic_rate_limit_is_a_429_with_retry_after(app, live_server, tenant, upstream):
    limited = Reply(status=429, retry_after="1", error_message="Number of request tokens has exceeded your rate limit")
    upstream.queue(limited, limited, limited)
    before = balance(app, tenant)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.response.headers["retry-after"] == "1"
    valid(ERROR, raised.value.response.json())
    assert len(upstream.requests) == 3 and balance(app, tenant) == before
    assert_invariant(app)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=400, error_message="Your credit balance is too low to access the Anthropic API."),
        Reply(status=429, error_code="enforced_spend_limit_reached", error_message="Spend limit reached."),
    ],
)
def test_our_anthropic_spend_limit_is_a_503_and_alerts_the_operator(app, live_server, tenant, upstream, reply):
    upstream.default = reply
    before = balance(app, tenant)
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.status_code == 503 and raised.value.body["code"] == "upstream_quota_exceeded"
    assert balance(app, tenant) == before
    svc = app.extensions["broker"]
    with app.app_context():
        svc.ledger.drain(svc.db())
        found = alerts.findings(svc.db(), error_rate=1.0, failed_jobs=1000)
    assert [kind for kind, _ in found] == ["quota:anthropic"]
    assert_invariant(app)


@pytest.mark.parametrize("streamed", [False, True])
def test_anthropic_errors_reach_the_sdk_as_its_classes_and_charge_nothing(app, live_server, tenant, upstream, streamed):
    client = sdk(live_server, tenant.key)
    before = balance(app, tenant)
    upstream.queue(Reply(status=404, error_message="model: claude-haiku-4-5"))
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=streamed)
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"
    upstream.queue(Reply(status=400, error_message="prompt is too long: 210000 tokens > 200000 maximum"))
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=streamed)
    assert "prompt is too long: 210000 tokens" in raised.value.body["message"]
    upstream.default = Reply(status=529, error_message="Overloaded")
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=streamed)
    assert raised.value.status_code == 503
    valid(ERROR, raised.value.response.json())
    assert balance(app, tenant) == before
    assert_invariant(app)


@pytest.mark.parametrize(
    ("rules", "fields", "param"),
    [
        ({"sampling": "default_only"}, {"temperature": 0.2}, "temperature"),
        ({"sampling": "default_only"}, {"top_p": 0.9}, "top_p"),
        ({"sampling": "default_only"}, {"extra": {"top_k": 5}}, "top_k"),
        ({"thinking": "none"}, {"extra": {"reasoning_effort": "low"}}, "reasoning_effort"),
    ],
)
def test_per_model_rules_from_the_price_table_are_checked_by_the_adapter(upstream, rules, fields, param):
    """Rows no current model uses yet (e.g. a model that samples with its defaults only)."""
    provider = AnthropicProvider(upstream.anthropic_base, "sk-ant-test", requests.Session(), (2.0, 2.0))
    calls = len(upstream.requests)
    call = ChatCall(model="claude-next", messages=MESSAGES, max_tokens=4000, rules=rules, **fields)
    with pytest.raises(InvalidRequest) as raised:
        provider.check(call)
    assert raised.value.param == param and raised.value.code == "unsupported_parameter"
    assert provider.check(dataclasses.replace(call, rules={}, temperature=None, top_p=None)) == 0
    assert len(upstream.requests) == calls  # checking never calls Anthropic
