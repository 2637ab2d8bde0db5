"""The media fakes speak OpenAI Images, ElevenLabs TTS and sunoapi.org Suno wire formats (PROVIDERS.md §2, §6, §7)."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator

import openai
import pytest
import requests

from tests.fakes.upstreams import OMIT, FakeUpstream, Reply, fake_audio, fake_clip, fake_png

BEARER = {"Authorization": "Bearer vendor-key"}
XI = {"xi-api-key": "xi-test"}
SONG = {"prompt": "a calm piano", "customMode": False, "instrumental": True, "model": "V4_5ALL", "callBackUrl": ""}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    return server


def png_pixel(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the first RGB pixel of an 8-bit RGB PNG, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + payload)
        chunks[kind] = payload
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    rows = zlib.decompress(chunks[b"IDAT"])
    assert len(rows) == height * (1 + 3 * width)
    return width, height, rows[1:4]


# --------------------------------------------------------------------------- OpenAI Images


def test_images_sdk_returns_real_pngs_and_usage(fake: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=fake.openai_base, api_key="sk-test", max_retries=0)
    result = client.images.generate(model="gpt-image-1", prompt="a red fox", n=2, quality="low", size="1024x1536")
    images = [base64.b64decode(item.b64_json or "") for item in result.data or []]
    assert images == [fake_png("a red fox", 0), fake_png("a red fox", 1)] == fake.last_outputs
    assert png_pixel(images[0])[:2] == (8, 8) and png_pixel(images[0])[2] != png_pixel(images[1])[2]
    assert fake_png("a red fox", 0) != fake_png("a blue fox", 0)
    assert (result.size, result.quality, result.output_format, result.background) == (
        "1024x1536",
        "low",
        "png",
        "opaque",
    )
    usage = result.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (3, 816, 819)
    assert usage.input_tokens_details.text_tokens == 3 and usage.input_tokens_details.image_tokens == 0
    recorded = fake.requests[-1]
    assert recorded.provider == "openai_images" and recorded.json["n"] == 2


def test_images_usage_overrides_omission_and_errors(fake: FakeUpstream) -> None:
    url = f"{fake.openai_base}/images/generations"
    body = {"model": "gpt-image-1", "prompt": "cat"}
    fake.queue(
        Reply(image_usage={"text_tokens": 7, "image_tokens": 5, "output_tokens": 100}),
        Reply(omit_usage=True),
        Reply(status=400, error_type="image_generation_user_error", error_code="moderation_blocked"),
        Reply(status=429, retry_after="3"),
    )
    usage = requests.post(url, headers=BEARER, json=body, timeout=5).json()["usage"]
    assert usage == {
        "total_tokens": 112,
        "input_tokens": 12,
        "output_tokens": 100,
        "input_tokens_details": {"text_tokens": 7, "image_tokens": 5},
    }
    assert "usage" not in requests.post(url, headers=BEARER, json=body, timeout=5).json()
    blocked = requests.post(url, headers=BEARER, json=body, timeout=5)
    assert blocked.status_code == 400
    assert blocked.json()["error"]["type"] == "image_generation_user_error"
    assert blocked.json()["error"]["code"] == "moderation_blocked"
    limited = requests.post(url, headers=BEARER, json=body, timeout=5)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    assert requests.post(url, json=body, timeout=5).status_code == 401
    missing = requests.post(url, headers=BEARER, json={"model": "gpt-image-1"}, timeout=5)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


# --------------------------------------------------------------------------- ElevenLabs


def tts(fake: FakeUpstream, body: dict, query: str = "", headers: dict | None = None) -> requests.Response:
    url = f"{fake.elevenlabs_base}/v1/text-to-speech/voice123{query}"
    return requests.post(url, headers=XI if headers is None else headers, json=body, timeout=5)


def test_elevenlabs_audio_bytes_and_character_cost(fake: FakeUpstream) -> None:
    text = "Hello from the fake!"  # 20 characters
    response = tts(fake, {"text": text, "model_id": "eleven_multilingual_v2"})
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.content == fake_audio(text, "mp3_44100_128") == fake.last_outputs[0]
    assert response.content[:2] == b"\xff\xfb"
    assert response.headers["character-cost"] == "20"
    assert response.headers["request-id"] and response.headers["history-item-id"]
    flash = tts(fake, {"text": "abc", "model_id": "eleven_flash_v2_5"}, "?output_format=pcm_16000")
    assert flash.headers["Content-Type"] == "audio/pcm" and flash.headers["character-cost"] == "2"
    assert flash.content == fake_audio("abc", "pcm_16000")
    assert tts(fake, {"text": "abc"}, "?output_format=ulaw_8000").headers["Content-Type"] == "audio/basic"
    opus = tts(fake, {"text": "abc"}, "?output_format=opus_48000_64")
    assert opus.headers["Content-Type"] == "audio/opus" and opus.content.startswith(b"OggS")
    fake.queue(Reply(character_cost=3), Reply(character_cost=OMIT))
    assert tts(fake, {"text": text}).headers["character-cost"] == "3"
    assert "character-cost" not in tts(fake, {"text": text}).headers
    recorded = fake.requests[-1]
    assert recorded.provider == "elevenlabs" and recorded.path == "/v1/text-to-speech/voice123"


def test_elevenlabs_errors(fake: FakeUpstream) -> None:
    denied = tts(fake, {"text": "hi"}, headers={})
    assert denied.status_code == 401 and denied.json()["detail"]["status"] == "invalid_api_key"
    invalid = tts(fake, {"model_id": "x"})
    assert invalid.status_code == 422
    assert invalid.json() == {"detail": [{"loc": ["body", "text"], "msg": "Field required", "type": "missing"}]}
    assert tts(fake, {"text": "hi"}, "?output_format=wav").status_code == 422
    fake.queue(Reply(status=429, error_type="too_many_concurrent_requests", error_message="busy", retry_after="1"))
    limited = tts(fake, {"text": "hi"})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    assert limited.json() == {"detail": {"status": "too_many_concurrent_requests", "message": "busy"}}
    fake.queue(Reply(fault="truncate", fault_after=1, chunks=3))
    with pytest.raises(requests.exceptions.RequestException):
        tts(fake, {"text": "x" * 200})


# --------------------------------------------------------------------------- Suno


def poll(fake: FakeUpstream, task_id: str) -> dict:
    response = requests.get(
        f"{fake.suno_base}/api/v1/generate/record-info", params={"taskId": task_id}, headers=BEARER, timeout=5
    )
    assert response.status_code == 200
    body = response.json()
    assert body["code"] == 200 and body["msg"] == "success"
    return body["data"]


def submit(fake: FakeUpstream, body: dict | None = None) -> requests.Response:
    return requests.post(f"{fake.suno_base}/api/v1/generate", headers=BEARER, json=body or SONG, timeout=5)


def test_suno_task_advances_and_serves_clips_without_consuming_replies(fake: FakeUpstream) -> None:
    fake.queue(Reply(suno_polls_per_stage=2), Reply(status=500))
    submitted = submit(fake).json()
    assert submitted["code"] == 200 and submitted["msg"] == "success"
    task_id = submitted["data"]["taskId"]
    records = [poll(fake, task_id) for _ in range(8)]
    statuses = [record["status"] for record in records]
    assert statuses == ["PENDING"] * 2 + ["TEXT_SUCCESS"] * 2 + ["FIRST_SUCCESS"] * 2 + ["SUCCESS"] * 2
    first = records[4]["response"]["sunoData"]
    assert first[0]["audioUrl"] and first[1]["audioUrl"] == ""
    final = records[-1]
    assert final["taskId"] == task_id and final["type"] == "GENERATE" and final["errorCode"] is None
    clips = final["response"]["sunoData"]
    assert len(clips) == 2 and all(clip["duration"] > 0 for clip in clips)
    for clip in clips:
        audio = requests.get(clip["audioUrl"], timeout=5)
        assert audio.headers["Content-Type"] == "audio/mpeg"
        assert audio.content == fake_clip(clip["id"]) == fake.last_outputs[0]
        assert audio.content.startswith(b"ID3")
        assert png_pixel(requests.get(clip["imageUrl"], timeout=5).content)[:2] == (8, 8)
    assert requests.get(f"{fake.suno_base}/files/unknown.mp3", timeout=5).status_code == 404
    # polls and downloads did not pop the second reply: the next submit gets it
    assert submit(fake).status_code == 500
    assert {r.provider for r in fake.requests} == {"suno"}


def test_suno_failures_and_app_codes(fake: FakeUpstream) -> None:
    fake.queue(
        Reply(suno_fail="SENSITIVE_WORD_ERROR", suno_polls_per_stage=0),
        Reply(suno_fail="GENERATE_AUDIO_FAILED", error_code="531", error_message="nope"),
        Reply(suno_app_code=429),
        Reply(status=503, retry_after="2"),
    )
    sensitive = poll(fake, submit(fake).json()["data"]["taskId"])
    assert sensitive["status"] == "SENSITIVE_WORD_ERROR" and sensitive["errorMessage"]
    task_id = submit(fake).json()["data"]["taskId"]
    assert poll(fake, task_id)["status"] == "PENDING"
    failed = poll(fake, task_id)
    assert (failed["status"], failed["errorCode"], failed["errorMessage"]) == ("GENERATE_AUDIO_FAILED", 531, "nope")
    assert failed["response"]["sunoData"] == []
    broke = submit(fake)
    assert broke.status_code == 200 and broke.json()["code"] == 429 and broke.json()["data"] is None
    down = submit(fake)
    assert down.status_code == 503 and down.headers["Retry-After"] == "2" and down.json()["code"] == 503
    unauthorised = requests.post(f"{fake.suno_base}/api/v1/generate", json=SONG, timeout=5)
    assert unauthorised.status_code == 401 and unauthorised.json()["code"] == 401
    assert submit(fake, {"customMode": True, "instrumental": True, "style": "jazz"}).json()["code"] == 400


# --------------------------------------------------------------------------- shared controls


def test_reset_and_delay_apply_to_every_media_provider(fake: FakeUpstream) -> None:
    calls = [
        lambda: requests.post(f"{fake.openai_base}/images/generations", headers=BEARER, json={"prompt": "x"}),
        lambda: tts(fake, {"text": "hi"}),
        lambda: submit(fake),
    ]
    for call in calls:
        fake.queue(Reply(fault="reset"))
        with pytest.raises(requests.exceptions.ConnectionError):
            call()
        fake.queue(Reply(delay=0.2))
        response = call()
        assert response.status_code == 200 and response.elapsed.total_seconds() >= 0.2
    assert [r.provider for r in fake.requests] == ["openai_images"] * 2 + ["elevenlabs"] * 2 + ["suno"] * 2
