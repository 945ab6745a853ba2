"""The worker's own web pages: health and live table lookups routed to the partition owner.

The API reads live state here. Any worker can be asked: `table_route` forwards the request to
the worker that owns the lead's partition, so the answer is the owner's current state.
"""

from __future__ import annotations

from typing import Any

from faust.types import AppT, TableT
from faust.web import Request, Response, View


def register(app: AppT, *, sessions: TableT[bytes, Any]) -> None:
    @app.page("/health")
    async def health(self: View, request: Request) -> Response:
        return self.json({"status": "ok"})

    @app.page("/ready")
    async def ready(self: View, request: Request) -> Response:
        # Serving table reads before recovery finished would answer from partial state.
        assigned = len(app.consumer.assignment()) if app.consumer else 0
        if app.rebalancing or getattr(app, "in_recovery", False) or not assigned:
            return self.json(
                {"status": "unavailable", "detail": "rebalancing or recovering tables"},
                status=503,
            )
        return self.json({"status": "ready", "assigned_partitions": assigned})

    @app.page("/internal/leads/{lead_id}")
    @app.table_route(table=sessions, match_info="lead_id")
    async def lead_state(self: View, request: Request, lead_id: str) -> Response:
        state: Any = sessions.get(lead_id.encode())
        if state is None:
            return self.json({"error": "lead not found"}, status=404)
        return self.json({"session": state})
