"""Outgoing email: plain-text messages over SMTP with verified TLS (MAIL_URL), or to .eml files in development."""

from __future__ import annotations

import logging
import os
import smtplib
import ssl
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

logger = logging.getLogger("broker.mail")

DEFAULT_FROM = "AI API Broker <no-reply@localhost>"
TIMEOUT_SECONDS = 10.0
DEFAULT_PORTS = {"smtp": 587, "smtps": 465}
URL_FORMAT = (
    "MAIL_URL must look like smtp://[user:password@]host[:587] (STARTTLS) or smtps://[user:password@]host[:465]"
)


class Mailer(Protocol):
    def send(self, to: str, subject: str, text: str) -> None:
        """Send one plain-text message to ``to``, from ``MAIL_FROM``; raise ``MailError`` if it cannot go out."""


class MailError(RuntimeError):
    """A message could not be sent. Its text names the host, never MAIL_URL or its password."""


def build_message(sender: str, to: str, subject: str, text: str) -> EmailMessage:
    """A plain-text message; a CR or LF in a header value raises ValueError (no header injection)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    # The sender's domain, not socket.getfqdn(): that can wait on DNS and names the machine.
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    message["Message-ID"] = make_msgid(domain=domain)
    message.set_content(text)
    return message


class SmtpMailer:
    """Sends through an SMTP server over TLS: STARTTLS (required) for ``smtp://``, implicit TLS for ``smtps://``."""

    def __init__(self, url: str, sender: str = DEFAULT_FROM, ca_file: str = "", timeout: float = TIMEOUT_SECONDS):
        # Errors below never quote the URL (it carries the password) and chain nothing that could.
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(URL_FORMAT) from None
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(URL_FORMAT)
        self.implicit_tls = parts.scheme == "smtps"
        self.host = parts.hostname
        self.port = port or DEFAULT_PORTS[parts.scheme]
        self.username = unquote(parts.username or "")
        self._password = unquote(parts.password or "")
        self.sender = sender
        self.timeout = timeout
        # Certificates and host names are verified, against the system's CAs or a private CA's bundle.
        self.context = ssl.create_default_context(cafile=ca_file or None)

    def __repr__(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        return f"SmtpMailer({scheme}://{self.host}:{self.port})"

    def send(self, to: str, subject: str, text: str) -> None:
        message = build_message(self.sender, to, subject, text)
        try:
            with self._connect() as smtp:
                if self.username:
                    smtp.login(self.username, self._password)
                smtp.send_message(message)
        except MailError:
            raise
        except (smtplib.SMTPException, OSError) as exc:
            raise MailError(f"sending mail through {self.host}:{self.port} failed: {self._redact(exc)}") from None
        logger.info("mail sent through %s:%s: %s", self.host, self.port, subject)

    def _connect(self) -> smtplib.SMTP:
        if self.implicit_tls:
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=self.context)
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            smtp.ehlo()
            if not smtp.has_extn("starttls"):
                # Never fall back to clear text: the message carries links that log people in.
                raise MailError(f"{self.host}:{self.port} does not offer STARTTLS; refusing to send mail in clear")
            smtp.starttls(context=self.context)
            smtp.ehlo()
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _redact(self, exc: BaseException) -> str:
        """The exception's text without the password, should a server ever echo it back."""
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._password, "***") if self._password else text


class FileMailer:
    """Development: each message becomes an .eml file; the log names only its path and subject."""

    def __init__(self, directory: str | Path, sender: str = DEFAULT_FROM):
        self.directory = Path(directory)
        self.sender = sender

    def __repr__(self) -> str:
        return f"FileMailer({str(self.directory)!r})"

    def send(self, to: str, subject: str, text: str) -> None:
        message = build_message(self.sender, to, subject, text)
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = self.directory / f"{stamp}-{uuid.uuid4().hex[:12]}.eml"
        # Owner-only: the body holds sign-in links. O_EXCL: never overwrite another message.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(message.as_bytes())
        # Never the body or the recipient's links: only where to read it.
        logger.info("mail written to %s: %s", path, subject)


def make_mailer(config: dict) -> Mailer:
    """SMTP when MAIL_URL is set; otherwise files under INSTANCE_PATH/mail."""
    sender = config.get("MAIL_FROM") or DEFAULT_FROM
    if config.get("MAIL_URL"):
        return SmtpMailer(config["MAIL_URL"], sender, config.get("MAIL_TLS_CA_FILE") or "")
    return FileMailer(Path(config["INSTANCE_PATH"]) / "mail", sender)
