"""The media adapters (ElevenLabs, OpenAI Images, Suno) against the fake upstreams, and the demo stand-ins."""

from __future__ import annotations

import io
import math
import wave
from collections.abc import Iterator

import pytest
import requests

from broker.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from broker.providers.base import ImageUsage, MusicTask, UpstreamRateLimited
from broker.providers.demo import DemoImages, DemoMusic, DemoSpeech, image_tokens
from broker.providers.elevenlabs import OUTPUT_FORMATS, ElevenLabsProvider, content_type_for
from broker.providers.http import make_session
from broker.providers.openai_images import OpenAIImagesProvider, usage_from
from broker.providers.suno import PLACEHOLDER_CALLBACK, SunoProvider
from tests.fakes.upstreams import OMIT, FakeUpstream, Reply, fake_audio, fake_clip, fake_png

KEY = "sk-test-SECRET-media-key-0123456789"
TIMEOUT = (2.0, 5.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def tts(fake: FakeUpstream, session: requests.Session, timeout: tuple[float, float] = TIMEOUT) -> ElevenLabsProvider:
    return ElevenLabsProvider(fake.elevenlabs_base, KEY, session, timeout)


def images(fake: FakeUpstream, session: requests.Session) -> OpenAIImagesProvider:
    return OpenAIImagesProvider(fake.openai_base, KEY, session, TIMEOUT)


def suno(fake: FakeUpstream, session: requests.Session) -> SunoProvider:
    return SunoProvider(fake.suno_base, KEY, session, TIMEOUT)


def say(provider: ElevenLabsProvider, text: str = "Hello world", output_format: str = "mp3_44100_128"):
    return provider.synthesize("eleven_multilingual_v2", text, "voice-1", output_format, None)


def read_wav(data: bytes) -> tuple[int, int, int, int]:
    """(channels, sample width, rate, frames) as the stdlib reader sees them."""
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()


# ------------------------------------------------------------------ ElevenLabs


def test_elevenlabs_returns_the_audio_its_content_type_and_billed_credits(
    fake: FakeUpstream, session: requests.Session
) -> None:
    settings = {"stability": 0.5, "similarity_boost": 0.75}
    result = tts(fake, session).synthesize("eleven_flash_v2_5", "Hello world", "v1", "mp3_22050_32", settings)
    assert result.audio.data == fake_audio("Hello world", "mp3_22050_32")
    assert result.audio.content_type == "audio/mpeg"
    assert result.billed_units == 6  # flash: half a credit per character, rounded up
    assert result.upstream_id
    sent = fake.requests[-1]
    assert sent.path == "/v1/text-to-speech/v1" and sent.query == "output_format=mp3_22050_32"
    assert sent.headers["xi-api-key"] == KEY and "authorization" not in sent.headers
    assert sent.json == {"text": "Hello world", "model_id": "eleven_flash_v2_5", "voice_settings": settings}


def test_elevenlabs_quotes_the_voice_id_and_omits_absent_settings(
    fake: FakeUpstream, session: requests.Session
) -> None:
    tts(fake, session).synthesize("eleven_v3", "Hi", "my voice", "mp3_44100_128", None)
    sent = fake.requests[-1]
    assert sent.path == "/v1/text-to-speech/my voice"  # sent as my%20voice, decoded by the server
    assert "voice_settings" not in sent.json


def test_elevenlabs_billed_units_follow_the_header_and_are_none_without_it(
    fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(character_cost=3), Reply(character_cost=OMIT), Reply(fault="no_usage"))
    provider = tts(fake, session)
    assert say(provider).billed_units == 3
    assert say(provider).billed_units is None
    result = say(provider)
    assert result.billed_units is None and result.audio.data == fake_audio("Hello world")


def test_elevenlabs_pcm_keeps_the_response_content_type(fake: FakeUpstream, session: requests.Session) -> None:
    result = say(tts(fake, session), output_format="pcm_16000")
    assert result.audio.content_type == "audio/pcm"
    assert result.audio.data == fake_audio("Hello world", "pcm_16000")


def test_elevenlabs_output_formats_are_checked_before_any_call(fake: FakeUpstream, session: requests.Session) -> None:
    assert len(OUTPUT_FORMATS) == 21 and "pcm_48000" in OUTPUT_FORMATS and "opus_48000_192" in OUTPUT_FORMATS
    assert [content_type_for(f) for f in ("mp3_44100_128", "pcm_8000", "opus_48000_64")] == [
        "audio/mpeg",
        "audio/pcm",
        "audio/ogg",
    ]
    with pytest.raises(InvalidRequest) as raised:
        say(tts(fake, session), output_format="wav_44100")
    assert raised.value.param == "output_format"
    assert fake.requests == []


def test_elevenlabs_quota_exceeded_401_is_a_plain_upstream_error(fake: FakeUpstream, session: requests.Session) -> None:
    message = f"This request exceeds your quota of 10000. Key {KEY} has 0 credits remaining."
    fake.queue(Reply(status=401, error_type="quota_exceeded", error_message=message))
    with pytest.raises(UpstreamError) as raised:
        say(tts(fake, session))
    assert type(raised.value) is UpstreamError and raised.value.status == 502
    assert "quota" in raised.value.message
    assert KEY not in str(raised.value) and "10000" not in str(raised.value)


def test_elevenlabs_bad_key_never_echoes_the_message(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(status=401, error_message=f"Invalid API key {KEY}"))
    with pytest.raises(UpstreamError) as raised:
        say(tts(fake, session))
    assert type(raised.value) is UpstreamError
    assert raised.value.message == "the provider refused the broker's credentials"


def test_elevenlabs_validation_errors_are_rejected_with_the_message(
    fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(
        Reply(status=400, error_message="eleven_v3 does not support previous_text"),
        Reply(status=422, error_message="String should have at most 5000 characters"),
    )
    provider = tts(fake, session)
    with pytest.raises(UpstreamRejected) as raised:
        say(provider)
    assert "does not support previous_text" in raised.value.message and raised.value.status == 400
    with pytest.raises(UpstreamRejected) as raised:
        say(provider)
    assert "text: String should have at most 5000 characters" in raised.value.message


def test_elevenlabs_rate_limit_is_a_rate_limit_with_retry_after(fake: FakeUpstream) -> None:
    """A 429 past the session's retries is a rate limit (429 to a waiting client; RQ retries the job)."""
    fake.queue(Reply(status=429, retry_after="3", error_message="Too many concurrent requests"))
    with make_session(retries=0) as once, pytest.raises(UpstreamRateLimited) as raised:
        say(tts(fake, once))
    assert raised.value.headers == {"Retry-After": "3"}


def test_elevenlabs_server_error_is_retried_then_reported(fake: FakeUpstream, session: requests.Session) -> None:
    fake.default = Reply(status=500)
    with pytest.raises(UpstreamError) as raised:
        say(tts(fake, session))
    assert type(raised.value) is UpstreamError and len(fake.requests) == 3


def test_elevenlabs_transport_failures(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(fault="reset"), Reply(delay=2), Reply(fault="truncate", chunks=3, fault_after=1))
    with pytest.raises(UpstreamUnavailable):
        say(tts(fake, session))
    with pytest.raises(UpstreamTimeout):
        say(tts(fake, session, timeout=(1, 0.5)))
    with pytest.raises(UpstreamUnavailable):
        say(tts(fake, session), text="a body that the fake cuts off part way through " * 4)


# ------------------------------------------------------------------ OpenAI Images


def test_images_decode_every_image_and_report_usage(fake: FakeUpstream, session: requests.Session) -> None:
    result = images(fake, session).generate("gpt-image-1", "a red fox", "1024x1536", "low", 2)
    assert [i.data for i in result.images] == [fake_png("a red fox", 0), fake_png("a red fox", 1)]
    assert all(i.content_type == "image/png" and i.data.startswith(PNG_MAGIC) for i in result.images)
    assert result.usage == ImageUsage(text_input_tokens=3, image_input_tokens=0, image_output_tokens=816)
    sent = fake.requests[-1]
    assert sent.path == "/v1/images/generations" and sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json == {"model": "gpt-image-1", "prompt": "a red fox", "n": 2, "size": "1024x1536", "quality": "low"}


def test_images_usage_overrides_and_absent_usage(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(image_usage={"text_tokens": 40, "image_tokens": 7, "output_tokens": 999}), Reply(omit_usage=True))
    provider = images(fake, session)
    first = provider.generate("gpt-image-1", "p", "1024x1024", "high", 1)
    assert first.usage == ImageUsage(text_input_tokens=40, image_input_tokens=7, image_output_tokens=999)
    second = provider.generate("gpt-image-1", "p", "1024x1024", "high", 1)
    assert second.usage is None and second.images[0].data == fake_png("p", 0)


def test_images_usage_splits_output_details_when_sent() -> None:
    usage = {
        "input_tokens": 60,
        "output_tokens": 500,
        "input_tokens_details": {"text_tokens": 50, "image_tokens": 10},
        "output_tokens_details": {"image_tokens": 450, "text_tokens": 50},
    }
    assert usage_from(usage) == ImageUsage(50, 10, 450, 50)
    only_text = {**usage, "output_tokens_details": {"text_tokens": 20}}
    assert usage_from(only_text) == ImageUsage(50, 10, 480, 20)
    bare = {"input_tokens": 12, "output_tokens": 272}
    assert usage_from(bare) == ImageUsage(text_input_tokens=12, image_output_tokens=272)


def test_images_moderation_block_is_a_content_policy_rejection(fake: FakeUpstream, session: requests.Session) -> None:
    message = "Your request was rejected by the safety system. safety_violations=[sexual]."
    fake.queue(
        Reply(
            status=400, error_code="moderation_blocked", error_type="image_generation_user_error", error_message=message
        )
    )
    with pytest.raises(UpstreamRejected) as raised:
        images(fake, session).generate("gpt-image-1", "p", "auto", "auto", 1)
    assert raised.value.code == "content_policy_violation" and raised.value.status == 400
    assert "safety system" in raised.value.message


def test_images_other_errors_take_the_shared_mapping(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(
        Reply(status=400, error_message="Invalid size"),
        Reply(status=401, error_message=f"Incorrect API key provided: {KEY}"),
        Reply(fault="reset"),
    )
    provider = images(fake, session)
    with pytest.raises(UpstreamRejected) as raised:
        provider.generate("gpt-image-1", "p", "7x7", "low", 1)
    assert raised.value.code == "upstream_rejected" and "Invalid size" in raised.value.message
    with pytest.raises(UpstreamError) as raised:
        provider.generate("gpt-image-1", "p", "auto", "low", 1)
    assert type(raised.value) is UpstreamError and KEY not in str(raised.value)
    with pytest.raises(UpstreamUnavailable):
        provider.generate("gpt-image-1", "p", "auto", "low", 1)


# ------------------------------------------------------------------ Suno (unofficial reseller shape)


def poll_until_done(provider: SunoProvider, task_id: str, limit: int = 20) -> list[MusicTask]:
    seen = [provider.poll(task_id)]
    while seen[-1].status not in ("succeeded", "failed"):
        assert len(seen) < limit, "the task never finished"
        seen.append(provider.poll(task_id))
    return seen


def test_suno_submit_poll_and_download_both_clips(fake: FakeUpstream, session: requests.Session) -> None:
    provider = suno(fake, session)
    task_id = provider.submit("V4_5ALL", "A calm piano track", None, None, True)
    sent = fake.requests[-1]
    assert sent.path == "/api/v1/generate" and sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json == {
        "instrumental": True,
        "model": "V4_5ALL",
        "callBackUrl": PLACEHOLDER_CALLBACK,
        "customMode": False,
        "prompt": "A calm piano track",
    }
    seen = poll_until_done(provider, task_id)
    assert [(t.status, t.progress) for t in seen] == [
        ("pending", 0),
        ("running", 33),
        ("running", 66),
        ("succeeded", 100),
    ]
    assert fake.requests[-1].query == f"taskId={task_id}"
    urls = seen[-1].clip_urls
    assert len(urls) == 2
    for url in urls:
        clip = provider.download(url)
        assert clip.content_type == "audio/mpeg"
        assert clip.data == fake_clip(url.rsplit("/", 1)[1].removesuffix(".mp3"))
        assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"  # same host as the base


def test_suno_custom_mode_sends_lyrics_style_and_a_title(fake: FakeUpstream, session: requests.Session) -> None:
    provider = suno(fake, session)
    provider.submit("V5", "Night Drive\nsynthwave about a city", "[Verse] neon lights", "synthwave", False)
    assert fake.requests[-1].json == {
        "instrumental": False,
        "model": "V5",
        "callBackUrl": PLACEHOLDER_CALLBACK,
        "customMode": True,
        "prompt": "[Verse] neon lights",
        "style": "synthwave",
        "title": "Night Drive",
    }
    provider.submit("V5", None, "[Verse] la la", "pop", False)
    assert fake.requests[-1].json["title"] == "Untitled"
    provider.submit("V5", "rainy day", None, "jazz", False)
    assert fake.requests[-1].json["prompt"] == "rainy day\nStyle: jazz"
    provider.submit("V5", "y" * 495, None, "jazz", False)  # folding would pass the 500-character limit
    assert fake.requests[-1].json["prompt"] == "y" * 495
    with pytest.raises(InvalidRequest):
        provider.submit("V5", "x", "[Verse] la la", None, False)
    with pytest.raises(InvalidRequest):
        provider.submit("V5", None, None, "pop", False)
    assert len(fake.requests) == 4


def test_suno_sends_no_key_to_a_foreign_host(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(suno_polls_per_stage=0))
    provider = suno(fake, session)
    [task] = poll_until_done(provider, provider.submit("V4_5ALL", "drums", None, None, True))
    foreign = task.clip_urls[0].replace("127.0.0.1", "localhost")
    assert provider.download(foreign).data.startswith(b"ID3")
    assert "authorization" not in fake.requests[-1].headers


@pytest.mark.parametrize("failure", ["GENERATE_AUDIO_FAILED", "SENSITIVE_WORD_ERROR"])
def test_suno_failed_generation_reports_the_reason(failure: str, fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(suno_fail=failure))
    provider = suno(fake, session)
    seen = poll_until_done(provider, provider.submit("V4_5ALL", "song", None, None, False))
    assert seen[0].status == "pending"
    assert seen[-1].status == "failed" and seen[-1].clip_urls == []
    assert failure in (seen[-1].error or "")


@pytest.mark.parametrize(
    ("code", "error", "text"),
    [
        (429, UpstreamError, "credits"),
        (430, UpstreamUnavailable, "rate limiting"),
        (405, UpstreamUnavailable, "rate limiting"),
        (413, UpstreamRejected, "prompt too long"),
        (455, UpstreamUnavailable, "maintenance"),
        (500, UpstreamError, "code 500"),
        (400, UpstreamRejected, "Invalid parameters"),
    ],
)
def test_suno_app_level_codes_on_http_200_are_errors(
    code: int, error: type[UpstreamError], text: str, fake: FakeUpstream, session: requests.Session
) -> None:
    fake.queue(Reply(suno_app_code=code))
    with pytest.raises(UpstreamError) as raised:
        suno(fake, session).submit("V4_5ALL", "song", None, None, False)
    assert type(raised.value) is error and text in raised.value.message
    assert KEY not in str(raised.value)


@pytest.mark.parametrize(("status", "error"), [(429, UpstreamError), (455, UpstreamUnavailable), (401, UpstreamError)])
def test_suno_http_status_codes_map_like_app_codes(status: int, error: type[UpstreamError], fake: FakeUpstream) -> None:
    fake.queue(Reply(status=status))
    with make_session(retries=0) as once, pytest.raises(UpstreamError) as raised:
        suno(fake, once).submit("V4_5ALL", "song", None, None, False)
    assert type(raised.value) is error


def test_suno_prompt_too_long_from_the_vendor(fake: FakeUpstream, session: requests.Session) -> None:
    with pytest.raises(UpstreamRejected) as raised:
        suno(fake, session).submit("V4_5ALL", "x" * 501, None, None, False)
    assert "prompt too long" in raised.value.message


def test_suno_unknown_task_and_missing_clip_are_upstream_errors(fake: FakeUpstream, session: requests.Session) -> None:
    provider = suno(fake, session)
    with pytest.raises(UpstreamError) as raised:
        provider.poll("no-such-task")
    assert type(raised.value) is UpstreamError
    with pytest.raises(UpstreamError) as raised:
        provider.download(f"{fake.url}/files/missing.mp3")
    assert type(raised.value) is UpstreamError
    with pytest.raises(UpstreamError):
        provider.download("file:///etc/passwd")


def test_suno_truncated_clip_download_is_unavailable(fake: FakeUpstream, session: requests.Session) -> None:
    fake.queue(Reply(suno_polls_per_stage=0, fault="truncate", chunks=4, fault_after=1))
    provider = suno(fake, session)
    [task] = poll_until_done(provider, provider.submit("V4_5ALL", "song", None, None, False))
    with pytest.raises(UpstreamUnavailable):
        provider.download(task.clip_urls[0])


# ------------------------------------------------------------------ demo stand-ins


def test_demo_speech_is_a_valid_wav_growing_with_the_text() -> None:
    speech = DemoSpeech()
    short = speech.synthesize("m", "Hi", "v", "mp3_44100_128", None)
    long = speech.synthesize("m", "word " * 100, "v", "mp3_44100_128", None)
    assert short.audio.content_type == "audio/wav" and short.audio.data[:4] == b"RIFF"
    assert short.billed_units == 2 and long.billed_units == 500
    channels, width, rate, short_frames = read_wav(short.audio.data)
    assert (channels, width, rate) == (1, 2, 8000)
    long_frames = read_wav(long.audio.data)[3]
    assert short_frames < long_frames == 16000  # capped at 2 s
    assert speech.synthesize("m", "Hi", "v", "pcm_16000", None) == short  # deterministic


def test_demo_images_are_valid_pngs_with_deterministic_usage() -> None:
    result = DemoImages().generate("gpt-image-1", "a blue whale", "1024x1024", "high", 3)
    assert len(result.images) == 3 and len({i.data for i in result.images}) == 3
    assert all(i.content_type == "image/png" and i.data.startswith(PNG_MAGIC) for i in result.images)
    assert result.usage == ImageUsage(
        text_input_tokens=math.ceil(len("a blue whale") / 4), image_output_tokens=3 * 4160
    )
    assert image_tokens("auto", "auto") == 1056 and image_tokens("2048x2048", "low") == 4 * 272


def test_demo_music_runs_once_then_serves_two_wav_clips() -> None:
    music = DemoMusic()
    task_id = music.submit("V4_5ALL", "lofi beats", None, None, True)
    assert task_id == DemoMusic().submit("V4_5ALL", "lofi beats", None, None, True)
    first, second = music.poll(task_id), DemoMusic().poll(task_id)
    assert first.status == "running"
    assert second.status == "succeeded" and len(second.clip_urls) == 2
    assert all(url.startswith("demo://") for url in second.clip_urls)
    for url in second.clip_urls:
        clip = music.download(url)
        assert clip.content_type == "audio/wav" and read_wav(clip.data)[:3] == (1, 2, 8000)
    assert music.poll("not-a-demo-task").status == "failed"
    with pytest.raises(UpstreamError):
        music.download("https://example.com/x.mp3")
    with pytest.raises(InvalidRequest):
        music.submit("V4_5ALL", None, None, "pop", False)
