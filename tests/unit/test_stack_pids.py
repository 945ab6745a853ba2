"""`flexoraa stack stop` kills only the broker it started: a pid file left by a crash or a
reboot may name a process that is now someone else's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
