"""The chat provider adapters against the fake upstreams, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from broker.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from broker.providers.anthropic import AnthropicProvider
from broker.providers.base import (
    ChatCall,
    Finish,
    StreamEvent,
    StreamMeta,
    TextDelta,
    UpstreamRateLimited,
    Usage,
    UsageReport,
)
from broker.providers.demo import DemoProvider
from broker.providers.gemini import GeminiProvider
from broker.providers.http import make_session
from broker.providers.openai import OpenAIProvider
from tests.fakes.upstreams import FakeUpstream, Reply

KEY = "sk-test-SECRET-provider-key-0123456789"
TIMEOUT = (2.0, 5.0)
NETWORK = ["openai", "anthropic", "gemini"]
Provider = OpenAIProvider | AnthropicProvider | GeminiProvider


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with make_session(retries=2) as s:
        yield s


@pytest.fixture(autouse=True)
def clean(fake: FakeUpstream) -> None:
    fake.reset()


def provider(
    name: str,
    fake: FakeUpstream,
    session: requests.Session,
    timeout: tuple[float, float] = TIMEOUT,
) -> Provider:
    if name == "openai":
        return OpenAIProvider(fake.openai_base, KEY, session, timeout)
    if name == "anthropic":
        return AnthropicProvider(fake.anthropic_base, KEY, session, timeout)
    return GeminiProvider(fake.gemini_base, KEY, session, timeout)


def chat(**overrides: object) -> ChatCall:
    fields: dict = {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Say hello."},
        ],
        "max_tokens": 64,
    }
    fields.update(overrides)
    return ChatCall(**fields)


def drain(events: Iterator[StreamEvent]) -> tuple[list[StreamEvent], Exception | None]:
    """All events until the stream ends or fails, and the failure if any."""
    seen: list[StreamEvent] = []
    try:
        for event in events:
            seen.append(event)
    except Exception as exc:  # returned for the test to assert on
        return seen, exc
    return seen, None


def text_of(events: list[StreamEvent], index: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.index == index)


def last_usage(events: list[StreamEvent]) -> Usage:
    reports = [e for e in events if isinstance(e, UsageReport)]
    assert reports, "the stream carried no usage report"
    return reports[-1].usage


CACHED_REPLY = {
    "text": "Cached and reasoned.",
    "input_tokens": 100,
    "cached_tokens": 40,
    "cache_write_tokens": 10,
    "cache_write_1h_tokens": 5,
    "output_tokens": 30,
    "reasoning_tokens": 20,
}


# ------------------------------------------------------------------ non-stream usage


def test_openai_usage_splits_cache_reads_and_writes_out_of_prompt_tokens(
    fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(**{**CACHED_REPLY, "cache_write_1h_tokens": 0}))
    result = provider("openai", fake, session).complete(chat(temperature=0.2))
    assert result.usage == Usage(
        input_tokens=100, cached_input_tokens=40, cache_write_tokens=10, output_tokens=30, reasoning_tokens=20
    )
    assert result.choices[0].content == "Cached and reasoned."
    assert result.choices[0].finish_reason == "stop"
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json["max_completion_tokens"] == 64
    assert sent.json["temperature"] == 0.2
    assert "stream_options" not in sent.json and "max_tokens" not in sent.json


def test_anthropic_usage_splits_cache_writes_by_ttl(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(**CACHED_REPLY, finish="length"))
    result = provider("anthropic", fake, session).complete(chat(stop=["END"]))
    assert result.usage == Usage(
        input_tokens=100,
        cached_input_tokens=40,
        cache_write_tokens=10,
        cache_write_1h_tokens=5,
        output_tokens=30,
        reasoning_tokens=20,  # output_tokens_details.thinking_tokens: part of output_tokens
    )
    assert result.choices[0].finish_reason == "length"
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.json["max_tokens"] == 64
    assert sent.json["system"] == "Be terse."
    assert sent.json["messages"] == [{"role": "user", "content": "Say hello."}]
    assert sent.json["stop_sequences"] == ["END"]


def test_gemini_usage_takes_cached_out_of_prompt_and_adds_thoughts_to_output(
    fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(**{**CACHED_REPLY, "cache_write_tokens": 0}))
    result = provider("gemini", fake, session).complete(chat(n=2, top_p=0.5))
    assert result.usage == Usage(input_tokens=100, cached_input_tokens=40, output_tokens=30, reasoning_tokens=20)
    assert [c.index for c in result.choices] == [0, 1]
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/test-model:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.json["generationConfig"] == {
        "maxOutputTokens": 64,
        "topP": 0.5,
        "candidateCount": 2,
    }
    assert sent.json["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    assert sent.json["contents"] == [{"role": "user", "parts": [{"text": "Say hello."}]}]


def test_anthropic_content_parts_become_text_and_image_blocks(fake: FakeUpstream, session: requests.Session) -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": parts},
    ]
    provider("anthropic", fake, session).complete(chat(messages=messages))
    sent = fake.requests[-1].json
    assert sent["system"] == "Be terse."
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
    ]


def test_anthropic_refuses_n_above_one_without_calling_upstream(fake: FakeUpstream, session: requests.Session) -> None:
    anthropic = provider("anthropic", fake, session)
    with pytest.raises(InvalidRequest) as raised:
        anthropic.complete(chat(n=2))
    assert raised.value.param == "n"
    with pytest.raises(InvalidRequest):
        anthropic.stream(chat(n=2))
    assert fake.requests == []


def test_openai_passes_extra_fields_but_keeps_its_own_max_tokens(fake: FakeUpstream, session: requests.Session) -> None:
    extra = {"seed": 7, "max_tokens": 4096, "response_format": {"type": "text"}}
    provider("openai", fake, session).complete(chat(extra=extra, user="u-1"))
    sent = fake.requests[-1].json
    assert sent["seed"] == 7 and sent["response_format"] == {"type": "text"}
    assert sent["user"] == "u-1"
    assert sent["max_completion_tokens"] == 64 and "max_tokens" not in sent


# ------------------------------------------------------------------ streams


def test_openai_stream_asks_for_usage_and_reports_it_last(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(**{**CACHED_REPLY, "cache_write_1h_tokens": 0}, chunks=4))
    extra = {"stream_options": {"include_obfuscation": False}}
    events, error = drain(provider("openai", fake, session).stream(chat(extra=extra)))
    assert error is None
    assert text_of(events) == "Cached and reasoned."
    assert Finish(0, "stop") in events
    assert events[-1] == UsageReport(
        Usage(input_tokens=100, cached_input_tokens=40, cache_write_tokens=10, output_tokens=30, reasoning_tokens=20)
    )
    sent = fake.requests[-1].json
    assert sent["stream"] is True and sent["max_completion_tokens"] == 64
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}


def test_openai_stream_without_usage_chunk_ends_without_a_report(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(fault="no_usage"))
    events, error = drain(provider("openai", fake, session).stream(chat()))
    assert error is None
    assert text_of(events) == Reply().text
    assert not any(isinstance(e, UsageReport) for e in events)


def test_anthropic_stream_takes_the_last_cumulative_output_count(fake: FakeUpstream, session: requests.Session) -> None:
    # The fake sends two message_delta events (output 15, then 30): summing gives 45.
    fake.queue(Reply(**CACHED_REPLY, chunks=5))
    events, error = drain(provider("anthropic", fake, session).stream(chat()))
    assert error is None
    assert text_of(events) == "Cached and reasoned."
    assert events[-2:] == [
        Finish(0, "stop"),
        UsageReport(
            Usage(
                input_tokens=100,
                cached_input_tokens=40,
                cache_write_tokens=10,
                cache_write_1h_tokens=5,
                output_tokens=30,
                reasoning_tokens=20,
            )
        ),
    ]
    sent = fake.requests[-1].json
    assert sent["stream"] is True and sent["max_tokens"] == 64


def test_gemini_stream_keeps_the_last_cumulative_usage(fake: FakeUpstream, session: requests.Session) -> None:
    # Early chunks carry only promptTokenCount; the last has candidates and thoughts.
    fake.queue(Reply(**{**CACHED_REPLY, "cache_write_tokens": 0}, chunks=4))
    events, error = drain(provider("gemini", fake, session).stream(chat()))
    assert error is None
    assert text_of(events) == "Cached and reasoned."
    assert Finish(0, "stop") in events
    assert last_usage(events) == Usage(input_tokens=100, cached_input_tokens=40, output_tokens=30, reasoning_tokens=20)
    sent = fake.requests[-1]
    assert sent.path == "/v1beta/models/test-model:streamGenerateContent"
    assert sent.query == "alt=sse"
    assert sent.json["generationConfig"]["maxOutputTokens"] == 64


def test_gemini_stream_reassembles_each_candidate_by_index(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(text="abcdef", chunks=3, finish="length"))
    events, error = drain(provider("gemini", fake, session).stream(chat(n=2)))
    assert error is None
    assert text_of(events, 0) == text_of(events, 1) == "abcdef"
    assert {e.index for e in events if isinstance(e, Finish)} == {0, 1}
    assert all(e.reason == "length" for e in events if isinstance(e, Finish))


@pytest.mark.parametrize("name", NETWORK)
def test_closing_a_stream_returns_the_pooled_connection(name: str, fake: FakeUpstream) -> None:
    fake.queue(Reply(chunks=20))
    with make_session(retries=0, pool_size=2) as own:
        events = provider(name, fake, own).stream(chat())
        assert isinstance(next(events), (StreamMeta, TextDelta))  # OpenAI reports its fingerprint first
        pools = own.get_adapter(fake.url).poolmanager.pools
        [pool] = [pools[key] for key in pools.keys()]  # noqa: SIM118 - not iterable
        assert pool.pool.qsize() == 1  # one of two slots checked out
        events.close()
        assert pool.pool.qsize() == 2


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("name", NETWORK)
def test_server_error_is_retried_then_reported(
    name: str, streamed: bool, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.default = Reply(status=500)
    p = provider(name, fake, session)
    with pytest.raises(UpstreamError) as raised:
        p.complete(chat()) if not streamed else next(p.stream(chat()))
    assert type(raised.value) is UpstreamError and raised.value.status == 502
    assert len(fake.requests) == 3  # make_session(retries=2)


@pytest.mark.parametrize("name", NETWORK)
def test_bad_request_is_rejected_with_the_providers_message(
    name: str, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(status=400, error_message="prompt is too long"))
    with pytest.raises(UpstreamRejected) as raised:
        provider(name, fake, session).complete(chat())
    assert "prompt is too long" in raised.value.message
    assert raised.value.status == 400 and len(fake.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("name", NETWORK)
def test_refused_credentials_never_echo_the_upstream_message(
    name: str, status: int, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(status=status, error_message=f"Incorrect API key provided: {KEY}"))
    with pytest.raises(UpstreamError) as raised:
        provider(name, fake, session).complete(chat())
    assert type(raised.value) is UpstreamError
    assert raised.value.message == "the provider refused the broker's credentials"
    assert KEY not in str(raised.value) and "Incorrect" not in str(raised.value)


@pytest.mark.parametrize(
    ("status", "error"),
    [(429, UpstreamRateLimited), (503, UpstreamUnavailable), (504, UpstreamTimeout)],
)
@pytest.mark.parametrize("name", NETWORK)
def test_overload_and_gateway_timeouts_map_to_their_own_errors(
    name: str, status: int, error: type[UpstreamError], fake: FakeUpstream
) -> None:
    fake.queue(Reply(status=status, retry_after="7"))
    with make_session(retries=0) as once, pytest.raises(error) as raised:
        provider(name, fake, once).complete(chat())
    if status == 429:  # Gemini sends it as RetryInfo in the body, not as a header
        assert raised.value.headers == {"Retry-After": "7"}


def test_anthropic_overloaded_529_is_unavailable(fake: FakeUpstream) -> None:
    fake.queue(Reply(status=529))
    with make_session(retries=0) as once, pytest.raises(UpstreamUnavailable):
        provider("anthropic", fake, once).complete(chat())


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("name", NETWORK)
def test_connection_reset_before_any_byte_is_unavailable(
    name: str, streamed: bool, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(fault="reset"))
    p = provider(name, fake, session)
    with pytest.raises(UpstreamUnavailable):
        p.complete(chat()) if not streamed else next(p.stream(chat()))
    assert len(fake.requests) == 1  # a request that reached the provider is not resent


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("name", NETWORK)
def test_read_timeout_before_the_first_byte_is_a_timeout(
    name: str, streamed: bool, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(delay=2))
    p = provider(name, fake, session, timeout=(1, 0.5))
    with pytest.raises(UpstreamTimeout):
        p.complete(chat()) if not streamed else next(p.stream(chat()))


@pytest.mark.parametrize("fault", ["truncate", "error_event"])
@pytest.mark.parametrize("name", NETWORK)
def test_a_stream_failing_after_text_is_broken(
    name: str, fault: str, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(text="one two three", chunks=3, fault=fault, fault_after=1))
    events, error = drain(provider(name, fake, session).stream(chat()))
    assert text_of(events) == "one "
    assert isinstance(error, UpstreamStreamBroken)
    assert KEY not in str(error)


@pytest.mark.parametrize("name", NETWORK)
def test_a_stream_failing_before_any_text_is_not_broken(
    name: str, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(text="one two three", chunks=3, fault="error_event", fault_after=0))
    events, error = drain(provider(name, fake, session).stream(chat()))
    assert events == []
    assert isinstance(error, UpstreamError)
    assert not isinstance(error, UpstreamStreamBroken)


def test_unreachable_provider_is_unavailable(session: requests.Session) -> None:
    with make_session(retries=0) as once:
        p = OpenAIProvider("http://127.0.0.1:9", KEY, once, (0.5, 0.5))
        with pytest.raises(UpstreamUnavailable) as raised:
            p.complete(chat())
    assert KEY not in str(raised.value)


# ------------------------------------------------------------------ demo


def test_demo_is_labelled_deterministic_and_metered_by_formula() -> None:
    call = chat(messages=[{"role": "user", "content": "héllo world"}], n=2)
    first, second = DemoProvider().complete(call), DemoProvider().complete(call)
    assert first == second
    text = first.choices[0].content
    assert text.startswith("[demo provider — not a real model] ")
    assert "héllo world" in text
    assert [c.index for c in first.choices] == [0, 1]
    assert first.choices[1].content == text and first.choices[0].finish_reason == "stop"
    # "héllo world" is 12 UTF-8 bytes: ceil(12 / 4) + 4 = 7.
    per_choice = -(-len(text) // 4)
    assert first.usage == Usage(input_tokens=7, output_tokens=2 * per_choice)


def test_demo_cuts_the_reply_at_max_tokens() -> None:
    result = DemoProvider().complete(chat(max_tokens=3))
    assert result.choices[0].content == "[demo provider — not a real model] "[:12]
    assert result.choices[0].finish_reason == "length"
    assert result.usage.output_tokens == 3


def test_demo_stream_matches_complete_and_ends_with_usage() -> None:
    call = chat(n=2)
    result = DemoProvider().complete(call)
    events = list(DemoProvider().stream(call))
    assert text_of(events, 0) == text_of(events, 1) == result.choices[0].content
    assert sum(isinstance(e, TextDelta) for e in events) > 4
    assert [e for e in events if isinstance(e, Finish)] == [
        Finish(0, "stop"),
        Finish(1, "stop"),
    ]
    assert events[-1] == UsageReport(result.usage)
