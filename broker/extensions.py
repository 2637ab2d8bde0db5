"""Shared clients of one app: Redis, SQL sessions, the ledger, prices and providers, behind one accessor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis
from flask import Flask, current_app
from sqlalchemy.engine import Engine
from sqlalchemy.orm import scoped_session

from broker import db, embedded_redis
from broker.chat import Metering
from broker.ledger import Ledger
from broker.pricing import PriceTable
from broker.providers.anthropic import AnthropicProvider
from broker.providers.base import ChatProvider
from broker.providers.demo import DemoProvider
from broker.providers.gemini import GeminiProvider
from broker.providers.http import make_session
from broker.providers.openai import OpenAIProvider

EMBEDDED_REDIS_PORT = 6390


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


def services() -> Services:
    """The current app's shared clients."""
    return current_app.extensions["broker"]


def redis_url(config: dict) -> str:
    if config["REDIS_URL"]:
        return config["REDIS_URL"]
    data_dir = Path(config["INSTANCE_PATH"]) / "redis"
    return embedded_redis.ensure_running(data_dir, int(config.get("EMBEDDED_REDIS_PORT", EMBEDDED_REDIS_PORT)))


def build_providers(config: dict) -> dict[str, ChatProvider]:
    """One adapter per provider that has a key (each with its own pooled session), plus demo."""
    timeout = (config["UPSTREAM_CONNECT_TIMEOUT"], config["UPSTREAM_READ_TIMEOUT"])
    retries = config["UPSTREAM_RETRIES"]
    providers: dict[str, ChatProvider] = {}
    for name, cls, base, key in (
        ("openai", OpenAIProvider, "OPENAI_BASE_URL", "OPENAI_API_KEY"),
        ("anthropic", AnthropicProvider, "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
        ("gemini", GeminiProvider, "GEMINI_BASE_URL", "GOOGLE_API_KEY"),
    ):
        if config[key]:
            providers[name] = cls(config[base], config[key], make_session(retries), timeout)
    if config["DEMO_PROVIDER"]:
        providers["demo"] = DemoProvider()
    return providers


def init_app(app: Flask) -> Services:
    config = app.config
    url = redis_url(config)
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        max_connections=config.get("REDIS_MAX_CONNECTIONS", 256),
    )
    engine = db.make_engine(config["DATABASE_URL"])
    session_factory = db.make_session_factory(engine)
    ledger = Ledger(client, hold_ttl=config["HOLD_TTL_SECONDS"])
    prices = PriceTable.load(config["PRICES_FILE"])
    providers = build_providers(config)
    metering = Metering(ledger, prices, providers, config["MARKUP"], config["CREDIT_USD"])
    services = Services(
        url,
        client,
        redis.Redis.from_url(url),
        engine,
        session_factory,
        ledger,
        prices,
        providers,
        metering,
    )
    app.extensions["broker"] = services

    @app.teardown_appcontext
    def _remove_session(_exc) -> None:
        session_factory.remove()

    return services
