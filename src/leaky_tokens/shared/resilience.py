"""Bulkheads (bounded concurrency per dependency) and retry with full-jitter back-off."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

# 2**60 times any sane base delay is far beyond any max_delay; capping the exponent keeps the
# arithmetic from overflowing a float when someone configures many attempts.
_MAX_BACKOFF_EXPONENT = 60


class BulkheadFull(Exception):
    """No slot of the bulkhead became free within its maximum wait."""

    def __init__(self, max_concurrent: int, max_wait_seconds: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_wait_seconds = max_wait_seconds
        super().__init__(
            f"all {max_concurrent} slots busy for {max_wait_seconds}s",
        )


class Bulkhead:
    """At most `max_concurrent` holders at once; others wait up to `max_wait_seconds`.

    Keeps one slow dependency from tying up every task and connection of the process.
    """

    def __init__(self, max_concurrent: int, max_wait_seconds: float) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if max_wait_seconds < 0:
            raise ValueError("max_wait_seconds must not be negative")
        self.max_concurrent = max_concurrent
        self.max_wait_seconds = max_wait_seconds
        self._slots = asyncio.Semaphore(max_concurrent)
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    async def __aenter__(self) -> None:
        if self._slots.locked():
            if self.max_wait_seconds == 0:
                raise BulkheadFull(self.max_concurrent, self.max_wait_seconds)
            try:
                # Semaphore.acquire gives a slot back itself if the timeout's cancellation
                # races with being woken, so no slot leaks here.
                async with asyncio.timeout(self.max_wait_seconds):
                    await self._slots.acquire()
            except TimeoutError:
                raise BulkheadFull(self.max_concurrent, self.max_wait_seconds) from None
        else:
            await self._slots.acquire()  # free slot: returns without suspending
        self._in_use += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._in_use -= 1
        self._slots.release()


def backoff_ceiling(attempt: int, base_delay: float, max_delay: float) -> float:
    """Upper bound of the delay after failed try number `attempt` (0-based)."""
    return min(max_delay, base_delay * 2.0 ** min(attempt, _MAX_BACKOFF_EXPONENT))


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base_delay: float,
    max_delay: float,
    retry_on: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """Call `fn` up to `attempts` times in total, re-raising the last error.

    Before try n+1 sleeps a uniform random time in [0, min(max_delay, base_delay * 2**n))
    ("full jitter"), so clients that failed together do not retry together. Only exceptions
    for which `retry_on` is true are retried; cancellation never is.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    attempt = 0
    while True:
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if attempt + 1 >= attempts or not retry_on(exc):
                raise
            await sleep(rng() * backoff_ceiling(attempt, base_delay, max_delay))
            attempt += 1
