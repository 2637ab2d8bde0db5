"""Chat parity on OpenAI models with the official SDK: tools, structured output, logprobs, refusals,
usage details billed exactly, every Chat Completions field, OpenAI's stream rules and error classes.

Every body, chunk and error is validated against OpenAI's published schemas (tests/openai-schemas.json).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import jsonschema_rs
import openai
import pydantic
import pytest
import requests

from broker import alerts
from broker.chat import account_namespace
from tests.conftest import assert_invariant, make_tenant
from tests.fakes.upstreams import Reply
from tests.test_chat_billing import LONG_PROMPT, PRICES, expected_ucr, sdk

MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PARIS = '{"city":"Paris"}'
ROME = '{"city":"Rome"}'
TWO_CALLS = Reply(
    tool_calls=[{"name": "get_weather", "arguments": PARIS}, {"name": "get_weather", "arguments": ROME}],
    input_tokens=80,
    output_tokens=24,
    chunks=3,
)


# -- OpenAI's schemas ---------------------------------------------------------------

SCHEMAS = json.loads((Path(__file__).parent / "openai-schemas.json").read_text())


def _nullable(node):
    """OpenAPI 3.0's ``nullable: true`` (still in OpenAI's 3.1 document) as JSON Schema."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            return {"anyOf": [node, {"type": "null"}]}
    return node


COMPONENTS = _nullable(SCHEMAS["components"])


def validator(name: str) -> jsonschema_rs.Draft202012Validator:
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": COMPONENTS})


COMPLETION = validator("CreateChatCompletionResponse")
CHUNK = validator("CreateChatCompletionStreamResponse")
ERROR = validator("ErrorResponse")


def valid(schema: jsonschema_rs.Draft202012Validator, instance: dict) -> dict:
    errors = [f"{e.instance_path}: {e.message}" for e in schema.iter_errors(instance)]
    assert not errors, errors
    return instance


# -- helpers ------------------------------------------------------------------------


def create(live_server: str, key: str, **kwargs) -> tuple[openai.types.chat.ChatCompletion, dict, dict]:
    """A non-streamed completion through the SDK: (parsed, raw JSON body validated, headers)."""
    raw = sdk(live_server, key).chat.completions.with_raw_response.create(**kwargs)
    return raw.parse(), valid(COMPLETION, raw.http_response.json()), dict(raw.headers)


def sse(live_server: str, key: str, body: dict) -> tuple[list[dict], list[str], requests.Response]:
    """The raw SSE of a streamed call: (chunks validated against the schema, every data line, response)."""
    response = requests.post(
        live_server + "/v1/chat/completions",
        json={"stream": True, **body},
        headers={"Authorization": f"Bearer {key}"},
        stream=True,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    lines = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    chunks = [valid(CHUNK, json.loads(line)) for line in lines if line != "[DONE]"]
    return chunks, lines, response


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def receipt(client, tenant, request_id: str) -> dict:
    return client.get(f"/v1/requests/{request_id}", headers=tenant.headers).json


def tool_calls_of(chunks) -> dict[int, dict]:
    """Streamed tool-call deltas (SDK objects or raw dicts) reassembled by their index, as a client does."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        chunk = chunk if isinstance(chunk, dict) else chunk.model_dump()
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.get("id") or call["id"]
                fn = delta.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
    return calls


# -- tools --------------------------------------------------------------------------


def test_tool_calls_pass_through_non_stream_and_are_billed_exactly(app, live_server, tenant, upstream, client):
    upstream.queue(TWO_CALLS)
    before = balance(app, tenant)
    completion, body, headers = create(
        live_server, tenant.key, model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=100
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", PARIS),
        ("get_weather", ROME),
    ]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    sent = upstream.requests[-1].json
    assert sent["tools"] == [WEATHER, TIME]
    want = expected_ucr(MODEL, TWO_CALLS)
    assert before - balance(app, tenant) == want
    assert receipt(client, tenant, headers["x-request-id"])["charged_ucr"] == want
    assert body["usage"]["cost_credits"] == want / 1_000_000
    assert_invariant(app)


def test_the_next_turn_sends_tool_results_back(live_server, tenant, upstream):
    upstream.queue(Reply(text="Paris is sunny, 21 °C."))
    turn = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius":21,"sky":"sunny"}'},
    ]
    completion, _, _ = create(live_server, tenant.key, model=MODEL, messages=turn, tools=[WEATHER])
    assert completion.choices[0].message.content == "Paris is sunny, 21 °C."
    sent = upstream.requests[-1].json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1" and sent[2] == turn[2]


def test_streamed_parallel_tool_calls_keep_index_id_name_and_argument_fragments(app, live_server, tenant, upstream):
    upstream.queue(TWO_CALLS)
    before = balance(app, tenant)
    chunks, lines, response = sse(
        live_server, tenant.key, {"model": MODEL, "messages": MESSAGES, "tools": [WEATHER], "max_tokens": 100}
    )
    calls = tool_calls_of(chunks)
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in (0, 1)] == [
        ("get_weather", PARIS),
        ("get_weather", ROME),
    ]
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["id"].startswith("call_")
    fragments = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert len(fragments) > 2 and all("id" not in d for d in fragments if d["function"].get("name") is None)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"]["content"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert all(c["choices"] for c in chunks) and lines[-1] == "[DONE]"
    want = expected_ucr(MODEL, TWO_CALLS)
    assert before - balance(app, tenant) == want


def test_forced_tool_choice_reaches_openai_and_returns_one_call(live_server, tenant, upstream):
    upstream.queue(TWO_CALLS)
    forced = {"type": "function", "function": {"name": "get_time"}}
    completion, _, _ = create(
        live_server, tenant.key, model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=forced
    )
    sent = upstream.requests[-1].json
    assert sent["tool_choice"] == forced
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "get_time" and call.function.arguments == PARIS
    assert completion.choices[0].finish_reason == "stop"  # what OpenAI answers to a forced function


def test_parallel_tool_calls_false_is_passed(live_server, tenant, upstream):
    upstream.queue(TWO_CALLS)
    completion, _, _ = create(
        live_server, tenant.key, model=MODEL, messages=MESSAGES, tools=[WEATHER], parallel_tool_calls=False
    )
    assert upstream.requests[-1].json["parallel_tool_calls"] is False
    assert len(completion.choices[0].message.tool_calls) == 1


class GetWeather(pydantic.BaseModel):
    city: str


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def test_sdk_stream_helper_assembles_tool_calls(live_server, tenant, upstream):
    upstream.queue(Reply(tool_calls=[{"name": "GetWeather", "arguments": PARIS}], chunks=4))
    with sdk(live_server, tenant.key).chat.completions.stream(
        model=MODEL, messages=MESSAGES, tools=[openai.pydantic_function_tool(GetWeather)]
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.parsed_arguments for e in done] == [GetWeather(city="Paris")]
    [call] = final.choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetWeather(city="Paris")
    assert final.choices[0].finish_reason == "tool_calls"


def test_sdk_parse_and_stream_helpers_with_a_json_schema(live_server, tenant, upstream):
    answer = '{"city":"Paris","celsius":21}'
    upstream.queue(Reply(text=answer), Reply(text=answer, chunks=5))
    client = sdk(live_server, tenant.key)
    parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Weather)
    assert parsed.choices[0].message.parsed == Weather(city="Paris", celsius=21)
    sent = upstream.requests[-1].json["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Weather"
    assert sent["json_schema"]["strict"] is True and sent["json_schema"]["schema"]["required"] == ["city", "celsius"]
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES, response_format=Weather) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == Weather(city="Paris", celsius=21)


def test_json_object_mode_reaches_openai_and_its_refusal_is_a_400_with_its_message(app, live_server, tenant, upstream):
    upstream.queue(Reply(text='{"ok":true}'))
    completion, _, _ = create(
        live_server,
        tenant.key,
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
    )
    assert json.loads(completion.choices[0].message.content) == {"ok": True}
    assert upstream.requests[-1].json["response_format"] == {"type": "json_object"}
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}
        )
    assert "must contain the word 'json'" in raised.value.body["message"]
    valid(ERROR, raised.value.response.json())
    assert balance(app, tenant) == before
    assert_invariant(app)


# -- fields relayed -----------------------------------------------------------------


def test_logprobs_are_relayed_non_stream_and_stream(live_server, tenant, upstream):
    upstream.queue(Reply(text="Hello there friend"), Reply(text="Hello there friend", chunks=3))
    completion, body, _ = create(live_server, tenant.key, model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2)
    tokens = completion.choices[0].logprobs.content
    assert [t.token for t in tokens] == ["Hello", " there", " friend"]
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    assert upstream.requests[-1].json["logprobs"] is True and upstream.requests[-1].json["top_logprobs"] == 2
    chunks, _, _ = sse(
        live_server, tenant.key, {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 1}
    )
    streamed = [
        t["token"] for c in chunks for ch in c["choices"] if ch.get("logprobs") for t in ch["logprobs"]["content"]
    ]
    assert "".join(streamed) == "Hello there friend"


def test_refusal_stays_in_refusal_non_stream_and_stream(live_server, tenant, upstream):
    no = "I'm sorry, I can't help with that."
    upstream.queue(Reply(refusal=no), Reply(refusal=no, chunks=3))
    completion, _, _ = create(live_server, tenant.key, model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.refusal == no and completion.choices[0].message.content is None
    chunks, _, _ = sse(live_server, tenant.key, {"model": MODEL, "messages": MESSAGES})
    deltas = [ch["delta"] for c in chunks for ch in c["choices"]]
    assert "".join(d.get("refusal") or "" for d in deltas) == no
    assert not any(d.get("content") for d in deltas)


def test_annotations_fingerprint_and_service_tier_are_relayed(live_server, tenant, upstream):
    cite = {
        "type": "url_citation",
        "url_citation": {"start_index": 0, "end_index": 5, "url": "https://example.com/", "title": "Example"},
    }
    upstream.queue(Reply(annotations=[cite]), Reply())
    completion, body, _ = create(live_server, tenant.key, model=MODEL, messages=MESSAGES, service_tier="default")
    assert body["choices"][0]["message"]["annotations"] == [cite]
    assert completion.system_fingerprint == "fp_fake0000" and completion.service_tier == "default"
    assert upstream.requests[-1].json["service_tier"] == "default"
    chunks, _, _ = sse(live_server, tenant.key, {"model": MODEL, "messages": MESSAGES})
    assert all(c["system_fingerprint"] == "fp_fake0000" and c["service_tier"] == "default" for c in chunks)


def test_reasoning_and_cached_tokens_are_reported_and_billed_at_their_rates(app, live_server, tenant, upstream, client):
    reply = Reply(input_tokens=1500, cached_tokens=640, output_tokens=300, reasoning_tokens=256)
    upstream.queue(reply, reply)
    model = "openai/gpt-5-mini"
    long = [{"role": "user", "content": LONG_PROMPT}]  # room in the hold for the tokens the fake reports
    before = balance(app, tenant)
    completion, _, headers = create(
        live_server, tenant.key, model=model, messages=long, reasoning_effort="low", max_completion_tokens=400
    )
    want = expected_ucr(model, reply)
    cached, full = Decimal(PRICES[model]["cached_input"]), Decimal(PRICES[model]["input"])
    assert cached < full  # the cached tokens are billed at the cache rate, not the input rate
    assert want == math.ceil(
        (1500 * full + 640 * cached + 300 * Decimal(PRICES[model]["output"])) * Decimal("1.8") / Decimal("0.01")
    )
    assert before - balance(app, tenant) == want
    assert completion.usage.completion_tokens_details.reasoning_tokens == 256
    assert completion.usage.prompt_tokens_details.cached_tokens == 640
    assert completion.usage.prompt_tokens == 2140 and completion.usage.completion_tokens == 300
    rec = receipt(client, tenant, headers["x-request-id"])
    assert rec["tokens"]["cached_input"] == 640 and rec["tokens"]["output"] == 300 and rec["charged_ucr"] == want
    chunks, _, _ = sse(
        live_server,
        tenant.key,
        {"model": model, "messages": long, "stream_options": {"include_usage": True}, "max_completion_tokens": 400},
    )
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens_details"]["reasoning_tokens"] == 256
    assert usage["cost_credits"] == want / 1_000_000
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI does with include_usage
    assert_invariant(app)


# -- every Chat Completions field ---------------------------------------------------


def test_current_openai_fields_are_accepted_and_identifiers_are_namespaced(live_server, tenant, upstream):
    fields = {
        "user": "end-user-7",
        "safety_identifier": "u" * 64,
        "prompt_cache_key": "support-bot",
        "metadata": {"team": "support"},
        "prompt_cache_retention": "24h",
        "prompt_cache_options": {"ttl": "30m"},
        "moderation": {"model": "omni-moderation-latest"},
        "verbosity": "low",
        "reasoning_effort": "minimal",
        "service_tier": "auto",
        "modalities": ["text"],
        "store": False,
        "seed": 7,
        "prediction": {"type": "content", "content": "Paris"},
        "functions": [WEATHER["function"]],
        "function_call": "auto",
    }
    create(live_server, tenant.key, model="openai/gpt-5-mini", messages=MESSAGES, extra_body=fields)
    sent = upstream.requests[-1].json
    ns = account_namespace(tenant.account_id)
    assert sent["user"] == f"{ns}-end-user-7"
    assert sent["prompt_cache_key"] == f"{ns}-support-bot"
    assert sent["metadata"] == {"team": f"{ns}-support"}
    assert sent["safety_identifier"].startswith(ns + "-") and len(sent["safety_identifier"]) == 64
    for name in ("prompt_cache_retention", "prompt_cache_options", "moderation", "verbosity", "reasoning_effort"):
        assert sent[name] == fields[name], name
    assert sent["functions"] == [WEATHER["function"]] and sent["function_call"] == "auto"
    assert "store" not in sent
    other = make_tenant("5")
    create(live_server, other.key, model=MODEL, messages=MESSAGES, user="end-user-7")
    assert upstream.requests[-1].json["user"] != sent["user"]  # two accounts never share an identity upstream


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"service_tier": "flex"}, "service_tier"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"store": True}, "store"),
        ({"top_k": 40}, "top_k"),
    ],
)
def test_unpriced_or_unsafe_fields_are_a_400_naming_them_before_anything_is_held(
    app, live_server, tenant, upstream, fields, param
):
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=fields)
    assert raised.value.body["param"] == param and raised.value.body["code"] == "unsupported_parameter"
    valid(ERROR, raised.value.response.json())
    assert balance(app, tenant) == before and upstream.requests == []


def test_the_hold_covers_tool_definitions(live_server, tenant, upstream, client):
    tools = [
        {**WEATHER, "function": {**WEATHER["function"], "name": f"tool_{k}", "description": "d" * 2000}}
        for k in range(10)
    ]
    holds = []
    for extra in ({}, {"tools": tools}):
        _, _, headers = create(live_server, tenant.key, model=MODEL, messages=MESSAGES, max_tokens=50, **extra)
        holds.append(receipt(client, tenant, headers["x-request-id"])["hold_ucr"])
    rate = Decimal(PRICES[MODEL]["input"]) * Decimal("1.8") / Decimal("0.01")
    assert holds[1] - holds[0] >= len(json.dumps(tools)) * rate


# -- streams: OpenAI's rules on every provider ----------------------------------------

PROVIDERS = ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5", "gemini/gemini-2.5-flash", "demo/chat"]


@pytest.mark.parametrize("model", PROVIDERS)
def test_the_docs_loop_works_without_include_usage(model, app, live_server, tenant, upstream, client):
    stream = sdk(live_server, tenant.key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=50, stream=True
    )
    text = ""
    for chunk in stream.parse():
        text += chunk.choices[0].delta.content or ""  # OpenAI's own docs loop
    assert text
    rec = receipt(client, tenant, stream.headers["X-Request-Id"])
    assert rec["status"] == "ok" and rec["charged_ucr"] > 0
    assert_invariant(app)


@pytest.mark.parametrize("model", PROVIDERS)
def test_include_usage_ends_with_one_empty_choices_chunk_with_the_cost(model, app, live_server, tenant, upstream):
    before = balance(app, tenant)
    chunks, lines, _ = sse(
        live_server,
        tenant.key,
        {"model": model, "messages": MESSAGES, "max_tokens": 50, "stream_options": {"include_usage": True}},
    )
    assert [c["choices"] == [] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["usage"]["cost_credits"] * 1_000_000 == before - balance(app, tenant)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and lines[-1] == "[DONE]"


@pytest.mark.parametrize("finish", ["length", "content_filter", "stop"])
@pytest.mark.parametrize("streamed", [False, True])
def test_finish_reason_is_relayed_exactly(live_server, tenant, upstream, finish, streamed):
    upstream.queue(Reply(finish=finish))
    if streamed:
        chunks, _, _ = sse(live_server, tenant.key, {"model": MODEL, "messages": MESSAGES})
        reasons = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    else:
        completion, _, _ = create(live_server, tenant.key, model=MODEL, messages=MESSAGES)
        reasons = [completion.choices[0].finish_reason]
    assert reasons == [finish]


# -- upstream errors: the SDK's classes, nothing charged ------------------------------


def test_upstream_rate_limit_is_a_429_with_retry_after_after_our_retries(app, live_server, tenant, upstream):
    limited = Reply(status=429, retry_after="1", error_message="Rate limit reached for gpt-4o-mini")
    upstream.queue(limited, limited, limited)
    before = balance(app, tenant)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.response.headers["retry-after"] == "1"
    valid(ERROR, raised.value.response.json())
    assert len(upstream.requests) == 3  # our own two retries came first
    assert balance(app, tenant) == before
    assert_invariant(app)


def test_our_provider_account_out_of_quota_is_a_503_and_alerts_the_operator(app, live_server, tenant, upstream):
    quota = Reply(
        status=429,
        error_type="insufficient_quota",
        error_code="insufficient_quota",
        error_message="You exceeded your current quota, please check your plan and billing details.",
    )
    upstream.default = quota
    before = balance(app, tenant)
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.status_code == 503 and raised.value.body["code"] == "upstream_quota_exceeded"
    assert "operator" in raised.value.body["message"]
    assert balance(app, tenant) == before
    svc = app.extensions["broker"]
    with app.app_context():
        svc.ledger.drain(svc.db())
        found = alerts.findings(svc.db(), error_rate=1.0, failed_jobs=1000)
    assert [kind for kind, _ in found] == ["quota:openai"]
    assert_invariant(app)


def test_unknown_model_upstream_is_a_404_model_not_found(app, live_server, tenant, upstream):
    upstream.queue(
        Reply(status=404, error_message="The model `gpt-4o-mini` does not exist or you do not have access to it.")
    )
    before = balance(app, tenant)
    with pytest.raises(openai.NotFoundError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"
    valid(ERROR, raised.value.response.json())
    assert balance(app, tenant) == before


@pytest.mark.parametrize("streamed", [False, True])
def test_upstream_400_is_a_400_with_the_providers_message(app, live_server, tenant, upstream, streamed):
    upstream.queue(Reply(status=400, error_message="This model's maximum context length is 128000 tokens."))
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=MESSAGES, stream=streamed)
    assert "maximum context length is 128000 tokens" in raised.value.body["message"]
    assert balance(app, tenant) == before
    assert_invariant(app)
