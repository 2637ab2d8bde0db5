"""The fake upstreams speak each provider's wire format (PROVIDERS.md §1, §4, §5, §12)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from werkzeug.test import Client

from tests.fakes.upstreams import FakeUpstream, Reply, make_wsgi_app

OPENAI_AUTH = {"Authorization": "Bearer sk-test"}
ANTHROPIC_AUTH = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
GEMINI_AUTH = {"x-goog-api-key": "gm-test"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "claude-test",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    return server


def sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event, the way the SDK parsers read them."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        events.append((name, "\n".join(data)))
    return events


def sdk(fake: FakeUpstream, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_base, api_key="sk-test", max_retries=max_retries)


# --------------------------------------------------------------------------- OpenAI


def test_openai_sdk_completion_with_n_choices_and_usage(fake: FakeUpstream) -> None:
    fake.queue(
        Reply(
            text="Hi!",
            input_tokens=10,
            cached_tokens=5,
            cache_write_tokens=2,
            output_tokens=7,
            reasoning_tokens=3,
            finish="length",
        )
    )
    completion = sdk(fake).chat.completions.create(model="gpt-test", messages=CHAT["messages"], n=2)
    assert completion.object == "chat.completion"
    assert [c.message.content for c in completion.choices] == ["Hi!", "Hi!"]
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].finish_reason == "length"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        17,
        7,
        24,
    )
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert usage.prompt_tokens_details.cache_write_tokens == 2
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 3
    recorded = fake.requests[-1]
    assert recorded.provider == "openai" and recorded.path == "/v1/chat/completions"
    assert recorded.headers["authorization"] == "Bearer sk-test"
    assert recorded.json["n"] == 2


def test_openai_sdk_stream_has_usage_chunk_only_with_include_usage(
    fake: FakeUpstream,
) -> None:
    fake.queue(Reply(text="Hello world", chunks=4, output_tokens=5))
    chunks = list(
        sdk(fake).chat.completions.create(
            model="gpt-test",
            messages=CHAT["messages"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({(c.id, c.created) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])

    raw = requests.post(
        f"{fake.openai_base}/chat/completions",
        headers=OPENAI_AUTH,
        json={**CHAT, "stream": True},
        timeout=5,
    )
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    events = sse(raw.text)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    bodies = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in b and b["choices"] for b in bodies)


def test_openai_error_event_and_status_errors(fake: FakeUpstream) -> None:
    fake.queue(Reply(fault="error_event", fault_after=1, error_message="boom"))
    stream = sdk(fake).chat.completions.create(model="gpt-test", messages=CHAT["messages"], stream=True)
    with pytest.raises(openai.APIError, match="boom"):
        list(stream)

    fake.queue(Reply(status=429, retry_after="2"))
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(fake).chat.completions.create(model="gpt-test", messages=CHAT["messages"])
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.body == {
        "message": "fake upstream error",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }

    fake.queue(Reply(status=503, retry_after="0.01"), Reply(text="after retry"))
    completion = sdk(fake, max_retries=1).chat.completions.create(model="gpt-test", messages=CHAT["messages"])
    assert completion.choices[0].message.content == "after retry"

    missing = requests.post(f"{fake.openai_base}/chat/completions", json=CHAT, timeout=5)
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_no_usage_and_truncate(fake: FakeUpstream) -> None:
    fake.queue(Reply(fault="no_usage"))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = sse(
        requests.post(
            f"{fake.openai_base}/chat/completions",
            headers=OPENAI_AUTH,
            json=body,
            timeout=5,
        ).text
    )
    assert events[-1][1] == "[DONE]"
    assert all(json.loads(d)["usage"] is None for _, d in events[:-1])

    fake.queue(Reply(fault="truncate", fault_after=2, chunks=5))
    lines = []
    url = f"{fake.openai_base}/chat/completions"
    with (
        pytest.raises(requests.exceptions.RequestException),
        requests.post(url, headers=OPENAI_AUTH, json=body, stream=True, timeout=5) as response,
    ):
        lines.extend(line for line in response.iter_lines() if line)
    assert len(lines) == 3  # the role chunk and two text chunks, then the RST


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_message_and_errors(fake: FakeUpstream) -> None:
    fake.queue(
        Reply(
            text="Hi!",
            input_tokens=20,
            cached_tokens=4,
            cache_write_tokens=3,
            cache_write_1h_tokens=2,
            output_tokens=6,
            finish="length",
        )
    )
    response = requests.post(
        f"{fake.anthropic_base}/v1/messages",
        headers=ANTHROPIC_AUTH,
        json=MESSAGES,
        timeout=5,
    )
    message = response.json()
    assert message["type"] == "message" and message["stop_reason"] == "max_tokens"
    assert message["content"] == [{"type": "text", "text": "Hi!"}]
    usage = message["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"]) == (20, 4)
    assert usage["cache_creation_input_tokens"] == 5
    assert usage["cache_creation"] == {
        "ephemeral_5m_input_tokens": 3,
        "ephemeral_1h_input_tokens": 2,
    }
    assert usage["output_tokens"] == 6

    no_max = {k: v for k, v in MESSAGES.items() if k != "max_tokens"}
    bad = requests.post(
        f"{fake.anthropic_base}/v1/messages",
        headers=ANTHROPIC_AUTH,
        json=no_max,
        timeout=5,
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    unauth = requests.post(f"{fake.anthropic_base}/v1/messages", json=MESSAGES, timeout=5)
    assert unauth.status_code == 401 and unauth.json()["type"] == "error"
    assert unauth.json()["error"]["type"] == "authentication_error"

    fake.queue(Reply(status=529, retry_after="1"))
    overloaded = requests.post(
        f"{fake.anthropic_base}/v1/messages",
        headers=ANTHROPIC_AUTH,
        json=MESSAGES,
        timeout=5,
    )
    assert overloaded.status_code == 529 and overloaded.headers["Retry-After"] == "1"
    assert overloaded.json()["error"]["type"] == "overloaded_error"
    assert overloaded.json()["request_id"] == overloaded.headers["request-id"]


def test_anthropic_stream_has_two_cumulative_message_deltas(fake: FakeUpstream) -> None:
    fake.queue(Reply(text="Hello world", chunks=2, input_tokens=11, output_tokens=9))
    response = requests.post(
        f"{fake.anthropic_base}/v1/messages",
        headers=ANTHROPIC_AUTH,
        json={**MESSAGES, "stream": True},
        timeout=5,
    )
    events = sse(response.text)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_delta",
        "message_stop",
    ]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == name for d, name in zip(data, names, strict=True))
    assert data[0]["message"]["usage"]["input_tokens"] == 11
    assert data[0]["message"]["usage"]["output_tokens"] == 1
    assert "".join(d["delta"]["text"] for d in data[3:5]) == "Hello world"
    outputs = [d["usage"]["output_tokens"] for d in data if d["type"] == "message_delta"]
    assert outputs == [4, 9]  # cumulative: the last one is the total, the sum is wrong

    fake.queue(Reply(fault="error_event", fault_after=1))
    events = sse(
        requests.post(
            f"{fake.anthropic_base}/v1/messages",
            headers=ANTHROPIC_AUTH,
            json={**MESSAGES, "stream": True},
            timeout=5,
        ).text
    )
    assert events[-1][0] == "error"
    assert json.loads(events[-1][1])["error"]["type"] == "overloaded_error"

    fake.queue(Reply(fault="no_usage"))
    data = [
        json.loads(d)
        for _, d in sse(
            requests.post(
                f"{fake.anthropic_base}/v1/messages",
                headers=ANTHROPIC_AUTH,
                json={**MESSAGES, "stream": True},
                timeout=5,
            ).text
        )
    ]
    assert "usage" not in data[0]["message"]
    assert all("usage" not in d for d in data if d["type"] == "message_delta")


# --------------------------------------------------------------------------- Gemini


def test_gemini_stream_usage_is_cumulative(fake: FakeUpstream) -> None:
    fake.queue(
        Reply(
            text="Hello world",
            chunks=3,
            input_tokens=7,
            cached_tokens=2,
            output_tokens=10,
            reasoning_tokens=4,
        )
    )
    url = f"{fake.gemini_base}/v1beta/models/gemini-test:streamGenerateContent?alt=sse"
    response = requests.post(url, headers=GEMINI_AUTH, json=CONTENTS, timeout=5)
    events = sse(response.text)
    assert all(name is None for name, _ in events) and "[DONE]" not in response.text
    chunks = [json.loads(d) for _, d in events]
    assert len(chunks) == 3
    first, last = chunks[0]["usageMetadata"], chunks[-1]["usageMetadata"]
    assert "candidatesTokenCount" not in first
    assert first["promptTokenCount"] == first["totalTokenCount"] == 9
    assert "finishReason" not in chunks[0]["candidates"][0]
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert last["promptTokenCount"] == 9 and last["cachedContentTokenCount"] == 2
    assert (last["candidatesTokenCount"], last["thoughtsTokenCount"]) == (6, 4)
    assert last["totalTokenCount"] == 19
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == "Hello world"


def test_gemini_candidates_errors_and_key_in_query(fake: FakeUpstream) -> None:
    url = f"{fake.gemini_base}/v1beta/models/gemini-test:generateContent"
    body = {**CONTENTS, "generationConfig": {"candidateCount": 2}}
    fake.queue(Reply(finish="length"))
    response = requests.post(url + "?key=gm-test", json=body, timeout=5).json()
    assert [c["index"] for c in response["candidates"]] == [0, 1]
    assert response["candidates"][1]["finishReason"] == "MAX_TOKENS"
    assert response["usageMetadata"]["candidatesTokenCount"] == 9
    assert fake.requests[-1].query == "key=gm-test"

    fake.queue(Reply(status=429, retry_after="26"))
    limited = requests.post(url, headers=GEMINI_AUTH, json=CONTENTS, timeout=5)
    error = limited.json()["error"]
    assert (limited.status_code, error["code"], error["status"]) == (
        429,
        429,
        "RESOURCE_EXHAUSTED",
    )
    assert error["details"][0]["retryDelay"] == "26s"

    unauth = requests.post(url, json=CONTENTS, timeout=5)
    assert unauth.json()["error"]["status"] == "PERMISSION_DENIED"

    fake.queue(Reply(fault="error_event", fault_after=1))
    stream = requests.post(
        url.replace(":generateContent", ":streamGenerateContent?alt=sse"),
        headers=GEMINI_AUTH,
        json=CONTENTS,
        timeout=5,
    )
    assert json.loads(sse(stream.text)[-1][1])["error"]["code"] == 500


# --------------------------------------------------------------------------- transport


def test_reset_raises_connection_error_and_is_recorded(fake: FakeUpstream) -> None:
    fake.queue(Reply(fault="reset"), Reply(fault="reset"))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(
            f"{fake.openai_base}/chat/completions",
            headers=OPENAI_AUTH,
            json=CHAT,
            timeout=5,
        )
    with pytest.raises(openai.APIConnectionError):
        sdk(fake).chat.completions.create(model="gpt-test", messages=CHAT["messages"])
    assert len(fake.requests) == 2
    # the server survives and serves the next request normally
    ok = requests.post(
        f"{fake.openai_base}/chat/completions",
        headers=OPENAI_AUTH,
        json=CHAT,
        timeout=5,
    )
    assert ok.status_code == 200


def test_delay_queue_order_and_plain_wsgi(fake: FakeUpstream) -> None:
    fake.queue(Reply(text="one", delay=0.2), Reply(text="two"))
    started = time.monotonic()
    first = requests.post(
        f"{fake.openai_base}/chat/completions",
        headers=OPENAI_AUTH,
        json=CHAT,
        timeout=5,
    )
    assert time.monotonic() - started >= 0.2
    second = requests.post(
        f"{fake.openai_base}/chat/completions",
        headers=OPENAI_AUTH,
        json=CHAT,
        timeout=5,
    )
    third = requests.post(
        f"{fake.openai_base}/chat/completions",
        headers=OPENAI_AUTH,
        json=CHAT,
        timeout=5,
    )
    contents = [r.json()["choices"][0]["message"]["content"] for r in (first, second, third)]
    assert contents == ["one", "two", Reply().text]

    client = Client(make_wsgi_app(FakeUpstream(Reply(text="wsgi", chunks=1))))
    response = client.post("/v1/messages", headers=ANTHROPIC_AUTH, json={**MESSAGES, "stream": True})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert '"text":"wsgi"' in response.get_data(as_text=True)


def test_module_runs_as_a_standalone_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.upstreams", "--port", str(port)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert f"127.0.0.1:{port}" in process.stdout.readline()
        response = requests.post(
            f"http://127.0.0.1:{port}/v1beta/models/g:generateContent",
            headers=GEMINI_AUTH,
            json=CONTENTS,
            timeout=5,
        )
        assert response.json()["candidates"][0]["content"]["parts"][0]["text"] == Reply().text
    finally:
        process.terminate()
        process.wait(timeout=5)
