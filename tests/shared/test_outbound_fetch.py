"""`fetch` reads a whole answer, however the upstream splits it, and refuses one over its cap."""

from __future__ import annotations

import asyncio

import pytest

from leaky_tokens.shared.outbound import OutboundError, client_session, fetch
from tests.raw_upstream import RawConnection, raw_upstream

BODY = b"".join(f"piece {i:03d};".encode() for i in range(200))


async def in_pieces(connection: RawConnection) -> None:
    await connection.read_head()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
    await connection.write(head)
    for start in range(0, len(BODY), 500):
        await connection.write(BODY[start : start + 500])
        await asyncio.sleep(0.02)  # each piece its own segment, after the head was parsed


async def test_an_answer_sent_in_pieces_is_read_whole() -> None:
    async with raw_upstream(in_pieces) as upstream:
        session = client_session(max_connections=2, connect_seconds=5.0)
        try:
            answer = await fetch(session, "GET", upstream.url + "/x", timeout_seconds=30.0)
        finally:
            await session.close()
    assert answer.status == 200
    assert answer.body == BODY


async def test_an_answer_over_the_cap_is_refused_not_cut() -> None:
    async with raw_upstream(in_pieces) as upstream:
        session = client_session(max_connections=2, connect_seconds=5.0)
        try:
            with pytest.raises(OutboundError, match="too large"):
                await fetch(
                    session, "GET", upstream.url + "/x", timeout_seconds=30.0, max_bytes=1000
                )
        finally:
            await session.close()
