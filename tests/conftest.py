"""Fixtures shared by the integration and end-to-end tests.

The test session starts the real stack (Kafka broker, PostgreSQL) the way `flexoraa stack up`
does. If it cannot start, the tests that need it fail; they are never skipped. Each session
gets its own topic prefix (so its own topics, consumer group and changelogs) and its own
database, so runs do not see each other's data.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from flexoraa import stack
from flexoraa.kafka import delete_topics, ensure_topics
from flexoraa.settings import Settings
from schemas.migrate import migrate

_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and not given before in this session: the kernel hands a port just
    released out again, and two calls in a row (an API's and a worker's) could get the same."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a subprocess needs to run with these settings."""
    env = {
        **os.environ,
        "ENVIRONMENT": settings.environment,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_PARTITIONS": str(settings.kafka_partitions),
        "TOPIC_PREFIX": settings.topic_prefix,
        "DATABASE_URL": settings.database_url,
        "STACK_DIR": str(settings.stack_dir),
        "WORKER_WEB_PORT": str(settings.worker_web_port),
        "WORKER_URL": settings.worker_url,
        "API_PORT": str(settings.api_port),
        "SINK_BATCH_WINDOW_MS": str(settings.sink_batch_window_ms),
        "LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


def http_get_json(url: str, timeout_s: float = 2.0) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="session")
def running_stack() -> Iterator[Settings]:
    """The stack of `flexoraa stack up`; what this session started, it stops at the end."""
    settings = Settings(environment="test")
    already_running = {status.name for status in stack.stack_status(settings) if status.running}
    try:
        stack.stack_up(settings)
    except stack.StackError as exc:
        pytest.fail(f"the local stack (Kafka, PostgreSQL) could not start: {exc}")
    yield settings
    if "kafka" not in already_running:
        stack.stop_kafka(settings)
    if "postgres" not in already_running:
        stack.stop_postgres(settings)


async def _superuser(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=settings.postgres_port, user="postgres", database="postgres"
    )


@pytest.fixture(scope="session")
async def test_settings(
    running_stack: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """Settings of this test session: own database, own topic prefix, own stack directory."""
    run_id = uuid.uuid4().hex[:10]
    database = f"flexoraa_test_{run_id}"
    conn = await _superuser(running_stack)
    try:
        await conn.execute(f'CREATE DATABASE "{database}" OWNER flexoraa')
    finally:
        await conn.close()
    settings = Settings(
        environment="test",
        topic_prefix=f"test-{run_id}",
        database_url=f"postgresql://flexoraa@127.0.0.1:{running_stack.postgres_port}/{database}",
        stack_dir=tmp_path_factory.mktemp("stack"),
        kafka_bootstrap_servers=running_stack.kafka_bootstrap_servers,
        sink_batch_window_ms=50,
    )
    await migrate(settings.database_url)
    await ensure_topics(settings)
    yield settings
    conn = await _superuser(running_stack)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()
    await delete_topics(settings)


@pytest.fixture
async def db(test_settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(test_settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@dataclass
class Tenant:
    tenant_id: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


MakeTenant = Callable[..., Awaitable[Tenant]]


@pytest.fixture
def make_tenant(db: asyncpg.Connection) -> MakeTenant:
    from api.tenants import create_tenant

    async def make(name: str = "Acme", tokens: int = 100_000) -> Tenant:
        # Plenty of trial tokens: only the token tests run a tenant dry.
        created = await create_tenant(db, name, trial_tokens=tokens)
        return Tenant(created.tenant_id, created.api_key)

    return make


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


StartProcess = Callable[[str, list[str], dict[str, str]], ManagedProcess]


@contextmanager
def process_starter(logs: Path) -> Iterator[StartProcess]:
    """Starts `python -m flexoraa <args>` processes; stops them all on exit."""
    started: list[ManagedProcess] = []

    def start(name: str, args: list[str], env: dict[str, str]) -> ManagedProcess:
        log_path = logs / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "flexoraa", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        managed = ManagedProcess(name, process, log_path)
        started.append(managed)
        return managed

    try:
        yield start
    finally:
        for managed in started:
            managed.stop()


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartProcess]:
    """Processes of a test module, stopped after it."""
    with process_starter(tmp_path_factory.mktemp("logs")) as start:
        yield start


def start_worker(
    processes: StartProcess,
    settings: Settings,
    name: str = "worker",
    web_port: int | None = None,
    **extra_env: str,
) -> ManagedProcess:
    port = web_port or free_port()
    env = settings_env(
        settings,
        WORKER_WEB_PORT=str(port),
        WORKER_URL=f"http://127.0.0.1:{port}",
        **extra_env,
    )
    worker = processes(name, ["worker"], env)
    worker.ports["web"] = port

    def ready() -> bool:
        if worker.process.poll() is not None:
            raise AssertionError(f"{name} exited:\n{worker.log_tail()}")
        status, _ = http_get_json(f"http://127.0.0.1:{port}/ready")
        return status == 200

    wait_until(ready, 120, f"{name} to be ready")
    return worker
