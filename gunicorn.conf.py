"""Gunicorn settings for the broker: ``gunicorn -c gunicorn.conf.py app:app``.

Worker class: PROVISIONAL (figures filled in from bench/overhead.py).
"""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


bind = f"0.0.0.0:{_int('PORT', 8000)}"
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
workers = _int("WEB_CONCURRENCY", os.cpu_count() or 1)
# gthread only: threads per worker, i.e. requests (a stream holds one for its whole life) in flight.
threads = _int("GUNICORN_THREADS", 32)
# gevent only: open client connections per worker.
worker_connections = _int("GUNICORN_WORKER_CONNECTIONS", 250)
# The app must be imported after the gevent worker has monkey-patched (in each worker).
preload_app = False

# Streams may last as long as the upstream read timeout (UPSTREAM_READ_TIMEOUT, 120 s).
timeout = _int("GUNICORN_TIMEOUT", 180)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 130)
keepalive = _int("GUNICORN_KEEPALIVE", 5)

accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# gunicorn's control socket defaults to one per-user path that two instances would share.
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
else:
    control_socket_disable = True
