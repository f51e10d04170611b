"""Recorded real-format provider bodies (tests/fixtures/providers/): loaders for any test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "providers"


def load_json(name: str) -> Any:
    """e.g. load_json("gemini/error_resource_exhausted.json")."""
    return orjson.loads((ROOT / name).read_bytes())


def load_sse(name: str) -> list[Any]:
    """The JSON payloads of a recorded stream, in order; "[DONE]" stays a string."""
    raw = (ROOT / name).read_bytes().replace(b"\r\n", b"\n")
    payloads: list[Any] = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                data = line.removeprefix(b"data: ")
                payloads.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return payloads


def raw_bytes(name: str) -> bytes:
    return (ROOT / name).read_bytes()
