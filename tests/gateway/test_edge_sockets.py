"""The edge over real sockets (issue 9, defects 5 and 7 and the "also" list): the gateway is
served by uvicorn on a loopback port and spoken to byte by byte, so HTTP framing is what the
client really sent. Each message that the gateway and its upstream could read differently is
refused before anything is forwarded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest

from tests.gateway.gateway_harness import Gateway, Reply, running_gateway
from tests.live_server import serving
from tests.polling import eventually
from tests.raw_upstream import RawConnection, answer, raw_upstream


@dataclass
class RawAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def json(self) -> dict[str, object]:
        parsed: dict[str, object] = orjson.loads(self.body)
        return parsed


class RawClient:
    """One TCP connection to the gateway; requests written as bytes, answers parsed minimally
    (Content-Length or no body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, head: bool = False, within: float = 15.0) -> RawAnswer:
        async with asyncio.timeout(within):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = []
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers.append((name.strip().lower(), value.strip()))
            answer = RawAnswer(status, headers, b"")
            length = answer.header("content-length")
            if length and not head and status not in (204, 304):
                answer.body = await self.reader.readexactly(int(length))
            return answer


@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[RawClient]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@contextlib.asynccontextmanager
async def gateway_on_a_port(**settings: object) -> AsyncIterator[tuple[Gateway, str]]:
    async with running_gateway(**settings) as gw, serving(gw.app) as url:
        yield gw, url


async def test_an_unknown_transfer_coding_is_refused_and_never_forwarded() -> None:
    """Defect 7: `Transfer-Encoding: xchunked` got a 400 while the DELETE still ran upstream."""
    async with gateway_on_a_port() as (gw, url), raw_client(url) as client:
        key = gw.auth.add_key()
        await client.send(
            request(
                "DELETE",
                "/api/v1/auth/api-keys/0b7c2f0e-8f55-4a0f-9d2a-2d3c1f0b9a11",
                f"X-Api-Key: {key}",
                "Transfer-Encoding: xchunked",
                body=b"0\r\n\r\n",
            )
        )
        answer = await client.answer()

    assert answer.status in (400, 501)
    assert gw.upstream.seen == []


@pytest.mark.parametrize(
    "framing",
    [
        ("Transfer-Encoding: chunked", "Content-Length: 5"),
        ("Content-Length: 5", "Content-Length: 6"),
        ("Transfer-Encoding: gzip, chunked",),
    ],
)
async def test_conflicting_or_unusual_framing_is_refused_before_forwarding(
    framing: tuple[str, ...],
) -> None:
    async with gateway_on_a_port() as (gw, url), raw_client(url) as client:
        key = gw.auth.add_key()
        await client.send(
            request("POST", "/api/v1/tokens/consume", f"X-Api-Key: {key}", *framing)
            + b"5\r\nhello\r\n0\r\n\r\n"
        )
        answer = await client.answer()

    assert 400 <= answer.status < 600
    assert answer.status not in (200, 500)
    assert gw.upstream.seen == []


async def test_too_many_headers_are_431_and_never_forwarded() -> None:
    async with gateway_on_a_port(max_headers=50) as (gw, url), raw_client(url) as client:
        await client.send(
            request("GET", "/api/v1/openai/health", *(f"X-H{i}: v" for i in range(60)))
        )
        answer = await client.answer()

    assert answer.status == 431
    assert answer.json()["code"] == "HEADERS_TOO_LARGE"
    assert gw.upstream.seen == []


async def test_a_huge_header_is_431_and_never_forwarded() -> None:
    async with gateway_on_a_port() as (gw, url), raw_client(url) as client:
        await client.send(request("GET", "/api/v1/openai/health", "X-Big: " + "a" * 200_000))
        answer = await client.answer()

    assert answer.status == 431
    assert gw.upstream.seen == []


async def test_connection_cannot_name_away_the_checked_key_or_smuggle_another_credential() -> None:
    """Defect 7: `Connection: X-Api-Key` dropped the checked key and forwarded an unchecked
    Authorization header."""
    async with gateway_on_a_port() as (gw, url), raw_client(url) as client:
        key = gw.auth.add_key()
        await client.send(
            request(
                "GET",
                "/api/v1/tokens/quota",
                f"X-Api-Key: {key}",
                "Authorization: Bearer someone-elses-token",
                "Connection: keep-alive, X-Api-Key",
            )
        )
        answer = await client.answer()

    assert answer.status == 200
    (seen,) = gw.upstream.seen
    assert seen.all("x-api-key") == [key]
    assert seen.header("authorization") is None


async def test_a_redirect_never_reveals_the_upstream_address() -> None:
    """Defect 7: a trailing-slash 307 revealed the internal upstream URL."""
    async with gateway_on_a_port() as (gw, url), raw_client(url) as client:
        internal = gw.settings.url_of("tokens")
        gw.upstream.reply(
            Reply(
                status=307,
                body=b"",
                headers=[(b"location", f"{internal}/api/v1/tokens/quota".encode())],
            )
        )
        key = gw.auth.add_key()
        await client.send(request("GET", "/api/v1/tokens/quota/", f"X-Api-Key: {key}"))
        answer = await client.answer()

    assert answer.status == 307
    assert answer.header("location") == "/api/v1/tokens/quota"
    port = internal.rsplit(":", 1)[1]
    assert port not in b"".join(v.encode() for _, v in answer.headers).decode()


async def test_a_huge_announced_body_is_413_at_once_and_not_drained() -> None:
    """Defect 7: a 100 MB body was read to its end after its 413."""
    async with gateway_on_a_port() as (gw, url), raw_client(url) as client:
        key = gw.auth.add_key()
        await client.send(
            request(
                "POST",
                "/api/v1/tokens/consume",
                f"X-Api-Key: {key}",
                "Content-Type: application/json",
                f"Content-Length: {100 * 1024 * 1024}",
                body=b"{" + b" " * 65536,
            )
        )
        refused = await client.answer()
        # The gateway hangs up rather than reading the other 100 MB: sending the rest fails.
        with pytest.raises(ConnectionError):
            await client.send(b" " * (100 * 1024 * 1024))

    assert refused.status == 413
    assert refused.json()["code"] == "PAYLOAD_TOO_LARGE"
    assert refused.header("connection") == "close"
    assert gw.upstream.seen == []


async def test_an_over_limit_chunked_body_is_refused_not_truncated() -> None:
    async with gateway_on_a_port() as (gw, url), raw_client(url) as client:
        key = gw.auth.add_key()
        await client.send(
            request(
                "POST",
                "/api/v1/tokens/consume",
                f"X-Api-Key: {key}",
                "Transfer-Encoding: chunked",
            )
        )
        piece = b"z" * 65536
        for _ in range(20):  # 1.25 MiB > the 1 MiB limit
            await client.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await client.send(b"0\r\n\r\n")
        answer = await client.answer()

    assert answer.status == 413
    assert gw.upstream.seen == []


async def test_a_body_that_stops_arriving_is_408_and_never_forwarded() -> None:
    async with (
        gateway_on_a_port(client_body_timeout_seconds=0.5) as (gw, url),
        raw_client(url) as client,
    ):
        key = gw.auth.add_key()
        await client.send(
            request(
                "POST",
                "/api/v1/tokens/consume",
                f"X-Api-Key: {key}",
                "Content-Length: 100",
                body=b'{"a":',
            )
        )
        answer = await client.answer()

    assert answer.status == 408
    assert answer.json()["code"] == "REQUEST_TIMEOUT"
    assert gw.upstream.seen == []


@pytest.mark.parametrize(
    ("method", "head"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        # the length of the representation the client already has, no body follows
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n'),
    ],
    ids=["head", "204", "304"],
)
async def test_answers_without_a_body_keep_the_connection_in_step(method: str, head: bytes) -> None:
    """A 304 with a Content-Length broke the client's connection (and logged a traceback)."""

    async def no_body_then_a_body(connection: RawConnection) -> None:
        await connection.read_head()
        await connection.write(head)
        while await connection.read_head():
            await connection.write(answer(b"second"))

    async with (
        raw_upstream(no_body_then_a_body) as upstream,
        gateway_on_a_port(upstream_url=upstream.url) as (_gw, url),
        raw_client(url) as client,
    ):
        await client.send(request(method, "/oauth2/jwks"))
        first = await client.answer(head=method == "HEAD")
        await client.send(request("GET", "/oauth2/jwks"))
        second = await client.answer()

    assert first.status == int(head.split(b" ")[1])
    assert first.body == b""
    if method == "HEAD":
        assert first.header("content-length") == "10"
    assert second.status == 200
    assert second.body == b"second"


async def test_junk_keys_from_one_address_cost_the_auth_service_almost_nothing() -> None:
    """Defect 5: 50 junk-key requests from one address gave 50 auth-service calls."""
    async with gateway_on_a_port(address_limit_requests=20, rate_limit_requests=1000) as (
        gw,
        url,
    ):
        statuses = []
        async with raw_client(url) as client:
            for i in range(50):
                await client.send(
                    request("GET", "/api/v1/tokens/quota", f"X-Api-Key: junk-{i % 5}")
                )
                statuses.append((await client.answer()).status)

    assert statuses.count(401) == 20
    assert statuses.count(429) == 30
    # five distinct junk keys, each asked about once (remembered as unknown meanwhile)
    assert len(gw.auth.calls) == 5
    assert gw.upstream.seen == []


async def test_a_users_limit_spans_all_their_keys() -> None:
    import uuid

    user = uuid.uuid4()
    async with gateway_on_a_port(rate_limit_requests=100, user_limit_requests=6) as (gw, url):
        keys = [gw.auth.add_key(user_id=user) for _ in range(3)]
        other = gw.auth.add_key()
        statuses = []
        async with raw_client(url) as client:
            for i in range(9):
                await client.send(
                    request("GET", "/api/v1/tokens/quota", f"X-Api-Key: {keys[i % 3]}")
                )
                statuses.append((await client.answer()).status)
            await client.send(request("GET", "/api/v1/tokens/quota", f"X-Api-Key: {other}"))
            others = (await client.answer()).status

    assert statuses == [200] * 6 + [429] * 3
    assert others == 200


async def test_the_slot_and_connection_survive_a_refused_request() -> None:
    """After a refusal that closes the connection the gateway still serves new ones."""
    async with gateway_on_a_port(max_headers=10) as (gw, url):
        async with raw_client(url) as client:
            await client.send(
                request("GET", "/api/v1/openai/health", *(f"X-H{i}: v" for i in range(20)))
            )
            assert (await client.answer()).status == 431
        async with raw_client(url) as client:
            await client.send(request("GET", "/api/v1/openai/health"))
            assert (await client.answer()).status == 200
        await eventually(lambda: len(gw.upstream.seen) == 1)


async def test_an_answer_with_a_length_streams_rather_than_being_buffered_whole() -> None:
    """Answers up to 256 KiB with a Content-Length used to be buffered whole before the first
    byte went to the client."""
    release = asyncio.Event()
    size = 200 * 1024

    async def half_then_wait(connection: RawConnection) -> None:
        await connection.read_head()
        await connection.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        await connection.write(b"a" * 1000)
        await release.wait()
        await connection.write(b"b" * (size - 1000))

    async with (
        raw_upstream(half_then_wait) as upstream,
        gateway_on_a_port(upstream_url=upstream.url) as (_gw, url),
        raw_client(url) as client,
    ):
        await client.send(request("GET", "/api/v1/openai/health"))
        head = await client.answer(head=True)  # the headers (its body is read below)
        first = await asyncio.wait_for(client.reader.readexactly(1000), 15)
        release.set()
        rest = await asyncio.wait_for(client.reader.readexactly(size - 1000), 15)

    assert head.status == 200
    assert head.header("content-length") == str(size)
    assert first == b"a" * 1000
    assert rest == b"b" * (size - 1000)


async def test_a_users_limit_spans_their_tokens_and_keys_together() -> None:
    """Issue 10: more credentials give a user no more calls (a token and two keys here)."""
    import uuid

    user = uuid.uuid4()
    async with gateway_on_a_port(rate_limit_requests=100, user_limit_requests=6) as (gw, url):
        credentials = [
            f"Authorization: Bearer {gw.auth.add_token(user_id=user)}",
            f"X-Api-Key: {gw.auth.add_key(user_id=user)}",
            # a key as the OpenAI SDKs send it
            f"Authorization: Bearer {gw.auth.add_key(user_id=user)}",
        ]
        statuses = []
        async with raw_client(url) as client:
            for i in range(9):
                await client.send(request("GET", "/api/v1/tokens/quota", credentials[i % 3]))
                statuses.append((await client.answer()).status)

    assert statuses == [200] * 6 + [429] * 3
