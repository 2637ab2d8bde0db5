"""The operator CLI keeps its exact names and outputs."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from broker import keys, migrations
from broker.db import Base


def test_create_user_key_grant_balance(runner, client):
    created = runner.invoke(args=["broker", "create-user", "Ops@Example.com", "--password", "s3cret-pass"])
    assert created.exit_code == 0 and "ops@example.com" in created.output
    key = runner.invoke(args=["broker", "create-key", "ops@example.com", "--name", "ci"])
    assert key.exit_code == 0
    assert keys.well_formed(key.output.strip()) and key.output.count("\n") == 1
    granted = runner.invoke(args=["broker", "grant", "ops@example.com", "12.345678", "--reason", "welcome"])
    assert granted.exit_code == 0, granted.output
    balance = runner.invoke(args=["broker", "balance", "ops@example.com"])
    assert balance.output.strip() == "12.345678"
    api = client.get("/v1/balance", headers={"X-API-Key": key.output.strip()}).json
    assert api["available_credits"] == "12.345678" and api["available_ucr"] == 12_345_678


def test_cli_refuses_bad_input_and_changes_nothing(runner):
    runner.invoke(args=["broker", "create-user", "a@example.com"])
    assert runner.invoke(args=["broker", "create-user", "a@example.com"]).exit_code != 0
    assert runner.invoke(args=["broker", "create-user", "not-an-email"]).exit_code != 0
    assert runner.invoke(args=["broker", "grant", "a@example.com", "1.0000001"]).exit_code != 0
    assert runner.invoke(args=["broker", "grant", "a@example.com", "-5"]).exit_code != 0
    assert runner.invoke(args=["broker", "grant", "nobody@example.com", "5"]).exit_code != 0
    assert runner.invoke(args=["broker", "create-key", "nobody@example.com"]).exit_code != 0
    assert runner.invoke(args=["broker", "balance", "a@example.com"]).output.strip() == "0.000000"


def test_reconcile_reports_consistent_ledger(runner):
    runner.invoke(args=["broker", "create-user", "b@example.com"])
    runner.invoke(args=["broker", "grant", "b@example.com", "3"])
    result = runner.invoke(args=["broker", "reconcile"])
    assert result.exit_code == 0 and result.output.strip() == "ledger consistent"


def test_migrate_reaches_a_schema_identical_to_the_models(tmp_path, runner, app):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    migrations.upgrade(url)
    with create_engine(url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    result = runner.invoke(args=["broker", "migrate"])
    assert result.exit_code == 0 and "head" in result.output


def test_create_key_keeps_to_the_cap_on_active_keys(runner, app):
    app.config["MAX_KEYS_PER_ACCOUNT"] = 2
    created = runner.invoke(args=["broker", "create-user", "capped@example.com"])
    assert "emailed link" in created.output  # no password: how its owner gets one
    made = [runner.invoke(args=["broker", "create-key", "capped@example.com"]) for _ in range(3)]
    assert [m.exit_code for m in made[:2]] == [0, 0] and made[2].exit_code != 0
    assert "already has 2 active API keys" in made[2].output
    assert not keys.well_formed(made[2].output.strip())
