"""Dashboard: media jobs, their live rows (polled until the job ends), cancel, and their files.

A queued or running row asks for itself again a second after it loads; a finished row has
no trigger, so polling stops there. Cancel is ``media.cancel``, the same as
``DELETE /v1/jobs/{id}``: it releases the hold; nothing here touches money.
"""

from __future__ import annotations

import json
import mimetypes
from datetime import UTC, datetime

from flask import Response, abort, flash, make_response, redirect, render_template, request, url_for

from broker import media
from broker.errors import Conflict, NotFound
from broker.extensions import services
from broker.models import Job, JobResult
from broker.web.dashboard import account_id, bp, is_partial, render

SUMMARY_CHARS = 120
PREVIEW_IMAGES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
PLAYABLE_AUDIO = frozenset(
    {"audio/mpeg", "audio/wav", "audio/x-wav", "audio/wave", "audio/ogg", "audio/mp4", "audio/aac", "audio/flac"}
)
# Names that say what a file is; ``mimetypes`` guesses the rest (its answers vary by platform for these).
EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/ogg": "ogg",
    "audio/mp4": "m4a",
    "audio/aac": "aac",
    "audio/flac": "flac",
    "audio/pcm": "pcm",
    "audio/pcmu": "ulaw",
    "audio/pcma": "alaw",
}


def file_name(job_id: str, index: int, content_type: str) -> str:
    """``job_<id>_<index>.<ext>`` (job ids already start ``job_``), the extension from the content type."""
    base = content_type.partition(";")[0].strip().lower()
    extension = EXTENSIONS.get(base) or (mimetypes.guess_extension(base) or ".bin").lstrip(".")
    stem = job_id if job_id.startswith("job_") else f"job_{job_id}"
    return f"{stem}_{index}.{extension}"


def _what(job: Job) -> str:
    """The prompt, text or lyrics the job was made from."""
    try:
        params = json.loads(job.params)
    except ValueError:
        return ""
    for name in ("prompt", "text", "lyrics", "style"):
        if isinstance(params.get(name), str) and params[name].strip():
            return " ".join(params[name].split())
    return ""


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _seconds(start: datetime | None, end: datetime | None) -> int | None:
    start, end = _utc(start), _utc(end)
    return max(0, round((end - start).total_seconds())) if start and end else None


def _result_view(job: Job, result: JobResult) -> dict:
    base = result.content_type.partition(";")[0].strip().lower()
    url = url_for("dashboard.job_content", job_id=job.id, index=result.index)
    return {
        "index": result.index,
        "content_type": base,
        "bytes": result.bytes,
        "url": url,
        "download_url": url_for("dashboard.job_content", job_id=job.id, index=result.index, download=1),
        "file_name": file_name(job.id, result.index, base),
        "preview": "image" if base in PREVIEW_IMAGES else "audio" if base in PLAYABLE_AUDIO else None,
    }


def _job_view(job: Job) -> dict:
    what = _what(job)
    results = [] if job.media_expired else media.results_of(services().db(), job.id)
    return {
        "id": job.id,
        "type": job.type,
        "model": job.model,
        "status": job.status,
        "live": job.status not in media.TERMINAL,
        "progress": job.progress,
        "what": what,
        "what_short": what if len(what) <= SUMMARY_CHARS else what[: SUMMARY_CHARS - 1].rstrip() + "…",
        "created_at": _utc(job.created_at),
        "waited": _seconds(job.created_at, job.started_at),
        "took": _seconds(job.started_at, job.finished_at),
        "cost_ucr": job.cost_ucr,
        "hold_ucr": job.hold_ucr,
        "error": job.error_message if job.status == "failed" else None,
        "media_expired": job.media_expired,
        "results": [_result_view(job, r) for r in results],
    }


def _own_job(job_id: str) -> Job:
    try:
        return media.get_job(services().db(), account_id(), job_id)
    except NotFound:
        abort(404)


def _row(job: Job, notice: str | None = None) -> Response:
    response = make_response(render_template("dashboard/_job_row.html", job=_job_view(job), notice=notice))
    if job.status in media.TERMINAL:
        response.headers["HX-Trigger"] = "balance-changed"
    return response


@bp.get("/jobs")
def jobs_page():
    jobs, _ = media.list_jobs(services().db(), account_id(), 50, None, None, None)
    return render("dashboard/jobs.html", "dashboard/_jobs.html", jobs=[_job_view(j) for j in jobs])


@bp.get("/jobs/<job_id>/row")
def job_row(job_id: str):
    return _row(_own_job(job_id))


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Cancel a queued job (``media.cancel`` releases its hold); the row for htmx, the page otherwise."""
    svc = services()
    job = _own_job(job_id)
    try:
        job = media.cancel(svc.media, svc.db(), account_id(), job.id)
        notice = "Canceled: nothing was charged, the held credits are back in your balance."
    except Conflict:
        svc.db().refresh(job)
        notice = f"Not canceled: the job is already {job.status}; only a queued job can be canceled."
    if is_partial():
        return _row(job, notice)
    flash(notice, "success" if job.status == "canceled" else "error")
    return redirect(url_for("dashboard.jobs_page"), code=303)


@bp.get("/jobs/<job_id>/content/<int:index>")
def job_content(job_id: str, index: int):
    """One result, named ``job_<id>_<index>.<ext>``: shown in place, or saved with ``?download=1``."""
    svc = services()
    job = _own_job(job_id)
    result = next((r for r in media.results_of(svc.db(), job.id) if r.index == index), None)
    if result is None or job.media_expired:
        abort(404)
    disposition = "attachment" if request.args.get("download") else "inline"
    name = file_name(job.id, index, result.content_type)
    return Response(
        svc.media.storage.stream(result.storage_key),
        mimetype=result.content_type,
        headers={"Content-Length": str(result.bytes), "Content-Disposition": f'{disposition}; filename="{name}"'},
    )
