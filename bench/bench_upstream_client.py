"""The gateway's upstream client alone: CPU and Python work per proxied request against a bare
asyncio server answering a fixed 200, sequentially, on this process's event loop.

CPU per request moves with the machine's load; the function calls and timers per request
(cProfile) do not, so a change to how aiohttp is used is compared on those.

    python -m bench.bench_upstream_client [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from multidict import CIMultiDict

from leaky_tokens.gateway.upstream import UpstreamClient

ANSWER = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
)


class _Server(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(ANSWER)


async def measure(requests: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = UpstreamClient(
        f"http://127.0.0.1:{port}",
        max_connections=8,
        connect_seconds=2,
        headers_seconds=10,
        answer_seconds=300,
        pool_wait_seconds=1,
    )
    headers = CIMultiDict([("x-api-key", "k" * 60), ("x-forwarded-for", "203.0.113.7")])

    async def one() -> None:
        answer = await client.request("GET", "/api/v1/openai/health", headers, None)
        while await answer.next_chunk() is not None:
            pass

    try:
        for _ in range(200):
            await one()
        started = time.process_time()
        for _ in range(requests):
            await one()
        cpu_us = (time.process_time() - started) * 1e6 / requests
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(requests):
            await one()
        profile.disable()
    finally:
        await client.aclose()
        server.close()
    stats = pstats.Stats(profile)
    timers = sum(v[1] for k, v in stats.stats.items() if k[2] == "call_at")  # type: ignore[attr-defined]
    return {
        "cpu_us_per_request": round(cpu_us, 1),
        "python_calls_per_request": round(stats.total_calls / requests, 1),  # type: ignore[attr-defined]
        "timers_per_request": round(timers / requests, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    figures = asyncio.run(measure(parser.parse_args().requests))
    print(
        f"upstream client: {figures['cpu_us_per_request']} us CPU, "
        f"{figures['python_calls_per_request']} Python calls, "
        f"{figures['timers_per_request']} timers per request (client and bare server)"
    )


if __name__ == "__main__":
    main()
