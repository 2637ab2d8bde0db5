"""``flask --app app broker dev`` (the README's first command) stops everything it started (issue 10 item 6).

It is run as a user runs it, in its own process on a fresh instance folder: once it answers,
SIGTERM must end it and the worker and the embedded Redis-compatible server it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_the_worker_and_the_embedded_server_it_started(tmp_path):
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.endswith(("_API_KEY", "_URL")) and key not in ("BROKER_ENV", "SECRET_KEY", "DEMO_PROVIDER")
    }
    env.update(
        BROKER_ENV="development",
        INSTANCE_PATH=str(tmp_path / "instance"),
        EMBEDDED_REDIS_PORT=str(free_port()),
    )
    dev = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "broker", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert dev.poll() is None and time.monotonic() < deadline, "broker dev did not start"
            time.sleep(0.3)
        started = psutil.Process(dev.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "worker.py" in names and "valkey-server" in names
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(30) == 0
        gone, alive = psutil.wait_procs(started, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        for process in [*started, psutil.Process(dev.pid)] if dev.poll() is None else started:
            if process.is_running():
                process.kill()
