"""What crosses the gateway: the request as the client sent it (less hop-by-hop and identity
headers, plus ours), and the upstream's answer unchanged."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from tests.gateway.gateway_harness import (
    LIMIT_HEADERS,
    Gateway,
    Reply,
    assert_error,
    running_gateway,
)
from tests.live_server import serving


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with running_gateway() as gateway:
        yield gateway


async def test_the_request_reaches_its_upstream_as_sent(gw: Gateway) -> None:
    key = gw.auth.add_key()
    body = orjson.dumps({"userId": str(uuid.uuid4()), "provider": "openai", "tokens": 10})

    response = await gw.client().post(
        "/api/v1/tokens/consume?x=%20a&y=%2Fb",
        content=body,
        headers={"X-Api-Key": key, "Content-Type": "application/json", "X-Custom": "kept"},
    )

    assert response.status_code == 200
    (seen,) = gw.upstream.seen
    assert seen.method == "POST"
    assert seen.path == "/api/v1/tokens/consume"
    assert seen.query == b"x=%20a&y=%2Fb"
    assert seen.body == body
    assert seen.header("content-type") == "application/json"
    assert seen.header("content-length") == str(len(body))
    assert seen.header("x-custom") == "kept"
    assert seen.header("x-api-key") == key  # the upstream verifies the caller itself


async def test_percent_encoded_paths_go_on_as_they_were_written(gw: Gateway) -> None:
    key = gw.auth.add_key(admin=True)  # (the raw provider routes are for ADMINs)
    response = await gw.client().get("/api/v1/openai/chat%2Fextra", headers={"X-Api-Key": key})

    assert response.status_code == 200
    assert gw.upstream.seen[0].raw_path == b"/api/v1/openai/chat%2Fextra"


async def test_the_answer_comes_back_unchanged(gw: Gateway) -> None:
    key = gw.auth.add_key()
    payload = orjson.dumps({"message": "insufficient token quota", "code": "INSUFFICIENT_QUOTA"})
    gw.upstream.reply(
        Reply(
            status=402,
            body=payload,
            headers=[
                (b"content-type", b"application/json"),
                (b"x-upstream", b"yes"),
                (b"set-cookie", b"a=1; Path=/"),
                (b"set-cookie", b"b=2; Path=/"),
            ],
        )
    )

    response = await gw.client().get("/api/v1/tokens/quota", headers={"X-Api-Key": key})

    assert response.status_code == 402
    assert response.content == payload
    assert response.headers["x-upstream"] == "yes"
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    for name in LIMIT_HEADERS:
        assert name in response.headers


async def test_cookies_of_one_answer_are_not_sent_with_the_next_request(gw: Gateway) -> None:
    gw.upstream.reply(Reply(headers=[(b"set-cookie", b"session=secret; Path=/")]))
    await gw.client(ip="198.51.100.1").get("/api/v1/openai/health")
    await gw.client(ip="198.51.100.2").get("/api/v1/openai/health")

    assert gw.upstream.seen[1].header("cookie") is None


async def test_hop_by_hop_headers_stop_at_the_gateway(gw: Gateway) -> None:
    gw.upstream.reply(
        Reply(
            headers=[
                (b"content-type", b"application/json"),
                (b"connection", b"keep-alive, x-hop"),
                (b"keep-alive", b"timeout=5"),
                (b"x-hop", b"upstream-private"),
                (b"x-end-to-end", b"kept"),
            ]
        )
    )

    response = await gw.client().get(
        "/api/v1/openai/health",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "client-private",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "websocket",
            "Proxy-Authorization": "Basic abc",
            "Proxy-Connection": "keep-alive",
        },
    )

    seen = gw.upstream.seen[0]
    for name in ("x-private", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert seen.header(name) is None, name
    assert seen.header("connection") != "keep-alive, X-Private"
    assert "keep-alive" not in response.headers
    assert response.headers.get("x-end-to-end") == "kept"


async def test_identity_headers_from_the_client_never_reach_the_upstream(gw: Gateway) -> None:
    key = gw.auth.add_key()
    spoofed = {
        "X-User-Id": str(uuid.uuid4()),
        "X-Authenticated-User": "admin",
        "X-Authenticated-Roles": "ADMIN",
        "X-Auth-User": "admin",
        "X-User-Roles": "ADMIN",
        "X-Roles": "ADMIN",
        "X-Org-Ids": str(uuid.uuid4()),
        "X-Principal": "admin",
        "X-Remote-User": "admin",
        "X-Real-IP": "10.0.0.1",
        "Forwarded": "for=10.0.0.1",
    }

    response = await gw.client().get("/api/v1/tokens/quota", headers={"X-Api-Key": key, **spoofed})

    assert response.status_code == 200
    seen = gw.upstream.seen[0]
    for name in spoofed:
        assert seen.header(name) is None, name
    assert seen.header("x-api-key") == key


async def test_only_the_verified_credential_goes_on(gw: Gateway) -> None:
    key = gw.auth.add_key()

    await gw.client().get(
        "/api/v1/tokens/quota",
        headers=[("X-Api-Key", key), ("X-Api-Key", "leaky_someone_else")],
    )

    assert gw.upstream.seen[0].all("x-api-key") == [key]


async def test_forwarded_for_is_the_peer_and_the_request_id_is_ours(gw: Gateway) -> None:
    response = await gw.client(ip="198.51.100.9", port=5555).get(
        "/api/v1/openai/health",
        headers={"X-Forwarded-For": "10.9.9.9", "X-Request-Id": "trace-123"},
    )

    seen = gw.upstream.seen[0]
    assert seen.all("x-forwarded-for") == ["198.51.100.9"]  # an unknown peer's claim is dropped
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == "gateway.test"
    assert seen.all("x-request-id") == ["trace-123"]
    assert response.headers.get_list("x-request-id") == ["trace-123"]


async def test_a_trusted_proxy_names_the_client() -> None:
    async with running_gateway(trusted_proxies=["10.0.0.0/8"]) as gw:
        await gw.client(ip="10.1.1.1").get(
            "/api/v1/openai/health",
            # the client wrote the first hop itself; our proxies appended the others
            headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.20, 10.2.2.2"},
        )
        await gw.client(ip="198.51.100.30").get(
            "/api/v1/openai/health", headers={"X-Forwarded-For": "6.6.6.6"}
        )

    assert gw.upstream.seen[0].all("x-forwarded-for") == ["198.51.100.20"]
    assert gw.upstream.seen[1].all("x-forwarded-for") == ["198.51.100.30"]


async def test_security_headers_and_dates_appear_once(gw: Gateway) -> None:
    gw.upstream.reply(
        Reply(
            headers=[
                (b"content-type", b"application/json"),
                (b"x-content-type-options", b"nosniff"),
                (b"x-request-id", b"req_from_upstream"),
                (b"date", b"Thu, 01 Jan 1970 00:00:00 GMT"),
                (b"server", b"uvicorn"),
            ]
        )
    )

    response = await gw.client().get("/api/v1/openai/health")

    assert response.headers.get_list("x-content-type-options") == ["nosniff"]
    assert len(response.headers.get_list("x-request-id")) == 1
    assert response.headers["x-request-id"] != "req_from_upstream"
    assert "server" not in response.headers


async def test_large_bodies_stream_both_ways(gw: Gateway) -> None:
    key = gw.auth.add_key()
    piece = b"x" * 65536
    gw.upstream.reply(Reply(chunks=[piece] * 40, headers=[(b"content-type", b"text/plain")]))

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 50_000

    response = await gw.client().post(
        "/api/v1/tokens/consume",
        content=upload(),
        headers={"X-Api-Key": key, "Content-Length": "500000"},
    )

    assert response.status_code == 200
    assert response.content == piece * 40
    assert gw.upstream.seen[0].body == b"y" * 500_000
    assert gw.upstream.seen[0].header("content-length") == "500000"
    assert gw.upstream.seen[0].header("transfer-encoding") is None


async def test_a_chunked_body_is_read_whole_and_goes_on_with_its_length(gw: Gateway) -> None:
    key = gw.auth.add_key()

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 50_000

    response = await gw.client().post(
        "/api/v1/tokens/consume", content=upload(), headers={"X-Api-Key": key}
    )

    assert response.status_code == 200
    assert gw.upstream.seen[0].body == b"y" * 500_000
    assert gw.upstream.seen[0].header("content-length") == "500000"


async def test_a_body_over_the_limit_is_refused_with_413(gw: Gateway) -> None:
    key = gw.auth.add_key()

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b"z" * 65536

    response = await gw.client().post(
        "/api/v1/tokens/consume", content=upload(), headers={"X-Api-Key": key}
    )

    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"
    # The upstream's breaker did not count the client's oversized body against the upstream.
    assert gw.app.state.edge.upstreams["tokens"].breaker.snapshot()["failedCallsInWindow"] == 0


async def test_head_requests_get_headers_only(gw: Gateway) -> None:
    gw.upstream.reply(Reply(body=b"0123456789"), Reply(body=b"after"))

    head = await gw.client().head("/oauth2/jwks")
    after = await gw.client().get("/oauth2/jwks")

    assert head.status_code == 200
    assert head.headers["content-length"] == "10"
    assert head.content == b""
    assert after.content == b"after"


async def test_an_unknown_path_is_404_in_our_shape_without_a_trip_upstream(gw: Gateway) -> None:
    for path in (
        "/nowhere",
        "/api/v1/tokens/%2e%2e/auth/login",
        "/api/v1/auth/api-keys/revocations",
    ):
        response = await gw.client().get(path)
        assert_error(response, 404, "NOT_FOUND")

    assert gw.upstream.seen == []


async def test_the_gateways_own_endpoints_are_not_proxied(gw: Gateway) -> None:
    metrics = await gw.client().get("/metrics")
    docs = await gw.client().get("/openapi.json")

    assert metrics.status_code == 200
    assert "gateway_circuit_breaker_state" in metrics.text
    assert docs.status_code == 200
    assert gw.upstream.seen == []


async def test_upstream_connections_are_kept_and_reused(gw: Gateway) -> None:
    for i in range(20):
        response = await gw.client(ip=f"198.51.100.{i}").get("/api/v1/openai/health")
        assert response.status_code == 200

    assert len(gw.upstream.seen) == 20
    assert len({seen.client for seen in gw.upstream.seen}) == 1  # one pooled connection


@pytest.mark.parametrize("status", [402, 429, 502])
async def test_real_upstream_answers_pass_through_and_do_not_trip_the_breaker(
    status: int,
) -> None:
    async with running_gateway(breaker_minimum_calls=2, breaker_window_size=2) as gw:
        key = gw.auth.add_key()
        body = orjson.dumps({"code": "WHATEVER", "message": "from upstream"})
        headers = [(b"content-type", b"application/json")]
        if status == 429:
            headers += [(b"retry-after", b"3"), (b"x-ratelimit-limit", b"1000")]
        for _ in range(5):
            gw.upstream.reply(Reply(status=status, body=body, headers=headers))
        responses = [
            await gw.client().post("/api/v1/tokens/consume", headers={"X-Api-Key": key})
            for _ in range(5)
        ]

    assert [r.status_code for r in responses] == [status] * 5
    assert all(r.content == body for r in responses)
    assert len(gw.upstream.seen) == 5
    if status == 429:
        # The token service's bucket headers describe its 429; ours stay in RateLimit.
        assert responses[0].headers["retry-after"] == "3"
        assert responses[0].headers["x-ratelimit-limit"] == "1000"
        assert responses[0].headers["ratelimit-policy"].startswith('"default"')


async def test_a_streamed_answer_arrives_in_pieces_before_it_ends() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"last"})

    async with (
        serving(slow_app) as upstream_url,
        running_gateway(upstream_url=upstream_url) as gw,
        serving(gw.app) as gateway_url,  # httpx's ASGI transport would wait for the whole body
        httpx.AsyncClient(base_url=gateway_url) as client,
        client.stream("GET", "/api/v1/openai/health") as response,
    ):
        pieces = response.aiter_raw()
        assert await anext(pieces) == b"first"
        release.set()
        rest = b"".join([p async for p in pieces])

    assert rest == b"last"


async def test_every_prefix_is_forwarded(gw: Gateway) -> None:
    key = gw.auth.add_key(admin=True)  # (the raw provider routes are for ADMINs)
    for path in (
        "/api/v1/auth/me",
        "/oauth2/jwks",
        "/api/v1/tokens/status",
        "/api/v1/analytics/usage",
        "/api/v1/qwen/chat",
        "/api/v1/gemini/chat",
        "/api/v1/openai/chat",
    ):
        response = await gw.client().get(path, headers={"X-Api-Key": key})
        assert response.status_code == 200, path
        assert response.json()["path"] == path


async def test_a_stream_stops_upstream_when_the_client_leaves() -> None:
    upstream_saw_the_end = asyncio.Event()

    async def endless(scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            upstream_saw_the_end.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not upstream_saw_the_end.is_set():
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.01)
        watcher.cancel()

    async with (
        serving(endless) as upstream_url,
        running_gateway(upstream_url=upstream_url) as gw,
        serving(gw.app) as gateway_url,
        httpx.AsyncClient(base_url=gateway_url) as client,
    ):
        async with client.stream("GET", "/api/v1/openai/health") as response:
            assert (await anext(response.aiter_raw())).startswith(b"tick")
        # the client has hung up; the gateway lets go of the upstream soon after
        await asyncio.wait_for(upstream_saw_the_end.wait(), 3)
