"""What every benchmark shares: a throw-away environment on the real local stack, and results."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from api.tenants import create_tenant
from flexoraa import stack
from flexoraa.kafka import delete_topics, ensure_topics
from flexoraa.settings import PROJECT_ROOT, Settings
from schemas.migrate import migrate

RESULTS = PROJECT_ROOT / "bench" / "results"
LOGS = RESULTS / "logs"
# Each run's directory (the workers' stores, its secrets key) and the pid of the run owning it.
RUNS_DIR = PROJECT_ROOT / ".stack"
OWNER_FILE = "owner.pid"
_RUN_DIR = re.compile(r"^bench-([0-9a-f]{8})$")
# Held while runs are swept, and while a run claims its directory.
_RUNS_LOCK = ".bench-runs.lock"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def dead_runs(runs_dir: Path = RUNS_DIR) -> list[str]:
    """Runs of this checkout whose process is gone: their directory names a pid that no
    longer runs, or none (a run killed before it wrote one; it writes it under the runs'
    lock, whole, so a sweep never reads one half-written)."""
    dead = []
    for directory in sorted(runs_dir.glob("bench-*")):
        if (found := _RUN_DIR.match(directory.name)) is None or not directory.is_dir():
            continue
        try:
            pid: int | None = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _running(pid):
            dead.append(found.group(1))
    return dead


@contextmanager
def _runs_lock(runs_dir: Path) -> Iterator[None]:
    runs_dir.mkdir(parents=True, exist_ok=True)
    with (runs_dir / _RUNS_LOCK).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_run(run_dir: Path) -> None:
    """Marks `run_dir` as this process's run (call under the runs' lock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    written = run_dir / f"{OWNER_FILE}.new"
    written.write_text(str(os.getpid()))
    written.replace(run_dir / OWNER_FILE)


def sweep_and_claim(
    base: Settings, superuser: Any, run_dir: Path | None = None, runs_dir: Path = RUNS_DIR
) -> list[str]:
    """Removes what bench runs of this checkout that were killed left behind (a run cleans up
    only when it ends): their databases, topics and directories. Left, a killed run's 26
    topics of 8 partitions stayed on the broker, which every later run's fetches and the
    broker's own work paid for. Only runs with a directory here whose process is gone are
    touched: a run still going, or one of another checkout sharing the stack, is not. Then
    claims `run_dir`, under the same lock, so no sweep takes a run that is starting. Returns
    what went."""
    with _runs_lock(runs_dir):
        dead = dead_runs(runs_dir)
        removed = asyncio.run(_drop_runs(base, superuser, dead)) if dead else []
        for run in dead:
            shutil.rmtree(runs_dir / f"bench-{run}", ignore_errors=True)
            removed.append(str(runs_dir / f"bench-{run}"))
        if run_dir is not None:
            claim_run(run_dir)
    return removed


async def _drop_runs(base: Settings, superuser: Any, runs: list[str]) -> list[str]:
    """The runs' databases and topics, dropped; returns their names."""
    removed: list[str] = []
    admin = await superuser()
    try:
        for run in runs:
            database = f"flexoraa_bench_{run}"
            if await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                removed.append(database)
    finally:
        await admin.close()
    for run in runs:
        removed += await delete_topics(base.model_copy(update={"topic_prefix": f"bench-{run}"}))
    return removed


def machine_facts() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux). Steadier than
    wall time for comparing changes on a shared two-core machine, where the broker and
    PostgreSQL take turns with the worker."""
    return _cpu_of(_stat_fields(Path(f"/proc/{pid}/stat")))


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/PID/stat file after the command's parentheses (field 3 on)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def _cpu_of(fields: list[str]) -> float:
    # utime and stime: fields 14 and 15 of stat(5), counted after the command's parentheses.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` of a process and of its children: PostgreSQL serves each connection from
    a process of its own. A child that exited since is not counted."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat)
            if int(fields[1]) == pid:  # the parent's pid: field 4 of stat(5)
                total += _cpu_of(fields)
        except (OSError, IndexError, ValueError):
            continue  # exited while read
    return total


def pauses(url: str) -> dict[str, float]:
    """A process's pause counters from its /metrics page (`flexoraa.runtime`): subtract two
    snapshots to see how much of a run's tail was garbage collection or a blocked loop."""
    return pauses_in(httpx.get(f"{url}/metrics", timeout=30).text)


def pauses_in(text: str) -> dict[str, float]:
    """`pauses` of a /metrics page already fetched."""
    found = {"gc_s": 0.0, "gc_collections": 0.0, "gc_gen2": 0.0, "lag_samples": 0.0,
             "lag_under_25ms": 0.0, "producer_blocked_s": 0.0}  # fmt: skip
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "flexoraa_gc_pause_seconds_sum":
                found["gc_s"] += sample.value
            elif sample.name == "flexoraa_gc_pause_seconds_count":
                found["gc_collections"] += sample.value
                if sample.labels["generation"] == "2":
                    found["gc_gen2"] += sample.value
            elif sample.name == "flexoraa_producer_blocked_seconds_total":
                found["producer_blocked_s"] += sample.value
            elif sample.name == "flexoraa_event_loop_lag_seconds_count":
                found["lag_samples"] += sample.value
            elif (
                sample.name == "flexoraa_event_loop_lag_seconds_bucket"
                and float(sample.labels["le"]) == 0.025
            ):
                found["lag_under_25ms"] += sample.value
    return found


def pauses_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {key: after[key] - before[key] for key in after}
    return {
        "gc_ms": round(delta["gc_s"] * 1000, 1),
        # How long one collection held the loop, on average: what a higher GC_GEN0_THRESHOLD
        # costs each time it runs.
        "gc_mean_ms": round(delta["gc_s"] * 1000 / max(delta["gc_collections"], 1), 3),
        "gc_gen2": delta["gc_gen2"],
        "loop_lag_over_25ms": delta["lag_samples"] - delta["lag_under_25ms"],
        # Sends that waited for a full batch to go (the worker's; the API has no such metric).
        "producer_blocked_ms": round(delta["producer_blocked_s"] * 1000, 1),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def write_result(name: str, result: dict[str, Any]) -> Path:
    result = {
        "benchmark": name,
        "at": datetime.now(UTC).isoformat(),
        "machine": machine_facts(),
        **result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


@dataclass
class BenchEnvironment:
    settings: Settings
    tenant_id: str
    api_key: str
    database: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "TOPIC_PREFIX": self.settings.topic_prefix,
            "DATABASE_URL": self.settings.database_url,
            "STACK_DIR": str(self.settings.stack_dir),
            "WORKER_URL": self.settings.worker_url,
            "API_PORT": str(self.settings.api_port),
            "LOG_LEVEL": "WARNING",
            # The benchmarks measure the pipeline, not the per-key limits.
            "API_RATE_LIMIT": "1000000/second",
            "WEBHOOK_RATE_LIMIT": "1000000/second",
            **extra,
        }

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """Starts `flexoraa ARGS`; its output goes to bench/results/logs/<prefix>-<command>.log,
        so a process that dies mid-run says why."""
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{self.settings.topic_prefix}-{args[0]}.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "flexoraa", *args],
                env=self.env(**env),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        print(f"{args[0]} log: {log}")
        self.processes.append(process)
        return process

    def stop(self, *processes: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
        """SIGTERM, then SIGKILL for any still running after `timeout_s`: a worker left behind
        keeps its port and writes into the topics the environment deletes (seen once: a worker
        that had not drained its streams 30 s after SIGTERM broke the next run)."""
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"pid {process.pid} still running {timeout_s:g} s after SIGTERM: killed")
                process.kill()
                process.wait()


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


@contextmanager
def bench_environment(
    api_port: int = 18000, worker_port: int = 16066
) -> Iterator[BenchEnvironment]:
    """The local stack, plus a fresh database, topic prefix and tenant; removed afterwards."""
    base = Settings()
    stack.stack_up(base)
    run_id = uuid.uuid4().hex[:8]
    database = f"flexoraa_bench_{run_id}"
    settings = base.model_copy(
        update={
            "topic_prefix": f"bench-{run_id}",
            "database_url": base.database_url.rsplit("/", 1)[0] + f"/{database}",
            "stack_dir": PROJECT_ROOT / ".stack" / f"bench-{run_id}",
            "api_port": api_port,
            "worker_url": f"http://127.0.0.1:{worker_port}",
        }
    )

    async def superuser() -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=base.postgres_port, user="postgres", database="postgres"
        )

    async def prepare() -> tuple[str, str]:
        admin = await superuser()
        await admin.execute(f'CREATE DATABASE "{database}" OWNER flexoraa')
        await admin.close()
        await migrate(settings.database_url)
        await ensure_topics(settings)
        conn = await asyncpg.connect(settings.database_url)
        tenant = await create_tenant(conn, "bench", trial_tokens=10**9)
        await conn.close()
        return tenant.tenant_id, tenant.api_key

    async def cleanup() -> None:
        # The database first, then the topics: a broker that did not come back (bench.outage
        # stops it) must not leave the run's database behind. The directory (the workers'
        # stores, the run's secrets key, its owner) goes last, once both went: kept, it has
        # the next run sweep what is left.
        try:
            admin = await superuser()
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            finally:
                await admin.close()
        finally:
            await delete_topics(settings)
        shutil.rmtree(settings.stack_dir, ignore_errors=True)

    # Claimed before anything is made: a run killed from here on is swept by the next.
    if swept := sweep_and_claim(base, superuser, settings.stack_dir):
        print(f"removed {len(swept)} databases, topics and directories of killed bench runs")
    tenant_id, api_key = asyncio.run(prepare())
    environment = BenchEnvironment(settings, tenant_id, api_key, database)
    try:
        yield environment
    finally:
        environment.stop(*(p for p in environment.processes if p.poll() is None))
        asyncio.run(cleanup())
