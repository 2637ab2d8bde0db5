"""One place per provider: adapter modules declare themselves, and nothing else names a provider.

The registry (``broker.providers.registry``) finds each module's ``ADAPTERS``; the app's
settings, the demo switch and the adapters it builds come from there. These tests check that
every priced model has an adapter of its kind, that the settings an adapter declares reach the
configuration from the environment, and that the chat and media paths name no provider.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import config as broker_config
from broker.providers import registry

ROOT = Path(__file__).resolve().parent.parent
PRICE_KIND_TO_ADAPTER = {"chat": "chat", "embedding": "chat", "tts": "speech", "image": "images", "music": "music"}


def test_every_priced_model_has_an_adapter_of_its_kind():
    table = json.loads((ROOT / "broker" / "prices.json").read_text())["models"]
    declared = {(a.kind, a.provider) for a in registry.adapters()}
    missing = {
        model
        for model, row in table.items()
        if (PRICE_KIND_TO_ADAPTER[row["kind"]], model.split("/")[0]) not in declared
    }
    assert missing == set()


def test_an_adapters_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SUNO_BASE_URL", "https://music.example/api")
    monkeypatch.setenv("SUNO_API_KEY", "suno-key")
    config = broker_config.load({"BROKER_ENV": "testing"})
    assert config["SUNO_BASE_URL"] == "https://music.example/api" and config["SUNO_API_KEY"] == "suno-key"
    assert config["DEMO_PROVIDER"] is False  # a provider key is set: no demo by default
    built = registry.build(config, "music", lambda retries: __import__("requests").Session())
    assert set(built) == {"suno"}


def test_with_no_provider_key_the_demo_adapters_are_on(monkeypatch):
    for name in registry.key_settings():
        monkeypatch.setenv(name, "")
    config = broker_config.load({"BROKER_ENV": "testing"})
    assert config["DEMO_PROVIDER"] is True
    assert {kind: set(registry.build(config, kind, lambda r: None)) for kind in registry.KINDS} == {
        kind: {"demo"} for kind in registry.KINDS
    }


def test_the_chat_and_media_paths_name_no_provider():
    providers = {a.provider for a in registry.adapters()}
    # (extensions.py and config.py name "openai" only as a MODERATION backend, which is not an adapter.)
    for module in ("chat.py", "media.py"):
        source = (ROOT / "broker" / module).read_text()
        named = {p for p in providers if re.search(rf"""["']{p}["']""", source)}
        assert named == set(), f"{module} names {named}"
