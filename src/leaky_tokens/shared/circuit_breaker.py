"""A count-based circuit breaker (Resilience4j-like) guarding calls to one dependency."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from leaky_tokens.shared.clock import Clock, SystemClock, utc_iso

T = TypeVar("T")

log = logging.getLogger(__name__)

# While half-open every probe slot is taken, the probes' outcome is usually known within one
# call's timeout; a second is a sensible hint for clients without knowing that timeout.
_HALF_OPEN_RETRY_AFTER_SECONDS = 1.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When to open: at least `minimum_calls` of the last `window_size` outcomes recorded and a
    failure share of at least `failure_rate_threshold`. Stay open `open_seconds`, then let
    `half_open_max_calls` probes through; all must succeed to close again."""

    window_size: int = 20
    minimum_calls: int = 10
    failure_rate_threshold: float = 0.5
    open_seconds: float = 30.0
    half_open_max_calls: int = 3

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError("window_size must be at least 1")
        if not 1 <= self.minimum_calls <= self.window_size:
            # A minimum above the window size could never be reached: the breaker would never open.
            raise ValueError("minimum_calls must be between 1 and window_size")
        if not 0.0 < self.failure_rate_threshold <= 1.0:
            raise ValueError("failure_rate_threshold must be in (0, 1]")
        if self.open_seconds < 0:
            raise ValueError("open_seconds must not be negative")
        if self.half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be at least 1")


class CircuitOpenError(Exception):
    """The breaker refused a call; `retry_after_seconds` says when trying again makes sense."""

    def __init__(self, name: str, retry_after_seconds: float) -> None:
        self.name = name
        self.retry_after_seconds = retry_after_seconds
        super().__init__(f"circuit breaker {name!r} is open")


StateChangeListener = Callable[[str, BreakerState, BreakerState], None]


def _every_error_is_a_failure(_: BaseException) -> bool:
    return True


class CircuitBreaker:
    """Counts outcomes in a sliding window and refuses calls while the dependency looks down.

    Every method is synchronous, so a check and the state change it causes cannot interleave
    with another task on the same event loop; `call` only awaits the guarded function itself.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Clock | None = None,
        on_state_change: StateChangeListener | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock: Clock = clock or SystemClock()
        self._on_state_change = on_state_change
        self._state = BreakerState.CLOSED
        # True marks a failure; maxlen makes the deque the count-based sliding window.
        self._window: deque[bool] = deque(maxlen=config.window_size)
        self._failures_in_window = 0
        self._opened_at: float | None = None  # monotonic seconds
        self._opened_at_wall: datetime | None = None
        self._probes_admitted = 0
        self._probes_succeeded = 0
        # Bumped on every transition so outcomes of calls admitted under an earlier state (a
        # slow call from before the breaker opened) are not counted against the current one.
        self._epoch = 0

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._open_time_left() <= 0:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    @property
    def retry_after_seconds(self) -> float:
        """How long a refused caller should wait before trying again (0 when closed)."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._open_time_left())
        if state is BreakerState.HALF_OPEN:
            return _HALF_OPEN_RETRY_AFTER_SECONDS
        return 0.0

    def allow(self) -> bool:
        """Admit one call (taking a probe slot when half-open) or refuse it."""
        return self._acquire() is not None

    def record_success(self) -> None:
        self._record(failed=False, epoch=self._epoch)

    def record_failure(self) -> None:
        self._record(failed=True, epoch=self._epoch)

    def release(self) -> None:
        """Give back a call admitted by `allow()` that ended without an outcome (cancelled)."""
        self._release(self._epoch)

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        calls = len(self._window)
        return {
            "name": self.name,
            "state": state.value,
            "failureRate": self._failures_in_window / calls if calls else 0.0,
            "callsInWindow": calls,
            "failedCallsInWindow": self._failures_in_window,
            "openedAt": utc_iso(self._opened_at_wall) if self._opened_at_wall else None,
        }

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        is_failure: Callable[[BaseException], bool] = _every_error_is_a_failure,
    ) -> T:
        """Run `fn` if admitted, else raise `CircuitOpenError`.

        An exception for which `is_failure` is false counts as a success (the dependency did
        answer), as in Resilience4j. Cancellation counts as neither: it says nothing about the
        dependency, and the permit goes back so a half-open breaker cannot get stuck.
        """
        epoch = self._acquire()
        if epoch is None:
            raise CircuitOpenError(self.name, self.retry_after_seconds)
        try:
            result = await fn()
        except Exception as exc:
            self._record(failed=is_failure(exc), epoch=epoch)
            raise
        except BaseException:
            self._release(epoch)
            raise
        self._record(failed=False, epoch=epoch)
        return result

    # -- internals ---------------------------------------------------------------------------

    def _acquire(self) -> int | None:
        state = self.state
        if state is BreakerState.CLOSED:
            return self._epoch
        if state is BreakerState.OPEN:
            return None
        if self._probes_admitted >= self.config.half_open_max_calls:
            return None
        self._probes_admitted += 1
        return self._epoch

    def _release(self, epoch: int) -> None:
        if epoch == self._epoch and self._state is BreakerState.HALF_OPEN:
            self._probes_admitted = max(0, self._probes_admitted - 1)

    def _record(self, *, failed: bool, epoch: int) -> None:
        # Outcomes of calls admitted under an earlier state say nothing about the current one.
        # `_state`, not `state`: an outcome must not be what moves an open breaker to half-open,
        # or it would count as a probe nobody was admitted for.
        if epoch != self._epoch or self._state is BreakerState.OPEN:
            return
        if self._state is BreakerState.HALF_OPEN:
            if failed:
                self._open()
                return
            self._probes_succeeded += 1
            if self._probes_succeeded >= self.config.half_open_max_calls:
                self._transition(BreakerState.CLOSED)
            return
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._failures_in_window -= 1  # the oldest outcome is about to fall out
        self._window.append(failed)
        self._failures_in_window += int(failed)
        calls = len(self._window)
        if (
            calls >= self.config.minimum_calls
            and self._failures_in_window / calls >= self.config.failure_rate_threshold
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock.monotonic()
        self._opened_at_wall = self._clock.now()
        self._transition(BreakerState.OPEN)

    def _open_time_left(self) -> float:
        if self._opened_at is None:
            return 0.0
        return self._opened_at + self.config.open_seconds - self._clock.monotonic()

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self._probes_admitted = 0
        self._probes_succeeded = 0
        if new is BreakerState.CLOSED:
            # A recovered dependency starts with a clean slate, not with the failures that
            # opened the breaker (they would re-open it after a few unlucky calls).
            self._window.clear()
            self._failures_in_window = 0
            self._opened_at = None
            self._opened_at_wall = None
        if self._on_state_change is not None:
            try:
                self._on_state_change(self.name, old, new)
            except Exception:
                # An observer (metrics, logs) must not change the outcome of the guarded call.
                log.exception("circuit breaker listener failed", extra={"breaker": self.name})
