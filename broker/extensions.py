"""Shared clients of one app: Redis, SQL sessions, the ledger, prices and providers, behind one accessor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import wraps
from pathlib import Path

import redis
import stripe
from flask import Flask, Response, current_app, g, request
from flask.sessions import SecureCookieSessionInterface
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_talisman import Talisman
from flask_wtf import CSRFProtect
from rq import Queue
from sqlalchemy.engine import Engine
from sqlalchemy.orm import scoped_session

from broker import db, embedded_redis, moderation
from broker.billing import Catalogue, stripe_checkout
from broker.chat import Metering
from broker.ledger import Ledger
from broker.limits import Limits
from broker.mail import Mailer, make_mailer
from broker.media import MediaContext
from broker.pricing import PriceTable
from broker.providers import registry
from broker.providers.base import ChatProvider
from broker.providers.http import make_session
from broker.storage import make_storage

EMBEDDED_REDIS_PORT = 6390

# Unbound Flask extensions, initialised in ``broker.create_app``.
login_manager = LoginManager()
csrf = CSRFProtect()
limiter = Limiter(key_func=get_remote_address, strategy="fixed-window")

CSP = {
    "default-src": "'self'",
    "img-src": "'self' data:",
    "style-src": "'self'",
    "script-src": "'self'",
    "connect-src": "'self'",
    "form-action": "'self'",  # plus the Stripe Checkout origin, per app (init_web)
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
    "object-src": "'none'",
}
# Talisman's max-age and includeSubDomains defaults, for the API's own copy of its headers.
HSTS = "max-age=31556926; includeSubDomains"
# The blueprint of the keyed API (broker.api.bp): cookies, CSRF, IP limits and Talisman's per-request
# work are for pages; its requests skip them (issue 14) and get the same security headers, precomputed.
API_BLUEPRINT = "api"


@dataclass
class Services:
    redis_url: str
    redis: redis.Redis
    queue_redis: redis.Redis  # bytes replies, as RQ needs
    engine: Engine
    db: scoped_session
    ledger: Ledger
    prices: PriceTable
    providers: dict[str, ChatProvider]
    metering: Metering
    media: MediaContext
    stripe: stripe.StripeClient | None
    catalogue: Catalogue
    mailer: Mailer


def services() -> Services:
    """The current app's shared clients."""
    return current_app.extensions["broker"]


def redis_url(config: dict) -> str:
    if config["REDIS_URL"]:
        return config["REDIS_URL"]
    data_dir = Path(config["INSTANCE_PATH"]) / "redis"
    return embedded_redis.ensure_running(data_dir, int(config.get("EMBEDDED_REDIS_PORT", EMBEDDED_REDIS_PORT)))


def build_providers(config: dict) -> dict[str, ChatProvider]:
    """One chat adapter per provider that has a key (each with its own pooled session), plus demo."""
    return registry.build(config, "chat", make_session)  # type: ignore[return-value]


def build_moderation(config: dict) -> moderation.Check:
    terms = [t.strip() for t in str(config["BLOCKLIST"]).split(",") if t.strip()]
    if config["BLOCKLIST_FILE"]:
        terms += [line.strip() for line in Path(config["BLOCKLIST_FILE"]).read_text().splitlines() if line.strip()]
    checks = [moderation.blocklist(terms)]
    if config["MODERATION"] == "openai":
        timeout = (config["UPSTREAM_CONNECT_TIMEOUT"], 10.0)
        checks.append(
            moderation.openai_moderation(config["OPENAI_BASE_URL"], config["OPENAI_API_KEY"], make_session(1), timeout)
        )
    return moderation.combine(checks)


def build_media_providers(config: dict) -> tuple[dict, dict, dict]:
    """Speech, image and music adapters for the providers that have keys, plus demo."""
    speech, images, music = (registry.build(config, kind, make_session) for kind in ("speech", "images", "music"))
    return speech, images, music


def build_media(
    config: dict, ledger: Ledger, prices: PriceTable, client: redis.Redis, queue_redis, moderate: moderation.Check
) -> MediaContext:
    speech, images, music = build_media_providers(config)
    return MediaContext(
        ledger=ledger,
        prices=prices,
        speech=speech,
        images=images,
        music=music,
        storage=make_storage(config),
        queue=Queue("media", connection=queue_redis),
        redis=client,
        markup=config["MARKUP"],
        credit_usd=config["CREDIT_USD"],
        lease_seconds=config["JOB_LEASE_SECONDS"],
        hold_ttl=config["JOB_HOLD_TTL_SECONDS"],
        retry_intervals=[int(x) for x in str(config["JOB_RETRY_INTERVALS"]).split(",") if x.strip()],
        music_poll_seconds=config["MUSIC_POLL_SECONDS"],
        music_max_wait=config["MUSIC_MAX_WAIT_SECONDS"],
        moderate=moderate,
        wait_max=config["SYNC_WAIT_MAX_SECONDS"],
        waits_per_account=config["SYNC_WAITS_PER_ACCOUNT"],
        link_secret=config["SECRET_KEY"],
        link_ttl=config["MEDIA_URL_TTL_SECONDS"],
    )


def init_web(app: Flask, redis_url: str) -> None:
    """Sessions, CSRF, rate limits (state in Redis, so correct across processes) and security headers."""
    production = app.config["BROKER_ENV"] == "production"
    app.config.setdefault("RATELIMIT_STORAGE_URI", redis_url)
    app.config.setdefault("RATELIMIT_KEY_PREFIX", "ratelimit")
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=production,
        REMEMBER_COOKIE_SECURE=production,
        REMEMBER_COOKIE_HTTPONLY=True,
        WTF_CSRF_TIME_LIMIT=None,
    )
    app.session_interface = PageSessionInterface()
    csp = {**CSP, "form-action": f"'self' {app.config['STRIPE_CHECKOUT_ORIGIN']}"}
    with pages_only(app):
        login_manager.init_app(app)
        login_manager.login_view = "auth.login"
        csrf.init_app(app)

    # After-request functions run in reverse order of registration, so this one runs after
    # flask-limiter's, which would replace a view's own Retry-After with its window's end.
    @app.after_request
    def _view_retry_after(response: Response) -> Response:
        if "retry_after" in g:
            response.headers["Retry-After"] = str(g.retry_after)
        return response

    with pages_only(app):
        limiter.init_app(app)
        # One Talisman per app: it keeps its options on itself, and the CSP differs between apps.
        Talisman(
            app,
            # TLS ends at the proxy; a redirect would break API POSTs. HSTS keeps browsers on HTTPS.
            force_https=False,
            strict_transport_security=production,
            session_cookie_secure=production,
            # The checkout form answers with a redirect to Stripe's hosted page; form-action governs it too.
            content_security_policy=csp,
            referrer_policy="strict-origin-when-cross-origin",
            frame_options="DENY",
        )
    init_api_headers(app, csp, production)


def is_api_request() -> bool:
    """Whether this request was routed to the keyed API blueprint (``/v1`` less register and links)."""
    return request.blueprint == API_BLUEPRINT


class pages_only:  # noqa: N801  (used as ``with pages_only(app):``)
    """The app-wide before/after-request hooks registered inside the block skip API requests."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def __enter__(self) -> None:
        self.before = list(self.app.before_request_funcs.get(None, ()))
        self.after = list(self.app.after_request_funcs.get(None, ()))

    def __exit__(self, *_exc: object) -> None:
        funcs = self.app.before_request_funcs.setdefault(None, [])
        funcs[:] = [f if f in self.before else _skip_before(f) for f in funcs]
        funcs = self.app.after_request_funcs.setdefault(None, [])
        funcs[:] = [f if f in self.after else _skip_after(f) for f in funcs]


def _skip_before(hook: Callable[[], object]) -> Callable[[], object]:
    @wraps(hook)
    def pages_only_hook() -> object:
        return None if is_api_request() else hook()

    return pages_only_hook


def _skip_after(hook: Callable[[Response], Response]) -> Callable[[Response], Response]:
    @wraps(hook)
    def pages_only_hook(response: Response) -> Response:
        return response if is_api_request() else hook(response)

    return pages_only_hook


class PageSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, not opened on ``/v1``: the API authenticates by key, never
    by cookie, and opening one builds a signing serializer per request."""

    def open_session(self, app: Flask, request):  # type: ignore[no-untyped-def]
        if request.path.startswith("/v1/"):
            return None  # Flask then uses a null session, which refuses writes
        return super().open_session(app, request)


def init_api_headers(app: Flask, csp: dict[str, str], production: bool) -> None:
    """The headers Talisman sends on pages, on API answers too, without its per-request work."""
    fixed = {
        "Permissions-Policy": "browsing-topics=()",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "; ".join(f"{name} {value}" for name, value in csp.items()),
        "Referrer-Policy": "strict-origin-when-cross-origin",
    }

    @app.after_request
    def _api_security_headers(response: Response) -> Response:
        if is_api_request():
            response.headers.update(fixed)
            # As Talisman: HSTS in production on HTTPS (TLS ended at a trusted proxy included).
            if production and (request.is_secure or request.headers.get("X-Forwarded-Proto") == "https"):
                response.headers["Strict-Transport-Security"] = HSTS
        return response


def init_app(app: Flask) -> Services:
    config = app.config
    config["DEFAULT_LIMITS"] = Limits(
        int(config["RATE_LIMIT_PER_MINUTE"]),
        int(config["RATE_LIMIT_PER_DAY"]),
        int(Decimal(config["SPEND_LIMIT_CREDITS_PER_DAY"]) * 1_000_000),
    )
    url = redis_url(config)
    # Blocking: a request that finds every connection busy waits for one (a gevent worker holds up
    # to GUNICORN_WORKER_CONNECTIONS requests, each using a connection only for its round trips).
    pool = redis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        max_connections=config.get("REDIS_MAX_CONNECTIONS", 256),
        timeout=config.get("REDIS_POOL_TIMEOUT", 5.0),
    )
    client = redis.Redis(connection_pool=pool)
    engine = db.make_engine(config["DATABASE_URL"])
    session_factory = db.make_session_factory(engine)
    ledger = Ledger(client, hold_ttl=config["HOLD_TTL_SECONDS"])
    prices = PriceTable.load(config["PRICES_FILE"])
    providers = build_providers(config)
    moderate = build_moderation(config)
    metering = Metering(
        ledger,
        prices,
        providers,
        config["MARKUP"],
        config["CREDIT_USD"],
        moderate,
        config["MIN_OUTPUT_TOKENS"],
        progress_seconds=config["STREAM_PROGRESS_SECONDS"],
    )
    queue_redis = redis.Redis.from_url(url)
    media = build_media(config, ledger, prices, client, queue_redis, moderate)
    services = Services(
        redis_url=url,
        redis=client,
        queue_redis=queue_redis,
        engine=engine,
        db=session_factory,
        ledger=ledger,
        prices=prices,
        providers=providers,
        metering=metering,
        media=media,
        stripe=stripe_checkout.make_client(config),
        catalogue=Catalogue.from_config(config),
        mailer=make_mailer(config),
    )
    app.extensions["broker"] = services
    init_web(app, url)

    @app.teardown_appcontext
    def _remove_session(_exc) -> None:
        session_factory.remove()

    return services
