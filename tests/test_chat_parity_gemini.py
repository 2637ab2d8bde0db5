"""Chat parity on Gemini models: an app on the official ``openai`` SDK works unchanged.

Each feature goes through a live broker to the fake Gemini upstream (real wire format), non-stream
and stream; the test asserts the exact body Gemini received, what the SDK got back, and that the
charge is the priced usage to the micro-credit. Refusals (400, by design) hold nothing.
"""

from __future__ import annotations

import base64
import json
import struct
from decimal import Decimal

import openai
import pytest

from tests.conftest import assert_invariant
from tests.fakes.upstreams import Reply, gemini_thought_signature
from tests.test_chat_billing import PRICES, expected_ucr

MODEL = "gemini/gemini-2.5-flash"
THINKER = "gemini/gemini-3-flash-preview"
ASK = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": ["string", "null"], "enum": ["c", "f", None]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
WEATHER_DECLARATION = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["c", "f", None], "nullable": True},
        },
        "required": ["city"],
    },
}
PARIS, ROME = '{"city": "Paris"}', '{"city": "Rome"}'


def two_calls(**usage) -> Reply:
    calls = [{"name": "get_weather", "arguments": PARIS}, {"name": "get_weather", "arguments": ROME}]
    return Reply(tool_calls=calls, **{"input_tokens": 80, "output_tokens": 24, **usage})


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def receipt(client, tenant, request_id: str) -> dict:
    return client.get(f"/v1/requests/{request_id}", headers=tenant.headers).json


def sent(upstream) -> dict:
    """The body the fake Gemini received last."""
    gemini = [r for r in upstream.requests if r.provider == "gemini"]
    return gemini[-1].json


def run(live_server, tenant, streamed: bool, **kwargs) -> tuple[dict, str]:
    """One call through the SDK, streamed or not, reassembled as a client does:
    ({"content", "tool_calls", "finish_reason", "logprobs"}, request id)."""
    client = sdk(live_server, tenant.key)
    if not streamed:
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        choice = raw.parse().choices[0]
        message = choice.message.model_dump()
        logprobs = choice.logprobs.model_dump()["content"] if choice.logprobs else None
        calls = message.get("tool_calls") or []
        out = {"content": message["content"], "tool_calls": calls, "finish_reason": choice.finish_reason}
        return {**out, "logprobs": logprobs}, raw.headers["X-Request-Id"]
    raw = client.chat.completions.with_raw_response.create(stream=True, **kwargs)
    content, calls, finish, logprobs = None, {}, None, []
    for chunk in raw.parse():
        for choice in chunk.choices:  # the docs loop: a chunk without choices would raise here
            delta = choice.delta.model_dump()
            if delta.get("content"):
                content = (content or "") + delta["content"]
            for part in delta.get("tool_calls") or []:
                call = calls.setdefault(part["index"], {"function": {"name": "", "arguments": ""}})
                for key in ("id", "type", "extra_content"):
                    if part.get(key) is not None:
                        call[key] = part[key]
                call["function"]["name"] += (part.get("function") or {}).get("name") or ""
                call["function"]["arguments"] += (part.get("function") or {}).get("arguments") or ""
            if choice.logprobs:
                logprobs += choice.logprobs.model_dump()["content"]
            finish = choice.finish_reason or finish
    calls_list = [calls[k] for k in sorted(calls)]
    out = {"content": content, "tool_calls": calls_list, "finish_reason": finish, "logprobs": logprobs or None}
    return out, raw.headers["X-Request-Id"]


def assert_charged(app, client, tenant, request_id: str, model: str, reply: Reply, before: int) -> None:
    want = expected_ucr(model, reply)
    assert receipt(client, tenant, request_id)["charged_ucr"] == want
    assert before - balance(app, tenant) == want
    assert_invariant(app)


# -- tools ------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_tools_are_function_declarations_and_calls_come_back_as_tool_calls(
    streamed, app, live_server, tenant, upstream, client
):
    reply = two_calls()
    upstream.queue(reply)
    before = balance(app, tenant)
    got, request_id = run(
        live_server, tenant, streamed, model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required"
    )
    body = sent(upstream)
    assert body["tools"] == [{"functionDeclarations": [WEATHER_DECLARATION]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert got["finish_reason"] == "tool_calls" and got["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got["tool_calls"]] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    ids = [c["id"] for c in got["tool_calls"]]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert all("extra_content" not in c for c in got["tool_calls"])  # no thinking: nothing to carry
    assert_charged(app, client, tenant, request_id, MODEL, reply, before)


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice_maps_to_function_calling_config(choice, config, live_server, tenant, upstream):
    sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice)
    assert sent(upstream)["toolConfig"] == {"functionCallingConfig": config}


def test_tool_results_become_one_user_turn_of_function_responses(app, live_server, tenant, upstream, client):
    client_sdk = sdk(live_server, tenant.key)
    upstream.queue(two_calls())
    first = client_sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])
    calls = first.choices[0].message.tool_calls
    history = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[1].id, "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
    ]
    reply = Reply(text="Paris is sunny, Rome is 21.", input_tokens=140, output_tokens=12)
    upstream.queue(reply)
    before = balance(app, tenant)
    raw = client_sdk.chat.completions.with_raw_response.create(model=MODEL, messages=history, tools=[WEATHER])
    assert raw.parse().choices[0].message.content == reply.text
    body = sent(upstream)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": ASK[0]["content"]}]},
        {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"output": {"temp": 21}}}},
                {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}},
            ],
        },
    ]
    assert_charged(app, client, tenant, raw.headers["X-Request-Id"], MODEL, reply, before)


@pytest.mark.parametrize("streamed", [False, True])
def test_thinking_tool_calls_carry_the_thought_signature_to_the_next_turn(
    streamed, app, live_server, tenant, upstream, client
):
    reply = two_calls(reasoning_tokens=40, output_tokens=64)
    upstream.queue(reply)
    before = balance(app, tenant)
    kwargs = {"model": THINKER, "tools": [WEATHER], "reasoning_effort": "low"}
    got, request_id = run(live_server, tenant, streamed, messages=ASK, **kwargs)
    assert sent(upstream)["generationConfig"]["thinkingConfig"] == {"thinkingLevel": "low"}
    signature = gemini_thought_signature("get_weather", {"city": "Paris"})
    assert got["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": signature}}
    assert "extra_content" not in got["tool_calls"][1]  # Gemini signs the first call of the turn
    assert_charged(app, client, tenant, request_id, THINKER, reply, before)  # thoughts billed as output

    assistant = {"role": "assistant", "content": None, "tool_calls": got["tool_calls"]}
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in got["tool_calls"]]
    again = sdk(live_server, tenant.key).chat.completions.create(messages=[*ASK, assistant, *results], **kwargs)
    assert again.choices[0].message.content == Reply().text
    model_turn = sent(upstream)["contents"][1]
    assert model_turn["parts"][0]["thoughtSignature"] == signature

    # Without the signature Gemini refuses the turn: its 400 reaches the SDK, nothing is charged.
    del assistant["tool_calls"][0]["extra_content"]
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(messages=[*ASK, assistant, *results], **kwargs)
    assert "thought_signature" in raised.value.body["message"]
    assert balance(app, tenant) == before


# -- structured output ------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_json_mode_and_json_schema_use_gemini_response_schema(streamed, app, live_server, tenant, upstream, client):
    schema = {
        "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "type": "object",
        "properties": {
            "cities": {"type": "array", "items": {"$ref": "#/$defs/City"}},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["cities", "note"],
        "additionalProperties": False,
    }
    answer = '{"cities": [{"name": "Paris"}], "note": null}'
    for fmt, config in [
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {"type": "json_schema", "json_schema": {"name": "cities", "strict": True, "schema": schema}},
            {
                "responseMimeType": "application/json",
                "responseSchema": {
                    "type": "object",
                    "properties": {
                        "cities": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"name": {"type": "string"}},
                                "required": ["name"],
                            },
                        },
                        "note": {"type": "string", "nullable": True},
                    },
                    "required": ["cities", "note"],
                },
            },
        ),
    ]:
        reply = Reply(text=answer, input_tokens=50, output_tokens=15)
        upstream.queue(reply)
        before = balance(app, tenant)
        got, request_id = run(live_server, tenant, streamed, model=MODEL, messages=ASK, response_format=fmt)
        assert json.loads(got["content"]) == json.loads(answer)
        generation = sent(upstream)["generationConfig"]
        assert {k: v for k, v in generation.items() if k.startswith("response")} == config
        assert_charged(app, client, tenant, request_id, MODEL, reply, before)


# -- inputs -----------------------------------------------------------------------------


def png(width: int, height: int) -> str:
    head = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + struct.pack(">II", width, height)
        + b"\x08\x02\x00\x00\x00"
    )
    return base64.b64encode(head + b"\x00" * 32).decode()


def wav(seconds: int, rate: int = 16000) -> str:
    data = b"\x00\x00" * rate * seconds
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    head = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    return base64.b64encode(head + b"data" + struct.pack("<I", len(data)) + data).decode()


PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj<</Type/Page>>endobj\n%%EOF\n").decode()


@pytest.mark.parametrize("streamed", [False, True])
def test_images_pdfs_and_audio_are_inline_data_and_held_by_gemini_token_rules(
    streamed, app, live_server, tenant, upstream, client
):
    image, audio = png(1000, 500), wav(2)
    content = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?x=1"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF}"}},
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
    ]
    reply = Reply(text="They differ.", input_tokens=2000, output_tokens=9)
    upstream.queue(reply)
    before = balance(app, tenant)
    messages = [{"role": "user", "content": content}]
    got, request_id = run(live_server, tenant, streamed, model=MODEL, messages=messages, max_tokens=20)
    assert got["content"] == "They differ."
    assert sent(upstream)["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "Compare these."},
                {"inlineData": {"mimeType": "image/png", "data": image}},
                {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?x=1"}},
                {"inlineData": {"mimeType": "application/pdf", "data": PDF}},
                {"inlineData": {"mimeType": "audio/wav", "data": audio}},
            ],
        }
    ]
    # The hold covers Gemini's rules: 2 tiles (1000×500), 16 tiles (unknown size), 1,000 PDF pages, 2 s of audio.
    media = 2 * 258 + 16 * 258 + 1000 * 258 + 3 * 32
    rate = Decimal(PRICES[MODEL]["input"]) * Decimal("1.8") / Decimal("0.01")
    assert receipt(client, tenant, request_id)["hold_ucr"] >= media * rate
    assert_charged(app, client, tenant, request_id, MODEL, reply, before)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "https://"),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "file_data"),
        ({"type": "file", "file": {"file_data": "data:text/plain;base64,aGk="}}, "PDF"),
        ({"type": "input_audio", "input_audio": {"data": wav(1, rate=400), "format": "wav"}}, "resample"),
        ({"type": "input_audio", "input_audio": {"data": "aGk=", "format": "flac"}}, "wav or mp3"),
    ],
)
def test_inputs_gemini_cannot_take_or_we_cannot_bound_are_refused_before_the_hold(
    part, message, app, live_server, tenant, upstream
):
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [part]}]
        )
    assert message in raised.value.body["message"] and raised.value.body["param"] == "messages"
    assert balance(app, tenant) == before and not upstream.requests


# -- parameters -------------------------------------------------------------------------


def test_sampling_parameters_map_to_generation_config(live_server, tenant, upstream):
    sdk(live_server, tenant.key).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "One."},
            {"role": "user", "content": [{"type": "text", "text": "Two."}]},
            {"role": "assistant", "content": ""},
        ],
        max_tokens=40,
        temperature=1.5,
        top_p=0.9,
        stop=["END"],
        n=2,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        reasoning_effort="none",
        extra_body={"top_k": 20},
    )
    body = sent(upstream)
    assert body["generationConfig"] == {
        "maxOutputTokens": 40,
        "temperature": 1.5,
        "topP": 0.9,
        "topK": 20,
        "stopSequences": ["END"],
        "candidateCount": 2,
        "seed": 7,
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
        "thinkingConfig": {"thinkingBudget": 0},
    }
    # Same-role turns merged, the empty assistant turn dropped, the developer message the system instruction.
    assert body["contents"] == [{"role": "user", "parts": [{"text": "One."}, {"text": "Two."}]}]
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}


def test_a_system_message_alone_becomes_the_user_turn(live_server, tenant, upstream):
    sdk(live_server, tenant.key).chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Hi."}])
    body = sent(upstream)
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Hi."}]}] and "systemInstruction" not in body


@pytest.mark.parametrize("streamed", [False, True])
def test_logprobs_map_to_response_logprobs(streamed, app, live_server, tenant, upstream, client):
    reply = Reply(text="Hello there friend", input_tokens=20, output_tokens=3, chunks=1)
    upstream.queue(reply)
    before = balance(app, tenant)
    got, request_id = run(live_server, tenant, streamed, model=MODEL, messages=ASK, logprobs=True, top_logprobs=2)
    generation = sent(upstream)["generationConfig"]
    assert generation["responseLogprobs"] is True and generation["logprobs"] == 2
    assert [t["token"] for t in got["logprobs"]] == ["Hello", " there", " friend"]
    assert got["logprobs"][0]["logprob"] == pytest.approx(-0.01)
    assert [t["token"] for t in got["logprobs"][0]["top_logprobs"]] == ["Hello", "alt0"]
    assert_charged(app, client, tenant, request_id, MODEL, reply, before)


@pytest.mark.parametrize(
    ("model", "kwargs", "param"),
    [
        (MODEL, {"logit_bias": {"50256": -100}}, "logit_bias"),
        (MODEL, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        (MODEL, {"functions": [WEATHER["function"]]}, "functions"),
        (MODEL, {"metadata": {"a": "b"}}, "metadata"),
        (MODEL, {"safety_identifier": "u1"}, "safety_identifier"),
        (MODEL, {"prompt_cache_key": "k"}, "prompt_cache_key"),
        (MODEL, {"verbosity": "low"}, "verbosity"),
        (MODEL, {"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
        (MODEL, {"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
        (MODEL, {"extra_body": {"top_k": 100}}, "top_k"),
        (MODEL, {"reasoning_effort": "xhigh"}, "reasoning_effort"),
        ("gemini/gemini-2.5-pro", {"reasoning_effort": "none"}, "reasoning_effort"),
        ("gemini/gemini-2.5-pro", {"logprobs": True}, "logprobs"),
        (MODEL, {"top_logprobs": 3}, "top_logprobs"),
        (MODEL, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ],
)
def test_what_gemini_has_no_mapping_for_is_a_400_naming_it_and_holds_nothing(
    model, kwargs, param, app, live_server, tenant, upstream
):
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model=model, messages=ASK, **kwargs)
    assert raised.value.body["param"] == param
    assert balance(app, tenant) == before and not upstream.requests
    assert_invariant(app)


# -- finish reasons and errors ----------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(("finish", "want"), [("length", "length"), ("content_filter", "content_filter")])
def test_cut_answers_keep_their_finish_reason_and_are_charged_for_what_was_delivered(
    finish, want, streamed, app, live_server, tenant, upstream, client
):
    reply = Reply(finish=finish, input_tokens=30, output_tokens=9)
    upstream.queue(reply)
    before = balance(app, tenant)
    got, request_id = run(live_server, tenant, streamed, model=MODEL, messages=ASK)
    assert got["finish_reason"] == want and got["content"] == reply.text
    assert_charged(app, client, tenant, request_id, MODEL, reply, before)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_blocked_prompt_is_a_content_policy_400_and_free(streamed, app, live_server, tenant, upstream):
    upstream.queue(Reply(block_reason="PROHIBITED_CONTENT"))
    before = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        run(live_server, tenant, streamed, model=MODEL, messages=ASK)
    assert raised.value.body["code"] == "content_policy_violation"
    assert "PROHIBITED_CONTENT" in raised.value.body["message"]
    assert balance(app, tenant) == before
    assert_invariant(app)


def test_gemini_errors_reach_the_sdk_as_its_own_classes_and_are_free(app, live_server, tenant, upstream):
    client_sdk = sdk(live_server, tenant.key)
    before = balance(app, tenant)
    limited = Reply(status=429, retry_after="26s", error_message="You exceeded your current quota.")
    upstream.queue(limited, limited, limited)
    with pytest.raises(openai.RateLimitError) as raised:
        client_sdk.chat.completions.create(model=MODEL, messages=ASK)
    assert raised.value.response.headers["retry-after"] == "26"

    upstream.queue(Reply(status=404, error_message="models/gemini-2.5-flash is not found for API version v1beta"))
    with pytest.raises(openai.NotFoundError) as raised:
        client_sdk.chat.completions.create(model=MODEL, messages=ASK)
    assert raised.value.body["code"] == "model_not_found"

    upstream.queue(Reply(status=400, error_message="The input token count exceeds the maximum."))
    with pytest.raises(openai.BadRequestError) as raised:
        client_sdk.chat.completions.create(model=MODEL, messages=ASK)
    assert "The input token count exceeds the maximum." in raised.value.body["message"]
    assert balance(app, tenant) == before
    assert_invariant(app)
