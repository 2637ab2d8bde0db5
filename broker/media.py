"""Media jobs (speech, images, music): validate, price, hold, enqueue; the worker's run; polling and cancel.

A web process never calls a media provider. It holds the worst-case price, records
the job and enqueues ``broker.jobs.run_media_job`` by name. The job claims its row
with a compare-and-set, calls the provider, stores the outputs, settles the hold
with the provider's actual usage and marks the job succeeded. The settle is
idempotent by hold id and every status change is a compare-and-set, so a second run
of the same job changes nothing. A job whose worker died is finished by the cron
(``finish_stuck``) once its lease has run out.

A request may wait for its job (``Prefer: wait`` and the synchronous OpenAI-shaped
routes): ``wait_for`` never makes a blocking Redis read, so no socket timeout can turn
a running job into an error, and ``wait_slot`` caps how many waits an account holds.
Results can be fetched without a key through signed, expiring links (``sign_link``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import redis
from rq import Queue, Retry
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from broker import limits, metrics, pricing
from broker.errors import (
    BrokerError,
    Conflict,
    Forbidden,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
    RateLimited,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from broker.keys import Caller
from broker.ledger import Ledger
from broker.models import Job, JobResult
from broker.pricing import ModelPrice, PriceTable
from broker.providers.base import ImageProvider, MediaFile, MusicProvider, SpeechProvider
from broker.schemas import ImageRequest, MusicRequest, SpeechRequest
from broker.storage import Storage

log = logging.getLogger(__name__)

KINDS = {"tts": "tts", "image": "image", "music": "music"}
TERMINAL = ("succeeded", "failed", "canceled")
# Some ElevenLabs library voices bill a multiple of the model's rate; hold for that.
VOICE_MULTIPLIER_BOUND = 2
DONE_KEY = "job-done:"
WAITS_KEY = "job-waits:"
# A waiting request looks for the worker's done signal at growing intervals (50 ms up to
# 0.5 s) and reads the job row every WAIT_READ_SECONDS in case a signal was lost.
WAIT_POLL_FIRST, WAIT_POLL_MAX, WAIT_READ_SECONDS = 0.05, 0.5, 2.0
REJECTED_CODES = ("upstream_rejected", "content_policy_violation", "generation_failed", "invalid_request")


class JobStillRunning(BrokerError):
    """A synchronous route waited its longest for a job that has not ended.

    The job goes on: it is charged when it succeeds (its hold released if it fails).
    A retry with the same ``Idempotency-Key`` waits for the same job and returns its result.
    """

    status = 504
    type = "timeout_error"
    code = "job_still_running"

    def __init__(self, job_id: str, waited: int, retryable: bool) -> None:
        super().__init__(
            f"Job {job_id} did not finish within {waited} s. It goes on running and is charged when it "
            "finishes (its hold is released if it fails). Retry this request with the same Idempotency-Key, "
            f"or GET /v1/jobs/{job_id}, for the result.",
            # Stainless SDKs obey x-should-retry: a retry without a key would start (and pay for) a second job.
            headers={"x-should-retry": "true" if retryable else "false", "Retry-After": "1"},
        )
        self.job_id = job_id

    def body(self) -> dict:
        body = super().body()
        body["error"]["job_id"] = self.job_id
        return body


@dataclass
class MediaContext:
    """What the media path needs from the app, handed in so this module stays Flask-free."""

    ledger: Ledger
    prices: PriceTable
    speech: dict[str, SpeechProvider]
    images: dict[str, ImageProvider]
    music: dict[str, MusicProvider]
    storage: Storage
    queue: Queue
    redis: redis.Redis
    markup: Decimal
    credit_usd: Decimal
    lease_seconds: int
    hold_ttl: int
    retry_intervals: list[int]
    music_poll_seconds: float
    music_max_wait: int
    moderate: Callable[[str, str], None] = lambda text, what: None
    wait_max: int = 180  # SYNC_WAIT_MAX_SECONDS
    waits_per_account: int = 10  # SYNC_WAITS_PER_ACCOUNT
    link_secret: str = ""  # SECRET_KEY: signs result links
    link_ttl: int = 3600  # MEDIA_URL_TTL_SECONDS

    def charge(self, cost_usd: Decimal) -> int:
        return pricing.charge_ucr(cost_usd, self.markup, self.credit_usd)


def _now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo:
        return moment
    return moment.replace(tzinfo=UTC)


# -- submit ------------------------------------------------------------------------


def _resolve(ctx: MediaContext, job_type: str, model: str) -> ModelPrice:
    served = {"tts": ctx.speech, "image": ctx.images, "music": ctx.music}[job_type]
    price = ctx.prices.resolve(model, set(served))
    if price.kind != KINDS[job_type]:
        raise InvalidRequest(f"'{price.id}' is not a {job_type} model.", param="model")
    return price


def _speech_bound_usd(ctx: MediaContext, price: ModelPrice, req: SpeechRequest) -> Decimal:
    ctx.speech[price.provider].validate(
        price.upstream_model, req.output_format, req.voice_settings, req.speed, req.instructions
    )
    if len(req.text) > price.max_chars:
        raise InvalidRequest(f"text is longer than {price.max_chars} characters for {price.id}.", param="text")
    units = math.ceil(len(req.text) * price.units_per_char * VOICE_MULTIPLIER_BOUND)
    by_table = pricing.speech_cost_usd(price, len(req.text), None, None) * VOICE_MULTIPLIER_BOUND
    by_units = pricing.speech_cost_usd(price, len(req.text), units, _unit_usd(ctx, price))
    return max(by_table, by_units)


def speech_from_openai(
    ctx: MediaContext, model: str, text: str, voice: str, response_format: str, speed: float, instructions: str | None
) -> SpeechRequest:
    """OpenAI's speech request as a speech job's: the model's adapter maps the voice name and format."""
    price = _resolve(ctx, "tts", model)
    voice_id, output_format = ctx.speech[price.provider].from_openai(voice, response_format)
    return SpeechRequest(
        model=price.id,
        text=text,
        voice_id=voice_id,
        output_format=output_format,
        speed=None if speed == 1 else speed,
        instructions=instructions,
    )


def _image_bound_usd(price: ModelPrice, req: ImageRequest) -> Decimal:
    if req.n > price.max_images:
        raise InvalidRequest(f"n must be at most {price.max_images} for {price.id}.", param="n")
    per_image = pricing.image_output_bound(price, req.size, req.quality)
    text = pricing.text_token_bound(req.prompt) * price.input
    return (text + req.n * per_image * price.output) / pricing.MILLION


def _music_bound_usd(price: ModelPrice, req: MusicRequest) -> Decimal:
    if not req.prompt and not req.lyrics:
        raise InvalidRequest("Give either 'prompt' (a description) or 'lyrics' with 'style'.", param="prompt")
    if req.lyrics and not req.style:
        raise InvalidRequest("'lyrics' needs a 'style'.", param="style")
    return price.usd_per_generation


def _unit_usd(ctx: MediaContext, price: ModelPrice) -> Decimal | None:
    """What one of the provider's billing units costs on the operator's plan, if its adapter knows."""
    return getattr(ctx.speech.get(price.provider), "unit_usd", None)


def submit(
    ctx: MediaContext,
    session: Session,
    caller: Caller,
    job_type: str,
    req: SpeechRequest | ImageRequest | MusicRequest,
    request_id: str,
) -> tuple[Job, int]:
    """Validate, hold the worst-case price, record and enqueue the job; returns it and the balance."""
    if caller.marketplace:
        raise Forbidden("Media jobs are not part of the marketplace listing.", code="not_in_marketplace_plan")
    price = _resolve(ctx, job_type, req.model)
    if job_type == "image":
        ctx.moderate(req.prompt, "prompt")
    elif job_type == "music":
        ctx.moderate("\n".join(t for t in (req.prompt, req.lyrics, req.style, req.title) if t), "prompt")
    bound = {
        "tts": lambda: _speech_bound_usd(ctx, price, req),
        "image": lambda: _image_bound_usd(price, req),
        "music": lambda: _music_bound_usd(price, req),
    }[job_type]()
    amount = ctx.charge(bound)
    hold = ctx.ledger.hold(
        caller.account_id,
        request_id,
        amount,
        0,
        1,
        1,
        ttl=ctx.hold_ttl,
        key_id=caller.key_id,
        spend_cap_ucr=caller.spend_cap_ucr,
    )
    if not hold.ok:
        raise limits.hold_refusal(hold.why, caller.spend_cap_ucr) or InsufficientCredits(
            f"Insufficient credits: this {job_type} job needs up to {pricing.format_credits(amount)} credits "
            f"and the balance is {pricing.format_credits(hold.balance)}."
        )
    job = Job(
        id="job_" + uuid.uuid4().hex[:24],
        account_id=caller.account_id,
        key_id=caller.key_id,
        type=job_type,
        model=price.id,
        status="queued",
        params=req.model_dump_json(exclude={"model"}),
        hold_id=request_id,
        hold_ucr=hold.amount,
        created_at=_now(),
    )
    try:
        session.add(job)
        session.commit()
        ctx.queue.enqueue(
            "broker.jobs.run_media_job",
            job.id,
            job_id=job.id,
            retry=Retry(max=len(ctx.retry_intervals), interval=ctx.retry_intervals),
            # A music job's waits between polls are scheduled re-checks, not slept: one run is short.
            job_timeout=ctx.lease_seconds,
            result_ttl=3600,
            failure_ttl=7 * 86400,
        )
    except Exception:
        rollback_quietly(session)
        try:
            # Mark the job first: a release that fails leaves its hold to the reaper, never a queued ghost.
            _set_status(session, job.id, ("queued",), "failed", error_type="enqueue_failed", error_message="not queued")
        except SQLAlchemyError:
            rollback_quietly(session)
        ctx.ledger.release(caller.account_id, request_id, _receipt(ctx, job, price, "error", Decimal(0), {}))
        raise
    return job, hold.balance


# -- read, wait, cancel ---------------------------------------------------------------


def get_job(session: Session, account_id: int, job_id: str) -> Job:
    """The caller's job; any other account's job, or none, is the same 404."""
    job = session.get(Job, job_id)
    if job is None or job.account_id != account_id:
        raise NotFound(f"No job '{job_id}'.", param="id")
    return job


def results_of(session: Session, job_id: str) -> list[JobResult]:
    return list(session.scalars(select(JobResult).where(JobResult.job_id == job_id).order_by(JobResult.index)))


def job_json(job: Job, results: list[JobResult], url_for_content) -> dict:
    body = {
        "id": job.id,
        "object": "job",
        "type": job.type,
        "model": job.model,
        "status": job.status,
        "created_at": as_utc(job.created_at).isoformat(),
        "started_at": as_utc(job.started_at).isoformat() if job.started_at else None,
        "finished_at": as_utc(job.finished_at).isoformat() if job.finished_at else None,
        "progress": job.progress,
        "hold_credits": pricing.format_credits(job.hold_ucr),
        "cost_credits": pricing.format_credits(job.cost_ucr) if job.cost_ucr is not None else None,
        "request_id": job.hold_id,
        "error": {"type": job.error_type, "message": job.error_message} if job.status == "failed" else None,
        "media_expired": job.media_expired,
        "results": [
            {
                "index": r.index,
                "content_type": r.content_type,
                "bytes": r.bytes,
                "url": None if job.media_expired else url_for_content(job.id, r.index),
            }
            for r in results
        ],
    }
    return body


def list_jobs(
    session: Session, account_id: int, limit: int, before: str | None, status: str | None, job_type: str | None
) -> tuple[list[Job], bool]:
    """Newest first; ``before`` is the last job id of the previous page."""
    query = select(Job).where(Job.account_id == account_id)
    if before:
        try:
            anchor = get_job(session, account_id, before)
        except NotFound:
            raise InvalidRequest(f"Unknown cursor '{before}'.", param="cursor") from None
        query = query.where(
            (Job.created_at < anchor.created_at) | ((Job.created_at == anchor.created_at) & (Job.id < anchor.id))
        )
    if status:
        query = query.where(Job.status == status)
    if job_type:
        query = query.where(Job.type == job_type)
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def wait_for(ctx: MediaContext, session: Session, job: Job, seconds: float) -> Job:
    """Wait up to ``seconds`` for ``job`` to end; returns it as last read, ended or not.

    No blocking Redis read (a client's socket timeout would cut it short): short,
    non-destructive looks at the worker's done signal, so any number of requests can
    wait for one job, at growing intervals, plus a read of the job row every
    ``WAIT_READ_SECONDS``; each read ends its transaction, so no connection is held
    between looks. ``time.sleep`` yields under gevent. A Redis or database error ends
    the wait early: the caller answers with the job as it stands, never "nothing was charged".
    """
    deadline = time.monotonic() + seconds
    pause, next_read = WAIT_POLL_FIRST, 0.0
    while True:
        now = time.monotonic()
        try:
            if now >= next_read or ctx.redis.exists(DONE_KEY + job.id):
                session.refresh(job)
                session.commit()
                next_read = now + WAIT_READ_SECONDS
                if job.status in TERMINAL:
                    return job
        except (redis.RedisError, SQLAlchemyError) as error:
            log.warning("wait for job ended early", extra={"job_id": job.id, "error": type(error).__name__})
            rollback_quietly(session)
            return job
        if now >= deadline:
            return job
        time.sleep(min(pause, max(deadline - now, 0)))
        pause = min(pause * 1.5, WAIT_POLL_MAX)


def rollback_quietly(session: Session) -> None:
    try:
        session.rollback()
    except SQLAlchemyError:
        pass  # the connection is gone; the session starts afresh on next use


@contextmanager
def wait_slot(ctx: MediaContext, account_id: int, request_id: str) -> Iterator[None]:
    """One of the account's ``waits_per_account`` concurrent waits, or a 429 before anything is held.

    The slots are a sorted set scored by when each wait must have ended, so a process
    that died mid-wait frees its slot by itself.
    """
    key = f"{WAITS_KEY}{{acct:{account_id}}}"
    now = time.time()
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.zremrangebyscore(key, "-inf", now)
    pipe.zadd(key, {request_id: now + ctx.wait_max + 30})
    pipe.expire(key, ctx.wait_max + 30)
    pipe.zcard(key)
    *_, waiting = pipe.execute()
    if waiting > ctx.waits_per_account:
        ctx.redis.zrem(key, request_id)
        raise RateLimited(
            f"This account already has {ctx.waits_per_account} requests waiting for media jobs, the most it can; "
            "nothing was charged. Retry shortly, or submit to /v1/tts, /v1/image or /v1/music without "
            "Prefer: wait and poll the job.",
            code="too_many_waits",
            headers={"Retry-After": "1"},
        )
    try:
        yield
    finally:
        try:
            ctx.redis.zrem(key, request_id)
        except redis.RedisError:
            pass  # the slot's score frees it when the wait would have ended


def job_error(job: Job) -> BrokerError:
    """The error a synchronous route answers for a job that ended without a result (nothing was charged)."""
    if job.status == "canceled":
        return Conflict(f"Job {job.id} was canceled; nothing was charged.", code="job_canceled")
    message = f"Job {job.id} failed: {job.error_message or 'no reason given'} Nothing was charged."
    if job.error_type in REJECTED_CODES:
        return UpstreamRejected(message, code=job.error_type)
    return UpstreamError(message, code=job.error_type or "upstream_error")


def read_result(ctx: MediaContext, result: JobResult) -> bytes:
    return b"".join(ctx.storage.stream(result.storage_key))


# -- signed links to results -------------------------------------------------------


def _link_signature(secret: str, job_id: str, index: int, expires: int) -> str:
    message = f"media-link\0{job_id}\0{index}\0{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign_link(ctx: MediaContext, job_id: str, index: int) -> tuple[int, str]:
    """(expires, signature) of a link to result ``index`` of the job, valid for ``link_ttl`` seconds."""
    expires = int(time.time()) + ctx.link_ttl
    return expires, _link_signature(ctx.link_secret, job_id, index, expires)


def linked_result(ctx: MediaContext, session: Session, job_id: str, index: int, expires: int, signature: str):
    """The result a signed link names; 403 when the signature is wrong or the link expired, 404 when gone."""
    expected = _link_signature(ctx.link_secret, job_id, index, expires)
    # As bytes: compare_digest refuses str with non-ASCII characters (a 500 for a mangled link).
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise Forbidden("This link's signature is not valid.", code="invalid_signature", param="signature")
    if expires < time.time():
        raise Forbidden("This link has expired; fetch the job again for a new one.", code="link_expired")
    job = session.get(Job, job_id)
    result = next((r for r in results_of(session, job_id) if r.index == index), None)
    if job is None or result is None or job.media_expired:
        raise NotFound(f"Job '{job_id}' has no result {index}.", param="index")
    return result


def cancel(ctx: MediaContext, session: Session, account_id: int, job_id: str) -> Job:
    """Cancel a queued job (one a worker holds while it waits for a provider place included: it stays
    ``queued`` until it has its place) and release its hold; a running or finished one is a 409."""
    job = get_job(session, account_id, job_id)
    if not _set_status(session, job.id, ("queued",), "canceled"):
        session.refresh(job)
        raise Conflict(f"Job '{job_id}' is {job.status}; only a queued job can be canceled.", param="id")
    price = ctx.prices.models[job.model]
    ctx.ledger.release(account_id, job.hold_id, _receipt(ctx, job, price, "canceled", Decimal(0), {}))
    _signal(ctx, job.id, "canceled")
    session.refresh(job)
    return job


# -- the worker's side ---------------------------------------------------------------


def _set_status(session: Session, job_id: str, expected: tuple[str, ...], new: str, **values) -> bool:
    """Compare-and-set the status; True when this call made the change."""
    if new in TERMINAL:
        values.setdefault("finished_at", _now())
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(expected)).values(status=new, **values))
    session.commit()
    return result.rowcount == 1


@dataclass
class Running:
    """One job a worker process has in flight in a thread of its own (see ``broker.jobs.MediaPool``).

    ``lease_until`` is the lease this process last wrote: it is renewed by compare-and-set
    on it, so a renewal never overwrites a lease someone else set (a music job's re-check
    token, a takeover). ``lock`` makes "settle" and "time out" exclusive: whichever takes it
    first sets ``ended``, and the other then leaves the job alone.
    """

    job_id: str
    lease_until: datetime | None = None
    deadline: float = math.inf  # time.monotonic() past which the job is failed as timed out
    waiting: bool = False  # reserved (still ``queued``) while it waits for a provider place (``reserve``)
    provider: str = ""  # set while it holds one of its provider's places (``take_place``)
    place_until: float = 0.0  # time.time() when that place lapses unless renewed
    ended: bool = False
    timed_out: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def _owned(running: Running | None) -> Iterator[bool]:
    """Hold the job for its final writes; yields False if its timeout already failed it."""
    if running is None:
        yield True
        return
    with running.lock:
        if running.ended:
            yield False
            return
        running.ended = True
        yield True


def _claim(
    ctx: MediaContext, session: Session, job_id: str, recheck: str | None = None, running: Running | None = None
) -> Job | None:
    """queued → running, or take over a running job whose lease ran out; None if not ours to run.

    ``recheck`` is the lease a waiting music job set when it scheduled its next poll: only
    the re-check carrying it takes the job (renewing its lease), so a duplicate delivery of
    an earlier re-check finds the lease moved on and skips. ``running`` records the lease
    written, for its renewals.
    """
    now = _now()
    lease = now + timedelta(seconds=ctx.lease_seconds)
    job = None
    if recheck is not None:
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.lease_until == datetime.fromisoformat(recheck))
            .values(lease_until=lease)
        )
        session.commit()
        if taken.rowcount == 1:
            job = session.get(Job, job_id)
    if job is None:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id)
            .where(
                ((Job.status == "queued") & (Job.lease_until.is_(None) | (Job.lease_until < now)))
                | ((Job.status == "running") & (Job.lease_until < now))
            )
            .values(status="running", lease_until=lease, started_at=now, attempts=Job.attempts + 1)
        )
        session.commit()
        if result.rowcount != 1:
            return None
        job = session.get(Job, job_id)
    # End the read's transaction: no connection is held through the slow upstream call.
    session.commit()
    if running is not None:
        running.lease_until = lease
    return job


def claim(ctx: MediaContext, session: Session, job_id: str, recheck: str | None, running: Running) -> bool:
    """Claim the job for a run in a thread (``run_claimed``); False if it is not ours to run."""
    return _claim(ctx, session, job_id, recheck, running) is not None


def reserve(ctx: MediaContext, session: Session, job_id: str, running: Running) -> bool:
    """Hold a queued job for this worker while it waits for a provider place, leaving it ``queued``.

    The job stays cancelable meanwhile (``cancel`` is queued → canceled); its lease marks it
    held, so no other run claims it, and a lease that lapses (the worker died) has the
    stuck-job check queue it again. ``claim_reserved`` then makes it ``running``.
    """
    now = _now()
    lease = now + timedelta(seconds=ctx.lease_seconds)
    reserved = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .where(Job.lease_until.is_(None) | (Job.lease_until < now))
        .values(lease_until=lease)
    )
    session.commit()
    if reserved.rowcount != 1:
        return False
    running.lease_until, running.waiting = lease, True
    return True


def claim_reserved(ctx: MediaContext, session: Session, running: Running) -> bool:
    """queued → running for a job ``reserve`` held, once it has its place; False if it was canceled
    meanwhile (or its lease lapsed and it was queued again): then the provider is never called."""
    with running.lock:
        now = _now()
        lease = now + timedelta(seconds=ctx.lease_seconds)
        claimed = session.execute(
            update(Job)
            .where(Job.id == running.job_id, Job.status == "queued", Job.lease_until == running.lease_until)
            .values(status="running", lease_until=lease, started_at=now, attempts=Job.attempts + 1)
        )
        session.commit()
        if claimed.rowcount != 1:
            running.ended = True
            return False
        running.lease_until, running.waiting = lease, False
        return True


def gone(ctx: MediaContext, job_id: str) -> bool:
    """Whether the job has signalled its end (a cancel does): a job waiting for a place stops waiting."""
    return bool(ctx.redis.exists(DONE_KEY + job_id))


def run(
    ctx: MediaContext,
    session: Session,
    job_id: str,
    final_attempt: bool,
    recheck: str | None = None,
    retries_left: int = 0,
) -> str:
    """Run one job (or one re-check of a waiting music job); returns its outcome.

    Raises only to ask RQ for a retry. ``recheck`` and ``retries_left`` carry a music
    job's state from one scheduled poll to the next (see ``_run_music``).
    """
    job = _claim(ctx, session, job_id, recheck)
    if job is None:
        return "skipped"
    return _run_job(ctx, session, job, final_attempt, retries_left, None)


def run_claimed(
    ctx: MediaContext, session: Session, running: Running, final_attempt: bool, retries_left: int = 0
) -> str:
    """``run`` for a job claimed by ``claim``, in this thread's own session.

    The outcome "timed_out" means the job's timeout failed it (and released its hold)
    while the provider was still working; nothing is written then.
    """
    job = session.get(Job, running.job_id)
    session.commit()
    if job is None:
        return "skipped"
    return _run_job(ctx, session, job, final_attempt, retries_left, running)


def _run_job(
    ctx: MediaContext, session: Session, job: Job, final_attempt: bool, retries_left: int, running: Running | None
) -> str:
    price = ctx.prices.models[job.model]
    params = json.loads(job.params)
    try:
        generated = _generate(ctx, session, job, price, params, retries_left)
        if generated is None:
            return "waiting"
        files, cost, detail = generated
    except UpstreamRejected as error:
        with _owned(running) as ours:
            if not ours:
                return "timed_out"
            _fail(ctx, session, job, price, error)
        return "failed"
    except BrokerError as error:
        with _owned(running) as ours:
            if not ours:
                return "timed_out"
            if not final_attempt:
                _set_status(
                    session,
                    job.id,
                    ("running",),
                    "queued",
                    error_type=error.code,
                    error_message=error.message,
                    lease_until=None,  # a lease on a queued job means a worker holds it (``reserve``)
                )
                raise
            _fail(ctx, session, job, price, error)
        return "failed"
    with _owned(running) as ours:
        if not ours:
            return "timed_out"
        for index, media in enumerate(files):
            ctx.storage.put(f"{job.id}/{index}", media.data, media.content_type)
        _record_results(session, job.id, files)
        receipt = _receipt(ctx, job, price, "ok", cost, detail)
        ended = ctx.ledger.end_hold(job.account_id, job.hold_id, ctx.charge(cost), receipt)
        charged = ended.charged if ended.status != "unknown" else 0
        _set_status(session, job.id, ("running",), "succeeded", cost_ucr=charged, progress=100, error_type=None)
    _signal(ctx, job.id, "succeeded")
    metrics.CREDITS_CHARGED.labels(job.type).inc(charged)
    metrics.JOB_OUTCOMES.labels(job.type, "succeeded").inc()
    return "succeeded"


def renew_lease(ctx: MediaContext, session: Session, running: Running) -> bool:
    """Push the lease of a job still running here ``lease_seconds`` on; False once it is not ours to renew
    (ended, timed out, or its lease moved on: a music re-check's token, a takeover)."""
    with running.lock:
        if running.ended or running.lease_until is None:
            return False
        lease = _now() + timedelta(seconds=ctx.lease_seconds)
        status = "queued" if running.waiting else "running"
        renewed = session.execute(
            update(Job)
            .where(Job.id == running.job_id, Job.status == status, Job.lease_until == running.lease_until)
            .values(lease_until=lease)
        )
        session.commit()
        if renewed.rowcount != 1:
            if running.waiting:
                running.ended = True  # canceled while it waited: its thread stops waiting
            return False
        running.lease_until = lease
        return True


def time_out(ctx: MediaContext, session: Session, running: Running, seconds: float) -> bool:
    """Fail a job that ran past its timeout and release its hold; the thread still waiting on the
    provider then writes nothing (``_owned``). False if it had already ended."""
    with running.lock:
        if running.ended:
            return False
        running.ended = running.timed_out = True
        job = session.get(Job, running.job_id, populate_existing=True)
        session.commit()
        if job is None or job.status != "running":
            return False
        error = UpstreamTimeout(f"The job ran past its {seconds:g} s timeout.", code="job_timeout")
        _fail(ctx, session, job, ctx.prices.models[job.model], error)
        return True


def requeue(ctx: MediaContext, session: Session, running: Running, retries_left: int) -> None:
    """Hand a claimed (or reserved) job that has not called its provider back to the queue (the worker
    is stopping)."""
    with _owned(running) as ours:
        if not ours:
            return
        if running.waiting:
            given_back = session.execute(
                update(Job)
                .where(Job.id == running.job_id, Job.status == "queued", Job.lease_until == running.lease_until)
                .values(lease_until=None)
            )
            session.commit()
            done = given_back.rowcount == 1
        else:
            done = _set_status(session, running.job_id, ("running",), "queued", lease_until=None)
        if done:
            ctx.queue.enqueue(
                "broker.jobs.run_media_job",
                running.job_id,
                None,
                retries_left,
                job_timeout=ctx.lease_seconds,
                result_ttl=3600,
                failure_ttl=7 * 86400,
            )


def provider_of(ctx: MediaContext, session: Session, job_id: str) -> str:
    job = session.get(Job, job_id)
    session.commit()
    return ctx.prices.models[job.model].provider if job is not None else ""


# A provider's places: a sorted set of job ids scored by when each place lapses (its
# holder's lease), so a worker that died frees its places by itself. A job that already
# holds a place (a music job between polls) keeps it. Returns 1 taken, 2 already held, 0 full.
TAKE_PLACE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  return 2
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
PLACES_KEY = "media-places:"


def take_place(ctx: MediaContext, provider: str, job_id: str, cap: int, until: float) -> int:
    """One of ``cap`` places for jobs in flight at ``provider`` across all workers (see TAKE_PLACE)."""
    now = time.time()
    return int(ctx.redis.eval(TAKE_PLACE, 1, PLACES_KEY + provider, now, until, job_id, cap))


def renew_place(ctx: MediaContext, provider: str, job_id: str, until: float) -> None:
    ctx.redis.zadd(PLACES_KEY + provider, {job_id: until}, xx=True)


def free_place(ctx: MediaContext, provider: str, job_id: str) -> None:
    ctx.redis.zrem(PLACES_KEY + provider, job_id)


def places_in_use(ctx: MediaContext, provider: str) -> int:
    return int(ctx.redis.zcount(PLACES_KEY + provider, time.time(), "+inf"))


def _record_results(session: Session, job_id: str, files: list[MediaFile]) -> None:
    existing = {r.index for r in results_of(session, job_id)}
    for index, media in enumerate(files):
        if index not in existing:
            session.add(
                JobResult(
                    job_id=job_id,
                    index=index,
                    content_type=media.content_type,
                    bytes=len(media.data),
                    storage_key=f"{job_id}/{index}",
                )
            )
    session.commit()


def _fail(ctx: MediaContext, session: Session, job: Job, price: ModelPrice, error: BrokerError) -> None:
    metrics.UPSTREAM_ERRORS.labels(price.provider, error.code).inc()
    metrics.JOB_OUTCOMES.labels(job.type, "failed").inc()
    receipt = _receipt(ctx, job, price, "error", Decimal(0), {})
    receipt["error_code"] = error.code
    ctx.ledger.release(job.account_id, job.hold_id, receipt)
    _set_status(session, job.id, ("running",), "failed", error_type=error.code, error_message=error.message)
    _signal(ctx, job.id, "failed")


def _signal(ctx: MediaContext, job_id: str, status: str) -> None:
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.lpush(DONE_KEY + job_id, status)
    pipe.expire(DONE_KEY + job_id, 60)
    pipe.execute()


def _generate(
    ctx: MediaContext, session: Session, job: Job, price: ModelPrice, params: dict, retries_left: int = 0
) -> tuple[list[MediaFile], Decimal, dict] | None:
    if job.type == "tts":
        result = ctx.speech[price.provider].synthesize(
            price.upstream_model,
            params["text"],
            params["voice_id"],
            params["output_format"],
            params["voice_settings"],
            speed=params.get("speed"),
            instructions=params.get("instructions"),
        )
        characters = len(params["text"])
        cost = pricing.speech_cost_usd(price, characters, result.billed_units, _unit_usd(ctx, price))
        detail = {
            "characters": characters,
            "billed_units": result.billed_units,
            "estimated": result.billed_units is None,
        }
        return [result.audio], cost, detail
    if job.type == "image":
        result = ctx.images[price.provider].generate(
            price.upstream_model,
            params["prompt"],
            params["size"],
            params["quality"],
            params["n"],
            output_format=params.get("output_format", "png"),
        )
        if result.usage is None:
            cost = _image_bound_usd(price, ImageRequest(model=price.id, **params))
            return result.images, cost, {"images": len(result.images), "estimated": True}
        usage = result.usage
        detail = {
            "images": len(result.images),
            "text_input_tokens": usage.text_input_tokens,
            "image_input_tokens": usage.image_input_tokens,
            "image_output_tokens": usage.image_output_tokens,
            "text_output_tokens": usage.text_output_tokens,
            "estimated": False,
        }
        # A report past what the hold covers costs the bound it was held at (the ledger takes no more).
        bound = _image_bound_usd(price, ImageRequest(model=price.id, **params))
        return result.images, min(pricing.image_cost_usd(price, usage), bound), detail
    return _run_music(ctx, session, job, price, params, retries_left)


def _run_music(
    ctx: MediaContext, session: Session, job: Job, price: ModelPrice, params: dict, retries_left: int
) -> tuple[list[MediaFile], Decimal, dict] | None:
    """Submit once (the task id is kept, so a retry polls instead of paying twice), poll once, download.

    A task still running is re-checked by a job scheduled ``music_poll_seconds`` on (RQ's
    scheduler enqueues it), so no worker is held while the vendor works; returns None then.
    The job stays ``running`` meanwhile, its lease set past the re-check's due time, so the
    stuck-job check finishes it only if the re-check never comes. The deadline counts from
    ``started_at``, which only a fresh claim sets.
    """
    provider = ctx.music[price.provider]
    if not job.upstream_task_id:
        job.upstream_task_id = provider.submit(
            price.upstream_model, params["prompt"], params["lyrics"], params["style"], params["instrumental"]
        )
        session.commit()
    task = provider.poll(job.upstream_task_id)
    job.progress = task.progress
    session.commit()
    if task.status == "failed":
        raise UpstreamRejected(
            f"The music generation failed: {task.error or 'no reason given'}.", code="generation_failed"
        )
    if task.status != "succeeded":
        if _now() > as_utc(job.started_at) + timedelta(seconds=ctx.music_max_wait):
            raise UpstreamTimeout("The music generation did not finish in time.")
        _schedule_recheck(ctx, session, job, retries_left)
        return None
    files = [provider.download(url) for url in task.clip_urls]
    return files, price.usd_per_generation, {"clips": len(files), "task_id": job.upstream_task_id}


def _schedule_recheck(ctx: MediaContext, session: Session, job: Job, retries_left: int) -> None:
    """Lease the job past its next poll, then have RQ's scheduler run that poll when due.

    The lease is written first: if the enqueue fails, the job is one whose worker died
    (the stuck-job check releases it once the lease runs out). The re-check carries the
    RQ retries this run had left, so transient failures get the same budget as one run.
    """
    lease = _now() + timedelta(seconds=ctx.music_poll_seconds + ctx.lease_seconds)
    job.lease_until = lease
    session.commit()
    retry = None
    if retries_left > 0:
        retry = Retry(max=retries_left, interval=ctx.retry_intervals[-retries_left:])
    ctx.queue.enqueue_in(
        timedelta(seconds=ctx.music_poll_seconds),
        "broker.jobs.run_media_job",
        job.id,
        lease.isoformat(),
        retries_left,  # a worker running jobs in threads retries them itself (RQ's Retry never fires there)
        retry=retry,
        job_timeout=ctx.lease_seconds,
        result_ttl=3600,
        failure_ttl=7 * 86400,
    )


def _receipt(ctx: MediaContext, job: Job, price: ModelPrice, status: str, cost: Decimal, detail: dict) -> dict:
    return {
        "request_id": job.hold_id,
        "key_id": job.key_id,
        "endpoint": job.type,
        "provider": price.provider,
        "model": price.id,
        "status": status,
        "input_tokens": detail.get("text_input_tokens", detail.get("characters", 0)),
        "output_tokens": detail.get("image_output_tokens", 0),
        "cost_usd": format(cost, "f"),  # never exponent form (6E-7) for tiny costs
        "markup": str(ctx.markup),
        "hold_ucr": job.hold_ucr,
        "estimated": bool(detail.get("estimated")),
        "detail": json.dumps({"job_id": job.id, **detail}),
        "started_at": (as_utc(job.started_at) or as_utc(job.created_at)).isoformat(),
        "finished_at": _now().isoformat(),
    }


# -- housekeeping -----------------------------------------------------------------------


def finish_stuck(ctx: MediaContext, session: Session) -> list[str]:
    """Bring running jobs whose lease ran out (their worker died) to a terminal state; returns their ids.

    If the hold was already settled the job had finished its work: it succeeds with
    that charge. A music job with a task at the vendor is not given up while the vendor
    may still work: its poll is run again (``_rescue_music``), and only a job whose
    rescue was never run (no worker took it in a whole lease) is failed. Otherwise the
    hold is released (exactly once: the release is idempotent by hold id) and the job
    fails with ``worker_lost``. A job a worker reserved while it waited for a provider
    place (still ``queued``) and whose lease ran out is queued again (``_queue_again``).
    """
    now = _now()
    _queue_again(ctx, session, now)
    stuck = session.scalars(select(Job).where(Job.status == "running", Job.lease_until < now))
    finished = []
    for job in list(stuck):
        state, charged = ctx.ledger.hold_state(job.account_id, job.hold_id)
        if state == "ended" and results_of(session, job.id):
            done = _set_status(session, job.id, ("running",), "succeeded", cost_ucr=charged, progress=100)
        elif state != "ended" and job.type == "music" and job.upstream_task_id and _rescue_music(ctx, session, job):
            continue
        else:
            price = ctx.prices.models[job.model]
            receipt = _receipt(ctx, job, price, "error", Decimal(0), {})
            receipt["error_code"] = "worker_lost"
            ctx.ledger.release(job.account_id, job.hold_id, receipt)
            done = _set_status(
                session,
                job.id,
                ("running",),
                "failed",
                error_type="worker_lost",
                error_message="The worker running this job stopped; the held credits were released.",
            )
        if done:
            free_place(ctx, ctx.prices.models[job.model].provider, job.id)
            _signal(ctx, job.id, "finished")
            finished.append(job.id)
    return finished


RESCUED_KEY = "job-rescued:"
# Rescues go to the housekeeping queue, which a worker takes from even while its media jobs fill it.
RESCUE_QUEUE = "housekeeping"


def _rescue_music(ctx: MediaContext, session: Session, job: Job) -> bool:
    """Run a lapsed music job's next poll now, on a new lease; False if its last rescue never ran.

    Its lease lapses when the re-check is late (the scheduler's lock passing to another
    worker, a queue full of media jobs) or its worker died mid-poll; the vendor works on
    meanwhile. The re-check that was late, when it comes, finds the lease moved on and
    skips. A rescue that lapses in turn means no worker took it for a whole lease: the
    job is then failed as lost. The poll itself fails the job past ``music_max_wait``.
    """
    marker = RESCUED_KEY + job.id
    rescued = ctx.redis.get(marker)
    if isinstance(rescued, bytes):
        rescued = rescued.decode()
    if rescued == as_utc(job.lease_until).isoformat():
        return False
    lease = _now() + timedelta(seconds=ctx.lease_seconds)
    moved = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "running", Job.lease_until == job.lease_until)
        .values(lease_until=lease)
    )
    session.commit()
    if moved.rowcount != 1:
        return True  # a re-check took it meanwhile: not stuck
    # Written before the enqueue: a rescue that is never run fails the job at its next lapse.
    ctx.redis.set(marker, lease.isoformat(), ex=86400)
    Queue(RESCUE_QUEUE, connection=ctx.queue.connection).enqueue(
        "broker.jobs.run_media_job",
        job.id,
        lease.isoformat(),
        len(ctx.retry_intervals),
        at_front=True,
        job_timeout=ctx.lease_seconds,
        result_ttl=3600,
        failure_ttl=7 * 86400,
    )
    log.warning("music job re-checked by the stuck-job check", extra={"job_id": job.id})
    return True


def _queue_again(ctx: MediaContext, session: Session, now: datetime) -> None:
    """Queue again the jobs reserved by a worker that died while they waited for a provider place.

    Enqueued first, then the lease cleared by compare-and-set: a failed enqueue leaves the
    job for the next check, and a second enqueue (two checks at once) is skipped by the claim.
    """
    lapsed = session.scalars(select(Job).where(Job.status == "queued", Job.lease_until < now))
    for job in list(lapsed):
        ctx.queue.enqueue(
            "broker.jobs.run_media_job",
            job.id,
            None,
            len(ctx.retry_intervals),
            job_timeout=ctx.lease_seconds,
            result_ttl=3600,
            failure_ttl=7 * 86400,
        )
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued", Job.lease_until == job.lease_until)
            .values(lease_until=None)
        )
        session.commit()
        log.warning("media job queued again: its worker died while it waited", extra={"job_id": job.id})


def purge_media(ctx: MediaContext, session: Session, older_than_days: int) -> int:
    """Delete stored outputs of jobs finished more than N days ago; the job rows stay, marked expired."""
    cutoff = _now() - timedelta(days=older_than_days)
    jobs = list(session.scalars(select(Job).where(Job.finished_at < cutoff, Job.media_expired.is_(False))))
    for job in jobs:
        for result in results_of(session, job.id):
            ctx.storage.delete(result.storage_key)
        job.media_expired = True
    session.commit()
    return len(jobs)
