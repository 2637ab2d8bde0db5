"""A stream that ends cleanly hands its upstream connection back to the pool (issue 14).

Before, the SSE line reader was left suspended inside urllib3's chunked read and a fresh
``iter_content`` drained the rest; the reader's clean-up then closed the socket, so every
stream paid a new TCP (and, at real providers, TLS) handshake.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests

from broker.providers.anthropic import AnthropicProvider
from broker.providers.base import ChatCall
from broker.providers.gemini import GeminiProvider
from broker.providers.http import make_session
from broker.providers.openai import OpenAIProvider
from tests.fakes.upstreams import FakeUpstream, Reply, make_wsgi_app

KEY = "sk-test-key"
TIMEOUT = (5.0, 10.0)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """The fake upstreams' WSGI app behind gevent's HTTP/1.1 server, which keeps connections open
    after chunked streams as real providers do (the shared fake's werkzeug server closes them,
    which would hide the difference). It runs its own hub in its own thread; nothing is patched."""
    from gevent.pywsgi import WSGIServer

    app = make_wsgi_app(FakeUpstream(Reply(chunks=3), record=False))
    ready = threading.Event()
    box: dict = {}

    def serve() -> None:
        server = WSGIServer(("127.0.0.1", 0), app, log=None)
        server.start()
        box["server"] = server
        ready.set()
        server.serve_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{box['server'].server_port}"


def _idle_sockets(session: requests.Session, url: str) -> list[tuple[str, int]]:
    """Local addresses of the live connections waiting in the session's pool for ``url``."""
    request = requests.Request("POST", url).prepare()
    pool = session.get_adapter(url).get_connection_with_tls_context(request, True)
    return [conn.sock.getsockname() for conn in list(pool.pool.queue) if conn is not None and conn.sock is not None]


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
def test_streams_reuse_one_pooled_connection(base: str, name: str) -> None:
    call = ChatCall(model="test-model", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
    with make_session(retries=2) as session:
        if name == "openai":
            adapter = OpenAIProvider(f"{base}/v1", KEY, session, TIMEOUT)
        elif name == "anthropic":
            adapter = AnthropicProvider(base, KEY, session, TIMEOUT)
        else:
            adapter = GeminiProvider(base, KEY, session, TIMEOUT)
        seen = []
        for _ in range(3):
            events = list(adapter.stream(call))
            assert events, "the stream yielded nothing"
            seen.append(_idle_sockets(session, base))
    # One live connection after each stream, and the same one every time.
    assert all(len(idle) == 1 for idle in seen), seen
    assert len({idle[0] for idle in seen}) == 1, seen
