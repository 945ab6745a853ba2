"""Apply `schemas/migrations/*.sql` in order, each once, each in its own transaction."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant works; it only has to be the same for every migrating process.
_ADVISORY_LOCK_KEY = 7_351_204_118


class MigrationError(RuntimeError):
    """The database's applied migrations do not match the files."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    return [Migration(path.stem, path.read_text()) for path in sorted(directory.glob("*.sql"))]


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; returns the versions applied by this call."""
    conn = await asyncpg.connect(dsn)
    try:
        # Two processes starting together must not both apply the same file.
        await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version     text PRIMARY KEY,
                   checksum    text NOT NULL,
                   applied_at  timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        done: list[str] = []
        for migration in load_migrations(directory):
            known = applied.get(migration.version)
            if known is not None:
                if known != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            logger.info("applied migration %s", migration.version)
            done.append(migration.version)
        return done
    finally:
        await conn.close()
