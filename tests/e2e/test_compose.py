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
