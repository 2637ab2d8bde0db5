"""Mixed load for a bounded time (chat plain and streamed, media submits, balance reads) against gunicorn,
two workers and the fakes; prints throughput, p50/p99 per kind and whether the ledger invariant holds."""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jobs as stack  # noqa: E402  (bench/jobs.py: starts Redis, the fakes, gunicorn and workers)

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
MIX = (("chat", 40), ("stream", 30), ("media", 10), ("balance", 20))


def one(api: stack.Api, kind: str) -> int:
    session, base, headers = api.session, api.base, api.headers
    if kind == "chat":
        return session.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers, timeout=30).status_code
    if kind == "stream":
        with session.post(
            f"{base}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers, timeout=30, stream=True
        ) as response:
            body = b"".join(response.iter_content(8192))
            return response.status_code if b"[DONE]" in body else 599
    if kind == "media":
        return api.submit_tts().status_code
    return session.get(f"{base}/v1/balance", headers=headers, timeout=30).status_code


def drive(api: stack.Api, seconds: float, clients: int, max_requests: int) -> dict[str, list[tuple[float, int]]]:
    kinds = [kind for kind, weight in MIX for _ in range(weight)]
    results: dict[str, list[tuple[float, int]]] = defaultdict(list)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    sent = [0]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            kind = rng.choice(kinds)
            start = time.perf_counter()
            try:
                status = one(api, kind)
            except Exception:
                status = 0
            with lock:
                results[kind].append((time.perf_counter() - start, status))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20, help="length of the load, s (default 20)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests")
    parser.add_argument("--latency", type=float, default=0.05, help="fake upstream latency, s (default 0.05)")
    parser.add_argument("--workers", type=int, default=2, help="RQ worker processes (default 2)")
    args = parser.parse_args(argv)
    # One key drives all the load: lift the per-key limits so they do not shape the figures.
    os.environ.update(RATE_LIMIT_PER_MINUTE="100000000", RATE_LIMIT_PER_DAY="1000000000")
    options = argparse.Namespace(
        latency=args.latency, log_level="WARNING", web_workers=None, web_class=None, worker_kind="fork"
    )
    with stack.workspace(keep=False) as work:
        bench = stack.Bench(options, work)
        try:
            bench.start()
            bench.start_workers(args.workers, 1)
            started = time.monotonic()
            results = drive(bench.api, args.seconds, args.clients, args.max_requests)
            elapsed = time.monotonic() - started
            settled = bench.wait_queue_empty("media", 120)
            reconcile = stack.cli(bench.env, "reconcile", check=False)
        finally:
            bench.stop()
    total = sum(len(v) for v in results.values())
    print(f"\nmixed load: {args.clients} clients, {elapsed:.1f} s, fake upstream latency {args.latency * 1000:.0f} ms")
    print(f"{'kind':<8} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for kind, _ in MIX:
        rows = results.get(kind, [])
        times = sorted(t for t, _ in rows)
        statuses: dict[int, int] = defaultdict(int)
        for _, status in rows:
            statuses[status] += 1
        p50 = stack.pct(times, 50) or 0
        p99 = stack.pct(times, 99) or 0
        rate = len(rows) / elapsed
        print(f"{kind:<8} {len(rows):>9} {rate:>8.1f} {p50 * 1000:>8.1f} {p99 * 1000:>8.1f}  {dict(statuses)}")
    print(f"{'all':<8} {total:>9} {total / elapsed:>8.1f}")
    print(f"media queue drained: {'yes' if settled is not None else 'NO'}")
    print(f"ledger invariant (flask broker reconcile): exit {reconcile.returncode}: {reconcile.stdout.strip()}")
    return 0 if reconcile.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
