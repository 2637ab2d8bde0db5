"""Which provider adapters exist: each provider module declares its own, and this module finds them.

A module in ``broker/providers/`` that serves a provider ends with ``ADAPTERS``: one
``Adapter`` per kind it serves (``chat``, ``speech``, ``images``, ``music``), naming the
setting that holds its key and the other settings it reads, with their defaults. The app's
configuration, the demo switch and the adapters the app builds all come from these lists, so
adding a provider is one new module here plus its rows in the price table; nothing else in
the broker names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import requests

KINDS = ("chat", "speech", "images", "music")

# (config, pooled session, (connect, read) timeout) -> the adapter
Build = Callable[[Mapping[str, Any], requests.Session, tuple[float, float]], object]


@dataclass(frozen=True)
class Adapter:
    kind: str
    provider: str  # the price table's provider name
    build: Build
    key_setting: str | None  # None: a demo stand-in, on when DEMO_PROVIDER is
    settings: Mapping[str, str] = field(default_factory=dict)  # other settings it reads, with defaults
    transport_retries: bool = True  # False: the session does not retry (e.g. a 429 that means "out of credits")


def standard(cls: type, base_url_setting: str, key_setting: str) -> Build:
    """The usual constructor: ``cls(base_url, api_key, session, timeout)``."""
    return lambda config, session, timeout: cls(config[base_url_setting], config[key_setting], session, timeout)


@cache
def adapters() -> tuple[Adapter, ...]:
    """Every adapter the provider modules declare, in module order."""
    from broker import providers

    found: list[Adapter] = []
    for module in sorted(info.name for info in pkgutil.iter_modules(providers.__path__)):
        found.extend(getattr(importlib.import_module(f"broker.providers.{module}"), "ADAPTERS", ()))
    unknown = {a.kind for a in found} - set(KINDS)
    if unknown:
        raise RuntimeError(f"unknown adapter kinds: {sorted(unknown)}")
    return tuple(found)


def settings(env: Callable[[str, str], str]) -> dict[str, str]:
    """The adapters' settings from the environment: each key (empty when unset) and each other setting."""
    values: dict[str, str] = {}
    for adapter in adapters():
        if adapter.key_setting:
            values[adapter.key_setting] = env(adapter.key_setting, "")
        for name, default in adapter.settings.items():
            values[name] = env(name, default)
    return values


def key_settings() -> list[str]:
    """The settings that hold a provider key (with none set, the demo provider is on by default)."""
    return sorted({a.key_setting for a in adapters() if a.key_setting})


def build(config: Mapping[str, Any], kind: str, make_session: Callable[[int], requests.Session]) -> dict[str, object]:
    """The adapters of one kind this configuration enables: those with a key, and demo when it is on."""
    timeout = (config["UPSTREAM_CONNECT_TIMEOUT"], config["UPSTREAM_READ_TIMEOUT"])
    built: dict[str, object] = {}
    for adapter in adapters():
        if adapter.kind != kind:
            continue
        if adapter.key_setting is None:
            if config["DEMO_PROVIDER"]:
                built[adapter.provider] = adapter.build(config, None, timeout)
        elif config[adapter.key_setting]:
            session = make_session(config["UPSTREAM_RETRIES"] if adapter.transport_retries else 0)
            built[adapter.provider] = adapter.build(config, session, timeout)
    return built
