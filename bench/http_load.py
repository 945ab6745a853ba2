"""A lean HTTP/1.1 client for the benchmarks' load: keep-alive connections, httptools parsing.

The benchmarks run on the machine they measure, so every microsecond the load generator spends
is taken from the system under test. At 1,000 requests a second aiohttp took 0.3 of the two
cores (bench.freshness); this client writes each request as one buffer and parses the answer
with httptools (C), and spends a fraction of that. It speaks only what the benchmarks need:
one request at a time per connection, JSON in and out, answers with Content-Length or chunked
(an answer delimited by closing the connection is reported as a lost connection).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

import httptools


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self.closed = False
        self.last_used = time.monotonic()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()  # its parser is broken: never reused
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("the server closed the connection"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer, self._answer = self._answer, None
        body, self._body = b"".join(self._body), []
        self.last_used = time.monotonic()
        if not self._parser.should_keep_alive():
            self.close()
        if answer is not None and not answer.done():
            answer.set_result((self._parser.get_status_code(), body))

    def _fail(self, exc: BaseException) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self._transport is not None, "not connected"
        assert self._answer is None, "one request at a time per connection"
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return self._answer

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class LoadClient:
    """Requests to one host over a pool of keep-alive connections, one per request in flight
    up to `max_connections` (more requests wait for a connection)."""

    # Under uvicorn's 5 s keep-alive: a connection idle longer may be closing as it is reused.
    MAX_IDLE_S = 4.0

    def __init__(
        self,
        host: str,
        port: int,
        headers: dict[str, str] | None = None,
        *,
        max_connections: int = 200,
    ) -> None:
        self._host, self._port = host, port
        self._idle: deque[_Connection] = deque()
        self._connections = asyncio.Semaphore(max_connections)
        self._fixed_headers = "".join(
            f"{name}: {value}\r\n"
            for name, value in {"Host": f"{host}:{port}", **(headers or {})}.items()
        )

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed_headers}"
        if body or method != "GET":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        async with self._connections:
            connection = await self._connection()
            try:
                status, answer = await connection.send(f"{head}\r\n".encode() + body)
            except BaseException:
                connection.close()
                raise
            if not connection.closed:
                self._idle.append(connection)
        return status, answer

    async def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        """(status, the decoded JSON answer); an answer that is not 2xx comes back as text,
        as a server error's may not be JSON."""
        status, body = await self.request("POST", path, json.dumps(payload).encode())
        if not 200 <= status < 300:
            return status, body.decode(errors="replace")
        return status, json.loads(body) if body else None

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.last_used < self.MAX_IDLE_S:
                return connection
            connection.close()
        _, connection = await asyncio.get_running_loop().create_connection(
            _Connection, self._host, self._port
        )
        return connection

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


async def at_steady_rate(
    rate: float, seconds: float, job: Callable[[int], Coroutine[Any, Any, None]]
) -> None:
    """Starts job(0), job(1), ... at `rate` a second for `seconds`, then waits for them all.

    Each job is started on schedule whether or not earlier ones finished (an open loop), so a
    slow system is measured as slow, not politely given fewer requests."""
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(job(i)))
    await asyncio.gather(*tasks)
