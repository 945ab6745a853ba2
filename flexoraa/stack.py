"""The local stack: a real Kafka broker and a real PostgreSQL server on 127.0.0.1.

Machines here have Java and Maven but no Docker, Kafka or PostgreSQL server, so the project
provisions them itself:

* Kafka: the official `org.apache.kafka:kafka_2.13` artifacts from Maven Central, resolved with
  Maven into a cache outside git, formatted for single-node KRaft and started with `kafka.Kafka`.
* PostgreSQL: Debian's server packages (installed with apt when missing), a cluster of our own
  under the stack directory, trust authentication on loopback only.

Every `start_*` is idempotent: a server that already answers on its port is left alone.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from flexoraa.settings import Settings

logger = logging.getLogger(__name__)

_POM_TEMPLATE = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.flexoraa.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- The binary distribution ships this slf4j binding; without it the broker logs nothing. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>1.7.36</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J_PROPERTIES = """log4j.rootLogger=WARN, stdout
log4j.logger.kafka.server.KafkaServer=INFO
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
"""

_READY_TIMEOUT_S = 120.0
# Maven Central over a CI network: a transient failure of one of 57 downloads failed the run.
_MAVEN_ATTEMPTS = 3


class StackError(RuntimeError):
    """A server of the local stack could not be provisioned or started."""


@dataclass(frozen=True)
class ServerStatus:
    name: str
    running: bool
    address: str
    pid: int | None
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


KAFKA_MAIN_CLASS = "kafka.Kafka"


def _read_pid(pid_file: Path, command_has: str) -> int | None:
    """The pid the file names, if that process is alive and still ours: after a reboot or a
    crash the number may belong to another process (a shell, a service), which `stop` would
    have killed with its whole process group."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        # No /proc (not Linux): alive is all that can be known.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid
    return pid if command_has.encode() in command_line else None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- Kafka


def kafka_dir(settings: Settings) -> Path:
    return settings.stack_dir / "kafka"


def kafka_libs_dir(settings: Settings) -> Path:
    return settings.cache_dir / f"kafka-{settings.kafka_version}" / "libs"


def ensure_kafka_libs(settings: Settings) -> Path:
    """Resolve the broker's jars from Maven Central once; later calls reuse the cache.

    The jars are copied into a directory of this process's own and moved into place whole,
    the marker inside: an interrupted copy left a truncated jar that the next resolution kept
    (Maven overwrites a release jar only when its source is newer), and the broker failed at
    every start until someone deleted the cache. Checksums are enforced, and a failed
    resolution is tried again, forcing Maven past the failure it remembers in ~/.m2.
    """
    libs = kafka_libs_dir(settings)
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (mvn) is needed to fetch Apache Kafka from Maven Central")
    work = libs.parent
    work.mkdir(parents=True, exist_ok=True)
    pom = work / f"pom-{os.getpid()}.xml"
    pom.write_text(_POM_TEMPLATE.format(version=settings.kafka_version))
    partial = work / f"libs.partial-{os.getpid()}"
    logger.info("resolving Apache Kafka %s from Maven Central", settings.kafka_version)
    try:
        for attempt in Retrying(
            stop=stop_after_attempt(_MAVEN_ATTEMPTS),
            wait=wait_exponential(multiplier=5, max=30),
            retry=retry_if_exception_type(StackError),
            reraise=True,
        ):
            with attempt:
                shutil.rmtree(partial, ignore_errors=True)
                _resolve_kafka(mvn, pom, partial, force=attempt.retry_state.attempt_number > 1)
        (partial / ".complete").write_text(settings.kafka_version)
        if not marker.exists():
            # A directory without its marker is an interrupted copy of an older version.
            shutil.rmtree(libs, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process moved its own copy first
            partial.rename(libs)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        pom.unlink(missing_ok=True)
    if not marker.exists():
        raise StackError(f"the Kafka jars could not be moved into {libs}")
    return libs


def _resolve_kafka(mvn: str, pom: Path, into: Path, *, force: bool) -> None:
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-C",  # a checksum that does not match fails, not a warning
            *(["-U"] if force else []),
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={into}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(
            f"mvn could not resolve Kafka:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka's Uuid.randomUuid() makes one: URL-safe base64 of 16 random
    bytes, without padding, and never starting with "-". One in 64 does, and the storage tool's
    argument parser then read it as an option: formatting failed and the stack did not start."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _kafka_properties(settings: Settings, data_dir: Path) -> str:
    port = settings.kafka_port
    ctrl = settings.kafka_controller_port
    partitions = settings.kafka_partitions
    return f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{ctrl}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data_dir}
num.partitions={partitions}
# Topics are created explicitly with the co-partitioned count; a typo must not create one.
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
# A single local broker has no other members to wait for; rebalance at once.
group.initial.rebalance.delay.ms=0
log.retention.hours=168
# A deleted topic's files go after a second, not a minute: test sessions and benchmarks delete
# their topics and then stop the broker, and files still waiting stayed (7,710 directories
# after a day of test runs, all read again at every start).
log.segment.delete.delay.ms=1000
# And the first clean-up a second after a start, not 30: a test session's broker is often
# stopped sooner.
log.initial.task.delay.ms=1000
"""


def _java_command(libs: Path, *args: str, log4j: Path | None = None) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise StackError("Java 17 is needed to run the Kafka broker")
    command = [java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-cp", f"{libs}/*"]
    if log4j is not None:
        command.append(f"-Dlog4j.configuration=file:{log4j}")
    return [*command, *args]


def kafka_status(settings: Settings) -> ServerStatus:
    pid = _read_pid(kafka_dir(settings) / "kafka.pid", KAFKA_MAIN_CLASS)
    address = f"127.0.0.1:{settings.kafka_port}"
    running = port_open("127.0.0.1", settings.kafka_port)
    if running:
        detail = "running" if pid else "answering (not started by this stack)"
    else:
        detail = "starting" if pid else "stopped"
    return ServerStatus("kafka", running, address, pid, detail)


def start_kafka(settings: Settings) -> ServerStatus:
    status = kafka_status(settings)
    if status.running:
        # Accepting connections is not ready: a broker another process just started may
        # still be electing its controller, and creating topics on it failed.
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not _kafka_answers_metadata(settings):
            if time.monotonic() >= deadline:
                raise StackError(
                    f"Kafka on {status.address} accepts connections but does not answer "
                    f"metadata requests after {_READY_TIMEOUT_S:.0f}s"
                )
            time.sleep(0.3)
        return status
    libs = ensure_kafka_libs(settings)
    root = kafka_dir(settings)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    properties = root / "server.properties"
    properties.write_text(_kafka_properties(settings, data_dir))
    log4j = root / "log4j.properties"
    log4j.write_text(_LOG4J_PROPERTIES)
    log_file = root / "kafka.log"
    if not (data_dir / "meta.properties").exists():
        cluster_id = new_cluster_id()
        formatted = subprocess.run(
            _java_command(
                libs,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
                "--ignore-formatted",
                log4j=log4j,
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if formatted.returncode != 0:
            raise StackError(f"formatting KRaft storage failed:\n{formatted.stderr[-3000:]}")
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            _java_command(libs, KAFKA_MAIN_CLASS, str(properties), log4j=log4j),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (root / "kafka.pid").write_text(str(process.pid))
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"Kafka exited with {process.returncode}:\n{_tail(log_file)}")
        if port_open("127.0.0.1", settings.kafka_port) and _kafka_answers_metadata(settings):
            return kafka_status(settings)
        time.sleep(0.3)
    raise StackError(f"Kafka did not become ready in {_READY_TIMEOUT_S:.0f}s:\n{_tail(log_file)}")


def _kafka_answers_metadata(settings: Settings) -> bool:
    """A broker that accepts TCP may still be electing its controller; ask it for metadata."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap_servers, request_timeout_ms=3000
        )
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())


def stop_kafka(settings: Settings) -> ServerStatus:
    pid_file = kafka_dir(settings) / "kafka.pid"
    pid = _read_pid(pid_file, KAFKA_MAIN_CLASS)
    if pid is not None:
        _terminate(pid, grace_s=30.0)
    pid_file.unlink(missing_ok=True)
    return kafka_status(settings)


def _terminate(pid: int, grace_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_gone(pid, grace_s):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    # Its data directory's lock goes with it: a start right after a stop must find it free.
    _wait_gone(pid, 10.0)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether `pid` exited within `timeout_s`. A child of this process (the broker a test
    session or `stack up` in the same process started) is reaped here: unreaped, it stays a
    zombie that `kill(pid, 0)` still finds, and every stop waited out its whole grace period
    (30 s per broker restart in the fault tests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass  # not ours: its parent reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin_dir() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


def ensure_postgres_installed() -> Path:
    """Debian's PostgreSQL server binaries, installed with apt when missing."""
    bin_dir = _pg_bin_dir()
    if bin_dir is not None:
        return bin_dir
    apt = shutil.which("apt-get")
    if apt is None:
        raise StackError("PostgreSQL is not installed and apt-get is not available to install it")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    logger.info("installing PostgreSQL from Debian packages")
    # A new VM's apt-daily often holds the package lock for minutes: wait for it, not fail.
    apt_get = [*prefix, apt, "-qq", "-o", "DPkg::Lock::Timeout=600"]
    for command in (
        [*apt_get, "update"],
        [*apt_get, "install", "-y", "--no-install-recommends", "postgresql"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise StackError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        raise StackError(
            "apt installed postgresql but no initdb was found under /usr/lib/postgresql"
        )
    return bin_dir


def postgres_dir(settings: Settings) -> Path:
    return settings.stack_dir / "postgres"


def _as_server_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; Debian's package creates the `postgres` user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def postgres_status(settings: Settings) -> ServerStatus:
    root = postgres_dir(settings)
    pid: int | None = None
    try:
        pid = int((root / "data" / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    running = port_open("127.0.0.1", settings.postgres_port)
    detail = "running" if running else "stopped"
    if running and pid is None:
        detail = "answering (not started by this stack)"
    return ServerStatus("postgres", running, f"127.0.0.1:{settings.postgres_port}", pid, detail)


def start_postgres(settings: Settings) -> ServerStatus:
    status = postgres_status(settings)
    if not status.running:
        bin_dir = ensure_postgres_installed()
        root = postgres_dir(settings)
        data_dir = root / "data"
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        if not (data_dir / "PG_VERSION").exists():
            # Into a directory of its own, moved into place once complete: initdb writes
            # PG_VERSION first, so one cut short left a cluster every later start took for
            # made, and PostgreSQL failed to start until someone deleted it.
            fresh = root / "data.initdb"
            shutil.rmtree(fresh, ignore_errors=True)
            shutil.rmtree(data_dir, ignore_errors=True)  # begun before a version was written
            initdb = subprocess.run(
                _as_server_user(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(fresh),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C",
                    ]
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if initdb.returncode != 0:
                raise StackError(
                    f"initdb failed (is {root} reachable by the postgres user?):\n"
                    f"{initdb.stderr[-3000:]}"
                )
            fresh.rename(data_dir)
        options = (
            f"-p {settings.postgres_port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={root} -c max_connections=200 -c fsync=on"
        )
        started = subprocess.run(
            _as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data_dir),
                    "-l",
                    str(root / "postgres.log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if started.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start:\n{started.stderr[-2000:]}\n"
                f"{_tail(root / 'postgres.log')}"
            )
    _ensure_role_and_database(settings)
    return postgres_status(settings)


def _ensure_role_and_database(settings: Settings) -> None:
    """Create the application's role and database named in DATABASE_URL, if missing."""
    import asyncio

    import asyncpg

    url = urlsplit(settings.database_url)
    role = url.username or "flexoraa"
    database = (url.path or "/flexoraa").lstrip("/") or "flexoraa"

    async def ensure() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=settings.postgres_port, user="postgres", database="postgres"
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f'CREATE ROLE "{role}" LOGIN CREATEDB')
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await conn.execute(f'CREATE DATABASE "{database}" OWNER "{role}"')
        finally:
            await conn.close()

    asyncio.run(ensure())


def stop_postgres(settings: Settings) -> ServerStatus:
    bin_dir = _pg_bin_dir()
    data_dir = postgres_dir(settings) / "data"
    if bin_dir is not None and (data_dir / "postmaster.pid").exists():
        subprocess.run(
            _as_server_user(
                [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"]
            ),
            capture_output=True,
            check=False,
        )
    return postgres_status(settings)


# --------------------------------------------------------------------------- the stack


@contextlib.contextmanager
def _one_at_a_time(settings: Settings) -> Iterator[None]:
    """Holds the stack directory's lock: two starts at once (`make run` beside a test session)
    rewrote the broker's configuration under each other, both started a broker on one data
    directory, and both created the role and the database (the second failed)."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    with (settings.stack_dir / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another start or stop of the stack in %s", settings.stack_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def stack_up(settings: Settings) -> list[ServerStatus]:
    with _one_at_a_time(settings):
        return [start_kafka(settings), start_postgres(settings)]


def stack_down(settings: Settings) -> list[ServerStatus]:
    """Stops both; raises StackError if either still answers (`make clean` deletes their data
    right after)."""
    with _one_at_a_time(settings):
        statuses = [stop_kafka(settings), stop_postgres(settings)]
    running = [status.name for status in statuses if status.running]
    if running:
        names = ", ".join(running)
        raise StackError(f"still running after stop: {names}\n{describe(statuses)}")
    return statuses


def stack_status(settings: Settings) -> list[ServerStatus]:
    return [kafka_status(settings), postgres_status(settings)]


def describe(statuses: list[ServerStatus]) -> str:
    return json.dumps([s.as_dict() for s in statuses], indent=2)
