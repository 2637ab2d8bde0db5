"""Every change of a balance: grant, hold, settle, release, expire, debit, drain and reconcile.

Balances live in Redis as integer micro-credits and change only inside the Lua
scripts of ``ledger_scripts``; each hot-path change appends an entry to the
account's Redis stream, which ``drain`` copies into SQL ``ledger_entries`` (unique
by entry id, so replays are harmless). Grants are written to SQL first, then
applied in Redis, so a purchase is never lost even if Redis is.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from broker import ledger_scripts, usage
from broker.models import Account, Job, LedgerEntry, Purchase, UsageRecord

log = logging.getLogger(__name__)

DIRTY = "ledger:dirty"
EXPIRY = "ledger:hold-expiry"
MARKER_TTL = 30 * 24 * 3600
DRAIN_BATCH = 500
SPEND_DAY = 86400
MAX_UCR = 10**15  # the scripts take amounts of at most 15 digits
SPEND_TTL = 2 * SPEND_DAY
# A hold script that Redis runs later than this before the caller's socket timeout belongs to
# a request that has given up (and answered): it is refused rather than left holding credits.
GIVE_UP_MARGIN = 0.5
STREAM_MAX_AGE = 30  # seconds an entry may wait in Redis before the drain copies it to SQL
HOLD_GRACE = 60  # seconds past its deadline before an open hold counts as abandoned (the reaper runs every 10 s)
LIVE_JOB = ("queued", "running")


def keys_of(account_id: int) -> dict[str, str]:
    tag = f"{{acct:{account_id}}}"
    return {
        "bal": f"{tag}:bal",
        "held": f"{tag}:held",
        "holds": f"{tag}:holds",
        "log": f"{tag}:log",
        "holdspend": f"{tag}:holdspend",  # hold id -> the spend counter its amount is reserved on
        "estimates": f"{tag}:est",  # hold id -> what a live stream has delivered so far, in µcr
        "debts": f"{tag}:debts",  # refund ref -> µcr still owed from open holds
        "debtq": f"{tag}:debtq",  # refund refs, oldest first
        "tag": tag,
    }


def spend_key(account_id: int, key_id: int, now: float) -> str:
    """The counter of what one API key spent (and holds) on one UTC day, in the account's slot."""
    return f"{{acct:{account_id}}}:spend:{key_id}:{int(now // SPEND_DAY)}"


def _end_keys(k: dict[str, str], hold_id: str) -> list[str]:
    return [
        k["bal"],
        k["held"],
        k["holds"],
        k["log"],
        f"{k['tag']}:end:{hold_id}",
        k["holdspend"],
        k["estimates"],
        k["debts"],
        k["debtq"],
        f"{k['tag']}:expired:{hold_id}",
    ]


@dataclass
class Hold:
    """A hold's outcome; when not ``ok``, ``why`` says what refused it: ``balance``, ``cap`` (the
    key's daily spend cap) or ``late`` (Redis ran it after the request gave up)."""

    ok: bool
    amount: int
    max_tokens: int
    balance: int
    why: str = ""


@dataclass
class HoldEnd:
    """Outcome of settling, releasing or expiring a hold.

    ``status``: ``ended`` (this call ended it), ``replay`` (it had already ended;
    ``charged`` is what was charged then) or ``unknown`` (no such hold).
    """

    status: str
    charged: int
    balance: int


@dataclass
class Mismatch:
    account_id: int
    what: str

    def __str__(self) -> str:
        return f"account {self.account_id}: {self.what}"


# Whether this request (or job) has sent a hold or a settle to Redis: once it has, a Redis
# error leaves the outcome unknown (the script may have run), never "nothing was charged".
MONEY_SENT: ContextVar[bool] = ContextVar("ledger_money_sent", default=False)


def money_sent() -> bool:
    """True once the current request has sent a hold, settle or release to Redis."""
    return MONEY_SENT.get()


def forget_money_sent() -> None:
    """Start a request (or job) afresh: the context may be reused from the one before."""
    MONEY_SENT.set(False)


def _now_ms() -> str:
    return str(int(time.time() * 1000))


class Ledger:
    """The ledger over one Redis connection; SQL sessions are passed in by the caller."""

    def __init__(self, client: redis.Redis, hold_ttl: int = 3600) -> None:
        self.redis = client
        self.hold_ttl = hold_ttl
        pool = getattr(client, "connection_pool", None)
        self.socket_timeout = (pool.connection_kwargs.get("socket_timeout") if pool else None) or 0
        self._sources = {
            "hold": ledger_scripts.HOLD,
            "end": ledger_scripts.END,
            "grant": ledger_scripts.GRANT,
            "debit": ledger_scripts.DEBIT,
            "snapshot": ledger_scripts.SNAPSHOT,
            "repair": ledger_scripts.REPAIR,
        }
        self._shas = {name: self._sha(src) for name, src in self._sources.items()}

    @staticmethod
    def _sha(source: str) -> str:
        import hashlib

        return hashlib.sha1(source.encode()).hexdigest()

    def _pipeline_run(self, build) -> list:
        """Run one pipelined round trip; load the scripts and retry once on NOSCRIPT.

        Retrying is safe: a NOSCRIPT reply means the script did not run, and the
        other commands in these pipelines are idempotent.
        """
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            results = pipe.execute(raise_on_error=False)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                break
            if attempt == 1:
                for source in self._sources.values():
                    self.redis.script_load(source)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _evalsha(self, pipe, name: str, keys: list[str], args: list) -> None:
        # ``execute_command``: redis-py's ClusterPipeline blocks its ``evalsha`` method, not the command.
        pipe.execute_command("EVALSHA", self._shas[name], len(keys), *keys, *args)

    def _run(self, name: str, keys: list[str], args: list) -> list:
        return self._pipeline_run(lambda p: self._evalsha(p, name, keys, args))[0]

    # -- the hot path ---------------------------------------------------------

    def hold(
        self,
        account_id: int,
        hold_id: str,
        fixed_ucr: int,
        ucr_per_token: int,
        requested_tokens: int,
        max_tokens: int,
        ttl: int | None = None,
        min_tokens: int = 1,
        key_id: int = 0,
        spend_cap_ucr: int = 0,
    ) -> Hold:
        """Reserve ``fixed + tokens × ucr_per_token`` if the balance and the key's spend cap afford it.

        With ``requested_tokens`` 0 the token count is the most the balance and the cap
        afford, at most ``max_tokens``, and the hold fails if that is under ``min_tokens``.
        The amount is reserved on the key's spend of the day until the hold ends.
        One round trip: the expiry entry, the dirty flag and the script are pipelined.
        """
        k = keys_of(account_id)
        now = time.time()
        deadline = now + (ttl or self.hold_ttl)
        give_up_ms = int((now + self.socket_timeout - GIVE_UP_MARGIN) * 1000) if self.socket_timeout else 0

        def build(pipe) -> None:
            self._evalsha(
                pipe,
                "hold",
                [
                    k["bal"],
                    k["held"],
                    k["holds"],
                    k["log"],
                    f"{k['tag']}:end:{hold_id}",
                    k["holdspend"],
                    spend_key(account_id, key_id, now),
                ],
                [
                    hold_id,
                    fixed_ucr,
                    ucr_per_token,
                    requested_tokens,
                    max_tokens,
                    _now_ms(),
                    min_tokens,
                    spend_cap_ucr,
                    SPEND_TTL,
                    give_up_ms,
                ],
            )
            pipe.zadd(EXPIRY, {f"{account_id}|{hold_id}": deadline}, nx=True)
            pipe.sadd(DIRTY, account_id)

        MONEY_SENT.set(True)
        ok, balance, amount, tokens, *why = self._pipeline_run(build)[0]
        if not ok:
            self.redis.zrem(EXPIRY, f"{account_id}|{hold_id}")
        return Hold(bool(ok), int(amount), int(tokens), int(balance), why[0] if why else "")

    def end_hold(
        self,
        account_id: int,
        hold_id: str,
        charge_ucr: int,
        receipt: dict,
        kind: str = "settle",
        extra=None,
    ) -> HoldEnd:
        """Charge ``min(charge, hold)`` and return the rest; idempotent by hold id.

        What the hold gives back pays the account's refund debts first. An ``expire`` charges
        the estimate a live stream recorded (``record_progress``); a ``settle`` that arrives
        after its hold expired books what that left uncharged as a late charge (status
        ``ended``). ``extra(pipe)`` may add commands (e.g. a key's last-used stamp) to the
        same round trip.
        """
        if isinstance(charge_ucr, bool) or not isinstance(charge_ucr, int) or not 0 <= charge_ucr < MAX_UCR:
            # Refused here, before the pipeline: its expiry removal must not run for a hold the script keeps open.
            raise ValueError(f"a charge must be a whole number of µcr from 0 to {MAX_UCR - 1}, not {charge_ucr!r}")
        k = keys_of(account_id)

        def build(pipe) -> None:
            self._evalsha(
                pipe,
                "end",
                _end_keys(k, hold_id),
                [hold_id, charge_ucr, kind, _now_ms(), json.dumps(receipt), MARKER_TTL],
            )
            pipe.zrem(EXPIRY, f"{account_id}|{hold_id}")
            pipe.sadd(DIRTY, account_id)
            if extra:
                extra(pipe)

        MONEY_SENT.set(True)
        code, charged, balance = self._pipeline_run(build)[0]
        status = {1: "ended", 2: "replay", 3: "unknown"}[code]
        return HoldEnd(status, int(charged), int(balance))

    def record_progress(self, account_id: int, hold_id: str, delivered_ucr: int, ttl: int | None = None) -> None:
        """A live request's heartbeat: what it has delivered so far, and a later deadline for its hold.

        The reaper then charges ``delivered_ucr`` if the request dies without settling, and
        does not expire a hold whose request still runs. One round trip.
        """
        k = keys_of(account_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(k["estimates"], hold_id, str(max(0, int(delivered_ucr))))
        pipe.zadd(EXPIRY, {f"{account_id}|{hold_id}": time.time() + (ttl or self.hold_ttl)}, xx=True)
        pipe.execute()

    def release(self, account_id: int, hold_id: str, receipt: dict, extra=None) -> HoldEnd:
        return self.end_hold(account_id, hold_id, 0, receipt, kind="release", extra=extra)

    def hold_state(self, account_id: int, hold_id: str) -> tuple[str, int]:
        """(``open``, amount), (``ended``, charged) or (``unknown``, 0) for one hold."""
        k = keys_of(account_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(f"{k['tag']}:end:{hold_id}")
        pipe.hget(k["holds"], hold_id)
        ended, amount = pipe.execute()
        if ended is not None:
            return "ended", int(ended)
        if amount is not None:
            return "open", int(amount)
        return "unknown", 0

    def record_metered(self, account_id: int, request_id: str, receipt: dict) -> None:
        """Log a request that is metered but not charged (a marketplace caller): no balance changes."""
        k = keys_of(account_id)
        pipe = self.redis.pipeline(transaction=False)
        fields = {"e": f"meter:{request_id}", "k": "metered", "t": "0", "h": "0", "hid": "", "ts": _now_ms()}
        pipe.xadd(k["log"], {**fields, "r": json.dumps(receipt)})
        pipe.sadd(DIRTY, account_id)
        pipe.execute()

    def balance(self, account_id: int) -> int:
        return int(self.redis.get(keys_of(account_id)["bal"]) or 0)

    # -- money in and out -----------------------------------------------------

    def grant(
        self,
        session: Session,
        account_id: int,
        amount_ucr: int,
        grant_id: str,
        reason: str,
    ) -> int:
        """Add credits exactly once per ``grant_id``: SQL entry first, then Redis.

        Only the call whose SQL insert created the entry applies it in Redis, so a
        replay changes nothing even after Redis lost its data (and the marker with it).
        If Redis fails after the SQL commit, ``reconcile --repair`` applies the grant.
        Returns the balance after.
        """
        if amount_ucr <= 0:
            raise ValueError("a grant must be positive")
        row = {
            "entry_id": f"grant:{grant_id}",
            "account_id": account_id,
            "kind": "grant",
            "total_delta": amount_ucr,
            "held_delta": 0,
            "hold_id": None,
            "reason": reason[:200],
            "created_at": datetime.now(UTC),
        }
        created = _insert_one(session, LedgerEntry, row, "entry_id")
        session.commit()
        if not created:
            return self.balance(account_id)
        k = keys_of(account_id)
        _, balance = self._run(
            "grant",
            [k["bal"], f"{k['tag']}:grant:{grant_id}"],
            [amount_ucr, MARKER_TTL],
        )
        return int(balance)

    def debit(
        self,
        session: Session,
        account_id: int,
        amount_ucr: int,
        debit_id: str,
        reason: str,
        ref: str = "",
    ) -> tuple[bool, int, int]:
        """Take back up to ``amount_ucr`` (never below zero), once per ``debit_id``.

        Returns (applied now, taken now, balance after); a replay returns (False, what was
        taken then, balance). A debit already copied to SQL is a replay even if Redis
        has since lost its marker. The entry reaches SQL through the stream, drained at once.
        With a ``ref`` (``purchase_ref``), what the balance lacks is owed from the open
        holds as they end, and the drain books what is taken and what was already spent on
        that purchase (``refunded_ucr``, ``shortfall_ucr``).
        """
        done = session.scalar(select(LedgerEntry.total_delta).where(LedgerEntry.entry_id == f"debit:{debit_id}"))
        if done is not None:
            return False, -int(done), self.balance(account_id)
        k = keys_of(account_id)

        def build(pipe) -> None:
            self._evalsha(
                pipe,
                "debit",
                [k["bal"], k["log"], f"{k['tag']}:debit:{debit_id}", k["held"], k["debts"], k["debtq"]],
                [debit_id, amount_ucr, _now_ms(), reason[:200], MARKER_TTL, ref],
            )
            pipe.sadd(DIRTY, account_id)

        applied, taken, balance, _owed = self._pipeline_run(build)[0]
        # Durable before the caller records it (a purchase marked refunded): copied to SQL now,
        # so Redis restored from an older state cannot bring the credits back (reconcile
        # rebuilds balances from SQL). Metered charges stay on the stream's own schedule.
        self.drain(session, [account_id])
        return bool(applied), int(taken), int(balance)

    def debts(self, account_id: int) -> dict[str, int]:
        """Refund debts still owed from open holds: ref -> µcr."""
        return {ref: int(owed) for ref, owed in self.redis.hgetall(keys_of(account_id)["debts"]).items()}

    # -- housekeeping -----------------------------------------------------------

    def reap_expired(self, now: float | None = None, limit: int = 500) -> list[tuple[int, str, int]]:
        """Release every hold past its deadline; returns (account, hold id, amount) of each."""
        due = self.redis.zrangebyscore(EXPIRY, "-inf", now or time.time(), start=0, num=limit)
        reaped = []
        for member in due:
            account, _, hold_id = member.partition("|")
            amount = self.redis.hget(keys_of(int(account))["holds"], hold_id)
            receipt = {
                "request_id": hold_id,
                "status": "expired",
                "error_code": "hold_expired",
            }
            ended = self.end_hold(int(account), hold_id, 0, receipt, kind="expire")
            if ended.status == "ended":
                log.warning(
                    "hold expired",
                    extra={
                        "account_id": account,
                        "hold_id": hold_id,
                        "amount_ucr": amount,
                    },
                )
                reaped.append((int(account), hold_id, int(amount or 0)))
            self.redis.zrem(EXPIRY, member)
        return reaped

    def drain(self, session: Session, account_ids: list[int] | None = None) -> int:
        """Copy stream entries into SQL, then delete them from the stream.

        Safe to run concurrently and repeatedly: rows are unique by entry id and
        request id. The dirty flag is cleared before reading, so an entry written
        during the drain either is read now or leaves the flag set; a copy that fails
        (SQL locked or down) sets it again, so the entries it left in the stream are
        taken by the next drain rather than waiting for the account's next write.
        """
        if account_ids is None:
            account_ids = [int(a) for a in self.redis.smembers(DIRTY)]
        copied = 0
        for account_id in account_ids:
            self.redis.srem(DIRTY, account_id)
            stream = keys_of(account_id)["log"]
            try:
                while entries := self.redis.xrange(stream, count=DRAIN_BATCH):
                    self._copy(session, account_id, entries)
                    session.commit()
                    self.redis.xdel(stream, *[entry_id for entry_id, _ in entries])
                    copied += len(entries)
            except Exception:
                session.rollback()
                self.redis.sadd(DIRTY, account_id)
                raise
        return copied

    def _copy(self, session: Session, account_id: int, entries: list) -> None:
        rows, receipts, booked = [], [], []
        for _, fields in entries:
            created = datetime.fromtimestamp(int(fields["ts"]) / 1000, UTC)
            row = {
                "entry_id": fields["e"],
                "account_id": account_id,
                "kind": fields["k"],
                "total_delta": int(fields["t"]),
                "held_delta": int(fields["h"]),
                "hold_id": fields.get("hid") or None,
                "reason": fields.get("why", ""),
                "ref": fields.get("ref") or None,
                "created_at": created,
            }
            if fields.get("ref") or fields["k"] == "late":
                booked.append((row, fields))  # changes another row too: exactly once, by itself
                continue
            rows.append(row)
            if "r" in fields:
                receipts.append(_usage_row(account_id, json.loads(fields["r"]), int(fields["t"]), created))
        self._insert_entries(session, rows)
        if receipts:
            usage.store_records(session, receipts)  # and their daily roll-ups, in this transaction
        for row, fields in booked:
            if not _insert_one(session, LedgerEntry, row, "entry_id"):
                continue  # a replay: booked when it was first copied
            if fields["k"] == "late":
                receipt = _usage_row(account_id, json.loads(fields["r"]), row["total_delta"], row["created_at"])
                usage.add_late_charge(session, receipt, -row["total_delta"])
            else:
                _book_refund(session, fields["ref"], taken=-row["total_delta"], unpaid=int(fields.get("u", 0)))

    @staticmethod
    def _insert_entries(session: Session, rows: list[dict]) -> None:
        _insert_ignore(session, LedgerEntry, rows, "entry_id")

    # -- invariant L ------------------------------------------------------------

    def snapshot(self, account_id: int) -> dict:
        k = keys_of(account_id)
        raw = self._run("snapshot", [k["bal"], k["held"], k["holds"], k["log"]], [])
        holds = {raw[i]: int(raw[i + 1]) for i in range(4, len(raw), 2)}
        return {
            "balance": int(raw[0]),
            "held": int(raw[1]),
            "holds_sum": int(raw[2]),
            "stream": int(raw[3]),
            "holds": holds,
        }

    def live_holds(self, now: float | None = None) -> int:
        """How many holds are open and not yet past their deadline: requests or jobs in flight."""
        return int(self.redis.zcount(EXPIRY, f"({now or time.time()}", "+inf"))

    def reconcile(self, session: Session, repair: bool = False, now: float | None = None) -> list[Mismatch]:
        """Check every account; with ``repair`` rebuild Redis from SQL (invariant L only).

        Invariant L: Redis available + open holds = Σ ledger, the held counter is the sum of
        the open holds, and Redis and SQL agree on which holds are open. Beyond it: no entry
        waited in Redis longer than ``STREAM_MAX_AGE``; every open hold belongs to a live
        request (its deadline, which a live stream moves on, has not passed) or to a queued or
        running job; every job that ended was charged what it says it cost (0 unless it
        succeeded) and every live job holds; each refunded purchase's ``refunded_ucr`` is
        what the ledger booked for it, and with its shortfall and what open holds still owe
        it makes the refunded share of its credits.

        Repair releases (in SQL) holds that Redis no longer has, records holds that SQL
        missed, and sets each balance to Σ ledger − open holds. Returns the mismatches that
        remain.
        """
        now = now or time.time()
        account_ids = list(session.scalars(select(Account.id)))
        mismatches = self._waiting(account_ids, now)  # before the drain below copies them
        self.drain(session, account_ids)
        for account_id in account_ids:
            found = self._check(session, account_id)
            if found and repair:
                self._repair(session, account_id)
                found = self._check(session, account_id)
            mismatches.extend(found)
            mismatches.extend(self._check_holds_and_jobs(session, account_id, now))
            mismatches.extend(self._check_refunds(session, account_id))
        return mismatches

    def _waiting(self, account_ids: list[int], now: float) -> list[Mismatch]:
        """Accounts whose oldest stream entry has waited longer than ``STREAM_MAX_AGE`` (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for account_id in account_ids:
            pipe.xrange(keys_of(account_id)["log"], count=1)
        found = []
        for account_id, oldest in zip(account_ids, pipe.execute(), strict=True):
            if oldest:
                age = now - int(oldest[0][0].split("-")[0]) / 1000
                if age > STREAM_MAX_AGE:
                    found.append(
                        Mismatch(
                            account_id,
                            f"entries waited {age:.0f} s in Redis (the drain keeps them under {STREAM_MAX_AGE} s)",
                        )
                    )
        return found

    def _check_holds_and_jobs(self, session: Session, account_id: int, now: float) -> list[Mismatch]:
        holds = self.redis.hgetall(keys_of(account_id)["holds"])
        jobs = {
            job.hold_id: job
            for job in session.scalars(
                select(Job).where(
                    Job.account_id == account_id, (Job.status.in_(LIVE_JOB)) | (Job.hold_id.in_(list(holds)))
                )
            )
        }
        found = []
        deadlines = self.redis.zmscore(EXPIRY, [f"{account_id}|{hold_id}" for hold_id in holds]) if holds else []
        for (hold_id, amount), deadline in zip(holds.items(), deadlines, strict=True):
            job = jobs.get(hold_id)
            if job is not None:
                if job.status not in LIVE_JOB:
                    found.append(
                        Mismatch(account_id, f"hold {hold_id} ({amount} µcr) is open for job {job.id}, {job.status}")
                    )
            elif deadline is None or deadline + HOLD_GRACE < now:
                found.append(Mismatch(account_id, f"hold {hold_id} ({amount} µcr) belongs to no live request or job"))
        for job in jobs.values():
            if job.status in LIVE_JOB and job.hold_id not in holds:
                found.append(Mismatch(account_id, f"job {job.id} is {job.status} without an open hold"))
        ended = session.execute(
            select(Job.id, Job.status, Job.cost_ucr, LedgerEntry.total_delta)
            .join(LedgerEntry, LedgerEntry.entry_id == "end:" + Job.hold_id)
            .where(Job.account_id == account_id, Job.status.not_in(LIVE_JOB))
        )
        for job_id, status, cost, delta in ended:
            stated = (cost or 0) if status == "succeeded" else 0
            if -delta != stated:
                found.append(
                    Mismatch(account_id, f"job {job_id} ({status}) states {stated} µcr, the ledger charged {-delta}")
                )
        return found

    def _check_refunds(self, session: Session, account_id: int) -> list[Mismatch]:
        purchases = session.scalars(
            select(Purchase).where(Purchase.account_id == account_id, Purchase.refunded_cents > 0)
        ).all()
        if not purchases:
            return []
        booked = dict(
            session.execute(
                select(LedgerEntry.ref, func.coalesce(func.sum(-LedgerEntry.total_delta), 0))
                .where(LedgerEntry.account_id == account_id, LedgerEntry.kind == "debit", LedgerEntry.ref.is_not(None))
                .group_by(LedgerEntry.ref)
            ).all()
        )
        owed = self.debts(account_id)
        found = []
        for purchase in purchases:
            ref = purchase_ref(purchase.id)
            taken = int(booked.get(ref, 0))
            if taken != purchase.refunded_ucr:
                found.append(
                    Mismatch(
                        account_id,
                        f"purchase {purchase.id} says {purchase.refunded_ucr} µcr refunded, the ledger took {taken}",
                    )
                )
            accounted = purchase.refunded_ucr + purchase.shortfall_ucr + owed.get(ref, 0)
            if accounted != purchase.credits_for(purchase.refunded_cents):
                found.append(
                    Mismatch(
                        account_id,
                        f"purchase {purchase.id}: refunded {purchase.refunded_ucr} + spent {purchase.shortfall_ucr} "
                        f"+ owed {owed.get(ref, 0)} µcr != the {purchase.credits_for(purchase.refunded_cents)} µcr "
                        f"its {purchase.refunded_cents} refunded cents bought",
                    )
                )
        return found

    def _sql_state(self, session: Session, account_id: int) -> tuple[int, dict[str, int]]:
        total = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.total_delta), 0)).where(LedgerEntry.account_id == account_id)
        )
        held = session.execute(
            select(LedgerEntry.hold_id, LedgerEntry.kind, LedgerEntry.held_delta).where(
                LedgerEntry.account_id == account_id, LedgerEntry.hold_id.is_not(None)
            )
        )
        opened: dict[str, int] = {}
        closed: set[str] = set()
        for hold_id, kind, delta in held:
            if kind == "hold":
                opened[hold_id] = opened.get(hold_id, 0) + int(delta)
            else:
                closed.add(hold_id)
        open_holds = {hold_id: amount for hold_id, amount in opened.items() if hold_id not in closed}
        return int(total), open_holds

    def _check(self, session: Session, account_id: int) -> list[Mismatch]:
        snap = self.snapshot(account_id)
        if snap["stream"]:
            self.drain(session, [account_id])
            snap = self.snapshot(account_id)
        total, open_holds = self._sql_state(session, account_id)
        found = []

        def bad(what: str) -> None:
            found.append(Mismatch(account_id, what))

        if snap["balance"] < 0:
            bad(f"negative balance {snap['balance']} µcr")
        if snap["held"] != snap["holds_sum"]:
            bad(f"held counter {snap['held']} µcr != sum of open holds {snap['holds_sum']} µcr")
        if snap["balance"] + snap["holds_sum"] != total:
            bad(f"Redis balance {snap['balance']} + holds {snap['holds_sum']} µcr != ledger total {total} µcr")
        if snap["holds"] != open_holds:
            bad(f"open holds differ: Redis {snap['holds']} vs ledger {open_holds}")
        return found

    def _repair(self, session: Session, account_id: int) -> None:
        snap = self.snapshot(account_id)
        _, open_holds = self._sql_state(session, account_id)
        now = datetime.now(UTC)
        rows = []
        for hold_id, amount in open_holds.items():
            if hold_id not in snap["holds"]:
                rows.append(_repair_row(account_id, f"end:{hold_id}", "release", -amount, hold_id, now))
        for hold_id, amount in snap["holds"].items():
            if hold_id not in open_holds:
                rows.append(_repair_row(account_id, f"hold:{hold_id}", "hold", amount, hold_id, now))
        self._insert_entries(session, rows)
        session.commit()
        total, _ = self._sql_state(session, account_id)
        k = keys_of(account_id)
        result = self._run("repair", [k["bal"], k["held"], k["holds"], k["log"]], [total])
        if not result[0]:
            self.drain(session, [account_id])
            self._run("repair", [k["bal"], k["held"], k["holds"], k["log"]], [total])
        log.warning(
            "ledger repaired",
            extra={"account_id": account_id, "ledger_total_ucr": total},
        )


def purchase_ref(purchase_id: int) -> str:
    """The ``ref`` of a purchase's refund debits (see ``Ledger.debit``)."""
    return f"p{purchase_id}"


def _book_refund(session: Session, ref: str, taken: int, unpaid: int) -> None:
    """Book on its purchase what a refund took back and what it could not (already spent)."""
    if not ref.startswith("p") or not ref[1:].isdigit():
        return
    session.execute(
        update(Purchase)
        .where(Purchase.id == int(ref[1:]))
        .values(refunded_ucr=Purchase.refunded_ucr + taken, shortfall_ucr=Purchase.shortfall_ucr + unpaid)
    )


def _repair_row(account_id: int, entry_id: str, kind: str, held: int, hold_id: str, now: datetime) -> dict:
    return {
        "entry_id": entry_id,
        "account_id": account_id,
        "kind": kind,
        "total_delta": 0,
        "held_delta": held,
        "hold_id": hold_id,
        "reason": "reconcile --repair",
        "created_at": now,
    }


RECEIPT_FIELDS = {c.name for c in UsageRecord.__table__.columns} - {
    "id",
    "account_id",
    "charged_ucr",
}


def _usage_row(account_id: int, receipt: dict, total_delta: int, created: datetime) -> dict:
    row = {name: receipt[name] for name in RECEIPT_FIELDS if name in receipt}
    row.setdefault("provider", "")
    row.setdefault("model", "")
    row.setdefault("status", "ok")
    for stamp in ("started_at", "finished_at"):
        row[stamp] = datetime.fromisoformat(row[stamp]) if stamp in row else created
    row["account_id"] = account_id
    row["charged_ucr"] = -total_delta
    return row


def _insert_one(session: Session, model, row: dict, unique: str) -> bool:
    """Insert one row unless its unique column exists; True when this call created it."""
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    statement = insert(model).values(**row).on_conflict_do_nothing(index_elements=[unique]).returning(model.id)
    return session.execute(statement).first() is not None


def _insert_ignore(session: Session, model, rows: list[dict], unique: str) -> None:
    """Insert rows, skipping any whose unique column already exists (replays)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    session.execute(insert(model).on_conflict_do_nothing(index_elements=[unique]), rows)
