"""docker-compose.yml cannot run here (no Docker engine); Debian's docker-compose validates it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flexoraa.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.e2e
COMPOSE = PROJECT_ROOT / "docker-compose.yml"
SECRETS = {
    "POSTGRES_PASSWORD": "dummy",
    "GRAFANA_ADMIN_PASSWORD": "dummy",
    "SECRETS_ENCRYPTION_KEY": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is installed by `make setup` (Debian package docker-compose)"
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=PROJECT_ROOT,
    )


def test_compose_file_is_valid() -> None:
    env = {**os.environ, **SECRETS}
    result = compose_config(env)
    assert result.returncode == 0, result.stderr


def test_secrets_are_required_variables() -> None:
    for missing in SECRETS:
        env = {k: v for k, v in {**os.environ, **SECRETS}.items() if k != missing}
        result = compose_config(env)
        assert result.returncode != 0, missing
        assert missing in result.stderr


def test_compose_runs_the_same_kafka_version_as_the_stack() -> None:
    images = re.findall(r"image:\s*apache/kafka:(\S+)", COMPOSE.read_text())
    assert images == [Settings().kafka_version]


def test_grafana_provisioning_files_exist() -> None:
    text = COMPOSE.read_text()
    for relative in re.findall(r"\./(dashboards/[^:\s]+)", text):
        assert (PROJECT_ROOT / relative).exists(), relative
    assert list(Path(PROJECT_ROOT / "dashboards").rglob("*.json"))


def service_block(name: str) -> str:
    """The text of one service's definition in docker-compose.yml."""
    text = COMPOSE.read_text()
    match = re.search(rf"^  {name}:\n((?:    .*\n|\s*\n)+)", text, re.M)
    assert match, name
    return match.group(1)


def test_the_worker_service_scales_out() -> None:
    """`docker compose up --scale worker=3`: no fixed host port, and no one name that every
    replica would advertise (each advertises its own container's address)."""
    assert "ports:" not in service_block("worker")
    assert "WORKER_CANONICAL_URL" not in COMPOSE.read_text()
    assert re.search(r"^\s+WORKER_WEB_HOST: 0\.0\.0\.0$", COMPOSE.read_text(), re.M)


def test_prometheus_finds_every_worker_replica() -> None:
    config = PROJECT_ROOT / "dashboards" / "prometheus" / "prometheus.yml"
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by `make setup` (Debian package prometheus)"
    checked = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    worker_job = config.read_text().split("job_name: worker", 1)[1]
    assert "dns_sd_configs:" in worker_job
    assert 'names: ["worker"]' in worker_job
