"""Gunicorn settings for the broker: ``gunicorn -c gunicorn.conf.py app:app``.

Worker class: gevent, chosen with ``bench/overhead.py`` (2 CPUs shared by broker, fake upstream,
Redis and wrk; 2 workers, gthread with 32 threads; outside load <= 1 % but gthread at 128: 8 %):
- fast upstream: gevent served 519 / 480 non-stream req/s at 32 / 128 connections for 3.08 / 3.34 ms
  of broker CPU per request; gthread 397 / 360 req/s for 3.54 / 3.97 ms, and it left 7-13 % of the
  CPUs idle (GIL hand-offs between threads). Streams at 128 connections: 443/s vs 299/s. gevent's
  p99 at 128 connections is worse (one worker accepts more connections than the other).
- upstream answering in 1 s, as real providers do: gthread tops out at workers x threads calls in
  flight, 56 req/s at 128 and 256 connections with p50 2.0 s and 4.0 s (queued); gevent served 103
  and 189 req/s with p50 1.1 s and 1.2 s. A stream holds its slot for its whole life, so in
  production this cap matters more than CPU.
Streaming relays each event as it arrives under gevent (HTTP and HTTPS upstreams checked); the
gevent worker monkey-patches before it imports the app, so Redis and requests cooperate.
Workers: one per CPU measured best with gevent (2, 3, 4 workers: 506, 443, 358 req/s at 32 conn.).
"""

from __future__ import annotations

import os
import re

from gunicorn.glogging import Logger

API_KEY = re.compile(r"brk_live_[0-9A-Za-z]+")


class MaskingLogger(Logger):
    """gunicorn's logger with API keys masked in every access-log atom.

    A client may send its key as the HTTP Basic user (gunicorn's ``%(u)s``), in the query
    (``%(r)s``, ``%(q)s``) or in any header (``%({name}i)s``): none of it reaches the log.
    """

    def atoms(self, resp, req, environ, request_time) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["u"] = "-"  # the Basic user name is whatever the client chose to send, keys included
        for name, value in list(atoms.items()):
            if isinstance(value, str) and "brk_live_" in value:
                atoms[name] = API_KEY.sub("brk_live_[masked]", value)
        return atoms


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


bind = f"0.0.0.0:{_int('PORT', 8000)}"
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
workers = _int("WEB_CONCURRENCY", _cpus())
# gevent: open client connections per worker (a stream holds one for its whole life). A request
# holds a Redis connection only during its round trips, and one that finds the process's pool
# (REDIS_MAX_CONNECTIONS) busy waits for a free one, so this need not stay under it.
# bench/overhead.py's open-streams cell: 1,000 streams of 10 s on 2 workers, 0 errors.
worker_connections = _int("GUNICORN_WORKER_CONNECTIONS", 1000)
# gthread only: threads per worker = requests in flight per worker (a stream holds one throughout).
threads = _int("GUNICORN_THREADS", 32)
# The gevent worker must monkey-patch before the app is imported, so never preload it in the master.
preload_app = False

# Streams last as long as the upstream takes (UPSTREAM_READ_TIMEOUT, 120 s by default); async and
# threaded workers heartbeat from their own loop, so this only catches a worker stuck on the CPU.
timeout = _int("GUNICORN_TIMEOUT", 180)
# On restart or SIGTERM, let streams in flight finish (up to the upstream read timeout) first.
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 130)
keepalive = _int("GUNICORN_KEEPALIVE", 5)

# The longest request line gunicorn accepts (its maximum; the default is 4094). The app answers
# URLs over 4 KB with a JSON 414 (broker/api/errors.py); beyond this gunicorn answers a plain 414.
limit_request_line = 8190

accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None  # off unless set ("-" for stdout)
# gunicorn's default without %(u)s (the HTTP Basic user name, where clients put API keys).
access_log_format = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms'
logger_class = MaskingLogger
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
# Proxies whose X-Forwarded-* headers are trusted (scheme, client address); "*" behind a private LB.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# gunicorn's control socket defaults to one per-user path that every instance on a host would share.
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
else:
    control_socket_disable = True
