"""Time to first chunk of a streamed answer, one connection, plain blocking sockets.

wrk times whole responses only, so the first-chunk figure comes from this client: HTTP/1.1
keep-alive, one request at a time, the clock read when the first `data:` event of the body
arrives and when the response ends. At one connection the client is idle while it waits, so it
adds little beside the loopback round trip, and the same to every target.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field


class ResponseReader:
    """Incremental HTTP/1.1 response parser: feed bytes as they arrive.

    Knows when the headers end, when the first body byte that holds an SSE `data:` event has
    arrived (`first_event`), and when the response is complete (`done`), for chunked and
    Content-Length bodies."""

    def __init__(self) -> None:
        self._buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.first_event = False
        self.done = False
        self._in_body = False
        self._chunked = False
        self._remaining = 0  # Content-Length left, or bytes left of the current chunk
        self._chunk_state = "size"  # size | data | crlf | trailer

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if not self._in_body:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self._in_body = True
            self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
            self._remaining = int(self.headers.get("content-length", "0") or 0)
            if not self._chunked and self._remaining == 0:
                self.done = True
                return
        if self._chunked:
            self._feed_chunked()
        else:
            take = self._buffer[: self._remaining]
            self._buffer = self._buffer[len(take) :]
            self._remaining -= len(take)
            self._body(take)
            self.done = self._remaining == 0

    def _body(self, data: bytes) -> None:
        self.body += data
        if not self.first_event and b"data:" in self.body:
            self.first_event = True

    def _feed_chunked(self) -> None:
        while not self.done:
            if self._chunk_state == "size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(self._buffer[:end].split(b";")[0], 16)
                self._buffer = self._buffer[end + 2 :]
                self._remaining = size
                self._chunk_state = "data" if size else "trailer"
            elif self._chunk_state == "data":
                take = self._buffer[: self._remaining]
                if not take:
                    return
                self._buffer = self._buffer[len(take) :]
                self._remaining -= len(take)
                self._body(take)
                if self._remaining == 0:
                    self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(self._buffer) < 2:
                    return
                self._buffer = self._buffer[2:]
                self._chunk_state = "size"
            else:  # trailer: ends with an empty line
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if not line:
                    self.done = True


@dataclass
class StreamTimes:
    first_chunk_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


def request_bytes(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def measure(
    host: str, port: int, path: str, headers: dict[str, str], body: bytes, requests: int
) -> StreamTimes:
    """`requests` streamed requests in a row on one kept-alive connection."""
    times = StreamTimes()
    payload = request_bytes(host, port, path, headers, body)
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests):
            reader = ResponseReader()
            started = time.perf_counter()
            sock.sendall(payload)
            first = None
            while not reader.done:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection mid-response")
                reader.feed(data)
                if first is None and reader.first_event:
                    first = time.perf_counter()
            ended = time.perf_counter()
            times.statuses[reader.status] = times.statuses.get(reader.status, 0) + 1
            if reader.status == 200 and first is not None:
                times.first_chunk_ms.append((first - started) * 1000)
                times.total_ms.append((ended - started) * 1000)
            if reader.headers.get("connection", "").lower() == "close":
                break
    return times
