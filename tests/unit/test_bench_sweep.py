"""Which names a bench run left behind: its topics, database and directory."""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import OWNER_FILE, abandoned, live_runs, run_id_of


def test_a_runs_topics_database_and_directory_name_it() -> None:
    assert run_id_of("bench-0a1b2c3d.inbound-messages") == "0a1b2c3d"
    assert run_id_of("bench-0a1b2c3d-sessions-changelog") == "0a1b2c3d"
    assert run_id_of("flexoraa_bench_0a1b2c3d") == "0a1b2c3d"
    assert run_id_of("bench-0a1b2c3d") == "0a1b2c3d"
    # Nothing else is a bench run's: the pipeline's topics, tests', a longer id, other text.
    for name in ("flexoraa.inbound-messages", "test-0a1b2c3d4e.inbound-messages",
                 "bench-0a1b2c3d4e.inbound-messages", "bench-0A1B2C3D.x", "flexoraa_bench",
                 "flexoraa", "benchmarks-0a1b2c3d"):  # fmt: skip
        assert run_id_of(name) is None, name


def test_only_names_of_runs_no_longer_running_are_abandoned() -> None:
    names = ["bench-0a1b2c3d.inbound-messages", "flexoraa_bench_0a1b2c3d",
             "bench-ffffffff.inbound-messages", "flexoraa.inbound-messages"]  # fmt: skip
    assert abandoned(names, {"ffffffff"}) == names[:2]


def test_a_run_is_live_while_the_pid_its_directory_names_runs(tmp_path: Path) -> None:
    def owned(run: str, pid: str) -> None:
        (tmp_path / f"bench-{run}").mkdir()
        (tmp_path / f"bench-{run}" / OWNER_FILE).write_text(pid)

    owned("0000000a", str(os.getpid()))
    owned("0000000b", "999999999")  # no such process
    owned("0000000c", "not a pid")
    (tmp_path / "bench-0000000d").mkdir()  # killed before it wrote its owner
    (tmp_path / "kafka").mkdir()
    assert live_runs(tmp_path) == {"0000000a"}
