"""OpenAI-shaped media routes, answered synchronously over the job machinery.

``POST /v1/audio/speech`` answers with the audio bytes and ``POST /v1/images/generations``
with OpenAI's image list, so ``client.audio.speech.create`` and ``client.images.generate``
work. Underneath each is a media job (hold, enqueue, claim, settle exactly once) that the
request waits for, up to ``SYNC_WAIT_MAX_SECONDS``. Past that the answer is a ``504
job_still_running`` naming the job, never a ``202`` (the SDKs would save it as audio or
parse it as an empty list); the job still finishes and is charged.

With an ``Idempotency-Key`` the key is bound to the job as soon as it exists, so a retry
waits for that same job and returns its result (charged once) instead of replaying an
answer. ``url`` images are signed, expiring links (``GET /v1/media/{job_id}/{index}``,
on the keyless blueprint ``links``) that work without the API key.
"""

from __future__ import annotations

import base64

from flask import Blueprint, Response, g, jsonify, request, url_for

from broker import hosts, idempotency, media, pricing
from broker.api import bp, parse, parse_query
from broker.api.openapi import operation
from broker.errors import Conflict
from broker.extensions import services
from broker.models import Job
from broker.schemas import (
    ImageRequest,
    ImagesResponse,
    OpenAIImageRequest,
    OpenAISpeechRequest,
    SignedLinkQuery,
)

# Signed links take no API key, so they live outside the /v1 blueprint's authentication.
links = Blueprint("links", __name__, url_prefix="/v1")

SYNC_ERRORS = ("400", "401", "402", "403", "404", "409", "413", "429", "502", "503", "504")
SYNC_DESCRIPTION = (
    " The request waits for its job up to `SYNC_WAIT_MAX_SECONDS` (180 s by default). Past that it answers "
    "`504` with `error.code` `job_still_running` and `error.job_id`: the job goes on and is charged when it "
    "finishes; a retry with the same `Idempotency-Key` waits for that job and returns its result, charged once "
    "(`x-should-retry: true` tells the SDKs to retry when the key was sent). An account may hold "
    "`SYNC_WAITS_PER_ACCOUNT` (10) waiting requests at once; one more is a `429` before anything is held. "
    "Not offered to marketplace (RapidAPI) callers (`403`)."
)
FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def _run(job_type: str, build) -> Job:
    """The job of this request, ended: submitted now (``build()`` gives its request) or bound to its key earlier."""
    svc = services()
    session = svc.db()
    with media.wait_slot(svc.media, g.caller.account_id, g.request_id):
        bound = g.pop("idempotent_job", None)
        if bound is not None:
            job = media.get_job(session, g.caller.account_id, bound)
            if job.type != job_type:
                raise Conflict(
                    "This Idempotency-Key was used for another kind of request.",
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                )
        else:
            job, _ = media.submit(svc.media, session, g.caller, job_type, build(), g.request_id)
            _bind_key(job)
        job = media.wait_for(svc.media, session, job, svc.media.wait_max)
    if job.status == "succeeded":
        return job
    if job.status in media.TERMINAL:
        raise media.job_error(job)
    raise media.JobStillRunning(job.id, svc.media.wait_max, retryable="Idempotency-Key" in request.headers)


def _bind_key(job: Job) -> None:
    """From now on a retry with this request's Idempotency-Key waits for ``job`` (the key is ours, not replayed)."""
    key = g.pop("idempotency_key", None)
    if key is not None:
        idempotency.bind_job(services().redis, key, request.get_data(), job.id)


def _headers(job: Job) -> dict:
    svc = services()
    return {
        "X-Job-Id": job.id,
        "X-Credits-Charged": pricing.format_credits(job.cost_ucr or 0),
        "X-Credits-Remaining": pricing.format_credits(svc.ledger.balance(job.account_id)),
    }


@bp.post("/audio/speech")
@operation(
    summary="Text to speech in OpenAI's shape: the audio itself",
    description="OpenAI's `POST /v1/audio/speech` for OpenAI speech models (billed by input characters at the "
    "price table's rate: the audio carries no usage) and ElevenLabs models (OpenAI voice names mapped to "
    "ElevenLabs voices; `response_format` mp3, opus or pcm). The body is the audio, its `Content-Type` the "
    "format's." + SYNC_DESCRIPTION,
    tag="Media",
    body=OpenAISpeechRequest,
    content_type="audio/mpeg",
    errors=SYNC_ERRORS,
    headers={
        "X-Job-Id": "The media job behind this answer (GET /v1/jobs/{id})",
        "X-Credits-Charged": "",
        "X-Credits-Remaining": "",
    },
)
def audio_speech() -> Response:
    req = parse(OpenAISpeechRequest)
    ctx = services().media
    job = _run(
        "tts",
        lambda: media.speech_from_openai(
            ctx, req.model, req.input, req.voice_name, req.response_format, req.speed, req.instructions
        ),
    )
    session = services().db()
    result = media.results_of(session, job.id)[0]
    return Response(media.read_result(ctx, result), mimetype=result.content_type, headers=_headers(job))


@bp.post("/images/generations")
@operation(
    summary="Generate images in OpenAI's shape",
    description="OpenAI's `POST /v1/images/generations` (GPT image models), billed from the provider's usage. "
    "`response_format` `b64_json` (the default) carries the images; `url` gives signed links that work "
    "without the API key for `MEDIA_URL_TTL_SECONDS` (one hour by default)." + SYNC_DESCRIPTION,
    tag="Media",
    body=OpenAIImageRequest,
    response=ImagesResponse,
    errors=SYNC_ERRORS,
    headers={
        "X-Job-Id": "The media job behind this answer (GET /v1/jobs/{id})",
        "X-Credits-Charged": "",
        "X-Credits-Remaining": "",
    },
)
def images_generations() -> Response:
    req = parse(OpenAIImageRequest)
    job = _run(
        "image",
        lambda: ImageRequest(
            model=req.model,
            prompt=req.prompt,
            size=req.size,
            quality=req.quality,
            n=req.n,
            output_format=req.output_format,
        ),
    )
    ctx = services().media
    results = media.results_of(services().db(), job.id)
    data = []
    for result in results:
        if req.response_format == "url":
            expires, signature = media.sign_link(ctx, job.id, result.index)
            path = url_for("links.media_link", job_id=job.id, index=result.index, expires=expires, signature=signature)
            data.append({"url": hosts.public_base_url() + path})
        else:
            data.append({"b64_json": base64.b64encode(media.read_result(ctx, result)).decode()})
    body = {"created": int(media.as_utc(job.created_at).timestamp()), "data": data}
    if results:
        body["output_format"] = FORMATS.get(results[0].content_type, req.output_format)
    if req.size != "auto":
        body["size"] = req.size
    if req.quality != "auto":
        body["quality"] = req.quality
    response = jsonify(body)
    response.headers.update(_headers(job))
    return response


@links.get("/media/<job_id>/<int:index>")
@operation(
    summary="A job's result through a signed, expiring link (no API key)",
    description="The links that `POST /v1/images/generations` gives with `response_format: url`. They work "
    "without the API key until `expires` (`MEDIA_URL_TTL_SECONDS` after they were made, one hour by default); "
    "an altered or expired link is a `403`.",
    tag="Media",
    query=SignedLinkQuery,
    content_type="*/*",
    errors=("400", "403", "404", "503"),
    auth=False,
)
def media_link(job_id: str, index: int) -> Response:
    svc = services()
    query = parse_query(SignedLinkQuery)
    result = media.linked_result(svc.media, svc.db(), job_id, index, query.expires, query.signature)
    return Response(
        svc.media.storage.stream(result.storage_key),
        mimetype=result.content_type,
        headers={"Content-Length": str(result.bytes), "Cache-Control": "private, max-age=300"},
    )
