"""uvicorn's HTTP/1.1 protocol (httptools), each response written to its socket in one piece.

uvicorn writes a response's head when the app sends `http.response.start` and its body when
the app sends `http.response.body`: two socket writes, and with TCP_NODELAY two segments, so
the client wakes up twice for one answer. At 1,000 messages/s (bench.freshness, about 1,100
answers a second) the API made 3,114 socket writes a second and the load generator 1,851 reads;
with this protocol 1,933 writes and 1,111 reads (one run each, measured from /proc).

Here the writes a connection makes in one turn of the event loop go out together, once the
turn's callbacks have run: a head and a body sent one after the other (as every Starlette
response sends them) become one write. Nothing waits past the next turn, and a turn's writes
past `FLUSH_AT` bytes go out at once: uvicorn pauses a response's sends on the real
transport's buffer, which sees nothing of what waits here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Bytes of a turn's writes held at most; past it they go to the socket (asyncio's default
# high-water mark for a transport's buffer is 64 KiB).
FLUSH_AT = 64 * 1024


class WriteCoalescingTransport:
    """A transport whose writes within one turn of the loop reach the socket as one write.

    Everything but writing, closing, aborting and the write buffer size is the wrapped
    transport's own (reading flow control, addresses, the protocol): the protocol stays
    registered with the real transport, which goes on calling its `pause_writing` and
    `resume_writing`.
    """

    __slots__ = ("_loop", "_pending", "_pending_bytes", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        chunk = bytes(data)
        if not chunk:
            return
        if self._pending is None:
            self._pending = [chunk]
            self._pending_bytes = len(chunk)
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
        if self._pending_bytes >= FLUSH_AT:
            self._flush()  # the call scheduled above then finds nothing

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        # What was written before the close is sent before it (a 400's body, then the close).
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        pending = self._pending_bytes if self._pending else 0
        return self._transport.get_write_buffer_size() + pending

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `WriteCoalescingTransport`; pass it as uvicorn's
    `http` setting."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(
            WriteCoalescingTransport(transport, self.loop)  # type: ignore[arg-type]
        )
