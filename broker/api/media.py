"""Media routes: submit speech, image and music jobs; poll, list, download and cancel them."""

from __future__ import annotations

import re
from collections.abc import Callable

import redis
from flask import Response, g, jsonify, request, url_for
from sqlalchemy.exc import SQLAlchemyError

from broker import media, pricing
from broker.api import bp, parse, parse_query
from broker.api.openapi import operation
from broker.errors import NotFound
from broker.extensions import services
from broker.schemas import ContentQuery, ImageRequest, JobList, JobOut, JobsQuery, MusicRequest, SpeechRequest


def _content_url(job_id: str, index: int) -> str:
    return url_for("api.job_content", job_id=job_id, index=index)


def _job_response(job, status: int, extra_headers: dict | None = None) -> Response:
    session = services().db()
    response = jsonify(media.job_json(job, media.results_of(session, job.id), _content_url))
    response.status_code = status
    response.headers.update(extra_headers or {})
    return response


def _prefer_wait() -> int:
    """Seconds from ``Prefer: wait=N`` (at most SYNC_WAIT_MAX_SECONDS), 0 when absent."""
    match = re.search(r"\bwait=(\d+)", request.headers.get("Prefer", ""))
    return min(int(match.group(1)), services().media.wait_max) if match else 0


def _submit(job_type: str, model) -> Response:
    svc = services()
    req = parse(model)
    session = svc.db()
    wait = _prefer_wait()
    if not wait:
        job, balance = media.submit(svc.media, session, g.caller, job_type, req, g.request_id)
        return _job_response(job, 202, _submitted_headers(job, balance))
    with media.wait_slot(svc.media, g.caller.account_id, g.request_id):
        job, balance = media.submit(svc.media, session, g.caller, job_type, req, g.request_id)
        job = media.wait_for(svc.media, session, job, wait)
    headers = _submitted_headers(job, balance)
    try:
        if job.status in media.TERMINAL:
            headers["X-Credits-Remaining"] = pricing.format_credits(svc.ledger.balance(g.caller.account_id))
            if job.cost_ucr is not None:
                headers["X-Credits-Charged"] = pricing.format_credits(job.cost_ucr)
            headers["Preference-Applied"] = f"wait={wait}"
            return _job_response(job, 200, headers)
        return _job_response(job, 202, headers)
    except (redis.RedisError, SQLAlchemyError):
        # The job exists and holds credits: answer with it as last read, never "nothing was charged".
        media.rollback_quietly(session)
        response = jsonify(media.job_json(job, [], _content_url))
        response.status_code = 202
        response.headers.update(_submitted_headers(job, balance))
        return response


def _submitted_headers(job, balance: int) -> dict:
    return {
        "Location": url_for("api.get_job", job_id=job.id),
        "X-Credits-Held": pricing.format_credits(job.hold_ucr),
        "X-Credits-Remaining": pricing.format_credits(balance),
    }


def _submit_operation(summary: str, body) -> Callable:
    """The OpenAPI description shared by the three submit routes."""
    return operation(
        summary=summary,
        description="Answers `202` with the queued job and `Location`; with `Prefer: wait=N` (N up to "
        "`SYNC_WAIT_MAX_SECONDS`, 180 by default) a job that ends within N seconds comes back as `200`, one still "
        "running as `202`. An account may hold `SYNC_WAITS_PER_ACCOUNT` (10) such waits at once; one more is a `429` "
        "before anything is held.",
        tag="Media",
        body=body,
        response=JobOut,
        status=202,
        errors=("400", "401", "402", "404", "413", "429", "503"),
        headers={"Location": "The job's URL", "X-Credits-Held": "Credits held for the job"},
    )


@bp.post("/tts")
@_submit_operation("Submit a text-to-speech job", SpeechRequest)
def submit_tts() -> Response:
    return _submit("tts", SpeechRequest)


@bp.post("/image")
@_submit_operation("Submit an image generation job", ImageRequest)
def submit_image() -> Response:
    return _submit("image", ImageRequest)


@bp.post("/music")
@_submit_operation("Submit a music generation job (unofficial Suno-style API)", MusicRequest)
def submit_music() -> Response:
    return _submit("music", MusicRequest)


@bp.get("/jobs/<job_id>")
@operation(summary="A job: status, cost and results", tag="Media", response=JobOut, errors=("401", "404", "429", "503"))
def get_job(job_id: str) -> Response:
    job = media.get_job(services().db(), g.caller.account_id, job_id)
    headers = {}
    if job.cost_ucr is not None:
        headers["X-Credits-Charged"] = pricing.format_credits(job.cost_ucr)
    return _job_response(job, 200, headers)


@bp.get("/jobs/<job_id>/content")
@operation(
    summary="Download a result of a job",
    tag="Media",
    query=ContentQuery,
    content_type="*/*",
    errors=("400", "401", "404", "429", "503"),
)
def job_content(job_id: str) -> Response:
    svc = services()
    session = svc.db()
    job = media.get_job(session, g.caller.account_id, job_id)
    index = parse_query(ContentQuery).index
    result = next((r for r in media.results_of(session, job.id) if r.index == index), None)
    if result is None or job.media_expired:
        raise NotFound(f"Job '{job_id}' has no result {index}.", param="index")
    storage = svc.media.storage
    return Response(
        storage.stream(result.storage_key),
        mimetype=result.content_type,
        headers={"Content-Length": str(result.bytes), "Cache-Control": "private, max-age=3600"},
    )


@bp.get("/jobs")
@operation(summary="Your jobs, newest first", tag="Media", query=JobsQuery, response=JobList)
def list_jobs() -> Response:
    query = parse_query(JobsQuery)
    session = services().db()
    jobs, more = media.list_jobs(session, g.caller.account_id, query.limit, query.cursor, query.status, query.type)
    data = [media.job_json(job, media.results_of(session, job.id), _content_url) for job in jobs]
    return jsonify({"object": "list", "data": data, "has_more": more, "next_cursor": jobs[-1].id if more else None})


@bp.delete("/jobs/<job_id>")
@operation(summary="Cancel a queued job", tag="Media", response=JobOut, errors=("401", "404", "409", "429", "503"))
def cancel_job(job_id: str) -> Response:
    svc = services()
    job = media.cancel(svc.media, svc.db(), g.caller.account_id, job_id)
    return _job_response(job, 200, {"X-Credits-Remaining": pricing.format_credits(svc.ledger.balance(job.account_id))})
