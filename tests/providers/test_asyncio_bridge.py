"""The trio <-> asyncio bridge: results, exceptions, cancellation, close, no worker threads."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time

import pytest
import trio
import trio.testing

from queue_runtime.providers._asyncio_bridge import AsyncioThread, BridgeClosed


class Boom(Exception):
    pass


@pytest.fixture
async def bridge():
    b = AsyncioThread(name="test-bridge", cancel_grace=2.0)
    yield b
    await b.aclose()


def _pending_tasks(b: AsyncioThread) -> int:
    """Tasks still pending on the bridge loop (asked on the loop thread itself)."""
    result: list[int] = []
    done = threading.Event()

    def count() -> None:
        result.append(len([t for t in asyncio.all_tasks(b.loop) if not t.done()]))
        done.set()

    b.loop.call_soon_threadsafe(count)
    assert done.wait(5)
    return result[0]


async def test_result_and_runs_on_loop_thread(bridge: AsyncioThread) -> None:
    async def work(x: int) -> tuple[int, str]:
        await asyncio.sleep(0.01)
        asyncio.get_running_loop()  # really inside asyncio
        return x * 2, threading.current_thread().name

    value, thread_name = await bridge.run(work, 21)
    assert value == 42
    assert thread_name == "test-bridge"
    assert thread_name != threading.current_thread().name


async def test_exception_propagates_unchanged(bridge: AsyncioThread) -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise Boom("bad")

    with pytest.raises(Boom, match="bad"):
        await bridge.run(fail)


async def test_timeout_is_enforced_on_the_loop(bridge: AsyncioThread) -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await bridge.run(slow, timeout=0.1)
    assert time.monotonic() - start < 2


async def test_cancellation_cancels_the_asyncio_task_and_waits_for_cleanup(bridge: AsyncioThread) -> None:
    started = threading.Event()
    events: list[str] = []

    async def long_call() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled")
            await asyncio.sleep(0.05)  # clean-up that takes a moment
            events.append("cleaned")
            raise
        return "never"

    with trio.move_on_after(0.2) as scope:
        await bridge.run(long_call)
    assert scope.cancelled_caught
    assert started.is_set()
    # run() returned only after the asyncio side finished its clean-up.
    assert events == ["cancelled", "cleaned"]
    assert _pending_tasks(bridge) == 0


async def test_cancel_grace_bounds_the_wait_in_real_time() -> None:
    b = AsyncioThread(name="grace-bridge", cancel_grace=0.3)
    try:

        async def stubborn() -> None:
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    await asyncio.sleep(1.0)  # ignores the first cancel for a second
                    return

        start = time.monotonic()
        with trio.move_on_after(0.1):
            await b.run(stubborn)
        waited = time.monotonic() - start
        assert 0.3 <= waited < 0.9
    finally:
        await b.aclose(timeout=2.0)


async def test_late_result_after_cancel_is_discarded(bridge: AsyncioThread) -> None:
    """A resource produced after the caller gave up goes to the discard hook, not nowhere."""
    discarded: list[str] = []
    discard_done = threading.Event()

    async def acquire() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            # The SDK finished accepting a session just as we were cancelled.
            return "receiver-1"
        return "unreachable"

    async def close(resource: str) -> None:
        discarded.append(resource)
        discard_done.set()

    with trio.move_on_after(0.1) as scope:
        await bridge.run(acquire, discard=close)
    assert scope.cancelled_caught
    assert await trio.to_thread.run_sync(discard_done.wait, 5)  # test helper only
    assert discarded == ["receiver-1"]


async def test_cancel_before_start_never_calls_fn(bridge: AsyncioThread) -> None:
    calls: list[int] = []

    async def fn() -> None:
        calls.append(1)

    with trio.CancelScope() as scope:
        scope.cancel()
        await bridge.run(fn)
    await bridge.run(asyncio.sleep, 0.05)
    assert calls == []


async def test_many_concurrent_calls(bridge: AsyncioThread) -> None:
    results: dict[int, int] = {}

    async def square(i: int) -> int:
        await asyncio.sleep(0.001 * (i % 7))
        return i * i

    async def one(i: int) -> None:
        results[i] = await bridge.run(square, i)

    async with trio.open_nursery() as nursery:
        for i in range(300):
            nursery.start_soon(one, i)
    assert results == {i: i * i for i in range(300)}
    assert _pending_tasks(bridge) == 0


async def test_no_trio_worker_threads_are_used(bridge: AsyncioThread, monkeypatch) -> None:
    """The waiting side sleeps on the trio token: trio.to_thread is never involved, and no
    thread besides the loop thread exists while calls are in flight."""

    def forbidden(*args, **kwargs):
        raise AssertionError("trio.to_thread used")

    monkeypatch.setattr(trio.to_thread, "run_sync", forbidden)
    bridge.start()
    baseline = threading.active_count()

    async def wait_a_bit() -> int:
        await asyncio.sleep(0.2)
        return threading.active_count()

    counts: list[int] = []

    async def one() -> None:
        counts.append(await bridge.run(wait_a_bit))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert counts == [baseline] * 20


async def test_works_under_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    """Real-time work on the loop while trio's clock jumps: results still arrive, and the
    cancellation grace is timed in real time (not skipped by the autojump)."""
    b = AsyncioThread(name="mock-bridge", cancel_grace=5.0)
    try:
        cleaned = threading.Event()

        async def work() -> str:
            await asyncio.sleep(0.05)
            return "ok"

        assert await b.run(work) == "ok"

        started = threading.Event()

        async def slow_cleanup() -> None:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.1)
                cleaned.set()
                raise

        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.run, slow_cleanup)
            while not started.is_set():
                await trio.sleep(0.01)  # virtual time; real time is what the thread needs
            nursery.cancel_scope.cancel()
        # The shielded wait for the clean-up was not skipped by the clock's autojump.
        assert cleaned.is_set()
    finally:
        await b.aclose()


async def test_aclose_stops_thread_and_cancels_in_flight_calls() -> None:
    baseline = threading.active_count()
    b = AsyncioThread(name="close-bridge")
    b.start()
    assert threading.active_count() == baseline + 1
    assert b.thread is not None and b.thread.daemon
    errors: list[BaseException] = []

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def caller() -> None:
        try:
            await b.run(forever)
        except BridgeClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.sleep(0.1)
        start = time.monotonic()
        await b.aclose(timeout=2.0)
        assert time.monotonic() - start < 2.5
    assert len(errors) == 1
    assert not b.running
    assert threading.active_count() == baseline
    with pytest.raises(BridgeClosed):
        await b.run(asyncio.sleep, 0)
    await b.aclose()  # idempotent


async def test_aclose_deadline_with_a_task_that_ignores_cancellation() -> None:
    baseline = threading.active_count()
    b = AsyncioThread(name="stubborn-bridge", cancel_grace=0.2)
    b.start()
    release = threading.Event()

    async def ignores_cancel() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async with trio.open_nursery() as nursery:

        async def caller() -> None:
            with pytest.raises(BridgeClosed):
                await b.run(ignores_cancel)

        nursery.start_soon(caller)
        await trio.sleep(0.05)
        start = time.monotonic()
        await b.aclose(timeout=0.3)
        elapsed = time.monotonic() - start
        release.set()
    assert elapsed < 2.0
    assert threading.active_count() == baseline
    # The abandoned task dies with its loop; collect it now, with asyncio's expected
    # "Task was destroyed but it is pending" record filtered, so it cannot surface as an
    # ERROR record in some later test's caplog.
    asyncio_logger = logging.getLogger("asyncio")
    quiet = logging.Filter("nothing")  # rejects every record (no logger is named "nothing")
    asyncio_logger.addFilter(quiet)
    try:
        gc.collect()
    finally:
        asyncio_logger.removeFilter(quiet)


async def test_timeout_keeps_a_result_that_beat_the_cancellation(bridge: AsyncioThread) -> None:
    """Unlike asyncio.wait_for, a result produced while being timed out is not dropped."""

    async def finishes_anyway() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "resource"
        return "unreachable"

    assert await bridge.run(finishes_anyway, timeout=0.1) == "resource"
