"""Secrets at rest: AES-256-GCM with a key from settings.

Stored form: version byte || 12-byte nonce || ciphertext+tag. The associated data binds a
ciphertext to its row (e.g. the channel id), so a secret copied into another row does not
decrypt there.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flexoraa.settings import Settings

_VERSION = b"\x01"
_NONCE_BYTES = 12


class SecretsKeyMissing(RuntimeError):
    """Production needs SECRETS_ENCRYPTION_KEY; nothing generates one there."""


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the secrets key must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str, associated: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode(), associated.encode())

    def decrypt(self, stored: bytes, associated: str) -> str:
        if not stored.startswith(_VERSION):
            raise ValueError("unknown secret format")
        nonce = stored[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(
                nonce, stored[1 + _NONCE_BYTES :], associated.encode()
            ).decode()
        except InvalidTag as exc:
            raise ValueError("secret does not decrypt with this key and row") from exc


def load_secret_box(settings: Settings) -> SecretBox:
    """The box of SECRETS_ENCRYPTION_KEY; outside production, a key kept in the stack directory.

    The local key is generated once (mode 0600) so every local process shares it; production
    refuses to start without an explicit key, because a lost key loses every stored secret.
    """
    if settings.secrets_encryption_key is not None:
        return SecretBox(base64.b64decode(settings.secrets_encryption_key.get_secret_value()))
    if settings.environment == "production":
        raise SecretsKeyMissing("SECRETS_ENCRYPTION_KEY is required in production")
    path = Path(settings.stack_dir) / "secrets.key"
    if not path.exists():
        _create_key_file(path)
    return SecretBox(base64.b64decode(path.read_text().strip()))


def _create_key_file(path: Path) -> None:
    """Writes a new key to `path` unless another process got there first.

    `flexoraa run` starts its processes at once on a new stack: each saw no key, and the
    second to create it failed (FileExistsError), or read it half written. The key is written
    aside and linked into place, which is atomic and fails if the file exists: every process
    then reads the one whole key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)).decode())
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    finally:
        os.unlink(aside)
