import base64
import os
from pathlib import Path

import pytest

from flexoraa.crypto import SecretBox, SecretsKeyMissing, load_secret_box
from flexoraa.settings import Settings


def test_round_trip_and_binding_to_the_row() -> None:
    box = SecretBox(os.urandom(32))
    stored = box.encrypt("EAAG-access-token", "channel-1:access_token")
    assert b"EAAG" not in stored
    assert box.decrypt(stored, "channel-1:access_token") == "EAAG-access-token"
    with pytest.raises(ValueError, match="does not decrypt"):
        box.decrypt(stored, "channel-2:access_token")
    with pytest.raises(ValueError, match="does not decrypt"):
        SecretBox(os.urandom(32)).decrypt(stored, "channel-1:access_token")


def test_nonces_differ() -> None:
    box = SecretBox(os.urandom(32))
    assert box.encrypt("x", "a") != box.encrypt("x", "a")


def test_keys_from_settings_and_the_local_fallback(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    explicit = load_secret_box(Settings(secrets_encryption_key=key, stack_dir=tmp_path))
    local = load_secret_box(Settings(stack_dir=tmp_path))
    again = load_secret_box(Settings(stack_dir=tmp_path))
    assert again.decrypt(local.encrypt("s", "r"), "r") == "s"  # the same local key
    assert (tmp_path / "secrets.key").stat().st_mode & 0o777 == 0o600
    assert explicit.decrypt(explicit.encrypt("s", "r"), "r") == "s"
    with pytest.raises(SecretsKeyMissing):
        load_secret_box(
            Settings(
                environment="production", kafka_bootstrap_servers="kafka:9092", stack_dir=tmp_path
            )
        )


def test_processes_starting_at_once_share_the_one_local_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `flexoraa run` starts its processes together on a new stack: each saw no key file, and
    # the second to create it failed (FileExistsError), so the API did not start (a CI run).
    first = load_secret_box(Settings(stack_dir=tmp_path))
    sealed = first.encrypt("token", "row")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # it looked before the first wrote
    second = load_secret_box(Settings(stack_dir=tmp_path))
    assert second.decrypt(sealed, "row") == "token"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.key"]  # nothing left aside
