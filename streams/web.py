"""The worker's own web pages: health, readiness and live table reads.

The API reads live state here. Any worker can be asked: a read for a lead whose partition
another worker owns is forwarded to that worker, so the answer is the owner's current state.

Faust's `table_route` is not used: it finds the partition through the producer's metadata,
which a worker that has not yet produced to the changelog does not have (the read fails), so
the owner is computed here with the same murmur2 partitioner every Kafka producer uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from faust.types import AppT, TableT
from faust.web import Request, Response, View
from yarl import URL

from flexoraa.kafka import partition_of
from streams.rules.tokens import Account


def _owners(app: AppT, table: TableT[bytes, Any]) -> dict[int, str]:
    """Partition number → URL of the worker that owns it (active, not standby)."""
    owners: dict[int, str] = {}
    for url, topics in app.router.table_metadata(table.name).items():
        for partitions in topics.values():
            for partition in partitions:
                owners[partition] = url
    return owners


def _same_worker(url: str, own: URL) -> bool:
    other = URL(url)
    return (other.host, other.port) == (own.host, own.port)


class PartitionOwners:
    """Which worker owns each partition of a table: None for this worker, else its URL.

    Worked out again only when the assignor holds a new distribution (Faust replaces it on
    every assignment), not on every read: going through the assignor's metadata and parsing
    the URLs took a fifth of the worker's web handling of a live read (py-spy, bench.reads),
    about 0.02 ms of the 0.45 ms of worker CPU a read costs."""

    def __init__(self, app: AppT, table: TableT[bytes, Any]) -> None:
        self._app = app
        self._table = table
        self._own = URL(str(app.conf.canonical_url))
        self._seen: object = None
        self._owners: dict[int, str | None] = {}

    def __call__(self) -> dict[int, str | None]:
        distribution = self._app.assignor.tables_metadata()
        if distribution is not self._seen:
            self._owners = {
                partition: None if _same_worker(url, self._own) else url
                for partition, url in _owners(self._app, self._table).items()
            }
            self._seen = distribution
        return self._owners


def unready_reason(
    app: AppT,
    sessions: TableT[bytes, Any],
    partitions: int,
    tenant_statuses_loaded: Callable[[], bool],
) -> str | None:
    """Why the worker cannot serve yet, or None once it can."""
    assigned = len(app.consumer.assignment()) if app.consumer else 0
    recovering = app.rebalancing or getattr(app, "in_recovery", False)
    # Serving table reads before recovery finished would answer from partial state.
    if recovering or not assigned or len(_owners(app, sessions)) != partitions:
        return "rebalancing or recovering tables"
    # Table recovery starts the worker's tasks, the tenant-status reader among them, and every
    # AI action waits until that reader has loaded (0.1 s here; when it took 0.7 s, a worker
    # started under 600 messages/s held its first records 0.6 s and took seconds to catch up).
    if not tenant_statuses_loaded():
        return "reading tenant statuses"
    return None


def register(
    app: AppT,
    *,
    sessions: TableT[bytes, Any],
    qualification: TableT[bytes, Any],
    token_accounts: TableT[bytes, Any],
    deferred_ai: TableT[bytes, Any],
    partitions: int,
    tenant_statuses_loaded: Callable[[], bool],
) -> None:
    @app.page("/health")
    async def health(self: View, request: Request) -> Response:
        return self.json({"status": "ok"})

    @app.page("/ready")
    async def ready(self: View, request: Request) -> Response:
        reason = unready_reason(app, sessions, partitions, tenant_statuses_loaded)
        if reason is not None:
            return self.json({"status": "unavailable", "detail": reason}, status=503)
        assigned = len(app.consumer.assignment())
        return self.json({"status": "ready", "assigned_partitions": assigned})

    owners = PartitionOwners(app, sessions)

    async def elsewhere(view: View, key: bytes, path: str) -> Response | None:
        """The owner's answer when another worker owns `key`'s partition, else None."""
        partition = partition_of(key, partitions)
        known = owners()
        if partition not in known:
            return view.json({"error": "partition owner unknown (rebalancing)"}, status=503)
        owner = known[partition]
        if owner is None:
            return None
        async with app.http_client.get(f"{owner.rstrip('/')}{path}") as forwarded:
            return view.json(await forwarded.json(), status=forwarded.status)

    @app.page("/internal/tenants/{tenant_id}/tokens")
    async def tenant_tokens(self: View, request: Request, tenant_id: str) -> Response:
        key = tenant_id.encode()
        path = f"/internal/tenants/{tenant_id}/tokens"
        if (forwarded := await elsewhere(self, key, path)) is not None:
            return forwarded
        account = Account.from_dict(token_accounts.get(key))
        return self.json(
            {
                "balance": account.balance,
                "credited": account.credited,
                "debited": account.debited,
                "used": account.used,
                "used_this_cycle": account.cycle_used,
                "cycle_base": account.cycle_base,
                "percent_used": account.cycle_percent,
                "alerted_thresholds": list(account.alerted),
                "paused": account.paused,
            }
        )

    @app.page("/internal/leads/{lead_id}")
    async def lead_state(self: View, request: Request, lead_id: str) -> Response:
        key = lead_id.encode()
        if (forwarded := await elsewhere(self, key, f"/internal/leads/{lead_id}")) is not None:
            return forwarded
        state: Any = sessions.get(key)
        if state is None:
            return self.json({"error": "lead not found"}, status=404)
        # The AI work kept for the lead until its tenant has tokens: the id of each event.
        kept = (deferred_ai.get(key) or {}).get("actions", {})
        waiting = {kind: [payload["event_id"] for payload in payloads]
                   for kind, payloads in kept.items()}  # fmt: skip
        return self.json(
            {"session": state, "qualification": qualification.get(key), "deferred_ai": waiting}
        )
