"""The load generator's own ceiling: wrk (one thread) against a trivial server that answers
every request with the same 2-byte body from a raw asyncio protocol on uvloop, so the figure
is what wrk can drive on this machine while sharing it with a server. The compared systems
stay far below it, which is what shows wrk is not what limits them.

    python -m bench.ceiling [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import wrk

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: asyncio.Transport = transport  # type: ignore[assignment]
        self._pending = b""

    def data_received(self, data: bytes) -> None:
        self._pending += data
        count = self._pending.count(b"\r\n\r\n")  # wrk's GETs have no body
        if count:
            self._pending = self._pending[self._pending.rindex(b"\r\n\r\n") + 4 :]
            self._transport.write(_RESPONSE * count)


def serve(port_file: Path) -> None:
    import uvloop

    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        server = await asyncio.get_running_loop().create_server(_Answer, sock=sock)
        port_file.write_text(str(sock.getsockname()[1]))  # noqa: ASYNC240 - once, at start
        await server.serve_forever()

    uvloop.run(main())


def measure(seconds: int = 3, connections: int = 32) -> dict[str, Any]:
    """wrk's requests/s against the trivial server (median of three runs)."""
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, "-m", "bench.ceiling", "--serve", str(port_file)])
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists() or not port_file.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the trivial server did not start")
                time.sleep(0.02)
            url = f"http://127.0.0.1:{port_file.read_text()}/"
            wrk.run_wrk(url, connections=connections, seconds=1)
            runs = [wrk.run_wrk(url, connections=connections, seconds=seconds) for _ in range(3)]
        finally:
            proc.terminate()
            proc.wait(10)
    version = subprocess.run([wrk.executable(), "-v"], capture_output=True, text=True, check=False)
    return {
        "tool": (version.stdout or version.stderr).splitlines()[0].split(" Copyright")[0],
        "threads": 1,
        "connections": connections,
        "ceiling_rps": round(statistics.median(r["rps"] for r in runs)),
        "against": "a raw asyncio protocol on uvloop answering a fixed 2-byte body",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    print(json.dumps(measure(args.seconds), indent=2))


if __name__ == "__main__":
    main()
