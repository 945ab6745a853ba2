"""`flexoraa run` (what `make run` starts): worker and API as a user gets them, twice."""

from __future__ import annotations

import re
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from flexoraa.settings import Settings
from tests.conftest import ManagedProcess, StartProcess, free_port, settings_env, wait_until

pytestmark = pytest.mark.e2e

BANNER_KEY = re.compile(r"Demo API key: (\S+)")


def start_run(processes: StartProcess, settings: Settings, name: str) -> tuple[ManagedProcess, str]:
    run = processes(name, ["run"], settings_env(settings, LOG_LEVEL="INFO"))

    def banner_printed() -> bool:
        if run.process.poll() is not None:
            raise AssertionError(f"flexoraa run exited early:\n{run.log_tail()}")
        return BANNER_KEY.search(run.log_path.read_text(errors="replace")) is not None

    wait_until(banner_printed, 180, "the banner of `flexoraa run`")
    text = run.log_path.read_text(errors="replace")
    match = BANNER_KEY.search(text)
    assert match is not None
    assert f"http://127.0.0.1:{settings.api_port}/docs" in text
    return run, match.group(1)


def eventually(check: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def run_settings(test_settings: Settings) -> Settings:
    api_port, worker_port = free_port(), free_port()
    return test_settings.model_copy(
        update={
            "topic_prefix": f"{test_settings.topic_prefix}-e2e",
            "api_port": api_port,
            "worker_web_port": worker_port,
            "worker_url": f"http://127.0.0.1:{worker_port}",
        }
    )


def test_run_serves_the_inbound_path_and_runs_again(
    processes: StartProcess, run_settings: Settings
) -> None:
    run, api_key = start_run(processes, run_settings, "run-1")
    # The demo key is the tenant's credential: private to the user from its first byte.
    saved = run_settings.stack_dir / "demo-tenant.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in saved.parent.glob(".demo-tenant.json.*")] == []
    base = f"http://127.0.0.1:{run_settings.api_port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        assert client.get("/ready").status_code == 200
        assert client.get("/docs").status_code == 200
        start = datetime.now(UTC) - timedelta(minutes=5)
        lead_ids = set()
        for i, text in enumerate(["Hi there", "What does the Pro plan cost?", "Thanks!"]):
            response = client.post(
                "/api/events/inbound",
                json={
                    "channel": "whatsapp",
                    "contact": "+15550001111",
                    "contact_name": "Sam",
                    "text": text,
                    "occurred_at": (start + timedelta(minutes=i)).isoformat(),
                    "channel_message_id": f"wamid.e2e.{i}",
                },
            )
            assert response.status_code == 202, response.text
            lead_ids.add(response.json()["lead_id"])
        assert len(lead_ids) == 1
        lead_id = lead_ids.pop()

        def lead() -> Any:
            response = client.get(f"/api/leads/{lead_id}")
            return (
                response.status_code == 200
                and response.json()["message_count"] == 3
                and response.json()
            )

        state = eventually(lead)
        assert state["contact"] == "15550001111"
        assert state["window"]["open"] is True

        def history() -> Any:
            response = client.get(f"/api/leads/{lead_id}/messages")
            if response.status_code != 200:
                return None
            items = response.json()["items"]
            inbound = [m for m in items if m["direction"] == "inbound"]
            asked = [m for m in items if m["sent_by"] == "ai"]
            # The AI interview asked something back (no WhatsApp number is registered in the
            # demo, so the send is recorded as failed with the reason).
            return (inbound, asked) if len(inbound) == 3 and asked else None

        items, asked = eventually(history)
        assert [m["text"] for m in items] == ["Hi there", "What does the Pro plan cost?", "Thanks!"]
        assert asked[0]["error_code"] == "no_channel"
        assert (
            client.get(f"/api/leads/{lead_id}").json()["qualification"]["status"] == "in_progress"
        )
        listed = client.get("/api/leads").json()["items"]
        assert [lead["lead_id"] for lead in listed] == [lead_id]

    assert run.stop(signal.SIGINT) == 0

    # A second `make run` needs no cleanup: the stack is found running, the schema is current,
    # and the demo tenant (and its key) is the same.
    again, second_key = start_run(processes, run_settings, "run-2")
    assert second_key == api_key
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        # Served at once: the banner waits until the table was restored from its changelog.
        response = client.get(f"/api/leads/{lead_id}")
        assert response.status_code == 200, response.text
        assert response.json()["message_count"] == 3
    assert again.stop(signal.SIGINT) == 0
