"""Public pages: a minimal landing page and health checks (the full site comes with the web issue)."""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template
from sqlalchemy import text

from broker.extensions import services

bp = Blueprint("public", __name__)


@bp.get("/")
def landing():
    svc = services()
    return render_template(
        "landing.html",
        providers=sorted(svc.providers),
        models=svc.prices.models.values(),
    )


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    svc = services()
    svc.redis.ping()
    svc.db().execute(text("SELECT 1"))
    return jsonify({"status": "ready"})
