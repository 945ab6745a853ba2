"""Which bench runs of this checkout were killed: their directory names a pid gone, or none."""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import OWNER_FILE, claim_run, dead_runs


def test_a_run_is_dead_once_the_pid_its_directory_names_is_gone(tmp_path: Path) -> None:
    def owned(run: str, pid: str | None) -> None:
        (tmp_path / f"bench-{run}").mkdir()
        if pid is not None:
            (tmp_path / f"bench-{run}" / OWNER_FILE).write_text(pid)

    owned("0000000a", str(os.getpid()))
    owned("0000000b", "999999999")  # no such process
    owned("0000000c", "not a pid")
    owned("0000000d", None)  # killed before it wrote its owner
    # Not a run's directory: the stack's own, a longer or upper-case id, a file.
    for other in ("kafka", "bench-0000000e-backup", "bench-0000000F"):
        (tmp_path / other).mkdir()
    (tmp_path / "bench-0000000f").write_text("")
    assert dead_runs(tmp_path) == ["0000000b", "0000000c", "0000000d"]


def test_a_claimed_run_is_alive_while_its_process_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "bench-0000000a"
    claim_run(run_dir)
    assert (run_dir / OWNER_FILE).read_text() == str(os.getpid())
    assert not (run_dir / f"{OWNER_FILE}.new").exists()
    assert dead_runs(tmp_path) == []
