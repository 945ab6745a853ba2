"""Pure ASGI middleware (no per-request task or body copy, unlike BaseHTTPMiddleware)."""

from __future__ import annotations

import asyncio
import json
import time

from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flexoraa.latency import LatencyRecorder

REQUESTS = Counter("flexoraa_api_requests", "API requests answered", ["method", "route", "status"])
REQUEST_DURATION = Histogram(
    "flexoraa_api_request_duration_seconds",
    "API request duration to the last byte of the response",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


_SLA_ROUTE_PREFIXES = ("/api/", "/webhooks/")


# HTTP exceptions, not plain ones: FastAPI answers any other error raised while it reads a body
# it parses with "400 There was an error parsing the body", and lets these through.
class _BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is larger than {max_bytes} bytes", _CLOSE)


class _BodyTooSlow(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"request body not received within {timeout_s:g} s", _CLOSE)


# The rest of a body refused part-way would be read as the next request.
_CLOSE = {"Connection": "close"}


class BodyLimitMiddleware:
    """Refuses bodies over the limit with 413, whether or not Content-Length is declared, and
    bodies not complete within `timeout_s` of the request with 408: a client dripping a body
    byte by byte (slowloris) would otherwise hold a connection and a handler indefinitely."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            # No id or filter of ours holds a NUL, and PostgreSQL's text refuses it (a 500).
            await _send_json(send, 400, "NUL (%00) is not allowed in a path or query")
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "Content-Length is not a number")
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, self._too_large())
                    return
        received = 0
        started = False
        body_complete = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:
                return await receive()  # e.g. waiting for a disconnect: no deadline
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise _BodyTooSlow(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
                body_complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (_BodyTooLarge, _BodyTooSlow) as exc:
            # Raised outside the app's own exception handling (a body read by a middleware).
            if not started:
                await _send_json(send, exc.status_code, exc.detail)

    def _too_large(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, latency: LatencyRecorder | None = None) -> None:
        self.app = app
        # SLA latency events (issue 8): `record` only appends to a bounded buffer.
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            # The route template, not the raw path: ids must not explode the label set.
            label = getattr(route, "path", "unmatched")
            method = scope["method"]
            REQUESTS.labels(method, label, str(status)).inc()
            elapsed_s = time.perf_counter() - started
            REQUEST_DURATION.labels(method, label).observe(elapsed_s)
            # Only the product's endpoints count towards the API's SLA, not probes and scrapes.
            if self.latency is not None and label.startswith(_SLA_ROUTE_PREFIXES):
                self.latency.record(
                    "api_request",
                    elapsed_s * 1000,
                    ok=status < 500,
                    tenant_id=scope.get("state", {}).get("tenant_id"),
                    detail=f"{method} {label} {status}",
                )


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
