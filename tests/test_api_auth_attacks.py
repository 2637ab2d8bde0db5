"""API-key authentication under attack: guessed keys cost Redis nothing lasting, revocation is immediate.

Written as an attacker would try it: keys with a valid checksum (the format is public)
sent in bulk, one client and several, and requests racing a revocation. The race is
held open deterministically at the one place it can happen, between the key's SQL read
and the cache fill, by pausing the request thread in a SQLAlchemy engine event.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
import requests
from sqlalchemy import event

from broker import accounts, keys, limits
from broker.limits import Limits
from tests.conftest import make_tenant
from tests.test_cluster import cluster  # noqa: F401  (its three-node Redis Cluster fixture)

CLIENT_A = {"REMOTE_ADDR": "203.0.113.7"}
CLIENT_B = {"REMOTE_ADDR": "198.51.100.9"}


def guess(client, environ: dict | None = None):
    return client.get("/v1/balance", headers={"X-API-Key": keys.generate()}, environ_base=environ or CLIENT_A)


def new_keys(r: redis.Redis, before: set[str]) -> set[str]:
    return {k for k in r.scan_iter("*")} - before


# -- item 6: unknown keys -----------------------------------------------------------


def test_300_guessed_keys_leave_no_rate_counters_only_a_per_client_counter(app, client):
    app.config["AUTH_FAILURES_PER_MINUTE"] = 1000  # all 401 here: the growth alone is measured
    r = app.extensions["broker"].redis
    before = set(r.scan_iter("*"))
    answers = [guess(client) for _ in range(300)]
    assert {a.status_code for a in answers} == {401}
    assert {a.json["error"]["code"] for a in answers} == {"invalid_api_key"}
    grown = new_keys(r, before)
    assert not [k for k in grown if k.startswith("rl:")]  # nothing counted for keys nobody owns
    counters = {k for k in grown if k.startswith(limits.FAILURES)}
    assert 1 <= len(counters) <= 2  # one per client and minute (two if the minute turned)
    for name in grown:  # everything else is a brief negative cache entry
        ttl = r.ttl(name)
        assert 0 < ttl <= (limits.MINUTE_COUNTER_TTL if name in counters else keys.UNKNOWN_KEY_CACHE_SECONDS)
    time.sleep(keys.UNKNOWN_KEY_CACHE_SECONDS + 1)
    assert len(new_keys(r, before)) <= 2


def test_a_guessing_client_gets_429_and_no_more_lookups_while_known_keys_still_work(app, client, tenant):
    limit = app.config["AUTH_FAILURES_PER_MINUTE"]
    assert limit == 30
    r = app.extensions["broker"].redis
    cached = client.get("/v1/balance", headers=tenant.headers, environ_base=CLIENT_A)
    assert cached.status_code == 200  # the tenant's key is in use (cached) on the same address
    before = set(r.scan_iter("*"))
    lookups = []

    def count_lookups(conn, cursor, statement, *args) -> None:
        if "FROM api_keys" in statement:
            lookups.append(statement)

    engine = app.extensions["broker"].engine
    event.listen(engine, "after_cursor_execute", count_lookups)
    try:
        answers = [guess(client) for _ in range(300)]
        first, rest = answers[:limit], answers[limit:]
        assert [a.status_code for a in first] == [401] * limit
        assert {a.status_code for a in rest} == {429}
        assert rest[0].json["error"]["code"] == "too_many_failed_authentications"
        assert 0 < int(rest[0].headers["Retry-After"]) <= 60
        assert len(lookups) <= limit + 1  # past the limit, guesses cost no SQL (+1: a minute may turn)
    finally:
        event.remove(engine, "after_cursor_execute", count_lookups)
    assert len(new_keys(r, before)) <= limit + 2
    # Another address is not affected, and the blocked address's key in use keeps working.
    other = make_tenant()
    assert client.get("/v1/balance", headers=other.headers, environ_base=CLIENT_B).status_code == 200
    assert guess(client, CLIENT_B).status_code == 401
    assert client.get("/v1/balance", headers=tenant.headers, environ_base=CLIENT_A).status_code == 200


def test_a_revoked_key_counts_as_a_failure_too(app, client, tenant):
    app.config["AUTH_FAILURES_PER_MINUTE"] = 3
    svc = app.extensions["broker"]
    keys.revoke_key(svc.db(), svc.redis, tenant.account_id, tenant.key_id)
    statuses = [client.get("/v1/balance", headers=tenant.headers, environ_base=CLIENT_A).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]


class CountingConnection(redis.Connection):
    """A redis-py connection that counts what it sends: one send is one round trip."""

    sends = 0

    def send_packed_command(self, command, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)


def test_a_cached_known_key_costs_one_redis_round_trip(app, redis_server, tenant):
    svc = app.extensions["broker"]
    pool = redis.ConnectionPool(port=redis_server.port, decode_responses=True, connection_class=CountingConnection)
    counted = redis.Redis(connection_pool=pool)
    defaults = Limits(100, 1000, 0)
    keys.authenticate(counted, svc.db, tenant.key, 300, defaults)  # the miss: fills the cache
    CountingConnection.sends = 0
    caller, headers = keys.authenticate(counted, svc.db, tenant.key, 300, defaults)
    assert caller.account_id == tenant.account_id and headers["X-RateLimit-Remaining"] == "98"
    assert CountingConnection.sends == 1


def test_the_auth_script_keys_share_one_cluster_slot():
    from redis.crc import key_slot

    digest = keys.hash_key(keys.generate())
    names = [keys.cache_key(digest), *limits.counter_keys(keys.key_tag(digest), time.time())]
    assert len({key_slot(name.encode()) for name in names}) == 1


# -- item 6: keys per account -----------------------------------------------------


def test_an_account_cannot_hold_more_than_the_cap_of_active_keys(app, tenant):
    from broker.errors import Conflict

    session = app.extensions["broker"].db()
    account = accounts.get_by_email(session, tenant.email)
    keys.create_key(session, account, "two", max_active=3)
    row, _ = keys.create_key(session, account, "three", max_active=3)
    with pytest.raises(Conflict) as refused:
        keys.create_key(session, account, "four", max_active=3)
    assert refused.value.status == 409 and refused.value.code == "too_many_keys"
    keys.revoke_key(session, app.extensions["broker"].redis, tenant.account_id, row.id)
    keys.create_key(session, account, "four", max_active=3)  # a revoked key frees its place


def test_the_dashboard_shows_the_key_cap_instead_of_failing(app, client):
    from tests.test_dashboard import PASSWORD, csrf_from, login

    app.config["MAX_KEYS_PER_ACCOUNT"] = 2
    tenant = make_tenant()
    session = app.extensions["broker"].db()
    from werkzeug.security import generate_password_hash

    accounts.get_by_email(session, tenant.email).password_hash = generate_password_hash(PASSWORD)
    session.commit()
    login(client, tenant.email)
    token = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    assert "brk_live_" in client.post("/dashboard/keys", data={"name": "second"}, headers=hx).get_data(as_text=True)
    refused = client.post("/dashboard/keys", data={"name": "third"}, headers=hx)
    # 422 with the keys fragment and the reason in it: htmx swaps it in place (see base.html).
    assert refused.status_code == 422 and "already has 2 active API keys" in refused.get_data(as_text=True)
    assert "<html" not in refused.get_data(as_text=True)
    plain = client.post("/dashboard/keys", data={"name": "third", "csrf_token": token})
    assert plain.status_code == 422 and "already has 2 active API keys" in plain.get_data(as_text=True)


# -- item 7: revocation is immediate ------------------------------------------------


class HeldLookup:
    """Pauses the first API-key SQL read made by another thread, right after it returns its row."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.main = threading.get_ident()
        self.read = threading.Event()
        self.release = threading.Event()

    def __enter__(self) -> HeldLookup:
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        event.remove(self.engine, "after_cursor_execute", self._after)

    def _after(self, conn, cursor, statement, *args) -> None:
        if threading.get_ident() != self.main and "FROM api_keys" in statement and not self.read.is_set():
            self.read.set()
            assert self.release.wait(10)


def _request_in_thread(client, tenant) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(client.get("/v1/balance", headers=tenant.headers)))
    thread.start()
    return thread, answers


def test_a_request_that_read_the_key_before_revocation_cannot_bring_it_back(app, client, tenant):
    svc = app.extensions["broker"]
    with HeldLookup(svc.engine) as held:
        thread, answers = _request_in_thread(client, tenant)
        assert held.read.wait(10)  # the request has read the live row and not yet filled the cache
        keys.revoke_key(svc.db(), svc.redis, tenant.account_id, tenant.key_id)
        held.release.set()
        thread.join(10)
    assert answers[0].status_code == 401  # its fill lost to the tombstone
    assert [client.get("/v1/balance", headers=tenant.headers).status_code for _ in range(3)] == [401] * 3


def test_a_request_that_read_old_limits_cannot_bring_them_back(app, client, tenant):
    svc = app.extensions["broker"]
    with HeldLookup(svc.engine) as held:
        thread, answers = _request_in_thread(client, tenant)
        assert held.read.wait(10)
        keys.set_limits(svc.db(), svc.redis, tenant.key_id, 5, None, None)
        held.release.set()
        thread.join(10)
    assert answers[0].headers["X-RateLimit-Limit"] == "5"
    assert client.get("/v1/balance", headers=tenant.headers).headers["X-RateLimit-Limit"] == "5"


def test_no_request_after_revoke_returns_ever_succeeds(app, live_server):
    app.config["AUTH_FAILURES_PER_MINUTE"] = 0  # refusals stay 401s over the many trials
    svc = app.extensions["broker"]
    session = svc.db()
    tenant = make_tenant()
    account = accounts.get_by_email(session, tenant.email)
    http = requests.Session()
    late_successes = 0
    for trial in range(100):
        row, plain = keys.create_key(session, account, f"trial {trial}", max_active=0)
        start = threading.Barrier(2)
        racing: list[int] = []

        def call(plain: str = plain, racing: list[int] = racing, start: threading.Barrier = start) -> None:
            with requests.Session() as own:
                start.wait()
                racing.append(
                    own.get(f"{live_server}/v1/balance", headers={"X-API-Key": plain}, timeout=10).status_code
                )

        thread = threading.Thread(target=call)
        thread.start()
        start.wait()
        time.sleep((trial % 10) / 2000)  # spread the revocation over the request's lookup
        keys.revoke_key(session, svc.redis, tenant.account_id, row.id)
        after = [http.get(f"{live_server}/v1/balance", headers={"X-API-Key": plain}, timeout=10) for _ in range(2)]
        late_successes += sum(a.status_code == 200 for a in after)
        thread.join(10)
        assert racing and racing[0] in (200, 401)
    assert late_successes == 0


def test_authentication_runs_unchanged_on_redis_cluster(request, tmp_path):
    """The script's keys share a slot and the refusal's pipeline spans nodes: all of it on a real cluster."""
    from redis.cluster import RedisCluster

    from broker import db, migrations
    from broker.errors import AuthenticationFailed

    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    migrations.upgrade(url)
    sessions = db.make_session_factory(db.make_engine(url))
    account = accounts.create_account(sessions(), "cluster@example.com")
    row, plain = keys.create_key(sessions(), account, "on a cluster")
    ports = request.getfixturevalue("cluster")
    client = RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
    defaults = Limits(100, 1000, 0)
    for remaining in ("99", "98"):  # a miss (SQL, fill) and a hit
        caller, headers = keys.authenticate(client, sessions, plain, 300, defaults, "192.0.2.1")
        assert caller.key_id == row.id and headers["X-RateLimit-Remaining"] == remaining
    with pytest.raises(AuthenticationFailed):
        keys.authenticate(client, sessions, keys.generate(), 300, defaults, "192.0.2.1")
    keys.set_limits(sessions(), client, row.id, 7, None, None)
    assert keys.authenticate(client, sessions, plain, 300, defaults, "192.0.2.1")[1]["X-RateLimit-Limit"] == "7"
    keys.revoke_key(sessions(), client, account.id, row.id)
    with pytest.raises(AuthenticationFailed):
        keys.authenticate(client, sessions, plain, 300, defaults, "192.0.2.1")
    client.close()
