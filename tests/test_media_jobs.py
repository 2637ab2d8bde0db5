"""Media jobs on a real RQ worker process: submit over HTTP, poll, download, exactly-once billing."""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from broker import jobs, media
from broker.models import Job, LedgerEntry
from tests.conftest import WorkerProcess, assert_invariant, make_tenant
from tests.fakes.upstreams import Reply, fake_audio, fake_clip, fake_png, fake_speech

MARKUP, CREDIT_USD = Decimal("1.8"), Decimal("0.01")


def ucr(usd: Decimal) -> int:
    return math.ceil(usd * MARKUP / CREDIT_USD * 1_000_000)


def credits(value: int) -> str:
    return f"{value // 1_000_000}.{value % 1_000_000:06d}"


def poll(client, tenant, job_id: str, until=("succeeded", "failed", "canceled"), timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json
        if body["status"] in until:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} stayed {body['status']}")


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def test_tts_job_is_billed_by_the_character_cost_header(app, client, tenant, upstream, worker):
    upstream.queue(Reply(character_cost=37))
    start = balance(app, tenant)
    text = "Hello from the broker, spoken aloud by ElevenLabs."
    submitted = client.post(
        "/v1/tts",
        json={"model": "elevenlabs/eleven_flash_v2_5", "text": text, "voice_id": "JBFqnCBsd6RMkjVDRZzb"},
        headers=tenant.headers,
    )
    assert submitted.status_code == 202, submitted.json
    job = submitted.json
    assert job["status"] == "queued" and job["object"] == "job" and job["type"] == "tts"
    assert submitted.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert balance(app, tenant) == start - int(Decimal(job["hold_credits"]) * 1_000_000)

    done = poll(client, tenant, job["id"])
    # 37 ElevenLabs credits at the table's $0.05 per 1k characters ÷ 0.5 credits a character
    want = ucr(37 * Decimal("0.05") / 1000 / Decimal("0.5"))
    assert done["status"] == "succeeded" and done["cost_credits"] == credits(want)
    assert start - balance(app, tenant) == want
    result = done["results"][0]
    content = client.get(result["url"], headers=tenant.headers)
    assert content.status_code == 200 and content.data == fake_audio(text, "mp3_44100_128")
    assert content.headers["Content-Type"] == result["content_type"] == "audio/mpeg"
    assert int(content.headers["Content-Length"]) == result["bytes"] == len(content.data)
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).headers["X-Credits-Charged"] == credits(want)
    receipt = client.get(f"/v1/requests/{done['request_id']}", headers=tenant.headers).json
    assert receipt["charged_ucr"] == want and receipt["endpoint"] == "tts"
    assert receipt["detail"]["billed_units"] == 37
    assert_invariant(app)


def test_image_job_is_billed_from_usage(app, client, tenant, upstream, worker):
    upstream.queue(Reply(image_usage={"text_tokens": 21, "image_tokens": 0, "output_tokens": 2 * 1056}))
    start = balance(app, tenant)
    prompt = "a lighthouse at dawn, watercolour"
    response = client.post(
        "/v1/image",
        json={"model": "openai/gpt-image-1", "prompt": prompt, "size": "1024x1024", "quality": "medium", "n": 2},
        headers={**tenant.headers, "Prefer": "wait=20"},
    )
    assert response.status_code == 200, response.json
    done = response.json
    want = ucr((21 * Decimal("5.00") + 2 * 1056 * Decimal("40.00")) / 1_000_000)
    assert done["status"] == "succeeded" and done["cost_credits"] == credits(want)
    assert response.headers["X-Credits-Charged"] == credits(want)
    assert response.headers["X-Credits-Remaining"] == credits(start - want)
    assert start - balance(app, tenant) == want
    for index in (0, 1):
        content = client.get(f"/v1/jobs/{done['id']}/content?index={index}", headers=tenant.headers)
        assert content.data == fake_png(prompt, index)
        assert content.headers["Content-Type"] == "image/png"
    assert upstream.requests[-1].json["model"] == "gpt-image-1"
    assert_invariant(app)


def test_music_job_polls_the_unofficial_api_and_stores_both_clips(app, client, tenant, upstream, worker):
    upstream.queue(Reply(suno_polls_per_stage=2))
    start = balance(app, tenant)
    submitted = client.post(
        "/v1/music",
        json={"model": "suno/V4_5ALL", "prompt": "a calm piano piece", "instrumental": True},
        headers=tenant.headers,
    ).json
    done = poll(client, tenant, submitted["id"])
    assert done["status"] == "succeeded" and done["progress"] == 100
    assert done["cost_credits"] == credits(ucr(Decimal("0.06")))
    assert start - balance(app, tenant) == ucr(Decimal("0.06"))
    assert len(done["results"]) == 2
    polls = [r for r in upstream.requests if r.provider == "suno" and "record-info" in r.path]
    assert len(polls) >= 4
    submits = [r for r in upstream.requests if r.provider == "suno" and r.path.endswith("/generate")]
    assert len(submits) == 1
    downloads = [r.path for r in upstream.requests if r.path.startswith("/files/")]
    for index, path in enumerate(downloads):
        clip_id = path.removeprefix("/files/").removesuffix(".mp3")
        content = client.get(f"/v1/jobs/{done['id']}/content?index={index}", headers=tenant.headers)
        assert content.data == fake_clip(clip_id)
    assert_invariant(app)


MUSIC = {"model": "suno/V4_5ALL", "prompt": "a slow string quartet", "instrumental": True}


def test_a_waiting_music_job_holds_no_worker_and_is_charged_once(app, client, tenant, upstream, worker):
    # Three polls a stage: at least ten polls, each re-check a job RQ's scheduler enqueues when due.
    upstream.queue(Reply(suno_polls_per_stage=3))
    start = balance(app, tenant)
    music = client.post("/v1/music", json=MUSIC, headers=tenant.headers).json
    poll(client, tenant, music["id"], until=("running",))
    # The one worker is not in a poll loop: a TTS job submitted now runs (and ends) before the music job.
    upstream.queue(Reply(character_cost=12))
    tts = client.post(
        "/v1/tts",
        json={"model": "elevenlabs/eleven_flash_v2_5", "text": "meanwhile", "voice_id": "v1"},
        headers=tenant.headers,
    ).json
    tts_done = poll(client, tenant, tts["id"])
    assert tts_done["status"] == "succeeded"
    waiting = client.get(f"/v1/jobs/{music['id']}", headers=tenant.headers).json
    assert waiting["status"] == "running"
    # Cancel still refuses a running job (the vendor is already paid) and changes nothing.
    refused = client.delete(f"/v1/jobs/{music['id']}", headers=tenant.headers)
    assert refused.status_code == 409
    done = poll(client, tenant, music["id"], timeout=60)
    assert done["status"] == "succeeded" and len(done["results"]) == 2
    assert tts_done["finished_at"] < done["finished_at"]
    want = ucr(Decimal("0.06"))
    assert done["cost_credits"] == credits(want)
    assert start - balance(app, tenant) == want + int(Decimal(tts_done["cost_credits"]) * 1_000_000)
    polls = [r for r in upstream.requests if r.provider == "suno" and "record-info" in r.path]
    assert len(polls) >= 10
    assert len([r for r in upstream.requests if r.provider == "suno" and r.path.endswith("/generate")]) == 1
    assert _settles(app, tenant, done["request_id"]) == ["hold", "settle"]
    assert_invariant(app)


def test_a_music_job_whose_worker_died_while_waiting_is_released_once(app, client, tenant, upstream, worker):
    upstream.queue(Reply(suno_polls_per_stage=1000))  # never finishes
    start = balance(app, tenant)
    music = client.post("/v1/music", json=MUSIC, headers=tenant.headers).json
    svc = app.extensions["broker"]
    session = svc.db()
    deadline = time.time() + 30
    while not [r for r in upstream.requests if r.provider == "suno" and "record-info" in r.path]:
        assert time.time() < deadline, "the music job never polled"
        time.sleep(0.1)
    worker.kill()  # the scheduled re-check is never run
    session.commit()
    job = session.get(Job, music["id"])
    session.refresh(job)
    assert job.status == "running" and job.upstream_task_id
    token = media.as_utc(job.lease_until).isoformat()
    # The stuck-job check leaves it while its lease (past the re-check's due time) runs...
    assert media.finish_stuck(svc.media, session) == []
    deadline = time.time() + 30
    while not media.finish_stuck(svc.media, session):
        assert time.time() < deadline, "the stuck-job check never finished the job"
        time.sleep(0.2)
    done = client.get(f"/v1/jobs/{music['id']}", headers=tenant.headers).json
    assert done["status"] == "failed" and done["error"]["type"] == "worker_lost"
    assert balance(app, tenant) == start
    # ... and the re-check, delivered late, changes nothing.
    assert media.run(svc.media, session, music["id"], final_attempt=True, recheck=token) == "skipped"
    assert balance(app, tenant) == start
    assert _settles(app, tenant, done["request_id"]) == ["hold", "release"]
    assert_invariant(app)


def test_a_music_job_whose_recheck_is_late_is_polled_again_by_the_stuck_job_check_not_failed(
    app, client, tenant, upstream, worker
):
    # A short lease (JOB_LEASE_SECONDS) must not fail a music job whose vendor still works when its
    # re-check comes late (the scheduler's lock passing to another worker, a full media queue).
    upstream.queue(Reply(suno_polls_per_stage=2))
    start = balance(app, tenant)
    music = client.post("/v1/music", json=MUSIC, headers=tenant.headers).json
    svc = app.extensions["broker"]
    session = svc.db()
    deadline = time.time() + 30
    while not [r for r in upstream.requests if r.provider == "suno" and "record-info" in r.path]:
        assert time.time() < deadline, "the music job never polled"
        time.sleep(0.1)
    worker.kill()  # its scheduled re-check is not run: it comes late, from the next worker
    session.commit()
    job = session.get(Job, music["id"])
    session.refresh(job)
    late = media.as_utc(job.lease_until).isoformat()
    deadline = time.time() + 30
    while media.as_utc(job.lease_until).isoformat() == late:
        assert time.time() < deadline, "the stuck-job check never took up the lapsed job"
        assert media.finish_stuck(svc.media, session) == []  # never failed
        time.sleep(0.2)
        session.refresh(job)
        session.commit()
    assert job.status == "running"
    # A new worker: the killed one's scheduler lock would lapse in 61 s; the rescue needs no scheduler.
    svc.queue_redis.delete("rq:scheduler-lock:media", "rq:scheduler-lock:housekeeping")
    worker.start()
    done = poll(client, tenant, music["id"], timeout=60)
    assert done["status"] == "succeeded" and len(done["results"]) == 2, done
    assert done["cost_credits"] == credits(ucr(Decimal("0.06")))
    assert start - balance(app, tenant) == ucr(Decimal("0.06"))
    assert len([r for r in upstream.requests if r.provider == "suno" and r.path.endswith("/generate")]) == 1
    assert _settles(app, tenant, done["request_id"]) == ["hold", "settle"]
    # The late re-check, delivered after all, changes nothing.
    assert media.run(svc.media, session, music["id"], final_attempt=True, recheck=late) == "skipped"
    assert_invariant(app)


def test_a_duplicate_music_recheck_is_skipped(app, client, tenant, upstream, worker):
    upstream.queue(Reply(suno_polls_per_stage=1000))  # never finishes
    music = client.post("/v1/music", json=MUSIC, headers=tenant.headers).json
    svc = app.extensions["broker"]
    session = svc.db()
    deadline = time.time() + 30
    polls = []
    while len(polls) < 2:
        assert time.time() < deadline, "the music job was not re-checked"
        time.sleep(0.1)
        polls = [r for r in upstream.requests if r.provider == "suno" and "record-info" in r.path]
    worker.kill()
    # A token the job's lease has moved past (an earlier re-check, delivered twice) takes nothing.
    stale = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    assert media.run(svc.media, session, music["id"], final_attempt=True, recheck=stale) == "skipped"
    session.commit()
    job = session.get(Job, music["id"])
    session.refresh(job)
    assert job.status == "running" and job.attempts == 1
    before = len([r for r in upstream.requests if "record-info" in r.path])
    # The current token polls once more and schedules the next re-check with a new lease.
    token = media.as_utc(job.lease_until).isoformat()
    assert media.run(svc.media, session, music["id"], final_attempt=True, recheck=token) == "waiting"
    assert len([r for r in upstream.requests if "record-info" in r.path]) == before + 1
    assert media.run(svc.media, session, music["id"], final_attempt=True, recheck=token) == "skipped"
    assert len([r for r in upstream.requests if "record-info" in r.path]) == before + 1


def test_upstream_500_on_every_try_fails_the_job_and_releases_the_hold(app, client, tenant, upstream, worker):
    upstream.default = Reply(status=500)
    start = balance(app, tenant)
    job = client.post(
        "/v1/tts",
        json={"model": "elevenlabs/eleven_flash_v2_5", "text": "doomed", "voice_id": "v1"},
        headers=tenant.headers,
    ).json
    done = poll(client, tenant, job["id"], timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["type"] == "upstream_error" and done["error"]["message"]
    assert done["cost_credits"] is None
    assert balance(app, tenant) == start
    tts_calls = [r for r in upstream.requests if r.provider == "elevenlabs"]
    assert len(tts_calls) == 9  # 3 RQ attempts × (1 + 2 session retries)
    assert_invariant(app)


def test_500_then_success_is_retried_by_rq_and_charged_once(app, client, tenant, upstream, worker):
    upstream.queue(Reply(status=500), Reply(status=500), Reply(status=500), Reply(character_cost=10))
    start = balance(app, tenant)
    job = client.post(
        "/v1/tts",
        json={"model": "elevenlabs/eleven_flash_v2_5", "text": "second time lucky", "voice_id": "v1"},
        headers=tenant.headers,
    ).json
    done = poll(client, tenant, job["id"], timeout=60)
    want = ucr(10 * Decimal("0.0001"))
    assert done["status"] == "succeeded" and done["cost_credits"] == credits(want)
    assert start - balance(app, tenant) == want
    session = app.extensions["broker"].db()
    app.extensions["broker"].ledger.drain(session, [tenant.account_id])  # not just the dirty set: the cron may hold it
    ends = session.scalar(select(func.count()).where(LedgerEntry.entry_id == f"end:{done['request_id']}"))
    assert ends == 1
    assert_invariant(app)


def test_running_the_same_job_again_changes_nothing(app, client, tenant, upstream, worker):
    job = client.post(
        "/v1/image",
        json={"model": "openai/gpt-image-1", "prompt": "once", "quality": "low"},
        headers={**tenant.headers, "Prefer": "wait=20"},
    ).json
    assert job["status"] == "succeeded"
    after = balance(app, tenant)
    svc = app.extensions["broker"]
    assert media.run(svc.media, svc.db(), job["id"], final_attempt=True) == "skipped"
    svc.media.queue.enqueue("broker.jobs.run_media_job", job["id"])  # a duplicate delivery
    time.sleep(2)
    assert balance(app, tenant) == after
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json == job
    assert len([r for r in upstream.requests if r.provider == "openai_images"]) == 1
    assert_invariant(app)


def test_worker_killed_mid_call_ends_the_job_and_releases_the_hold_once(app, client, tenant, upstream, worker):
    upstream.queue(Reply(delay=1.5))  # below the 2 s read timeout: the call is in flight when killed
    start = balance(app, tenant)
    job = client.post(
        "/v1/tts",
        json={"model": "elevenlabs/eleven_flash_v2_5", "text": "never finished", "voice_id": "v1"},
        headers=tenant.headers,
    ).json
    poll(client, tenant, job["id"], until=("running",))
    worker.kill()  # SIGKILL: work horse, its parent and the cron, mid upstream call
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json["status"] == "running"
    worker.start()
    # The new worker either re-runs the abandoned job once its 4 s lease ran out (RQ hands
    # it back) or its cron fails it as worker_lost; either way the hold ends exactly once.
    done = poll(client, tenant, job["id"], timeout=30)
    session = app.extensions["broker"].db()
    app.extensions["broker"].ledger.drain(session, [tenant.account_id])  # not just the dirty set: the cron may hold it
    entries = session.scalars(select(LedgerEntry.kind).where(LedgerEntry.hold_id == job["request_id"])).all()
    if done["status"] == "succeeded":
        assert sorted(entries) == ["hold", "settle"]
        assert start - balance(app, tenant) == int(Decimal(done["cost_credits"]) * 1_000_000) > 0
    else:
        assert done["status"] == "failed" and done["error"]["type"] == "worker_lost"
        assert sorted(entries) == ["hold", "release"]
        assert balance(app, tenant) == start
    assert_invariant(app)


def test_jobs_of_other_accounts_and_unknown_ids_are_the_same_404(app, client, tenant):
    job = client.post("/v1/music", json={"model": "demo/music", "prompt": "mine"}, headers=tenant.headers).json
    other = make_tenant()
    for url in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/content?index=0"):
        theirs = client.get(url, headers=other.headers)
        assert theirs.status_code == 404 and theirs.json["error"]["code"] == "not_found"
    unknown = client.get(f"/v1/jobs/job_{uuid.uuid4().hex[:24]}", headers=other.headers)
    assert unknown.status_code == 404
    assert set(unknown.json["error"]) == set(theirs.json["error"])
    assert client.delete(f"/v1/jobs/{job['id']}", headers=other.headers).status_code == 404


def test_insufficient_credits_is_402_and_nothing_is_enqueued(app, client):
    poor = make_tenant("0.01")
    svc = app.extensions["broker"]
    response = client.post(
        "/v1/image",
        json={"model": "openai/gpt-image-1", "prompt": "expensive", "quality": "high", "n": 4},
        headers=poor.headers,
    )
    assert response.status_code == 402 and response.json["error"]["code"] == "insufficient_credits"
    assert svc.media.queue.count == 0
    assert svc.db().scalar(select(func.count()).select_from(Job)) == 0
    assert balance(app, poor) == 10_000


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/tts",
            {"model": "elevenlabs/eleven_flash_v2_5", "text": "hi", "voice_id": "v", "output_format": "wav_1"},
            "output_format",
        ),
        ("/v1/tts", {"model": "elevenlabs/eleven_flash_v2_5", "text": "", "voice_id": "v"}, "text"),
        ("/v1/tts", {"model": "elevenlabs/eleven_v3", "text": "x" * 5001, "voice_id": "v"}, "text"),
        ("/v1/tts", {"model": "elevenlabs/eleven_flash_v2_5", "text": "hi", "voice_id": "../etc"}, "voice_id"),
        ("/v1/image", {"model": "openai/gpt-image-1", "prompt": "p", "size": "800x600"}, "size"),
        ("/v1/image", {"model": "openai/gpt-image-1", "prompt": "p", "n": 11}, "n"),
        ("/v1/image", {"model": "demo/image", "prompt": "p", "n": 5}, "n"),
        ("/v1/image", {"model": "openai/gpt-4o-mini", "prompt": "p"}, "model"),
        ("/v1/music", {"model": "suno/V4_5ALL"}, "prompt"),
        ("/v1/music", {"model": "suno/V4_5ALL", "lyrics": "la la"}, "style"),
        ("/v1/music", {"model": "suno/V4_5ALL", "prompt": "p", "tempo": 120}, "tempo"),
    ],
)
def test_bad_media_input_is_4xx_naming_the_param_and_charges_nothing(app, client, tenant, path, body, param):
    start = balance(app, tenant)
    response = client.post(path, json=body, headers=tenant.headers)
    assert response.status_code in (400, 404, 422)
    assert response.json["error"]["param"] == param
    assert balance(app, tenant) == start
    assert app.extensions["broker"].media.queue.count == 0


def test_cancel_releases_the_hold_of_a_queued_job(app, client, tenant):
    start = balance(app, tenant)
    job = client.post("/v1/music", json={"model": "demo/music", "prompt": "later"}, headers=tenant.headers).json
    assert balance(app, tenant) < start
    canceled = client.delete(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    assert canceled.status_code == 200 and canceled.json["status"] == "canceled"
    assert balance(app, tenant) == start
    again = client.delete(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    assert again.status_code == 409
    svc = app.extensions["broker"]
    assert media.run(svc.media, svc.db(), job["id"], final_attempt=True) == "skipped"
    assert balance(app, tenant) == start
    assert_invariant(app)


def test_jobs_list_newest_first_with_filters_and_paging(app, client, tenant):
    ids = [
        client.post("/v1/music", json={"model": "demo/music", "prompt": f"song {i}"}, headers=tenant.headers).json["id"]
        for i in range(3)
    ]
    client.delete(f"/v1/jobs/{ids[0]}", headers=tenant.headers)
    page = client.get("/v1/jobs?limit=2", headers=tenant.headers).json
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get(f"/v1/jobs?limit=2&cursor={page['next_cursor']}", headers=tenant.headers).json
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    canceled = client.get("/v1/jobs?status=canceled", headers=tenant.headers).json["data"]
    assert [j["id"] for j in canceled] == [ids[0]]
    assert client.get("/v1/jobs?type=tts", headers=tenant.headers).json["data"] == []
    assert client.get("/v1/jobs?status=weird", headers=tenant.headers).json["error"]["param"] == "status"


def test_demo_media_run_end_to_end(app, client, tenant, worker):
    for path, body in (
        ("/v1/tts", {"model": "demo/tts", "text": "demo speech", "voice_id": "demo"}),
        ("/v1/image", {"model": "demo/image", "prompt": "demo picture"}),
        ("/v1/music", {"model": "demo/music", "prompt": "demo song"}),
    ):
        job = client.post(path, json=body, headers=tenant.headers).json
        done = poll(client, tenant, job["id"])
        assert done["status"] == "succeeded", done
        assert client.get(done["results"][0]["url"], headers=tenant.headers).status_code == 200
    assert_invariant(app)


def test_cron_tasks_run_twice_change_nothing_the_second_time(app, client, tenant, upstream, worker):
    client.post(
        "/v1/image", json={"model": "demo/image", "prompt": "cron"}, headers={**tenant.headers, "Prefer": "wait=20"}
    )
    worker.stop()
    tasks = (jobs.drain_ledger, jobs.reap_holds, jobs.finish_stuck_jobs, jobs.rollup_usage, jobs.purge_expired_media)
    for task in tasks:
        with app.app_context():
            task()
        before = _state(app)
        with app.app_context():
            task()
        assert _state(app) == before, task.__name__


def _state(app) -> tuple:
    svc = app.extensions["broker"]
    session = svc.db()
    session.expire_all()
    tables = ("ledger_entries", "usage_records", "jobs", "job_results", "usage_daily")
    from sqlalchemy import text

    rows = tuple(tuple(map(tuple, session.execute(text(f"select * from {t} order by 1")).all())) for t in tables)
    redis_state = {k: svc.redis.dump(k) for k in svc.redis.keys("*") if not k.startswith("rq:")}
    return rows, redis_state


def test_models_list_media_prices_in_credits_with_markup(client, tenant):
    data = {m["id"]: m for m in client.get("/v1/models?kind=all", headers=tenant.headers).json["data"]}
    # $0.05 per 1k characters, $0.06 a song, 1,056 tokens × $40 per 1M an image; × 1.8 ÷ $0.01
    assert data["elevenlabs/eleven_flash_v2_5"]["pricing"]["per_1k_characters"] == "9"
    assert data["suno/V4_5ALL"]["pricing"]["per_generation"] == "10.8"
    assert data["openai/gpt-image-1"]["pricing"]["per_image_output"]["medium"]["1024x1024"] == "7.6032"
    assert data["demo/tts"]["kind"] == "tts"


# -- Prefer: wait (no blocking Redis read: a wait longer than the client's 5 s socket timeout holds) --------


@pytest.fixture
def patient_worker(app):
    """A worker whose jobs may run 30 s: the suite's 4 s lease would let the cron fail a slow job as lost."""
    app.extensions["broker"].media.lease_seconds = 30
    process = WorkerProcess({**app.config["BROKER_TEST_CONFIG"], "JOB_LEASE_SECONDS": 30}).start()
    yield process
    process.stop()


SPOKEN = "A slow job: the fake upstream trickles its audio out over about ten seconds."


def _settles(app, tenant, hold_id: str) -> list[str]:
    svc = app.extensions["broker"]
    session = svc.db()
    svc.ledger.drain(session, [tenant.account_id])
    return sorted(session.scalars(select(LedgerEntry.kind).where(LedgerEntry.hold_id == hold_id)).all())


def test_prefer_wait_25_on_a_10_s_job_is_200_with_the_finished_job_charged_once(
    app, client, tenant, upstream, patient_worker
):
    # Ten 1 s gaps (each read under the 2 s read timeout): longer than the Redis client's 5 s socket timeout.
    upstream.queue(Reply(chunks=11, chunk_delay=1.0))
    start = balance(app, tenant)
    response = client.post(
        "/v1/tts",
        json={"model": "openai/tts-1", "text": SPOKEN, "voice_id": "alloy", "output_format": "mp3"},
        headers={**tenant.headers, "Prefer": "wait=25"},
    )
    assert response.status_code == 200, response.json
    done = response.json
    want = ucr(len(SPOKEN) * Decimal("0.015") / 1000)
    assert done["status"] == "succeeded" and done["cost_credits"] == credits(want)
    assert response.headers["Preference-Applied"] == "wait=25"
    assert response.headers["X-Credits-Charged"] == credits(want)
    assert start - balance(app, tenant) == want
    assert client.get(done["results"][0]["url"], headers=tenant.headers).data == fake_speech(SPOKEN, "mp3", "alloy")
    assert _settles(app, tenant, done["request_id"]) == ["hold", "settle"]
    assert app.extensions["broker"].db().scalar(select(func.count()).select_from(Job)) == 1
    assert_invariant(app)


def test_prefer_wait_that_runs_out_is_202_and_the_job_is_charged_once_when_it_ends(
    app, client, tenant, upstream, patient_worker
):
    upstream.queue(Reply(chunks=8, chunk_delay=0.7))
    start = balance(app, tenant)
    response = client.post(
        "/v1/tts",
        json={"model": "openai/tts-1", "text": SPOKEN, "voice_id": "alloy", "output_format": "mp3"},
        headers={**tenant.headers, "Prefer": "wait=1", "Idempotency-Key": "tts-wait-1"},
    )
    assert response.status_code == 202, response.json
    assert response.json["status"] in ("queued", "running") and "Preference-Applied" not in response.headers
    done = poll(client, tenant, response.json["id"])
    want = ucr(len(SPOKEN) * Decimal("0.015") / 1000)
    assert done["status"] == "succeeded" and start - balance(app, tenant) == want
    replay = client.post(
        "/v1/tts",
        json={"model": "openai/tts-1", "text": SPOKEN, "voice_id": "alloy", "output_format": "mp3"},
        headers={**tenant.headers, "Prefer": "wait=1", "Idempotency-Key": "tts-wait-1"},
    )
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json["id"] == done["id"]
    assert start - balance(app, tenant) == want
    assert _settles(app, tenant, done["request_id"]) == ["hold", "settle"]
    assert_invariant(app)


def test_prefer_wait_beyond_the_accounts_cap_is_429_and_holds_nothing(app, client, tenant):
    app.extensions["broker"].media.waits_per_account = 0
    start = balance(app, tenant)
    body = {"model": "demo/image", "prompt": "capped"}
    refused = client.post("/v1/image", json=body, headers={**tenant.headers, "Prefer": "wait=5"})
    assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_waits"
    assert balance(app, tenant) == start
    assert client.post("/v1/image", json=body, headers=tenant.headers).status_code == 202  # no wait, no cap
