"""Measure what the broker adds (latency, throughput, CPU per request) in front of a fast fake upstream."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MODEL = "openai/gpt-4o-mini"
UPSTREAM_MODEL = "gpt-4o-mini"
PROMPT = "Say hello in five words."
MAX_TOKENS = 16
EMAIL = "bench@example.com"
GRANT_CREDITS = "1000000"
CONCURRENCIES = (1, 32, 128)
MODES = ("non-stream", "stream")

# The targets: added p50 at concurrency 1, req/s at 32, errors at 32 and 128, broker CPU.
ADDED_P50_MS = 2.0
NON_STREAM_RPS = 600.0
STREAM_RPS = 400.0
BROKER_CPU_MS = 1.5

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"

local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bad = 0
  expect = args[1]
end

function response(status, headers, body)
  if status == 200 and not string.find(body, expect, 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local bodies = 0
  for _, t in ipairs(threads) do
    bodies = bodies + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
      .. '"timeout":%d,"bad_body":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, bodies,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


class BenchError(RuntimeError):
    """A setup step failed; the message says which and where its log is."""


def _terminate(signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A gunicorn we started in its own session, so that its whole group can be stopped."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)  # gunicorn: quick shutdown
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stray workers of the group
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_gunicorn(name: str, args: list[str], env: dict[str, str], log: Path) -> Service:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(name, process, log)


def wait_http(service: Service, url: str, timeout: float = 60.0) -> None:
    """Wait until a worker answers at all (any HTTP status counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{service.name} did not start; its log ends:\n{service.tail()}")


def cli(env: dict[str, str], *args: str) -> str:
    """One ``flask --app app broker ...`` command with the broker's environment; its stdout."""
    done = subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "app", "broker", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise BenchError(f"flask broker {args[0]} failed:\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


# --------------------------------------------------------------------------- CPU accounting


def tree_cpu(pid: int) -> float:
    """User+system CPU seconds of a process, its live descendants and the children it has reaped."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
            if proc is root:
                total += t.children_user + t.children_system
    return total


def children_cpu() -> float:
    """CPU seconds of the processes this script has reaped (wrk, here)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def box_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall clock)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle, time.monotonic()


# --------------------------------------------------------------------------- load


@dataclass
class Target:
    name: str
    url: str
    key: str
    bodies: dict[str, str]
    scripts: dict[str, Path] = field(default_factory=dict)


@dataclass
class Result:
    target: str
    mode: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: str
    cpu_ms: dict[str, float]
    busy_pct: float


def request_body(broker: bool, stream: bool) -> str:
    messages = [{"role": "user", "content": PROMPT}]
    if broker:
        body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}
    else:  # what the broker sends upstream for the same call
        body = {"model": UPSTREAM_MODEL, "messages": messages, "max_completion_tokens": MAX_TOKENS}
    if stream:
        body["stream"] = True
        if not broker:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"))


def write_scripts(target: Target, workdir: Path) -> None:
    for mode, body in target.bodies.items():
        path = workdir / f"{target.name}-{mode}.lua"
        path.write_text(WRK_SCRIPT.format(body=body, key=target.key))
        target.scripts[mode] = path


def run_wrk(
    target: Target,
    mode: str,
    concurrency: int,
    duration: float,
    threads: int,
    meters: dict[str, Callable[[], float]],
) -> Result:
    expect = "data: [DONE]" if mode == "stream" else '"finish_reason"'
    args = [
        "wrk",
        f"-t{min(threads, concurrency)}",
        f"-c{concurrency}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(target.scripts[mode]),
        target.url,
        "--",
        expect,
    ]
    before = {name: meter() for name, meter in meters.items()}
    wrk_before = children_cpu()
    busy_before, wall_before = box_busy()
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    busy_after, wall_after = box_busy()
    wrk_cpu = children_cpu() - wrk_before
    after = {name: meter() for name, meter in meters.items()}
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    data = json.loads(line.removeprefix("WRKJSON "))
    requests = int(data["requests"])
    kinds = ("connect", "read", "write", "status", "timeout", "bad_body")
    errors = {k: int(data[k]) for k in kinds if data[k]}
    per = max(requests, 1)
    cpu_ms = {name: (after[name] - before[name]) * 1000 / per for name in meters}
    cpu_ms["wrk"] = wrk_cpu * 1000 / per
    busy = (busy_after - busy_before) / ((wall_after - wall_before) * (psutil.cpu_count() or 1)) * 100
    return Result(
        target=target.name,
        mode=mode,
        concurrency=concurrency,
        requests=requests,
        rps=requests / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=sum(errors.values()),
        error_detail=",".join(f"{k}={v}" for k, v in errors.items()),
        cpu_ms=cpu_ms,
        busy_pct=busy,
    )


# --------------------------------------------------------------------------- report


def wait_idle(meters: dict[str, Callable[[], float]], limit: float = 10.0) -> None:
    """Let what the last phase left in flight finish: until the services use < 5 % of a CPU."""
    deadline = time.monotonic() + limit
    last = sum(meter() for meter in meters.values())
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(meter() for meter in meters.values())
        if now - last < 0.0125:
            return
        last = now


def print_table(results: list[Result]) -> None:
    head = (
        f"{'target':<7} {'mode':<10} {'conc':>4} {'requests':>8} {'req/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'errors':>6}  {'broker':>6} {'fake':>5} {'redis':>5} {'wrk':>5}  {'box busy':>8}"
    )
    print(f"{'':<56}{'CPU ms per request':^34}")
    print(head)
    print("-" * len(head))
    for r in results:
        c = r.cpu_ms
        print(
            f"{r.target:<7} {r.mode:<10} {r.concurrency:>4} {r.requests:>8} {r.rps:>8.0f} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.errors:>6}  {c['broker']:>6.2f} {c['fake']:>5.2f} {c['redis']:>5.2f} "
            f"{c['wrk']:>5.2f}  {r.busy_pct:>7.0f}%" + (f"  ({r.error_detail})" if r.errors else "")
        )


def check_targets(results: list[Result]) -> bool:
    by = {(r.target, r.mode, r.concurrency): r for r in results}
    rows: list[tuple[str, str, str, bool]] = []

    def get(target: str, mode: str, conc: int) -> Result | None:
        return by.get((target, mode, conc))

    for mode in MODES:
        direct, broker = get("direct", mode, 1), get("broker", mode, 1)
        if direct and broker:
            added = broker.p50_ms - direct.p50_ms
            rows.append(
                (f"added p50, {mode}, c=1", f"{added:.2f} ms", f"<= {ADDED_P50_MS:g} ms", added <= ADDED_P50_MS)
            )
    for mode, floor in (("non-stream", NON_STREAM_RPS), ("stream", STREAM_RPS)):
        r = get("broker", mode, 32)
        if r:
            unit = "req/s" if mode == "non-stream" else "streams/s"
            rows.append((f"broker {unit}, c=32", f"{r.rps:.0f}", f">= {floor:g}", r.rps >= floor))
    for conc in (32, 128):
        for mode in MODES:
            r = get("broker", mode, conc)
            if r:
                rows.append((f"broker errors, {mode}, c={conc}", str(r.errors), "0", r.errors == 0))
    for conc in CONCURRENCIES:
        r = get("broker", "non-stream", conc)
        if r:
            cpu = r.cpu_ms["broker"]
            rows.append(
                (
                    f"broker CPU per non-stream request, c={conc}",
                    f"{cpu:.2f} ms",
                    f"<= {BROKER_CPU_MS:g} ms",
                    cpu <= BROKER_CPU_MS,
                )
            )
    print("\ntargets")
    for what, got, want, ok in rows:
        print(f"  {what:<42} {got:>10}   target {want:<10} {'PASS' if ok else 'MISS'}")
    return all(ok for *_, ok in rows)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--worker-class",
        choices=("gthread", "gevent"),
        default=None,
        help="broker worker class (default: gunicorn.conf.py's choice)",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase (default 8)")
    parser.add_argument("--workers", type=int, default=None, help="WEB_CONCURRENCY for the broker")
    parser.add_argument("--threads", type=int, default=None, help="GUNICORN_THREADS (gthread)")
    parser.add_argument("--fake-workers", type=int, default=1, help="gevent workers of the fake (default 1)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCIES)),
        help="comma-separated connection counts (default 1,32,128)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="non-stream,stream (default both)")
    parser.add_argument("--targets", default="direct,broker", help="direct,broker (default both)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="record the broker with py-spy during the c=32 phases (collapsed stacks in DIR)",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="after the phases, keep everything running until Ctrl-C (to profile by hand)",
    )
    return parser.parse_args(argv)


@contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is missing; install it with:  apt-get install -y wrk   (Debian/Ubuntu, as root)")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    sys.path.insert(0, str(ROOT))
    services: list[Service] = []
    redis_server = None
    try:
        with workspace() as work:
            try:
                from broker import migrations
                from broker.embedded_redis import EmbeddedRedis

                redis_server = EmbeddedRedis(work / "redis", appendonly=True).start()
                db_url = f"sqlite:///{work / 'broker.db'}"
                migrations.upgrade(db_url)

                fake_port, broker_port = free_port(), free_port()
                base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "FLASK_"))}
                fake = start_gunicorn(
                    "fake upstream",
                    [
                        "--worker-class=gevent",
                        f"--workers={args.fake_workers}",
                        f"--bind=127.0.0.1:{fake_port}",
                        "--keep-alive=30",
                        "--no-control-socket",
                        "--log-level=warning",
                        "tests.fakes.upstreams:create_app()",
                    ],
                    base_env,
                    work / "fake.log",
                )
                services.append(fake)
                env = {
                    **base_env,
                    "BROKER_ENV": "production",
                    "SECRET_KEY": "bench-secret",
                    "INSTANCE_PATH": str(work / "instance"),
                    "DATABASE_URL": db_url,
                    "REDIS_URL": redis_server.url,
                    "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
                    "OPENAI_API_KEY": "sk-bench-anything",
                    "PORT": str(broker_port),
                }
                for name in ("ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "DEMO_PROVIDER"):
                    env.pop(name, None)
                if args.workers:
                    env["WEB_CONCURRENCY"] = str(args.workers)
                if args.threads:
                    env["GUNICORN_THREADS"] = str(args.threads)
                gunicorn_args = ["--config", str(ROOT / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{broker_port}"]
                if args.worker_class:
                    gunicorn_args += ["--worker-class", args.worker_class]
                broker = start_gunicorn("broker", [*gunicorn_args, "app:app"], env, work / "broker.log")
                services.append(broker)
                wait_http(fake, f"http://127.0.0.1:{fake_port}/")
                wait_http(broker, f"http://127.0.0.1:{broker_port}/v1/models")

                created = cli(env, "create-user", EMAIL)
                account_id = int(re.search(r"created account (\d+)", created).group(1))  # type: ignore[union-attr]
                key = cli(env, "create-key", EMAIL, "--name", "bench").splitlines()[-1]
                cli(env, "grant", EMAIL, GRANT_CREDITS, "--reason", "bench")

                config = describe(broker, args)
                print(config)
                return run_phases(args, work, fake, broker, redis_server, fake_port, broker_port, key, account_id)
            except BenchError as error:
                print(f"\nbench failed: {error}", file=sys.stderr)
                return 1
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                for service in reversed(services):
                    service.stop()
                if redis_server is not None:
                    redis_server.stop()
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped and removed", file=sys.stderr)
        return 130


def describe(broker: Service, args: argparse.Namespace) -> str:
    procs = psutil.Process(broker.process.pid).children()
    cmdline = " ".join(psutil.Process(broker.process.pid).cmdline()[1:])
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return (
        f"broker: gunicorn {cmdline}\n"
        f"  worker class {args.worker_class or '(gunicorn.conf.py default)'}, {len(procs)} workers"
        + (f", {args.threads} threads" if args.threads else "")
        + f"\nfake upstream: gunicorn gevent x{args.fake_workers}; load: {wrk_version.strip()},"
        f" {args.wrk_threads} thread(s); {psutil.cpu_count()} CPUs; Python {platform.python_version()};"
        f" {args.duration:g} s per phase\n"
    )


def run_phases(
    args: argparse.Namespace,
    work: Path,
    fake: Service,
    broker: Service,
    redis_server: Any,
    fake_port: int,
    broker_port: int,
    key: str,
    account_id: int,
) -> int:
    targets = {
        "direct": Target(
            "direct",
            f"http://127.0.0.1:{fake_port}/v1/chat/completions",
            "sk-bench-anything",
            {m: request_body(False, m == "stream") for m in MODES},
        ),
        "broker": Target(
            "broker",
            f"http://127.0.0.1:{broker_port}/v1/chat/completions",
            key,
            {m: request_body(True, m == "stream") for m in MODES},
        ),
    }
    for target in targets.values():
        write_scripts(target, work)
    redis_pid = redis_server.process.pid
    meters: dict[str, Callable[[], float]] = {
        "broker": lambda: tree_cpu(broker.process.pid),
        "fake": lambda: tree_cpu(fake.process.pid),
        "redis": lambda: tree_cpu(redis_pid),
    }
    chosen = [t for t in args.targets.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]

    print("warming up ...", flush=True)
    for name in chosen:
        for mode in modes:
            run_wrk(targets[name], mode, 32, 2, args.wrk_threads, meters)
    results = []
    for mode in modes:
        for conc in concurrencies:
            for name in chosen:
                wait_idle(meters)
                spy = None
                if args.profile and name == "broker" and conc == 32:
                    spy = start_py_spy(args.profile, broker.process.pid, mode, args.duration)
                result = run_wrk(targets[name], mode, conc, args.duration, args.wrk_threads, meters)
                if spy is not None:
                    spy.wait(timeout=60)
                results.append(result)
                print(
                    f"  {name:<6} {mode:<10} c={conc:<3} {result.rps:7.0f} req/s  p50 {result.p50_ms:.2f} ms"
                    f"  errors {result.errors}",
                    flush=True,
                )
    print()
    print_table(results)
    ok = check_targets(results)
    print()
    print(health(broker, redis_server.url, account_id))
    if args.hold:
        print(f"\nholding: broker on http://127.0.0.1:{broker_port} (pid {broker.process.pid}), Ctrl-C to stop")
        while True:
            time.sleep(3600)
    return 0 if ok else 1


def start_py_spy(directory: Path, pid: int, mode: str, duration: float) -> subprocess.Popen[bytes]:
    """py-spy on the broker's master and workers for one phase (collapsed stacks, 250 Hz)."""
    spy = VENV_BIN / "py-spy"
    if not spy.exists():
        raise BenchError(f"--profile needs py-spy: {VENV_BIN / 'pip'} install py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    args = [str(spy), "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "250"]
    args += ["--duration", str(max(1, int(duration))), "--format", "raw", "--output"]
    args += [str(directory / f"broker-{mode}.txt")]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def health(broker: Service, redis_url: str, account_id: int) -> str:
    """Open holds left behind (must be none) and the broker log's warnings and errors."""
    import redis

    from broker.ledger import Ledger

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 15  # requests the last phase left in flight may still be settling
    while (snap := Ledger(client).snapshot(account_id))["holds"] and time.monotonic() < deadline:
        time.sleep(0.5)
    client.close()
    text = broker.log.read_text(errors="replace") if broker.log.exists() else ""
    noisy = [line for line in text.splitlines() if re.search(r"WARNING|ERROR|Traceback|CRITICAL", line)]
    lines = [
        f"after the run: {len(snap['holds'])} open holds ({snap['holds_sum']} ucr held); "
        f"broker log: {len(noisy)} warning/error lines"
    ]
    lines += [f"  {line[:160]}" for line in noisy[:5]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
