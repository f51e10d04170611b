"""The gateway's upstream client against a misbehaving upstream on a raw socket (issue 9, defects
1 and 4): no caller ever reads another caller's answer, deadlines hold per answer (not per read),
a full pool answers 503 after its wait, and a slot is given back exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
from multidict import CIMultiDict

from leaky_tokens.gateway.upstream import UpstreamBusy, UpstreamClient
from leaky_tokens.shared.outbound import OutboundError
from tests.gateway.gateway_harness import assert_error, running_gateway
from tests.live_server import serving
from tests.polling import eventually
from tests.raw_upstream import RawConnection, answer, raw_upstream


@contextlib.asynccontextmanager
async def upstream_client(url: str, **overrides: float) -> AsyncIterator[UpstreamClient]:
    settings: dict[str, float] = {
        "max_connections": 4,
        "connect_seconds": 2.0,
        "headers_seconds": 5.0,
        "answer_seconds": 10.0,
        "pool_wait_seconds": 1.0,
        **overrides,
    }
    client = UpstreamClient(url, **settings)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        await client.aclose()


async def get_body(client: UpstreamClient, path: str = "/x") -> bytes:
    got = await client.request("GET", path, CIMultiDict(), None)
    body = b""
    while (chunk := await got.next_chunk()) is not None:
        body += chunk
    return body


class Numbered:
    """Legitimate answers real-1, real-2, ... across every connection."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> bytes:
        self.n += 1
        return answer(f"real-{self.n}".encode())

    async def each_request(self, connection: RawConnection) -> None:
        while await connection.read_head():
            await connection.write(self.next())


async def test_an_answer_longer_than_announced_never_reaches_the_next_caller() -> None:
    numbered = Numbered()

    async def overlong(connection: RawConnection) -> None:
        if not await connection.read_head():
            return
        # 5 bytes announced, then a whole second answer nobody asked for, in one write
        await connection.write(numbered.next() + answer(b"forged"))
        await numbered.each_request(connection)

    async with raw_upstream(overlong) as upstream, upstream_client(upstream.url) as client:
        first = await get_body(client)
        second = await get_body(client)

    assert first == b"real-1"
    assert second == b"real-2"
    assert client.free_slots == 4


async def test_an_answer_sent_to_an_idle_connection_is_not_read_as_the_next_one() -> None:
    released = asyncio.Event()
    forged_sent = asyncio.Event()
    numbered = Numbered()

    async def unsolicited(connection: RawConnection) -> None:
        if forged_sent.is_set():  # a fresh connection: plain answers
            await numbered.each_request(connection)
            return
        await connection.read_head()
        await connection.write(numbered.next())
        await released.wait()  # the connection now sits idle in the client's pool
        await connection.write(answer(b"forged"))
        forged_sent.set()
        await numbered.each_request(connection)

    async with raw_upstream(unsolicited) as upstream, upstream_client(upstream.url) as client:
        assert await get_body(client) == b"real-1"
        released.set()
        await forged_sent.wait()
        for _ in range(5):  # same event loop: let the client's protocol take the bytes in
            await asyncio.sleep(0.02)
        second = await get_body(client)
        third = await get_body(client)

    assert second == b"real-2"
    assert third == b"real-3"


async def test_a_forged_answer_on_the_wire_is_never_handed_to_another_client() -> None:
    """End to end over real sockets: clients of the gateway, a raw upstream behind it."""

    async def overlong_every_time(connection: RawConnection) -> None:
        while await connection.read_head():
            await connection.write(answer(b"client-secret") + answer(b"forged-for-the-next"))

    async with (
        raw_upstream(overlong_every_time) as upstream,
        running_gateway(upstream_url=upstream.url) as gw,
        serving(gw.app) as gateway_url,
    ):
        bodies = []
        for i in range(6):
            async with httpx.AsyncClient(base_url=gateway_url) as client:
                response = await client.get(
                    "/api/v1/openai/health", headers={"X-Forwarded-For": f"198.51.100.{i}"}
                )
            assert response.status_code == 200
            bodies.append(response.content)

    assert bodies == [b"client-secret"] * 6


async def test_headers_trickled_byte_by_byte_hit_the_answer_deadline() -> None:
    """Defect 4: one byte per 0.2 s used to restart a per-read timeout and get a 200."""

    async def trickle(connection: RawConnection) -> None:
        await connection.read_head()
        for byte in answer(b"late"):
            await connection.write(bytes([byte]))
            await asyncio.sleep(0.2)

    async with (
        raw_upstream(trickle) as upstream,
        upstream_client(upstream.url, headers_seconds=1.0) as client,
    ):
        with pytest.raises(OutboundError) as caught:
            await get_body(client)

    assert caught.value.kind == "timeout"
    assert client.free_slots == 4


async def test_a_body_trickled_past_the_whole_answer_deadline_is_cut() -> None:
    async def slow_body(connection: RawConnection) -> None:
        await connection.read_head()
        await connection.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            await connection.write(b"x")
            await asyncio.sleep(0.1)

    async with (
        raw_upstream(slow_body) as upstream,
        upstream_client(upstream.url, headers_seconds=1.0, answer_seconds=1.5) as client,
    ):
        with pytest.raises(OutboundError) as caught:
            await get_body(client)

    assert caught.value.kind == "timeout"
    assert client.free_slots == 4


async def test_a_full_pool_answers_busy_after_its_wait_and_the_gateway_says_503() -> None:
    hold = asyncio.Event()

    async def stall_first(connection: RawConnection) -> None:
        await connection.read_head()
        await hold.wait()
        await connection.write(answer(b"done"))
        await Numbered().each_request(connection)

    async with raw_upstream(stall_first) as upstream:
        async with upstream_client(
            upstream.url, max_connections=1, pool_wait_seconds=0.2
        ) as client:
            holder = asyncio.create_task(get_body(client))
            await eventually(lambda: client.free_slots == 0, what="the slot taken")
            with pytest.raises(UpstreamBusy):
                await client.request("GET", "/y", CIMultiDict(), None)
            hold.set()
            assert await holder == b"done"
            assert client.free_slots == 1

        hold.clear()
        async with running_gateway(
            upstream_url=upstream.url, max_connections_per_upstream=1, pool_wait_seconds=0.2
        ) as gw:
            first = asyncio.create_task(gw.client().get("/api/v1/openai/health"))
            tokens = gw.app.state.edge.upstreams["openai"].client
            await eventually(lambda: tokens.free_slots == 0, what="the slot taken")
            busy = await gw.client(ip="198.51.100.3").get("/api/v1/openai/health")
            hold.set()
            assert (await first).status_code == 200

    body = assert_error(busy, 503, "SERVICE_UNAVAILABLE")
    assert body["message"] == "openai-stub is busy; retry shortly"
    assert busy.headers["retry-after"] == "1"


async def test_a_close_delimited_answer_whose_client_leaves_gives_its_slot_back_once() -> None:
    """Defect 4: each abandoned answer used to release its slot twice (a cap of 1 drifted)."""

    async def endless_until_close(connection: RawConnection) -> None:
        await connection.read_head()
        await connection.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        while True:
            await connection.write(b"tick\n")
            await asyncio.sleep(0.02)

    async with (
        raw_upstream(endless_until_close) as upstream,
        running_gateway(upstream_url=upstream.url, max_connections_per_upstream=1) as gw,
        serving(gw.app) as gateway_url,
    ):
        client = gw.app.state.edge.upstreams["openai"].client
        for round_ in range(4):
            async with (
                httpx.AsyncClient(base_url=gateway_url) as http,
                http.stream("GET", "/api/v1/openai/health") as response,
            ):
                assert response.status_code == 200
                assert (await anext(response.aiter_raw())).startswith(b"tick")
            # the client has left; the slot comes back, once
            await eventually(lambda: client.free_slots == 1, what=f"slot back ({round_})")
            await eventually(
                lambda n=round_: len(upstream.closed) == n + 1, what="upstream connection closed"
            )
        assert client.free_slots == 1


async def test_aiohttp_alone_still_reads_idle_bytes_as_the_next_answer() -> None:
    """Why shared/outbound.py's connector exists: aiohttp (as locked) discards a connection whose
    answer was longer than announced, but not one on which bytes arrived while it sat idle. When
    this test fails, aiohttp does it itself and `_HygienicConnector` can go."""
    released = asyncio.Event()
    forged_sent = asyncio.Event()
    numbered = Numbered()

    async def unsolicited(connection: RawConnection) -> None:
        await connection.read_head()
        await connection.write(numbered.next())
        await released.wait()
        await connection.write(answer(b"forged"))
        forged_sent.set()
        await numbered.each_request(connection)

    async with (
        raw_upstream(unsolicited) as upstream,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session,
    ):
        async with session.get(f"{upstream.url}/a") as response:
            assert await response.read() == b"real-1"
        released.set()
        await forged_sent.wait()
        for _ in range(5):
            await asyncio.sleep(0.02)
        async with session.get(f"{upstream.url}/b") as response:
            second = await response.read()

    assert second == b"forged"


async def test_a_body_that_goes_silent_is_cut_after_the_silence_bound() -> None:
    """`headers_seconds` is also the longest silence mid-body (well within the whole answer's
    deadline here)."""
    stop = asyncio.Event()

    async def goes_silent(connection: RawConnection) -> None:
        await connection.read_head()
        await connection.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await stop.wait()

    async with (
        raw_upstream(goes_silent) as upstream,
        upstream_client(upstream.url, headers_seconds=0.5, answer_seconds=60) as client,
    ):
        got = await client.request("GET", "/x", CIMultiDict(), None)
        assert await got.next_chunk() == b"0123456789"
        with pytest.raises(OutboundError) as caught:
            await got.next_chunk()
        stop.set()

    assert caught.value.kind == "timeout"
    assert client.free_slots == 4
