"""Dashboard: media jobs, their live rows and their files."""

from __future__ import annotations

from flask import Response, abort, make_response, render_template

from broker import media
from broker.errors import NotFound
from broker.extensions import services
from broker.models import Job
from broker.web.dashboard import account_id, bp, render


def _job_view(job: Job) -> dict:
    session = services().db()
    return media.job_json(
        job, media.results_of(session, job.id), lambda job_id, index: f"/dashboard/jobs/{job_id}/content/{index}"
    )


@bp.get("/jobs")
def jobs_page():
    jobs, _ = media.list_jobs(services().db(), account_id(), 50, None, None, None)
    return render("dashboard/jobs.html", "dashboard/_jobs.html", jobs=[_job_view(j) for j in jobs])


@bp.get("/jobs/<job_id>/row")
def job_row(job_id: str):
    try:
        job = media.get_job(services().db(), account_id(), job_id)
    except NotFound:
        abort(404)
    response = make_response(render_template("dashboard/_job_row.html", job=_job_view(job)))
    if job.status in media.TERMINAL and job.cost_ucr is not None:
        response.headers["HX-Trigger"] = "balance-changed"
    return response


@bp.get("/jobs/<job_id>/content/<int:index>")
def job_content(job_id: str, index: int):
    svc = services()
    session = svc.db()
    try:
        job = media.get_job(session, account_id(), job_id)
    except NotFound:
        abort(404)
    result = next((r for r in media.results_of(session, job.id) if r.index == index), None)
    if result is None or job.media_expired:
        abort(404)
    return Response(
        svc.media.storage.stream(result.storage_key),
        mimetype=result.content_type,
        headers={"Content-Length": str(result.bytes)},
    )
