"""What `flexoraa run` starts, and a Gmail poller without the OAuth client refused at start.

A poller without GMAIL_CLIENT_ID ran until a mailbox connected earlier came due, crashed on it,
and `flexoraa run` stopped the worker and the API with it (seen in the end-to-end test, whose
database held a mailbox from the Gmail tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flexoraa.cli import main, run_commands
from flexoraa.settings import Settings


def settings(**values: Any) -> Settings:
    """Settings from these values only, whatever the environment or a `.env` file holds."""
    return Settings(_env_file=None, **values)


def test_run_starts_a_gmail_poller_only_when_polling_is_on_and_gmail_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("GMAIL_CLIENT_ID", "GMAIL_CLIENT_SECRET", "ENABLE_GMAIL_POLLING"):
        monkeypatch.delenv(name, raising=False)
    configured = settings(gmail_client_id="client.apps.googleusercontent.com",
                          gmail_client_secret="s")  # fmt: skip
    assert run_commands(configured) == ["worker", "api", "gmail-poller"]
    assert run_commands(settings()) == ["worker", "api"]
    assert run_commands(settings(gmail_client_id="id-without-secret")) == ["worker", "api"]
    polling_off = configured.model_copy(update={"enable_gmail_polling": False})
    assert run_commands(polling_off) == ["worker", "api"]


def test_a_gmail_poller_without_the_oauth_client_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no `.env` file read
    monkeypatch.delenv("GMAIL_CLIENT_ID", raising=False)
    monkeypatch.delenv("GMAIL_CLIENT_SECRET", raising=False)
    assert main(["gmail-poller"]) == 2
    assert "set GMAIL_CLIENT_ID and GMAIL_CLIENT_SECRET" in capsys.readouterr().err
