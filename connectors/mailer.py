"""E-mail through SMTP (stdlib smtplib in a thread: a send is rare and short)."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage

from flexoraa.settings import Settings

logger = logging.getLogger(__name__)


class Mailer:
    def __init__(self, settings: Settings) -> None:
        self._host = settings.smtp_host
        self._port = settings.smtp_port
        self._username = settings.smtp_username
        self._password = settings.smtp_password
        self._sender = settings.smtp_from
        self._starttls = settings.smtp_starttls
        self._timeout_s = settings.smtp_timeout_s

    @property
    def configured(self) -> bool:
        return self._host is not None

    async def send(self, to: list[str], subject: str, body: str) -> None:
        """Raises OSError / smtplib.SMTPException when the server refuses or is unreachable."""
        if not self.configured or not to:
            return
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = ", ".join(to)
        message["Subject"] = subject
        message.set_content(body)
        await asyncio.to_thread(self._send_blocking, message)

    def _send_blocking(self, message: EmailMessage) -> None:
        assert self._host is not None
        with smtplib.SMTP(self._host, self._port, timeout=self._timeout_s) as smtp:
            if self._starttls:
                smtp.starttls()
            if self._username and self._password:
                smtp.login(self._username, self._password.get_secret_value())
            smtp.send_message(message)
