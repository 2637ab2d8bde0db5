"""OpenAI-shaped media routes over the job machinery, with the official openai SDK, a live server and a real worker.

``POST /v1/audio/speech`` and ``POST /v1/images/generations`` hold, enqueue, wait and answer
synchronously; past the wait they answer a 504 naming the job, whose retry with the same
Idempotency-Key returns the result, charged once. ``url`` images are signed, expiring links.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import openai
import pytest
import requests
from sqlalchemy import func, select

from broker import media
from broker.models import Job, LedgerEntry
from tests.conftest import RAPIDAPI_SECRET, WorkerProcess, assert_invariant
from tests.fakes.upstreams import Reply, fake_audio, fake_png, fake_speech

MARKUP, CREDIT_USD = Decimal("1.8"), Decimal("0.01")
TEXT = "The broker speaks through OpenAI's speech endpoint, billed by the character."


def ucr(usd: Decimal) -> int:
    return math.ceil(usd * MARKUP / CREDIT_USD * 1_000_000)


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def sdk(live_server: str, tenant, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=tenant.key, max_retries=retries)


def jobs_of(app, tenant) -> list[Job]:
    session = app.extensions["broker"].db()
    session.expire_all()
    return list(session.scalars(select(Job).where(Job.account_id == tenant.account_id)))


def hold_entries(app, tenant, hold_id: str) -> list[str]:
    svc = app.extensions["broker"]
    session = svc.db()
    svc.ledger.drain(session, [tenant.account_id])
    return sorted(session.scalars(select(LedgerEntry.kind).where(LedgerEntry.hold_id == hold_id)).all())


@pytest.fixture
def patient_worker(app):
    """A worker whose jobs may run 30 s: the suite's 4 s lease would let the cron fail a slow job as lost."""
    app.extensions["broker"].media.lease_seconds = 30
    process = WorkerProcess({**app.config["BROKER_TEST_CONFIG"], "JOB_LEASE_SECONDS": 30}).start()
    yield process
    process.stop()


# -- speech ---------------------------------------------------------------------------


def test_sdk_speech_with_an_openai_model_returns_the_audio_charged_by_characters(
    app, live_server, tenant, upstream, worker
):
    start = balance(app, tenant)
    response = sdk(live_server, tenant).audio.speech.with_raw_response.create(
        model="openai/gpt-4o-mini-tts", voice="coral", input=TEXT, instructions="Cheerful.", response_format="wav"
    )
    assert response.http_response.content == fake_speech(TEXT, "wav", "coral")
    assert response.headers["content-type"] == "audio/wav"
    want = ucr(len(TEXT) * Decimal("0.015") / 1000)
    assert start - balance(app, tenant) == want
    assert response.headers["x-credits-charged"] == f"{want // 1_000_000}.{want % 1_000_000:06d}"
    sent = next(r for r in upstream.requests if r.provider == "openai_speech")
    assert sent.json == {
        "model": "gpt-4o-mini-tts",
        "input": TEXT,
        "voice": "coral",
        "response_format": "wav",
        "instructions": "Cheerful.",
    }
    (job,) = jobs_of(app, tenant)
    assert job.id == response.headers["x-job-id"] and job.type == "tts" and job.cost_ucr == want
    assert hold_entries(app, tenant, job.hold_id) == ["hold", "settle"]
    assert_invariant(app)


def test_sdk_speech_with_tts_1_hd_speed_and_mp3(app, live_server, tenant, upstream, worker):
    start = balance(app, tenant)
    audio = sdk(live_server, tenant).audio.speech.create(model="openai/tts-1-hd", voice="onyx", input=TEXT, speed=1.5)
    assert audio.content == fake_speech(TEXT, "mp3", "onyx")
    assert start - balance(app, tenant) == ucr(len(TEXT) * Decimal("0.030") / 1000)
    sent = next(r for r in upstream.requests if r.provider == "openai_speech")
    assert sent.json["speed"] == 1.5 and sent.json["model"] == "tts-1-hd"
    assert_invariant(app)


def test_sdk_speech_with_elevenlabs_maps_the_voice_and_format(app, live_server, tenant, upstream, worker):
    upstream.queue(Reply(character_cost=40))
    start = balance(app, tenant)
    response = sdk(live_server, tenant).audio.speech.with_raw_response.create(
        model="elevenlabs/eleven_flash_v2_5", voice="fable", input=TEXT, response_format="opus", speed=1.1
    )
    assert response.http_response.content == fake_audio(TEXT, "opus_48000_64")
    sent = next(r for r in upstream.requests if r.provider == "elevenlabs")
    assert sent.path == "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb"  # fable → George
    assert sent.query == "output_format=opus_48000_64"
    assert sent.json["voice_settings"] == {"speed": 1.1}
    # 40 ElevenLabs credits at $0.05 per 1k characters ÷ 0.5 credits a character
    assert start - balance(app, tenant) == ucr(40 * Decimal("0.05") / 1000 / Decimal("0.5"))
    assert_invariant(app)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "elevenlabs/eleven_flash_v2_5", "voice": "alloy", "response_format": "aac"}, "response_format"),
        ({"model": "elevenlabs/eleven_flash_v2_5", "voice": "alloy", "instructions": "Whisper."}, "instructions"),
        ({"model": "elevenlabs/eleven_flash_v2_5", "voice": "alloy", "speed": 2.0}, "speed"),
        ({"model": "openai/tts-1", "voice": "alloy", "instructions": "Whisper."}, "instructions"),
        ({"model": "openai/tts-1", "voice": "alloy", "stream_format": "sse"}, "stream_format"),
        ({"model": "openai/gpt-image-1", "voice": "alloy"}, "model"),
    ],
)
def test_speech_refused_before_anything_is_held(app, live_server, tenant, body, param):
    start = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant).audio.speech.create(input="hello", **body)
    assert raised.value.body["param"] == param
    assert balance(app, tenant) == start and jobs_of(app, tenant) == []


def test_a_failed_speech_job_is_the_providers_error_and_nothing_is_charged(app, live_server, tenant, upstream, worker):
    upstream.queue(Reply(status=400, error_message="Input rejected."))
    start = balance(app, tenant)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant).audio.speech.create(model="openai/tts-1", voice="alloy", input="no")
    (job,) = jobs_of(app, tenant)
    assert job.status == "failed" and job.id in raised.value.message and "Nothing was charged" in raised.value.message
    assert balance(app, tenant) == start
    assert hold_entries(app, tenant, job.hold_id) == ["hold", "release"]
    assert_invariant(app)


# -- images -------------------------------------------------------------------------------


def test_sdk_images_b64_json_charged_from_usage(app, live_server, tenant, upstream, worker):
    upstream.queue(Reply(image_usage={"text_tokens": 9, "image_tokens": 0, "output_tokens": 2 * 272}))
    start = balance(app, tenant)
    prompt = "a red kite over the downs"
    result = sdk(live_server, tenant).images.generate(
        model="openai/gpt-image-1", prompt=prompt, n=2, size="1024x1024", quality="low"
    )
    assert [base64.b64decode(image.b64_json) for image in result.data] == [fake_png(prompt, 0), fake_png(prompt, 1)]
    assert result.size == "1024x1024" and result.quality == "low" and result.output_format == "png"
    want = ucr((9 * Decimal("5.00") + 2 * 272 * Decimal("40.00")) / 1_000_000)
    assert start - balance(app, tenant) == want
    (job,) = jobs_of(app, tenant)
    assert job.cost_ucr == want and hold_entries(app, tenant, job.hold_id) == ["hold", "settle"]
    sent = next(r for r in upstream.requests if r.provider == "openai_images")
    assert sent.json == {"model": "gpt-image-1", "prompt": prompt, "n": 2, "size": "1024x1024", "quality": "low"}
    assert_invariant(app)


def test_sdk_images_url_is_a_signed_link_that_works_without_the_key(app, live_server, tenant, upstream, worker):
    start = balance(app, tenant)
    prompt = "a lighthouse, linocut"
    result = sdk(live_server, tenant).images.generate(
        model="openai/gpt-image-1", prompt=prompt, quality="medium", response_format="url"
    )
    (image,) = result.data
    assert image.b64_json is None and image.url.startswith(live_server + "/v1/media/")
    fetched = requests.get(image.url, timeout=10)  # no API key
    assert fetched.status_code == 200 and fetched.content == fake_png(prompt, 0)
    assert fetched.headers["Content-Type"] == "image/png"
    (job,) = jobs_of(app, tenant)
    assert start - balance(app, tenant) == job.cost_ucr > 0

    parts = urlsplit(image.url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    expires = int(query["expires"])
    assert time.time() + 3500 < expires <= time.time() + 3600  # MEDIA_URL_TTL_SECONDS: one hour
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    altered = requests.get(base, params={**query, "signature": "0" * 64}, timeout=10)
    assert altered.status_code == 403 and altered.json()["error"]["code"] == "invalid_signature"
    mangled = requests.get(base, params={**query, "signature": "\u0080" + "0" * 63}, timeout=10)  # was a 500
    assert mangled.status_code == 403 and mangled.json()["error"]["code"] == "invalid_signature"
    longer = requests.get(base, params={**query, "expires": expires + 3600}, timeout=10)
    assert longer.status_code == 403 and longer.json()["error"]["code"] == "invalid_signature"
    other_index = requests.get(base.removesuffix("/0") + "/1", params=query, timeout=10)
    assert other_index.status_code == 403
    secret = app.extensions["broker"].media.link_secret
    past = int(time.time()) - 1
    expired = requests.get(
        base, params={"expires": past, "signature": media._link_signature(secret, job.id, 0, past)}, timeout=10
    )
    assert expired.status_code == 403 and expired.json()["error"]["code"] == "link_expired"
    assert_invariant(app)


# -- waits ----------------------------------------------------------------------------------


SLOW = Reply(chunks=8, chunk_delay=0.7)  # about 5 s of audio trickling in, each read well under the 2 s timeout


def test_wait_runs_out_then_the_retry_with_the_same_key_returns_the_result_charged_once(
    app, live_server, tenant, upstream, patient_worker
):
    upstream.queue(SLOW)
    svc = app.extensions["broker"]
    svc.media.wait_max = 1
    start = balance(app, tenant)
    body = {"model": "openai/tts-1", "voice": "alloy", "input": TEXT}
    headers = {**tenant.headers, "Idempotency-Key": "speech-once"}
    first = requests.post(live_server + "/v1/audio/speech", json=body, headers=headers, timeout=30)
    assert first.status_code == 504, first.text
    error = first.json()["error"]
    (job,) = jobs_of(app, tenant)
    assert error["code"] == "job_still_running" and error["job_id"] == job.id and job.id in error["message"]
    assert "nothing was charged" not in error["message"].lower()
    assert first.headers["x-should-retry"] == "true"

    svc.media.wait_max = 30
    retry = requests.post(live_server + "/v1/audio/speech", json=body, headers=headers, timeout=60)
    assert retry.status_code == 200 and retry.content == fake_speech(TEXT, "mp3", "alloy")
    assert retry.headers["X-Job-Id"] == job.id
    again = requests.post(live_server + "/v1/audio/speech", json=body, headers=headers, timeout=60)
    assert again.content == retry.content
    want = ucr(len(TEXT) * Decimal("0.015") / 1000)
    assert start - balance(app, tenant) == want
    assert len(jobs_of(app, tenant)) == 1
    assert len([r for r in upstream.requests if r.provider == "openai_speech"]) == 1
    assert hold_entries(app, tenant, job.hold_id) == ["hold", "settle"]
    changed = requests.post(live_server + "/v1/audio/speech", json={**body, "input": "other"}, headers=headers)
    assert changed.status_code == 409
    assert_invariant(app)


def test_the_sdk_with_an_idempotency_key_rides_out_a_slow_job(app, live_server, tenant, upstream, patient_worker):
    """x-should-retry: true on the 504 lets the SDK retry; the same key finds the same job."""
    upstream.queue(SLOW)
    app.extensions["broker"].media.wait_max = 2
    start = balance(app, tenant)
    audio = sdk(live_server, tenant, retries=5).audio.speech.create(
        model="openai/tts-1", voice="alloy", input=TEXT, extra_headers={"Idempotency-Key": "sdk-slow"}
    )
    assert audio.content == fake_speech(TEXT, "mp3", "alloy")
    assert len(jobs_of(app, tenant)) == 1
    assert start - balance(app, tenant) == ucr(len(TEXT) * Decimal("0.015") / 1000)
    assert_invariant(app)


def test_wait_runs_out_without_a_key_tells_the_sdk_not_to_retry_and_the_job_is_still_charged(
    app, live_server, tenant, upstream, patient_worker
):
    upstream.queue(SLOW)
    app.extensions["broker"].media.wait_max = 1
    start = balance(app, tenant)
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(live_server, tenant, retries=3).audio.speech.create(model="openai/tts-1", voice="alloy", input=TEXT)
    assert raised.value.status_code == 504 and raised.value.response.headers["x-should-retry"] == "false"
    (job,) = jobs_of(app, tenant)  # the SDK did not retry into a second job
    assert raised.value.body["job_id"] == job.id
    deadline = time.time() + 30
    while jobs_of(app, tenant)[0].status != "succeeded" and time.time() < deadline:
        time.sleep(0.2)
    assert start - balance(app, tenant) == ucr(len(TEXT) * Decimal("0.015") / 1000)
    assert_invariant(app)


def test_waits_per_account_are_capped_with_a_429_before_anything_is_held(
    app, live_server, tenant, upstream, patient_worker
):
    upstream.queue(SLOW)
    app.extensions["broker"].media.waits_per_account = 1
    body = {"model": "openai/tts-1", "voice": "alloy", "input": TEXT}
    outcome = {}

    def first() -> None:
        outcome["first"] = requests.post(live_server + "/v1/audio/speech", json=body, headers=tenant.headers)

    waiting = threading.Thread(target=first)
    waiting.start()
    deadline = time.time() + 10
    while not jobs_of(app, tenant) and time.time() < deadline:
        time.sleep(0.05)
    held = balance(app, tenant)
    second = requests.post(
        live_server + "/v1/images/generations", json={"model": "demo/image", "prompt": "p"}, headers=tenant.headers
    )
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_waits"
    assert "Retry-After" in second.headers
    assert balance(app, tenant) == held and len(jobs_of(app, tenant)) == 1
    waiting.join(30)
    assert outcome["first"].status_code == 200
    after = requests.post(
        live_server + "/v1/images/generations", json={"model": "demo/image", "prompt": "p"}, headers=tenant.headers
    )
    assert after.status_code == 200  # the slot was given back
    assert_invariant(app)


def test_marketplace_callers_do_not_get_the_synchronous_routes(app, client):
    headers = {
        "X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET,
        "X-RapidAPI-User": "alice_dev",
        "X-RapidAPI-Subscription": "PRO",
    }
    response = client.post(
        "/v1/audio/speech", json={"model": "demo/tts", "voice": "alloy", "input": "hi"}, headers=headers
    )
    assert response.status_code == 403 and response.json["error"]["code"] == "not_in_marketplace_plan"


def test_openapi_documents_the_synchronous_routes_and_the_keyless_link(client):
    spec = client.get("/openapi.json").json
    speech = spec["paths"]["/v1/audio/speech"]["post"]
    assert "audio/mpeg" in speech["responses"]["200"]["content"] and "504" in speech["responses"]
    images = spec["paths"]["/v1/images/generations"]["post"]
    assert images["responses"]["200"]["content"]["application/json"]["example"]["data"][0]["url"]
    link = spec["paths"]["/v1/media/{job_id}/{index}"]["get"]
    assert link["security"] == [] and "403" in link["responses"]


def test_no_job_row_is_left_behind_by_a_refused_request(app, client, tenant):
    response = client.post(
        "/v1/images/generations", json={"model": "openai/gpt-image-1", "prompt": "p", "n": 11}, headers=tenant.headers
    )
    assert response.status_code == 400 and response.json["error"]["param"] == "n"
    assert app.extensions["broker"].db().scalar(select(func.count()).select_from(Job)) == 0
