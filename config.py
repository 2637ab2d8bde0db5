"""Configuration from the environment (and a `.env` file): the only module that reads os.environ."""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

ROOT = Path(__file__).resolve().parent

ENVIRONMENTS = ("development", "production", "testing")
DEV_SECRET_KEY = "dev-only-insecure-secret"
MAKE_SECRET_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(48))"'
# Who runs the service, as the terms and privacy pages name them. Outside production, unset ones get
# these values, which the pages mark as a demo; production refuses to start without real ones.
OPERATOR_SETTINGS = ("OPERATOR_NAME", "OPERATOR_CONTACT", "OPERATOR_JURISDICTION")
DEMO_OPERATOR = {
    "OPERATOR_NAME": "Example Operator (demo)",
    "OPERATOR_CONTACT": "operator@example.invalid",
    "OPERATOR_JURISDICTION": "the demo jurisdiction (not a real one)",
}


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _check_secret_key(key: str) -> None:
    """Production's SECRET_KEY signs sessions and CSRF tokens: whoever guesses it forges them."""
    # A plain rule rather than an entropy estimate: long, varied, and not the development default.
    if len(key) < 32 or len(set(key)) < 10 or key == DEV_SECRET_KEY:
        raise RuntimeError(
            "SECRET_KEY must be a long random value when BROKER_ENV=production: at least 32 characters, "
            f"at least 10 of them different, not the development default. Make one with: {MAKE_SECRET_KEY}"
        )


def _check_operator(config: dict) -> None:
    """The terms bind the customer to a named operator: production never shows them a placeholder."""
    missing = [name for name in OPERATOR_SETTINGS if not str(config[name] or "").strip()]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} must be set when BROKER_ENV=production: the terms of use and the privacy page "
            "name the operator (legal name), a contact email and the governing law's jurisdiction"
        )
    if "@" not in config["OPERATOR_CONTACT"]:
        raise RuntimeError("OPERATOR_CONTACT must be an email address, e.g. support@broker.example.com")


def _trusted_hosts(config: dict) -> list[str] | None:
    """Flask's TRUSTED_HOSTS: the TRUSTED_HOSTS setting plus PUBLIC_URL's host; production needs one of them."""
    hosts = config["TRUSTED_HOSTS"] or []
    if isinstance(hosts, str):
        hosts = [host.strip() for host in hosts.split(",") if host.strip()]
    hosts = list(hosts)
    production = config["BROKER_ENV"] == "production"
    if config["PUBLIC_URL"]:
        public = urlsplit(config["PUBLIC_URL"])
        if public.scheme not in ("http", "https") or not public.hostname:
            raise RuntimeError("PUBLIC_URL must be an http(s) URL with a host, e.g. https://broker.example.com")
        # The public URL's host is ours by definition; in development only when a list is asked for.
        if (hosts or production) and public.hostname not in hosts:
            hosts.append(public.hostname)
    if production and not hosts:
        raise RuntimeError(
            "PUBLIC_URL (e.g. https://broker.example.com) or TRUSTED_HOSTS must be set when BROKER_ENV=production: "
            "without them the Host header a client sends would choose the links the app builds"
        )
    return hosts or None


STRIPE_CHECKOUT_ORIGIN = "https://checkout.stripe.com"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")


def _checkout_origin(config: dict) -> str:
    """Where the Checkout form's redirect may go (CSP form-action): one origin, checked, no path."""
    origin = config["STRIPE_CHECKOUT_ORIGIN"]
    if not origin:
        # A local fake Stripe (tests, development) serves its hosted page from its API's own origin.
        api = urlsplit(config["STRIPE_API_BASE"])
        origin = f"{api.scheme}://{api.netloc}" if api.hostname in LOCAL_HOSTS else STRIPE_CHECKOUT_ORIGIN
    origin = origin.rstrip("/")
    if not _ORIGIN.fullmatch(origin):
        raise RuntimeError(
            f"STRIPE_CHECKOUT_ORIGIN must be an origin (scheme, host and optional port), e.g. {STRIPE_CHECKOUT_ORIGIN}"
        )
    return origin


def load(overrides: dict | None = None) -> dict:
    """Build the Flask config mapping from the environment, then apply ``overrides``.

    Every setting and its default is listed here and in the README. Production
    fails fast without a strong ``SECRET_KEY``, without ``REDIS_URL``, without
    ``PUBLIC_URL`` or ``TRUSTED_HOSTS`` and without the ``OPERATOR_*`` settings, and never
    starts an embedded Redis. Elsewhere unset ``OPERATOR_*`` settings get marked demo values
    (``OPERATOR_DEMO`` is then true).
    """
    load_dotenv(ROOT / ".env", override=False)
    from broker.providers import registry  # here, not at the top: the broker package imports this module

    env = os.environ.get
    broker_env = (overrides or {}).get("BROKER_ENV") or env("BROKER_ENV", "development")
    if broker_env not in ENVIRONMENTS:
        raise RuntimeError(f"BROKER_ENV must be one of {', '.join(ENVIRONMENTS)}")
    instance = Path(env("INSTANCE_PATH", str(ROOT / "instance")))
    config = {
        "BROKER_ENV": broker_env,
        "INSTANCE_PATH": str(instance),
        "SECRET_KEY": env("SECRET_KEY", ""),
        "DATABASE_URL": env("DATABASE_URL", f"sqlite:///{instance / 'broker.db'}"),
        # Unset: development starts an embedded Redis-compatible server under instance/.
        "REDIS_URL": env("REDIS_URL", ""),
        # Redis connections per web process; a request holds one only during a round trip, and one
        # that finds them all busy waits for a free one (up to REDIS_POOL_TIMEOUT s) instead of failing.
        "REDIS_MAX_CONNECTIONS": int(env("REDIS_MAX_CONNECTIONS", "256")),
        "REDIS_POOL_TIMEOUT": float(env("REDIS_POOL_TIMEOUT", "5")),
        "MARKUP": Decimal(env("MARKUP", "1.8")),
        "CREDIT_USD": Decimal(env("CREDIT_USD", "0.01")),
        "PRICES_FILE": env("PRICES_FILE", str(ROOT / "broker" / "prices.json")),
        "MAX_CONTENT_LENGTH": int(env("MAX_CONTENT_LENGTH", str(1024 * 1024))),
        "HOLD_TTL_SECONDS": int(env("HOLD_TTL_SECONDS", "900")),
        "STREAM_PROGRESS_SECONDS": float(env("STREAM_PROGRESS_SECONDS", "10")),
        # A chat without max_tokens holds at least this many output tokens (or the model's limit): below it, 402.
        "MIN_OUTPUT_TOKENS": int(env("MIN_OUTPUT_TOKENS", "1024")),
        "KEY_CACHE_SECONDS": int(env("KEY_CACHE_SECONDS", "300")),
        # Per client address: more requests with unknown or revoked keys in a minute get 429 (0: off).
        "AUTH_FAILURES_PER_MINUTE": int(env("AUTH_FAILURES_PER_MINUTE", "30")),
        # Unrevoked API keys an account may hold (0: no cap).
        "MAX_KEYS_PER_ACCOUNT": int(env("MAX_KEYS_PER_ACCOUNT", "100")),
        # Idempotency-Keys an account may hold at once (24 h each), and the largest response kept for replay.
        "IDEMPOTENCY_KEYS_PER_ACCOUNT": int(env("IDEMPOTENCY_KEYS_PER_ACCOUNT", "1000")),
        "IDEMPOTENCY_MAX_BODY_BYTES": int(env("IDEMPOTENCY_MAX_BODY_BYTES", str(256 * 1024))),
        "DEMO_CREDITS": Decimal(env("DEMO_CREDITS", "1000")),
        "UPSTREAM_CONNECT_TIMEOUT": float(env("UPSTREAM_CONNECT_TIMEOUT", "5")),
        "UPSTREAM_READ_TIMEOUT": float(env("UPSTREAM_READ_TIMEOUT", "120")),
        "UPSTREAM_RETRIES": int(env("UPSTREAM_RETRIES", "2")),
        # Each provider's key and base URL (and any other setting it reads): its adapter module declares them.
        **registry.settings(env),
        "MEDIA_STORAGE": env("MEDIA_STORAGE", "local"),
        "S3_BUCKET": env("S3_BUCKET", ""),
        "S3_ENDPOINT_URL": env("S3_ENDPOINT_URL", ""),
        "MEDIA_TTL_DAYS": int(env("MEDIA_TTL_DAYS", "7")),
        # Renewed by its worker once a quarter has passed; a crashed worker's jobs are taken up after it lapses.
        "JOB_LEASE_SECONDS": int(env("JOB_LEASE_SECONDS", "60")),
        "JOB_HOLD_TTL_SECONDS": int(env("JOB_HOLD_TTL_SECONDS", "86400")),
        "JOB_RETRY_INTERVALS": env("JOB_RETRY_INTERVALS", "5,30,120"),
        "STUCK_JOB_CHECK_SECONDS": int(env("STUCK_JOB_CHECK_SECONDS", "15")),
        "MUSIC_POLL_SECONDS": float(env("MUSIC_POLL_SECONDS", "5")),
        # Media jobs in flight at once in one worker process (each in a thread, mostly waiting on its provider).
        "MEDIA_JOBS_PER_WORKER": int(env("MEDIA_JOBS_PER_WORKER", "256")),
        # Media jobs in flight at one provider across all workers; more wait for a place (0: no cap).
        "MEDIA_MAX_IN_FLIGHT_PER_PROVIDER": int(env("MEDIA_MAX_IN_FLIGHT_PER_PROVIDER", "500")),
        # A media job (one run, or one poll of a music job) still running after this is failed and released.
        "MEDIA_JOB_TIMEOUT_SECONDS": float(env("MEDIA_JOB_TIMEOUT_SECONDS", "600")),
        "MUSIC_MAX_WAIT_SECONDS": int(env("MUSIC_MAX_WAIT_SECONDS", "600")),
        # The longest a request waits for its media job (Prefer: wait, /v1/audio/speech, /v1/images/generations).
        "SYNC_WAIT_MAX_SECONDS": int(env("SYNC_WAIT_MAX_SECONDS", "180")),
        # Requests of one account waiting for jobs at once; one more is a 429 before anything is held.
        "SYNC_WAITS_PER_ACCOUNT": int(env("SYNC_WAITS_PER_ACCOUNT", "10")),
        # How long a signed link to a job's result (images' response_format=url) works without the key.
        "MEDIA_URL_TTL_SECONDS": int(env("MEDIA_URL_TTL_SECONDS", "3600")),
        "STRIPE_API_BASE": env("STRIPE_API_BASE", "https://api.stripe.com"),
        "STRIPE_SECRET_KEY": env("STRIPE_SECRET_KEY", ""),
        "STRIPE_WEBHOOK_SECRET": env("STRIPE_WEBHOOK_SECRET", ""),
        # The origin of Stripe's hosted Checkout page, the one form target the CSP allows besides the site;
        # unset: https://checkout.stripe.com, or STRIPE_API_BASE's origin when that is a fake on this machine.
        "STRIPE_CHECKOUT_ORIGIN": env("STRIPE_CHECKOUT_ORIGIN", ""),
        # 1: offer Stripe's stablecoin (USDC) payment method in Checkout beside cards.
        "STRIPE_CRYPTO": _bool(env("STRIPE_CRYPTO")),
        "CREDIT_PACKS_USD": env("CREDIT_PACKS_USD", "5,20,100"),
        "CHECKOUT_MIN_USD": Decimal(env("CHECKOUT_MIN_USD", "5")),
        "CHECKOUT_MAX_USD": Decimal(env("CHECKOUT_MAX_USD", "1000")),
        # The base of every link the app builds (Stripe's return URL, the docs' examples); unset: the request's host.
        "PUBLIC_URL": env("PUBLIC_URL", ""),
        # Comma-separated Host names served (Flask's syntax: ".example.com" admits its subdomains); others get 400.
        "TRUSTED_HOSTS": env("TRUSTED_HOSTS", ""),
        "COINBASE_WEBHOOK_SECRET": env("COINBASE_WEBHOOK_SECRET", ""),
        "RAPIDAPI_SECRET": env("RAPIDAPI_SECRET", ""),
        # Requests per minute per RapidAPI plan (X-RapidAPI-Subscription), as JSON.
        "RAPIDAPI_PLANS": env(
            "RAPIDAPI_PLANS", '{"BASIC": 30, "PRO": 300, "ULTRA": 1200, "MEGA": 6000, "CUSTOM": 600}'
        ),
        "TRIAL_CREDITS": Decimal(env("TRIAL_CREDITS", "0")),
        # Per API key, unless the key has its own (flask broker limit-key).
        "RATE_LIMIT_PER_MINUTE": int(env("RATE_LIMIT_PER_MINUTE", "600")),
        "RATE_LIMIT_PER_DAY": int(env("RATE_LIMIT_PER_DAY", "100000")),
        "SPEND_LIMIT_CREDITS_PER_DAY": Decimal(env("SPEND_LIMIT_CREDITS_PER_DAY", "0")),
        "REGISTER_RATE_LIMIT": env("REGISTER_RATE_LIMIT", "5/hour"),
        # The demo provider is on when no provider key is set, or when DEMO_PROVIDER=1.
        "DEMO_PROVIDER": env("DEMO_PROVIDER", ""),
        "LOG_LEVEL": env("LOG_LEVEL", "INFO"),
        # Proxies in front of the app that set X-Forwarded-For/-Proto/-Host (per-IP limits need it).
        "PROXY_HOPS": int(env("PROXY_HOPS", "0")),
        "SENTRY_DSN": env("SENTRY_DSN", ""),
        # Comma-separated words or phrases refused in prompts (BLOCKLIST_FILE: one a line).
        "BLOCKLIST": env("BLOCKLIST", ""),
        "BLOCKLIST_FILE": env("BLOCKLIST_FILE", ""),
        # "openai": check chat, image and music prompts with OpenAI's moderation endpoint first.
        "MODERATION": env("MODERATION", ""),
        # /metrics answers only with "Authorization: Bearer METRICS_TOKEN"; unset: /metrics is off.
        "METRICS_TOKEN": env("METRICS_TOKEN", ""),
        "ALERT_WEBHOOK_URL": env("ALERT_WEBHOOK_URL", ""),
        "ALERT_WINDOW_SECONDS": int(env("ALERT_WINDOW_SECONDS", "900")),
        "ALERT_UPSTREAM_ERROR_RATE": float(env("ALERT_UPSTREAM_ERROR_RATE", "0.2")),
        "ALERT_FAILED_JOBS": int(env("ALERT_FAILED_JOBS", "5")),
        "EMBEDDED_REDIS_PORT": int(env("EMBEDDED_REDIS_PORT", "6390")),
        # smtp://[user:password@]host[:587] (STARTTLS required) or smtps://…[:465]; unset: files under instance/mail/.
        "MAIL_URL": env("MAIL_URL", ""),
        "MAIL_FROM": env("MAIL_FROM", "AI API Broker <no-reply@localhost>"),
        # A PEM bundle of a private CA that signs the SMTP server's certificate; unset: the system's CAs.
        "MAIL_TLS_CA_FILE": env("MAIL_TLS_CA_FILE", ""),
        # The terms and privacy pages: the operator's legal name, contact email, and governing law.
        **{name: env(name, "").strip() for name in OPERATOR_SETTINGS},
    }
    config.update(overrides or {})
    if isinstance(config["RAPIDAPI_PLANS"], str):
        config["RAPIDAPI_PLANS"] = {k.upper(): int(v) for k, v in json.loads(config["RAPIDAPI_PLANS"]).items()}
    if config["BROKER_ENV"] == "production":
        if not config["SECRET_KEY"]:
            raise RuntimeError("SECRET_KEY must be set when BROKER_ENV=production")
        _check_secret_key(config["SECRET_KEY"])
        if not config["REDIS_URL"]:
            raise RuntimeError("REDIS_URL must be set when BROKER_ENV=production")
        if not config["MAIL_URL"]:
            raise RuntimeError(
                "MAIL_URL must be set when BROKER_ENV=production (e.g. smtps://USER:PASSWORD@smtp.example.com): "
                "sign-up and password links are sent by email"
            )
        _check_operator(config)
    elif not config["SECRET_KEY"]:
        config["SECRET_KEY"] = DEV_SECRET_KEY
    config["OPERATOR_DEMO"] = not all(config[name] for name in OPERATOR_SETTINGS)
    for name in OPERATOR_SETTINGS:
        config[name] = config[name] or DEMO_OPERATOR[name]
    config["TRUSTED_HOSTS"] = _trusted_hosts(config)
    config["STRIPE_CHECKOUT_ORIGIN"] = _checkout_origin(config)
    no_keys = not any(config[k] for k in registry.key_settings())
    config["DEMO_PROVIDER"] = _bool(str(config["DEMO_PROVIDER"]), default=no_keys)
    config["TESTING"] = config["BROKER_ENV"] == "testing"
    return config
