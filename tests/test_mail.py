"""Outgoing mail through a real local SMTP server: TLS always, certificates verified, no secret in logs or errors."""

from __future__ import annotations

import logging
import stat
import traceback
from email import policy
from email.parser import BytesParser
from urllib.parse import quote

import pytest
import trustme

import config as config_module
from broker.extensions import services
from broker.mail import FileMailer, MailError, SmtpMailer, make_mailer
from tests.conftest import MAIL_FROM, OPERATOR
from tests.fakes.smtp import SMTP_PASSWORD, SMTP_USER, FakeSmtp

STRONG_KEY = "x7Gq2LmZ9pR4vT8wK1nB5cY3hJ6dF0sA-production-key"


@pytest.fixture
def mail_log(caplog):
    """Records of the ``broker.mail`` logger (the app's logging setup stops it propagating to the root)."""
    logger = logging.getLogger("broker.mail")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="broker.mail")
    yield caplog
    logger.removeHandler(caplog.handler)


def logged(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def test_app_mail_arrives_over_starttls_with_auth(app, mailbox):
    with app.app_context():
        services().mailer.send("alice@example.com", "Set your password", "Open https://broker.test/reset/abc\n")

    message = mailbox.wait_for("alice@example.com")
    assert message["From"] == MAIL_FROM
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Set your password"
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "Open https://broker.test/reset/abc\n"
    received = mailbox.received[-1]
    assert received.tls is True
    assert received.login == SMTP_USER  # the percent-encoded user and password were decoded
    assert received.mail_from == "no-reply@broker.test"
    assert received.rcpt_tos == ["alice@example.com"]


def test_smtps_url_sends_over_implicit_tls():
    with FakeSmtp(tls="implicit") as server:
        assert server.url.startswith("smtps://")
        SmtpMailer(server.url, MAIL_FROM, server.ca_file).send("bob@example.com", "Hello", "over TLS")
        message = server.wait_for("bob@example.com")
        assert message.get_content() == "over TLS\n"
        assert server.received[-1].tls is True
        assert server.received[-1].login == SMTP_USER


def test_smtp_url_refuses_a_server_without_starttls():
    """A server (or an attacker stripping STARTTLS) offering plain text gets neither the password nor the mail."""
    with FakeSmtp(tls="none") as server:
        mailer = SmtpMailer(server.url, MAIL_FROM, server.ca_file)
        with pytest.raises(MailError, match="does not offer STARTTLS"):
            mailer.send("carol@example.com", "Reset", "https://broker.test/reset/secret-token")
        assert server.auth_attempts == []
        assert server.received == []


@pytest.mark.parametrize("ca", ["other", "system"])
def test_certificate_not_signed_by_the_trusted_ca_is_refused(tmp_path, ca):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with FakeSmtp(tls="starttls") as server:
        mailer = SmtpMailer(server.url, MAIL_FROM, str(other) if ca == "other" else "")
        with pytest.raises(MailError, match="CERTIFICATE_VERIFY_FAILED"):
            mailer.send("dave@example.com", "Reset", "https://broker.test/reset/secret-token")
        assert server.auth_attempts == []
        assert server.received == []


def test_smtps_certificate_for_another_ca_is_refused(tmp_path):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with FakeSmtp(tls="implicit") as server:
        with pytest.raises(MailError, match="CERTIFICATE_VERIFY_FAILED"):
            SmtpMailer(server.url, MAIL_FROM, str(other)).send("erin@example.com", "Reset", "body")
        assert server.received == []


def test_header_injection_in_subject_or_recipient_sends_nothing(app, mailbox):
    with app.app_context():
        mailer = services().mailer
        with pytest.raises(ValueError):
            mailer.send("frank@example.com", "Hi\r\nBcc: attacker@evil.test", "body")
        with pytest.raises(ValueError):
            mailer.send("frank@example.com\r\nBcc: attacker@evil.test", "Hi", "body")
    assert mailbox.received == []


def test_without_mail_url_messages_become_eml_files_and_the_log_names_only_path_and_subject(tmp_path, mail_log):
    mailer = make_mailer({"INSTANCE_PATH": str(tmp_path / "instance"), "MAIL_URL": "", "MAIL_FROM": MAIL_FROM})
    assert isinstance(mailer, FileMailer)
    body = "Your link: https://broker.test/verify/TOKEN-abc123\n"
    mailer.send("gina@example.com", "Verify your email", body)
    mailer.send("gina@example.com", "Verify your email", body)

    files = sorted((tmp_path / "instance" / "mail").glob("*.eml"))
    assert len(files) == 2  # unique names, nothing overwritten
    message = BytesParser(policy=policy.default).parsebytes(files[0].read_bytes())
    assert (message["From"], message["To"], message["Subject"]) == (MAIL_FROM, "gina@example.com", "Verify your email")
    assert message.get_content() == body
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600  # the body holds sign-in links

    text = logged(mail_log)
    assert str(files[0]) in text and str(files[1]) in text
    assert "Verify your email" in text
    assert "TOKEN-abc123" not in text and "https://" not in text


def test_production_refuses_to_start_without_mail_url():
    settings = {
        "BROKER_ENV": "production",
        "SECRET_KEY": STRONG_KEY,
        "REDIS_URL": "redis://127.0.0.1:6399/0",
        "PUBLIC_URL": "https://broker.example.com",
        **OPERATOR,
    }
    with pytest.raises(RuntimeError, match="MAIL_URL must be set"):
        config_module.load({**settings, "MAIL_URL": ""})
    loaded = config_module.load({**settings, "MAIL_URL": "smtps://u:p@smtp.example.com"})
    assert loaded["MAIL_URL"] == "smtps://u:p@smtp.example.com"


def test_mail_url_password_never_appears_in_errors_or_logs(mail_log):
    password = "Hunter2-mail-password-0011/:@%"
    secrets = (password, quote(password, safe=""))
    with FakeSmtp(tls="starttls") as server:
        wrong = server.url.replace(quote(SMTP_PASSWORD, safe=""), quote(password, safe=""))
        closed = f"smtp://{quote(SMTP_USER, safe='')}:{quote(password, safe='')}@127.0.0.1:1"
        failures = []
        for url in (wrong, closed):
            mailer = SmtpMailer(url, MAIL_FROM, server.ca_file)
            assert all(s not in repr(mailer) for s in secrets)
            with pytest.raises(MailError) as info:
                mailer.send("hank@example.com", "Reset", "body")
            failures.append(info.value)
        # The wrong password reached the server (smtplib tries PLAIN, then LOGIN) and was refused.
        assert set(server.auth_attempts) == {SMTP_USER}
        assert server.received == []
        for bad in (f"smtp://u:{quote(password, safe='')}@host:notaport", f"ftp://u:{quote(password, safe='')}@h"):
            with pytest.raises(ValueError) as info:
                SmtpMailer(bad)
            failures.append(info.value)

    assert "SMTPAuthenticationError" in str(failures[0])
    for exc in failures:
        text = "".join(traceback.format_exception(exc))
        assert all(s not in text for s in secrets), text
    assert all(s not in logged(mail_log) for s in secrets)
