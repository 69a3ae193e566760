"""RetryPolicy delays and jitter, Backoff, call_with_retry and CircuitBreaker, on MockClock."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from queue_runtime.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    QueueError,
    Throttled,
    Timeout,
)
from queue_runtime.retry import Backoff, BreakerState, CircuitBreaker, RetryPolicy, call_with_retry


# -- RetryPolicy ------------------------------------------------------------------------------------
def test_defaults_follow_the_operations_guide() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_backoff, policy.multiplier) == (3, 1.0, 2.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"initial_backoff": -1},
        {"initial_backoff": math.nan},
        {"max_backoff": math.inf},
        {"multiplier": 0.5},
        {"jitter": -0.1},
        {"jitter": 1.5},
    ],
)
def test_invalid_policy_is_a_configuration_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="retry\\."):
        RetryPolicy(**fields)


def test_delays_grow_exponentially_and_are_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.5, multiplier=3, max_backoff=10, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10, 10]
    assert policy.delay(0) == 0.5
    assert policy.delay(10_000) == 10  # no overflow for huge counts


@given(
    failures=st.integers(1, 200),
    initial=st.floats(0, 100),
    multiplier=st.floats(1, 10),
    maximum=st.floats(0, 1000),
    jitter=st.floats(0, 1),
    seed=st.integers(0, 2**32),
)
def test_jitter_stays_within_bounds(
    failures: int, initial: float, multiplier: float, maximum: float, jitter: float, seed: int
) -> None:
    policy = RetryPolicy(initial_backoff=initial, multiplier=multiplier, max_backoff=maximum, jitter=jitter)
    base = min(initial * multiplier ** min(failures - 1, 64), maximum)
    delay = policy.delay(failures, random.Random(seed))
    assert math.isfinite(delay) and delay >= 0
    assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_jitter_actually_spreads_delays() -> None:
    policy = RetryPolicy(initial_backoff=1, jitter=0.5)
    rng = random.Random(7)
    delays = {round(policy.delay(1, rng), 6) for _ in range(50)}
    assert len(delays) > 10
    assert min(delays) < 0.8 and max(delays) > 1.2


def test_backoff_grows_and_resets() -> None:
    backoff = Backoff(initial=0.1, multiplier=2, maximum=0.5, jitter=0)
    assert [backoff.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.next_delay() == 0.1


# -- call_with_retry ----------------------------------------------------------------------------------
class Flaky:
    def __init__(self, errors: list[BaseException], result: str = "ok") -> None:
        self.errors = list(errors)
        self.calls: list[float] = []
        self.result = result

    async def __call__(self) -> str:
        self.calls.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return self.result


async def test_transient_errors_are_retried_with_backoff(autojump_clock: Any) -> None:
    flaky = Flaky([ConnectionFailed("a"), Timeout("b"), Throttled("c")])
    result = await call_with_retry(flaky, attempts=5, backoff=Backoff(initial=1, multiplier=2, jitter=0))
    assert result == "ok"
    gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:], strict=False)]
    assert gaps == [1, 2, 4]


async def test_permanent_error_is_raised_at_once(autojump_clock: Any) -> None:
    flaky = Flaky([AuthenticationFailed("bad key"), ConnectionFailed("never reached")])
    with pytest.raises(AuthenticationFailed):
        await call_with_retry(flaky, attempts=5)
    assert len(flaky.calls) == 1
    # A transient flag on the instance wins over the class default.
    flaky = Flaky([ConnectionFailed("x", transient=False)])
    with pytest.raises(ConnectionFailed):
        await call_with_retry(flaky, attempts=5)
    assert len(flaky.calls) == 1


async def test_gives_up_after_attempts_with_the_last_error(autojump_clock: Any) -> None:
    errors = [ConnectionFailed(f"attempt {i}") for i in range(1, 5)]
    flaky = Flaky(errors)
    with pytest.raises(ConnectionFailed, match="attempt 3"):
        await call_with_retry(flaky, attempts=3, backoff=Backoff(jitter=0))
    assert len(flaky.calls) == 3


async def test_retry_after_hint_wins_over_backoff(autojump_clock: Any) -> None:
    flaky = Flaky([Throttled("slow down", retry_after=7)])
    await call_with_retry(flaky, backoff=Backoff(initial=0.1, jitter=0))
    assert flaky.calls[1] - flaky.calls[0] == 7


async def test_deadline_stops_retrying(autojump_clock: Any) -> None:
    flaky = Flaky([ConnectionFailed(str(i)) for i in range(10)])
    start = trio.current_time()
    with pytest.raises(ConnectionFailed):
        await call_with_retry(flaky, attempts=10, backoff=Backoff(initial=1, jitter=0), deadline=start + 5)
    # Waits 1 and 2 fit before the deadline; the next (4) would pass it.
    assert len(flaky.calls) == 3
    assert trio.current_time() - start == 3


async def test_non_queue_errors_and_cancellation_pass_through(autojump_clock: Any) -> None:
    flaky = Flaky([KeyError("bug")])
    with pytest.raises(KeyError):
        await call_with_retry(flaky)
    assert len(flaky.calls) == 1
    flaky = Flaky([ConnectionFailed(str(i)) for i in range(10)])
    with trio.move_on_after(2.5) as scope:
        await call_with_retry(flaky, attempts=10, backoff=Backoff(initial=1, jitter=0))
    assert scope.cancelled_caught
    assert len(flaky.calls) == 2  # at 0 and 1; cancelled during the 2 s wait


def test_queue_error_transient_flags() -> None:
    assert ConnectionFailed("x").transient and Throttled("x").transient and Timeout("x").transient
    assert not AuthenticationFailed("x").transient and not QueueError("x").transient


# -- CircuitBreaker ---------------------------------------------------------------------------------
async def test_breaker_opens_after_consecutive_failures_then_half_opens_and_closes(
    autojump_clock: Any,
) -> None:
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(failure_threshold=5, open_duration=30, on_change=changes.append)
    for _ in range(4):
        breaker.record_failure()
    breaker.record_success()  # resets the consecutive count
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.open_until == pytest.approx(trio.current_time() + 30)
    assert breaker.times_opened == 1
    await trio.sleep(29.9)
    assert breaker.state is BreakerState.OPEN
    await trio.sleep(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.open_until is None
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


async def test_failure_while_half_open_reopens(autojump_clock: Any) -> None:
    breaker = CircuitBreaker(failure_threshold=2, open_duration=10, success_threshold=2)
    breaker.record_failure()
    breaker.record_failure()
    await trio.sleep(10)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is BreakerState.HALF_OPEN  # needs two successes
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.times_opened == 2
    await trio.sleep(10)
    breaker.record_success()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


async def test_wait_returns_at_once_when_closed(autojump_clock: Any) -> None:
    breaker = CircuitBreaker()
    start = trio.current_time()
    await breaker.wait()
    assert trio.current_time() == start


class StepCounter(trio.abc.Instrument):
    """Counts the steps of one task; stops the run if it spins (instead of hanging)."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit, self.steps = name, limit, 0
        self.scope: trio.CancelScope | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self.steps += 1
            if self.steps > self.limit and self.scope is not None:
                self.scope.cancel()


def test_wait_sleeps_until_half_open_instead_of_spinning() -> None:
    clock = trio.testing.MockClock()  # manual: time moves only when the test jumps it
    counter = StepCounter("waiter", limit=100)
    done = trio.Event()
    breaker = CircuitBreaker(failure_threshold=1, open_duration=30)

    async def main() -> None:
        breaker.record_failure()

        async def waiter() -> None:
            await breaker.wait()
            done.set()

        async with trio.open_nursery() as nursery:
            counter.scope = nursery.cancel_scope
            nursery.start_soon(waiter)
            # Returns only once every other task is blocked: a spinning wait() never would
            # (the counter then cancels the run, and the asserts below fail).
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            clock.jump(29)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            clock.jump(1)
            await trio.testing.wait_all_tasks_blocked()

    trio.run(main, clock=clock, instruments=[counter])
    assert done.is_set(), "wait() did not return once the breaker half-opened"
    assert counter.steps <= 5, f"wait() ran {counter.steps} steps: it spins instead of sleeping"
    assert breaker.state is BreakerState.HALF_OPEN


async def test_wait_is_cancellable(autojump_clock: Any) -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_duration=30)
    breaker.record_failure()
    with trio.move_on_after(5) as scope:
        await breaker.wait()
    assert scope.cancelled_caught
