"""`flexoraa stack stop` kills only the broker it started: a pid file left by a crash or a
reboot may name a process that is now someone else's."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from flexoraa import stack
from flexoraa.settings import Settings
from flexoraa.stack import KAFKA_MAIN_CLASS, _read_pid


def test_a_pid_now_someone_elses_is_not_ours_to_stop(tmp_path: Path) -> None:
    pid_file = tmp_path / "kafka.pid"
    pid_file.write_text(str(os.getpid()))  # alive, but this test, not a broker
    assert _read_pid(pid_file, KAFKA_MAIN_CLASS) is None


def test_the_brokers_own_pid_is_found(tmp_path: Path) -> None:
    broker = subprocess.Popen(
        [sys.executable, "-c", "import time; print(flush=True); time.sleep(30)", KAFKA_MAIN_CLASS],
        stdout=subprocess.PIPE,
    )
    try:
        assert broker.stdout is not None
        broker.stdout.readline()  # running its own command line (forked, not exec'd, before)
        pid_file = tmp_path / "kafka.pid"
        pid_file.write_text(str(broker.pid))
        assert _read_pid(pid_file, KAFKA_MAIN_CLASS) == broker.pid
    finally:
        broker.kill()
        broker.wait()
        if broker.stdout is not None:
            broker.stdout.close()
    assert _read_pid(pid_file, KAFKA_MAIN_CLASS) is None  # gone


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xf8 encodes to "-" first: the storage tool took such an id for an option, and the
    # stack failed to start one time in 64 (a CI run).
    ids = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x10" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(ids))
    cluster_id = stack.new_cluster_id()
    assert cluster_id == base64.urlsafe_b64encode(b"\x10" * 16).rstrip(b"=").decode()
    assert len(cluster_id) == 22


def test_a_broker_this_process_started_is_reaped_when_stopped() -> None:
    # A test session starts the broker itself (and restarts it in the fault tests): stopped,
    # it stayed a zombie, which `kill(pid, 0)` still finds, so each stop waited its whole
    # grace period and then killed a process that had already exited.
    broker = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    stack._terminate(broker.pid, grace_s=30.0)
    assert not Path(f"/proc/{broker.pid}").exists()


def test_one_start_or_stop_of_a_stack_at_a_time(tmp_path: Path) -> None:
    # Two starts at once (`make run` beside a test session) rewrote the broker's configuration
    # under each other and both started a broker on one data directory.
    settings = Settings(stack_dir=tmp_path)
    entered = threading.Event()

    def second() -> None:
        with stack._one_at_a_time(settings):
            entered.set()

    with stack._one_at_a_time(settings):
        waiting = threading.Thread(target=second)
        waiting.start()
        assert not entered.wait(0.5)
    waiting.join(10)
    assert entered.is_set()
