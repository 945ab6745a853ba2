"""What `flexoraa run` starts, and a Gmail poller without the OAuth client refused at start.

A poller without GMAIL_CLIENT_ID ran until a mailbox connected earlier came due, crashed on it,
and `flexoraa run` stopped the worker and the API with it (seen in the end-to-end test, whose
database held a mailbox from the Gmail tests)."""

from __future__ import annotations

import pytest

from flexoraa.cli import main, run_commands
from flexoraa.settings import Settings

CONFIGURED = Settings(gmail_client_id="client.apps.googleusercontent.com", gmail_client_secret="s")


def test_run_starts_a_gmail_poller_only_when_polling_is_on_and_gmail_is_configured() -> None:
    assert run_commands(CONFIGURED) == ["worker", "api", "gmail-poller"]
    assert run_commands(Settings()) == ["worker", "api"]
    assert run_commands(Settings(gmail_client_id="id-without-secret")) == ["worker", "api"]
    polling_off = CONFIGURED.model_copy(update={"enable_gmail_polling": False})
    assert run_commands(polling_off) == ["worker", "api"]


def test_a_gmail_poller_without_the_oauth_client_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GMAIL_CLIENT_ID", raising=False)
    monkeypatch.delenv("GMAIL_CLIENT_SECRET", raising=False)
    assert main(["gmail-poller"]) == 2
    assert "set GMAIL_CLIENT_ID and GMAIL_CLIENT_SECRET" in capsys.readouterr().err
