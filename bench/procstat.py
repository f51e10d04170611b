"""CPU time and memory of serving processes, read from /proc (Linux).

CPU is utime + stime of every process in a tree (the process and its descendants, so a proxy's
worker processes count), read before and after a run; the difference divided by the requests
the run completed is the CPU-ms per request of that role. Resolution is one clock tick (10 ms
at the usual 100 Hz), far below what a run of a few seconds accumulates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, int]:
    """(ppid, utime + stime in ticks) from one /proc/<pid>/stat line.

    The command name (field 2) is in parentheses and may itself hold spaces or parentheses,
    so the fields are counted from the last ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]) + int(rest[12])


def _stat(pid: int) -> tuple[int, int] | None:
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def tree(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        stat = _stat(pid)
        if stat is not None:
            total += stat[1]
    return total / TICKS_PER_SECOND


def rss_mb(pids: Iterable[int]) -> float:
    """Resident memory of the processes now (VmRSS), MiB."""
    kib = 0
    for pid in pids:
        try:
            for line in (PROC / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
        except FileNotFoundError:
            continue
    return kib / 1024


class CpuMeter:
    """CPU seconds of named roles (each a set of pids, looked up anew for every reading)."""

    def __init__(self, roles: dict[str, Callable[[], Iterable[int]]]) -> None:
        self._roles = roles
        self._start: dict[str, float] = {}

    def _pids(self, role: str) -> list[int]:
        return list(self._roles[role]())

    def start(self) -> None:
        self._start = {role: cpu_seconds(self._pids(role)) for role in self._roles}

    def stop(self) -> dict[str, float]:
        """CPU seconds each role used since start()."""
        return {
            role: max(0.0, cpu_seconds(self._pids(role)) - before)
            for role, before in self._start.items()
        }
