"""The ledger's scripts and invariant: bad arguments change nothing; FLUSHALL is repaired from SQL."""

from __future__ import annotations

import pytest
import redis

from broker import ledger_scripts
from broker.ledger import keys_of
from tests.conftest import assert_invariant, make_tenant


def dump_all(client: redis.Redis) -> dict:
    return {key: client.dump(key) for key in client.keys("*")}


BAD_CALLS = {
    "HOLD": [
        ["", "1", "1", "0", "10", "1"],
        ["h1", "-5", "1", "0", "10", "1"],
        ["h1", "1", "x", "0", "10", "1"],
        ["h1", "1", "1", "0", "0", "1"],
        ["h1", "1", "1", "1.5", "10", "1"],
        ["h 1", "1", "1", "0", "10", "1"],
        ["h1", "1", "1", "0", "10", ""],
        ["h1", "9999999999999999", "1", "0", "10", "1"],
    ],
    "END": [
        ["", "0", "settle", "1", "{}", "60"],
        ["h1", "-1", "settle", "1", "{}", "60"],
        ["h1", "1", "steal", "1", "{}", "60"],
        ["h1", "1", "settle", "x", "{}", "60"],
        ["h1", "1", "settle", "1", "{}", "0"],
    ],
    "GRANT": [["0", "60"], ["-100", "60"], ["abc", "60"], ["100", "0"], ["1e5", "60"]],
    "DEBIT": [["", "5", "1", "r", "60"], ["d1", "0", "1", "r", "60"], ["d1", "5", "1", "r" * 201, "60"]],
}


@pytest.mark.parametrize(("script", "args"), [(s, a) for s, calls in BAD_CALLS.items() for a in calls])
def test_script_fed_bad_arguments_changes_no_key(app, script, args):
    svc = app.extensions["broker"]
    tenant = make_tenant("5")
    svc.ledger.hold(tenant.account_id, "h1", 100, 10, 5, 10)
    k = keys_of(tenant.account_id)
    keys_for = {
        "HOLD": [k["bal"], k["held"], k["holds"], k["log"], k["tag"] + ":end:h1"],
        "END": [k["bal"], k["held"], k["holds"], k["log"], k["tag"] + ":end:h1"],
        "GRANT": [k["bal"], k["tag"] + ":grant:g1"],
        "DEBIT": [k["bal"], k["log"], k["tag"] + ":debit:d1"],
    }[script]
    before = dump_all(svc.redis)
    with pytest.raises(redis.ResponseError, match="ledger: bad argument"):
        svc.redis.eval(getattr(ledger_scripts, script), len(keys_for), *keys_for, *args)
    assert dump_all(svc.redis) == before


def test_hold_settle_release_keep_the_invariant_to_the_ucr(app):
    svc = app.extensions["broker"]
    tenant = make_tenant("1")
    ledger = svc.ledger
    a = ledger.hold(tenant.account_id, "a", 1000, 7, 100, 500)
    b = ledger.hold(tenant.account_id, "b", 1000, 7, 0, 500)  # as many tokens as affordable, ≤ 500
    assert (a.amount, b.amount, b.max_tokens) == (1700, 4500, 500)
    assert ledger.balance(tenant.account_id) == 1_000_000 - 6200
    assert ledger.end_hold(tenant.account_id, "a", 1234, {"request_id": "a"}).charged == 1234
    assert ledger.end_hold(tenant.account_id, "a", 1234, {"request_id": "a"}).status == "replay"
    assert ledger.end_hold(tenant.account_id, "b", 99_999, {"request_id": "b"}).charged == 4500  # never above the hold
    assert ledger.release(tenant.account_id, "nope", {"request_id": "nope"}).status == "unknown"
    assert ledger.balance(tenant.account_id) == 1_000_000 - 1234 - 4500
    assert_invariant(app)


def test_hold_without_max_tokens_is_capped_by_what_the_balance_affords(app):
    ledger = app.extensions["broker"].ledger
    tenant = make_tenant("0.001")  # 1,000 µcr
    hold = ledger.hold(tenant.account_id, "h", 100, 7, 0, 4096)
    assert hold.ok and hold.max_tokens == (1000 - 100) // 7
    assert ledger.balance(tenant.account_id) == 1000 - 100 - 7 * hold.max_tokens
    refused = ledger.hold(tenant.account_id, "h2", 100, 7, 0, 4096)
    assert not refused.ok and ledger.balance(tenant.account_id) == 1000 - 100 - 7 * hold.max_tokens


def test_debit_never_goes_below_zero_and_is_applied_once(app):
    ledger = app.extensions["broker"].ledger
    tenant = make_tenant("0.5")
    session = app.extensions["broker"].db()
    assert ledger.debit(session, tenant.account_id, 2_000_000, "refund-1", "refund") == (True, 500_000, 0)
    assert ledger.debit(session, tenant.account_id, 2_000_000, "refund-1", "refund") == (False, 500_000, 0)
    assert_invariant(app)


def test_grant_is_applied_once_per_grant_id(app):
    svc = app.extensions["broker"]
    tenant = make_tenant("0")
    svc.ledger.grant(svc.db(), tenant.account_id, 700, "same", "x")
    svc.ledger.grant(svc.db(), tenant.account_id, 700, "same", "x")
    assert svc.ledger.balance(tenant.account_id) == 700
    assert_invariant(app)


def test_flushall_is_repaired_from_sql_by_reconcile(app, client, runner, upstream):
    svc = app.extensions["broker"]
    tenants = [make_tenant("3"), make_tenant("7.25")]
    for tenant in tenants:
        for _ in range(3):
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": "openai/gpt-4o-mini",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 9,
                },
                headers=tenant.headers,
            )
            assert response.status_code == 200
    svc.ledger.hold(tenants[0].account_id, "in-flight", 500, 1, 10, 10)  # a hold that Redis will lose
    svc.ledger.drain(svc.db())  # what the worker's cron does every 2 s
    balances = [svc.ledger.balance(t.account_id) for t in tenants]
    svc.redis.flushall()

    broken = runner.invoke(args=["broker", "reconcile"])
    assert broken.exit_code == 1
    assert f"account {tenants[0].account_id}:" in broken.output
    repaired = runner.invoke(args=["broker", "reconcile", "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert [svc.ledger.balance(t.account_id) for t in tenants] == [balances[0] + 510, balances[1]]
    clean = runner.invoke(args=["broker", "reconcile"])
    assert clean.exit_code == 0 and clean.output.strip() == "ledger consistent"
    # Keys were flushed too: the next request re-caches from SQL and is charged normally.
    again = client.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 9},
        headers=tenants[1].headers,
    )
    assert again.status_code == 200
    assert_invariant(app)


def test_replayed_grant_and_debit_change_nothing_after_redis_lost_its_data(app, runner):
    svc = app.extensions["broker"]
    tenant = make_tenant("0")
    session = svc.db()
    svc.ledger.grant(session, tenant.account_id, 5_000_000, "purchase-1", "a purchase")
    svc.ledger.debit(session, tenant.account_id, 1_000_000, "refund-1", "a refund")
    svc.ledger.drain(session, [tenant.account_id])
    svc.redis.flushall()
    assert runner.invoke(args=["broker", "reconcile", "--repair"]).exit_code == 0
    assert svc.ledger.balance(tenant.account_id) == 4_000_000
    # Payment providers retry: neither the grant nor the refund may apply twice.
    svc.ledger.grant(session, tenant.account_id, 5_000_000, "purchase-1", "a purchase")
    assert svc.ledger.debit(session, tenant.account_id, 1_000_000, "refund-1", "a refund") == (
        False,
        1_000_000,
        4_000_000,
    )
    assert svc.ledger.balance(tenant.account_id) == 4_000_000
    assert_invariant(app)


def test_a_drain_that_fails_keeps_the_account_marked_and_the_next_drain_copies_all(app):
    """Issue 10 item 9: the dirty flag was cleared before the copy, so a failed copy stranded entries."""
    import sqlalchemy
    from sqlalchemy import text

    from broker.ledger import DIRTY

    tenant = make_tenant("5")
    svc = app.extensions["broker"]
    session = svc.db()
    svc.ledger.drain(session)
    assert svc.ledger.hold(tenant.account_id, "h-drain", 1000, 0, 0, 1).ok
    stream = keys_of(tenant.account_id)["log"]
    assert svc.redis.xlen(stream) == 1
    session.close()
    with svc.engine.begin() as sql:  # SQL "down" for the ledger table: a real failure, not a stand-in
        sql.execute(text("ALTER TABLE ledger_entries RENAME TO ledger_entries_away"))
    try:
        with pytest.raises(sqlalchemy.exc.DBAPIError):
            svc.ledger.drain(svc.db())
        assert str(tenant.account_id) in svc.redis.smembers(DIRTY)  # still marked
        assert svc.redis.xlen(stream) == 1  # nothing lost, nothing deleted
    finally:
        svc.db().close()
        with svc.engine.begin() as sql:
            sql.execute(text("ALTER TABLE ledger_entries_away RENAME TO ledger_entries"))
    assert svc.ledger.drain(svc.db()) == 1  # the next drain, with no new write to the account
    assert svc.redis.xlen(stream) == 0 and str(tenant.account_id) not in svc.redis.smembers(DIRTY)
    assert_invariant(app)


def test_repair_refuses_while_requests_are_in_flight(app, runner):
    """Issue 10 item 7: repair under live traffic dropped the settles of holds in flight."""
    tenant = make_tenant("5")
    ledger = app.extensions["broker"].ledger
    assert ledger.hold(tenant.account_id, "in-flight", 1000, 0, 0, 1).ok
    refused = runner.invoke(args=["broker", "reconcile", "--repair"])
    assert refused.exit_code != 0 and "in flight" in refused.output
    assert ledger.snapshot(tenant.account_id)["holds"] == {"in-flight": 1000}  # untouched
    assert runner.invoke(args=["broker", "reconcile"]).exit_code == 0  # checking is always allowed
    ledger.release(tenant.account_id, "in-flight", {"request_id": "in-flight", "status": "error"})
    assert runner.invoke(args=["broker", "reconcile", "--repair"]).exit_code == 0
    assert_invariant(app)
