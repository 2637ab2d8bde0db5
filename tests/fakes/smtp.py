"""A real local SMTP server (aiosmtpd) with STARTTLS or implicit TLS from a test CA (trustme), and AUTH."""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Literal, Self
from urllib.parse import quote

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from broker.embedded_redis import free_port

__all__ = ["SMTP_PASSWORD", "SMTP_USER", "FakeSmtp", "Received"]

# Characters that must be percent-encoded in a URL, so the mailer's decoding is tested too.
SMTP_USER = "mailer@broker.test"
SMTP_PASSWORD = "s3cret:p@ss/w%rd-0010"
HOST = "127.0.0.1"

TlsMode = Literal["starttls", "implicit", "none"]


@dataclass
class Received:
    """One message as the server received it, with its envelope and how the session was secured."""

    message: EmailMessage
    mail_from: str
    rcpt_tos: list[str]
    tls: bool
    login: str | None


class _Handler:
    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def handle_MAIL(self, server, session, envelope, address: str, mail_options: list[str]) -> str:
        # AUTH is enforced here rather than by aiosmtpd's auth_required, which insists on STARTTLS
        # and so refuses AUTH on an implicit-TLS connection.
        if self.fake.auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        # Line ends as a mail reader shows them (SMTP sends CRLF), so bodies compare with plain strings.
        raw = (envelope.original_content or envelope.content).replace(b"\r\n", b"\n")
        message = BytesParser(policy=policy.default).parsebytes(raw)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        # After STARTTLS or with implicit TLS alike, the transport the message came in on is TLS.
        tls = server.transport.get_extra_info("ssl_object") is not None
        self.fake._add(Received(message, envelope.mail_from, list(envelope.rcpt_tos), tls, login))
        return "250 OK"


class FakeSmtp:
    """``tls``: "starttls" (offered and required), "implicit" (TLS from the first byte) or "none" (no TLS at all).

    With ``auth`` the server requires AUTH LOGIN/PLAIN as ``SMTP_USER``/``SMTP_PASSWORD`` (over TLS only).
    ``ca_file`` is the PEM of the CA that signed the server's certificate (for ``MAIL_TLS_CA_FILE``).
    """

    def __init__(self, tls: TlsMode = "starttls", auth: bool = True) -> None:
        self.tls = tls
        self.auth = auth
        self.port = 0
        self.received: list[Received] = []
        self.auth_attempts: list[str] = []  # the logins tried, right or wrong
        self.ca_file = ""
        self._dir: Path | None = None
        self._controller: Controller | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """MAIL_URL for this server, with the test credentials percent-encoded."""
        scheme = "smtps" if self.tls == "implicit" else "smtp"
        userinfo = f"{quote(SMTP_USER, safe='')}:{quote(SMTP_PASSWORD, safe='')}@" if self.auth else ""
        return f"{scheme}://{userinfo}{HOST}:{self.port}"

    def start(self) -> Self:
        if self._controller is not None:
            return self
        self._dir = Path(tempfile.mkdtemp(prefix="fake-smtp-"))
        ca = trustme.CA()
        self.ca_file = str(self._dir / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(HOST, "localhost").configure_cert(context)
        kwargs: dict = {
            "server_hostname": "fake-smtp.test",  # not getfqdn(), which may wait on DNS
            "authenticator": self._authenticate,
            # aiosmtpd counts only STARTTLS as TLS; an implicit-TLS session is encrypted from the first byte.
            "auth_require_tls": self.tls == "starttls",
        }
        if self.tls == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        elif self.tls == "implicit":
            kwargs.update(ssl_context=context)
        self.port = free_port()
        self._controller = Controller(_Handler(self), hostname=HOST, port=self.port, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.auth_attempts.clear()

    def messages_to(self, address: str) -> list[EmailMessage]:
        """Every message whose envelope named ``address`` (case-insensitive), oldest first."""
        with self._lock:
            return [r.message for r in self.received if address.lower() in (t.lower() for t in r.rcpt_tos)]

    def wait_for(self, address: str, timeout: float = 5) -> EmailMessage:
        """The latest message to ``address``, waiting up to ``timeout`` seconds for one to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages_to(address)
            if messages:
                return messages[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no mail to {address} within {timeout}s")
            time.sleep(0.02)

    def _add(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def _authenticate(self, server, session, envelope, mechanism: str, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode()
        with self._lock:
            self.auth_attempts.append(login)
        ok = login == SMTP_USER and auth_data.password.decode() == SMTP_PASSWORD
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


# aiosmtpd logs every session at INFO (and a deprecation on every AUTH); the tests read the broker's logs.
logging.getLogger("mail.log").setLevel(logging.ERROR)
