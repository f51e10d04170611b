"""The gateway's pipelined Redis script client: what it must get right besides speed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from leaky_tokens.gateway.redis_script import ScriptClient, _Incomplete, _parse
from tests.live_server import closed_port

ECHO = "return {KEYS[1], tonumber(ARGV[1]) + 1, redis.call('INCR', KEYS[1])}"


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def key() -> str:
    return f"lt:test:script:{uuid.uuid4().hex}"


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    redis_url: str, admin: redis.Redis, key: str
) -> None:
    script = ScriptClient(redis_url, ECHO)
    try:
        replies = await asyncio.gather(*(script(keys=[key], args=[i]) for i in range(200)))
    finally:
        await script.aclose()
        await admin.delete(key)

    assert [r[1] for r in replies] == [i + 1 for i in range(200)]
    assert sorted(r[2] for r in replies) == list(range(1, 201))
    assert all(r[0] == key.encode() for r in replies)


async def test_a_script_redis_forgot_is_sent_again(
    redis_url: str, admin: redis.Redis, key: str
) -> None:
    script = ScriptClient(redis_url, ECHO)
    try:
        await script(keys=[key], args=[1])
        await admin.script_flush()
        again = await script(keys=[key], args=[1])
    finally:
        await script.aclose()
        await admin.delete(key)

    assert again[2] == 2


async def test_a_dropped_connection_is_made_again(redis_url: str, admin: redis.Redis) -> None:
    script = ScriptClient(redis_url, "return 1")
    try:
        assert await script(keys=[], args=[]) == 1
        pipe = script._pipe
        assert pipe is not None
        assert pipe.transport is not None
        host, port = pipe.transport.get_extra_info("sockname")[:2]
        await admin.client_kill(f"{host}:{port}")
        await asyncio.sleep(0.05)

        assert await script(keys=[], args=[]) == 1
        assert script._pipe is not pipe
    finally:
        await script.aclose()


async def test_errors_from_the_script_are_raised(redis_url: str) -> None:
    script = ScriptClient(redis_url, "return redis.error_reply('NOPE broken')")
    try:
        with pytest.raises(ResponseError, match="NOPE"):
            await script(keys=[], args=[])
    finally:
        await script.aclose()


async def test_the_database_in_the_url_is_used(redis_url: str, key: str) -> None:
    other_db = redis_url.rsplit("/", 1)[0] + "/5"
    script = ScriptClient(other_db, "return redis.call('SET', KEYS[1], 'x')")
    reader = redis.Redis.from_url(other_db)
    try:
        await script(keys=[key], args=[])
        assert await reader.get(key) == b"x"
    finally:
        await reader.delete(key)
        await reader.aclose()
        await script.aclose()


async def test_without_redis_a_call_fails_as_a_connection_error() -> None:
    script = ScriptClient(f"redis://127.0.0.1:{closed_port()}/0", ECHO)
    with pytest.raises(RedisConnectionError):
        await script(keys=["k"], args=[1])


def test_replies_are_parsed_only_when_complete() -> None:
    reply = b"*3\r\n:1\r\n$3\r\nabc\r\n*1\r\n-ERR x\r\n"
    for cut in range(len(reply)):
        with pytest.raises(_Incomplete):
            _parse(reply[:cut], 0)
    value, end = _parse(reply, 0)
    assert end == len(reply)
    assert value[:2] == [1, b"abc"]
    assert isinstance(value[2][0], ResponseError)
