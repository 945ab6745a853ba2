"""The API's HTTP protocol writes each response to its socket once (api.http_protocol)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.http_protocol import FLUSH_AT, CoalescingHttpToolsProtocol, WriteCoalescingTransport


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False
        self.extra = {"peername": ("127.0.0.1", 1)}

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def write_eof(self) -> None:
        self.writes.append(b"<eof>")

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 5

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


def _coalescing() -> tuple[_RecordingTransport, WriteCoalescingTransport]:
    """A recording socket transport and the coalescing transport over it."""
    real = _RecordingTransport()
    loop = asyncio.get_running_loop()
    return real, WriteCoalescingTransport(real, loop)  # type: ignore[arg-type]


async def _next_turn() -> None:
    await asyncio.sleep(0)


async def test_writes_in_one_turn_reach_the_socket_as_one() -> None:
    real, transport = _coalescing()
    transport.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert real.writes == []
    assert transport.get_write_buffer_size() == 5 + 46
    await _next_turn()
    assert real.writes == [b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"next")
    await _next_turn()
    assert real.writes[1:] == [b"next"]


async def test_a_close_sends_what_was_written_before_it() -> None:
    real, transport = _coalescing()
    transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    transport.close()
    assert real.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n"]
    assert real.closed
    await _next_turn()  # the scheduled flush finds nothing left
    assert len(real.writes) == 1


async def test_an_abort_drops_what_waits_and_a_closed_socket_gets_nothing() -> None:
    real, transport = _coalescing()
    transport.write(b"lost")
    transport.abort()
    await _next_turn()
    assert real.writes == []
    closing, transport = _coalescing()
    transport.write(b"late")
    closing.closed = True  # the peer went away within the turn
    await _next_turn()
    assert closing.writes == []


async def test_a_turn_writing_more_than_flush_at_sends_it_at_once() -> None:
    real, transport = _coalescing()
    transport.write(b"head")
    transport.write(b"x" * FLUSH_AT)
    # Not held for the turn: uvicorn's flow control sees it in the real transport's buffer.
    assert real.writes == [b"head" + b"x" * FLUSH_AT]
    assert transport.get_write_buffer_size() == 5
    transport.write(b"tail")
    await _next_turn()
    assert real.writes[1:] == [b"tail"]


async def test_everything_else_is_the_wrapped_transports() -> None:
    real, transport = _coalescing()
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
    transport.writelines([b"a", b"", b"b"])
    transport.write_eof()
    assert real.writes == [b"ab", b"<eof>"]


async def _stream() -> AsyncIterator[bytes]:
    for part in (b"one,", b"two,", b"three"):
        yield part
        await asyncio.sleep(0.01)


async def _echo(request: Request) -> Response:
    return JSONResponse({"got": (await request.body()).decode()}, status_code=202)


_APP = Starlette(
    routes=[
        Route("/echo", _echo, methods=["POST"]),
        Route("/stream", lambda _: StreamingResponse(_stream(), media_type="text/plain")),
    ]
)


class _SocketWrites:
    """Counts the writes that reach the connection's real transport."""

    def __init__(self, transport: asyncio.Transport, counts: list[int]) -> None:
        self._transport = transport
        self._counts = counts

    def write(self, data: bytes) -> None:
        self._counts.append(len(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _serve_and_count(protocol: type[HttpToolsProtocol]) -> tuple[list[bytes], list[int]]:
    counts: list[int] = []

    class Counted(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(_SocketWrites(transport, counts))

    config = uvicorn.Config(_APP, host="127.0.0.1", port=0, http=Counted, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn's Server has no event for it)
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for request in (
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi",
            b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        ):
            writer.write(request)
            if b"close" in request:
                answers.append(await reader.read())
            else:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                answers.append(head + await reader.readexactly(length))
        writer.close()
        await writer.wait_closed()
        return answers, counts
    finally:
        server.should_exit = True
        await serving


@pytest.mark.parametrize("protocol", [CoalescingHttpToolsProtocol, HttpToolsProtocol])
async def test_each_answer_is_one_socket_write(protocol: type[HttpToolsProtocol]) -> None:
    answers, counts = await _serve_and_count(protocol)
    assert answers[0].startswith(b"HTTP/1.1 202 ")
    assert answers[0].endswith(b'{"got":"hello"}')
    assert answers[1].endswith(b'{"got":"hi"}')
    # A streamed answer still arrives whole, its parts as they come.
    assert answers[2].startswith(b"HTTP/1.1 200 ")
    assert b"one," in answers[2]
    assert b"three" in answers[2]
    assert answers[2].endswith(b"0\r\n\r\n")
    if protocol is CoalescingHttpToolsProtocol:
        # The two plain answers one write each; the stream's head goes with its first part.
        assert len(counts) == 2 + 3 + 1
    else:
        # uvicorn's own (0.55): a head and a body, then the stream's head, parts and end. Should
        # an upgrade write a head and body together, this fails, and the protocol can go.
        assert len(counts) == 2 * 2 + 1 + 3 + 1
