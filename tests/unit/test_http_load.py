"""The benchmarks' load client: what it measures must be what the server answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bench.http_load import LoadClient, at_steady_rate


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[int]]]:
    """A local HTTP server; yields its port and the client port of every request it saw."""
    peers: list[int] = []

    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        if request.path == "/missing":
            return web.json_response({"detail": "not found"}, status=404)
        headers = {"Connection": "close"} if request.path == "/close" else {}
        body = await request.read()
        return web.json_response(
            {"method": request.method, "auth": request.headers.get("Authorization"),
             "body": body.decode()},
            headers=headers,
        )  # fmt: skip

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, peers
    await runner.cleanup()


async def test_answers_status_and_body_and_reuses_its_connection(
    server: tuple[int, list[int]],
) -> None:
    port, peers = server
    client = LoadClient("127.0.0.1", port, {"Authorization": "Bearer k"})
    status, answer = await client.post_json("/in", {"text": "hi"})
    assert status == 200
    assert answer == {"method": "POST", "auth": "Bearer k", "body": '{"text": "hi"}'}
    status, body = await client.request("GET", "/missing")
    assert (status, body) == (404, b'{"detail": "not found"}')
    await client.close()
    assert len(peers) == 2
    assert peers[0] == peers[1]  # one keep-alive connection for both


async def test_concurrent_requests_get_their_own_connections(
    server: tuple[int, list[int]],
) -> None:
    port, peers = server
    client = LoadClient("127.0.0.1", port)
    answers = await asyncio.gather(*(client.post_json("/in", {"i": i}) for i in range(20)))
    await client.close()
    assert [answer["body"] for _, answer in answers] == [f'{{"i": {i}}}' for i in range(20)]
    assert len(set(peers)) > 1


async def test_a_connection_the_server_closes_is_not_reused(
    server: tuple[int, list[int]],
) -> None:
    port, peers = server
    client = LoadClient("127.0.0.1", port)
    assert (await client.request("GET", "/close"))[0] == 200
    assert (await client.request("GET", "/again"))[0] == 200
    await client.close()
    assert peers[0] != peers[1]


async def test_a_lost_connection_fails_the_request() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = LoadClient("127.0.0.1", port)
    with pytest.raises(ConnectionError):
        await client.request("GET", "/")
    listener.close()


async def test_jobs_start_on_schedule_even_while_earlier_ones_are_running() -> None:
    started: list[int] = []
    release = asyncio.Event()

    async def job(i: int) -> None:
        started.append(i)
        if len(started) == 10:
            release.set()
        await release.wait()  # no job finishes until every one has started

    await asyncio.wait_for(at_steady_rate(1000, 0.01, job), 5)
    assert started == list(range(10))


async def test_requests_beyond_the_connection_cap_wait_for_a_connection(
    server: tuple[int, list[int]],
) -> None:
    port, peers = server
    client = LoadClient("127.0.0.1", port, max_connections=2)
    answers = await asyncio.gather(*(client.request("GET", f"/{i}") for i in range(10)))
    await client.close()
    assert [status for status, _ in answers] == [200] * 10
    assert len(set(peers)) == 2


async def test_a_connection_idle_too_long_is_not_reused(server: tuple[int, list[int]]) -> None:
    port, peers = server
    client = LoadClient("127.0.0.1", port)
    client.MAX_IDLE_S = 0.0  # every idle connection is too old
    await client.request("GET", "/first")
    await client.request("GET", "/second")
    await client.close()
    assert peers[0] != peers[1]


async def test_an_error_answer_comes_back_as_text(server: tuple[int, list[int]]) -> None:
    port, _ = server
    client = LoadClient("127.0.0.1", port)
    assert await client.post_json("/missing", {}) == (404, '{"detail": "not found"}')
    await client.close()
