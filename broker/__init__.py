"""The AI API Broker: ``create_app`` builds the Flask app from configuration."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

import config as broker_config
from broker import extensions, hosts, migrations, observability

ROOT = Path(__file__).resolve().parent.parent


def create_app(overrides: dict | None = None) -> Flask:
    """Build the app. ``overrides`` replace settings read from the environment (tests use it)."""
    settings = broker_config.load(overrides)
    app = Flask(
        __name__,
        instance_path=settings["INSTANCE_PATH"],
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
    )
    app.config.update(settings)
    init_compression(app)  # first: its after_request then runs after every other one
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    observability.init_app(app)
    extensions.init_app(app)
    if settings["BROKER_ENV"] == "development":
        migrations.upgrade(settings["DATABASE_URL"])
    register_blueprints(app)
    register_commands(app)
    if settings["TRUSTED_HOSTS"]:
        host = hosts.canonical_host(settings["PUBLIC_URL"], settings["TRUSTED_HOSTS"])
        app.wsgi_app = hosts.AdmitInfrastructure(app.wsgi_app, host, settings["RAPIDAPI_SECRET"])
    # Outermost, so that the Host checked above is the one PROXY_HOPS allows to be forwarded.
    if settings["PROXY_HOPS"]:
        hops = settings["PROXY_HOPS"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    return app


def init_compression(app: Flask) -> None:
    from broker.web import compression

    compression.init_app(app)


def register_blueprints(app: Flask) -> None:
    from broker.api import bp as api_bp
    from broker.api.errors import register_error_handlers
    from broker.api.onboarding import bp as onboarding_bp
    from broker.api.openai_media import links as links_bp
    from broker.extensions import csrf, limiter
    from broker.web import bp as public_bp
    from broker.web.auth import bp as auth_bp
    from broker.web.dashboard import bp as dashboard_bp
    from broker.web.docs import bp as docs_bp
    from broker.web.webhooks import bp as webhooks_bp

    # The API authenticates by key and webhooks by signature, not by cookie: no CSRF there.
    for blueprint in (api_bp, onboarding_bp, webhooks_bp, links_bp):
        csrf.exempt(blueprint)
    # Per-key API limits are the ledger's and the hardening issue's; register has its own.
    limiter.exempt(api_bp)
    limiter.exempt(webhooks_bp)
    for blueprint in (api_bp, onboarding_bp, links_bp, webhooks_bp, public_bp, docs_bp, auth_bp, dashboard_bp):
        app.register_blueprint(blueprint)
    register_error_handlers(app)


def register_commands(app: Flask) -> None:
    from broker.cli import broker_cli

    app.cli.add_command(broker_cli)
