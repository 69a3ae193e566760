"""Backoff and the circuit breaker.

`RetryPolicy` is the user's policy for in-place retries of ``handle()``. `Backoff` is the
same exponential-with-jitter schedule used internally for provider calls, and
`CircuitBreaker` stops the supervisor from hammering a broker that keeps failing.

All waiting uses trio's clock, so tests run them on ``MockClock``.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import trio

from .errors import ConfigurationError, QueueError

__all__ = ["Backoff", "BreakerState", "CircuitBreaker", "RetryPolicy", "call_with_retry"]

T = TypeVar("T")


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How ``handle()`` failures are retried in place, by the same actor, lock kept.

    ``max_attempts`` counts ``handle()`` calls including the first (1 = no retry). Defaults
    follow the operations guide (``QUEUE_MAX_RETRY_ATTEMPTS=3``, ``QUEUE_RETRY_BACKOFF_MS=1000``):
    three calls, waiting about 1 s then 2 s, which rides out a blip without holding a session
    for long. ``jitter`` is a ± fraction applied to each delay so retries of many sessions that
    failed together do not stay in lock-step.
    """

    max_attempts: int = 3
    initial_backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"retry.max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        for name in ("initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"retry.{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.multiplier, (int, float)) or not self.multiplier >= 1:
            raise ConfigurationError(f"retry.multiplier must be >= 1, got {self.multiplier!r}")
        if not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"retry.jitter must be between 0 and 1, got {self.jitter!r}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed call (1-based)."""
        exponent = max(failures - 1, 0)
        # Cap the exponent so a huge attempt count cannot overflow the float.
        base = min(self.initial_backoff * self.multiplier ** min(exponent, 64), self.max_backoff)
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(base, 0.0)


class Backoff:
    """A running exponential backoff: `next_delay` grows, `reset` starts over."""

    def __init__(
        self, initial: float = 0.1, multiplier: float = 2.0, maximum: float = 10.0, jitter: float = 0.2
    ) -> None:
        self._policy = RetryPolicy(
            max_attempts=1, initial_backoff=initial, multiplier=multiplier, max_backoff=maximum, jitter=jitter
        )
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return self._policy.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0


async def call_with_retry(
    operation: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    backoff: Backoff | None = None,
    deadline: float | None = None,
) -> T:
    """Call ``operation``, retrying transient `QueueError`s with backoff.

    Gives up (re-raising the last error) after ``attempts`` calls, or when the next wait would
    pass ``deadline`` (trio clock). A server's ``retry_after`` hint wins over the backoff.
    Permanent errors are raised at once. Cancellation passes straight through.
    """
    backoff = backoff or Backoff()
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except QueueError as error:
            if not error.transient or attempt == attempts:
                raise
            delay = getattr(error, "retry_after", None) or backoff.next_delay()
            if deadline is not None and trio.current_time() + delay >= deadline:
                raise
            await trio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class BreakerState(enum.IntEnum):
    """Exported as a gauge: 0 closed, 1 open, 2 half-open."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Closed → open after ``failure_threshold`` consecutive failures → half-open after
    ``open_duration`` seconds → closed after ``success_threshold`` successes in a row
    (a failure while half-open opens it again).

    Callers ``await breaker.wait()`` before a provider call: it returns at once unless the
    circuit is open, in which case it sleeps until the open period ends instead of spinning.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        open_duration: float = 30.0,
        success_threshold: int = 1,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_duration = open_duration
        self.success_threshold = success_threshold
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and trio.current_time() >= self._opened_at + self.open_duration:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    @property
    def last_state(self) -> BreakerState:
        """The state as of the last call, without consulting trio's clock: safe to read from
        another thread (a metrics exporter's), where ``state`` would fail."""
        return self._state

    @property
    def open_until(self) -> float | None:
        return self._opened_at + self.open_duration if self.state is BreakerState.OPEN else None

    async def wait(self) -> None:
        """Return when a call may be made: at once unless open; cancellable."""
        while (until := self.open_until) is not None:
            await trio.sleep_until(until)

    def record_success(self) -> None:
        self._failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self.success_threshold:
                self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._successes = 0
        state = self.state
        self._failures += 1
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self._failures >= self.failure_threshold
        ):
            self._opened_at = trio.current_time()
            self.times_opened += 1
            self._set(BreakerState.OPEN)
