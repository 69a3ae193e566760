"""Concurrent handling: ``per_session_concurrency > 1`` and non-session queues (issue 18).

The same promises as the ordered loop (tests/test_supervisor.py), with c handlers of one
session (or of a whole non-session queue) running at once: every message settled once,
in-place retries, dead-lettering, the grace period and hand-back at shutdown, lock loss.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from queue_runtime import Message, MessageContext, RetryPolicy, SessionActor, Supervisor, SupervisorConfig
from queue_runtime.errors import SessionLockLost
from queue_runtime.providers.memory import InMemoryProvider
from test_supervisor import QUEUE, Event, Log, config, done_order, make_actor, run_for, send

JOBS = "jobs"


def jobs_config(**kwargs: Any) -> SupervisorConfig:
    kwargs.setdefault("retry", RetryPolicy(max_attempts=3, initial_backoff=0.0, jitter=0.0))
    kwargs.setdefault("receive_timeout", 1.0)
    return SupervisorConfig(queue=JOBS, **kwargs)


async def send_jobs(provider: InMemoryProvider, *events: Event) -> list[str]:
    messages = [Message.json(event) for event in events]
    await provider.send(JOBS, messages)
    return [m.message_id for m in messages]


@pytest.mark.parametrize("concurrency", [2, 4, 16])
async def test_c_handlers_run_at_once_and_every_message_is_completed_once(
    autojump_clock: Any, concurrency: int
) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", *(Event(n=i, sleep=1) for i in range(4 * concurrency)))
        supervisor = Supervisor(provider, make_actor(log), config(per_session_concurrency=concurrency))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            # Receive-ahead keeps all c handlers busy: four rounds of 1 s.
            await trio.sleep(4.5)
            assert sorted(done_order(log, "a")) == list(range(4 * concurrency))
            supervisor.stop()
        assert log.max_handles["a"] == concurrency
        assert len(log.actors["a"]) == 1  # one actor instance runs the c handlers
        stats = supervisor.stats()
        assert (stats.completed, stats.abandoned, stats.dead_lettered) == (4 * concurrency, 0, 0)
        assert (await provider.queue_stats(QUEUE)).active == 0


@pytest.mark.parametrize("concurrency", [2, 4])
async def test_a_failing_message_is_retried_in_place_while_the_others_go_on(
    autojump_clock: Any, concurrency: int
) -> None:
    log = Log()
    policy = RetryPolicy(max_attempts=3, initial_backoff=1.0, multiplier=1.0, jitter=0.0)
    async with InMemoryProvider(lock_duration=60) as provider:
        events = [Event(n=0, fail=2), Event(n=1, fail=5), *(Event(n=i, sleep=0.5) for i in range(2, 8))]
        await send(provider, "a", *events)
        supervisor = Supervisor(
            provider, make_actor(log), config(per_session_concurrency=concurrency, retry=policy)
        )
        await run_for(supervisor, 20)
        [dead] = await provider.peek_dead_letters(QUEUE)
    starts = [e for e in log.events if e[0] == "start" and e[2] == 0]
    assert [e[3] for e in starts] == [1, 2, 3]  # attempts counted, in place
    assert {e[4] for e in starts} == {1}  # delivery_count unchanged
    assert dead.dead_letter_reason == "MaxAttemptsExceeded"
    assert sorted(done_order(log, "a")) == [0, *range(2, 8)]
    stats = supervisor.stats()
    assert (stats.completed, stats.dead_lettered, stats.failed_attempts, stats.retries) == (
        7,
        1,
        2 + 3,
        2 + 2,
    )


@pytest.mark.parametrize("concurrency", [2, 4])
async def test_stop_lets_the_c_running_handlers_finish_and_hands_back_the_rest(
    autojump_clock: Any, concurrency: int
) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        ids = await send(provider, "a", *(Event(n=i, sleep=3) for i in range(3 * concurrency)))
        supervisor = Supervisor(
            provider,
            make_actor(log),
            config(per_session_concurrency=concurrency, prefetch=10, shutdown_grace=30),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            assert log.active_handles["a"] == concurrency
            supervisor.stop()
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at == pytest.approx(2, abs=0.1)  # waited for all c
        assert sorted(done_order(log, "a")) == list(range(concurrency))
        assert log.stops == [("a", "shutdown")]
        stats = supervisor.stats()
        assert (stats.completed, stats.abandoned) == (concurrency, 2 * concurrency)
        # Handed back at once, in order: deliverable now, long before the 60 s lock expires.
        receiver = await provider.accept_session(QUEUE, timeout=0)
        assert receiver is not None
        again = await receiver.receive(100, 0)
        assert [m.message_id for m in again] == ids[concurrency:]


@pytest.mark.parametrize("concurrency", [2, 4])
async def test_stop_cancels_the_c_handlers_after_the_grace_period_and_completes_none(
    autojump_clock: Any, concurrency: int
) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        ids = await send(provider, "a", *(Event(n=i, sleep=1000) for i in range(concurrency + 2)))
        supervisor = Supervisor(
            provider, make_actor(log), config(per_session_concurrency=concurrency, shutdown_grace=5)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at == pytest.approx(5, abs=0.1)
        assert sorted(log.cancelled) == list(range(concurrency))
        assert supervisor.stats().completed == 0
        assert log.stops == [("a", "shutdown")]
        receiver = await provider.accept_session(QUEUE, timeout=0)
        assert receiver is not None
        again = await receiver.receive(100, 0)
        assert sorted(m.message_id for m in again) == sorted(ids)


async def test_stop_during_a_retry_backoff_with_other_handlers_running(autojump_clock: Any) -> None:
    log = Log()
    policy = RetryPolicy(max_attempts=5, initial_backoff=100.0, jitter=0.0)
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=0, fail=10), Event(n=1, sleep=3))
        supervisor = Supervisor(provider, make_actor(log), config(per_session_concurrency=2, retry=policy))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
            stopped_at = trio.current_time()
        # The backoff is interrupted at once; the running handler gets its grace period.
        assert trio.current_time() - stopped_at == pytest.approx(2, abs=0.1)
        assert done_order(log, "a") == [1]
        assert (supervisor.stats().completed, supervisor.stats().abandoned) == (1, 1)


async def test_lock_loss_cancels_all_c_handlers_and_settles_nothing(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=4.0) as provider:
        await send(provider, "a", *(Event(n=i, sleep=100) for i in range(3)))
        supervisor = Supervisor(
            provider,
            make_actor(log),
            config(per_session_concurrency=3, session_idle_timeout=1000, shutdown_grace=1),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            provider.inject_fault("renew_lock", SessionLockLost("refused"), times=1)
            await trio.sleep(3)
            assert sorted(log.cancelled) == [0, 1, 2]
            assert log.stops == [("a", "lock_lost")]
            stats = supervisor.stats()
            assert (stats.completed, stats.dead_lettered, stats.abandoned, stats.lock_lost) == (0, 0, 0, 1)
            supervisor.stop()


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_settlement_refused_for_a_lost_lock_ends_the_session_as_lock_lost(
    autojump_clock: Any, concurrency: int
) -> None:
    """A lock error met by one of the c handlers (here: ``complete`` refused) ends the
    session with ``"lock_lost"`` as in the ordered loop, not as an actor error."""
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=0), Event(n=1, sleep=5))
        provider.inject_fault("complete", SessionLockLost("gone"), times=1)
        supervisor = Supervisor(provider, make_actor(log), config(per_session_concurrency=concurrency))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            assert log.stops[0] == ("a", "lock_lost")
            assert supervisor.stats().lock_lost == 1
            supervisor.stop()


async def test_idle_concurrent_session_stops_and_releases(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=1), Event(n=2))
        supervisor = Supervisor(
            provider, make_actor(log), config(per_session_concurrency=4, session_idle_timeout=5)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(4.5)
            assert log.stops == []
            await trio.sleep(1)
            assert log.stops == [("a", "idle")]
            supervisor.stop()
    assert sorted(done_order(log, "a")) == [1, 2]


@pytest.mark.parametrize("slots", [1, 4])
async def test_non_session_queue_handles_settles_and_stops(autojump_clock: Any, slots: int) -> None:
    """A non-session queue, one handler at a time or several: every message is completed or
    dead-lettered; stop lets running handlers finish and hands the rest back."""
    done: list[int] = []
    running = 0
    most = 0

    class Worker(SessionActor[Event]):
        async def handle(self, event: Event, ctx: MessageContext) -> None:
            nonlocal running, most
            assert ctx.session_id is None
            running += 1
            most = max(most, running)
            try:
                await trio.sleep(event.sleep)
                if event.fail >= ctx.attempt:
                    raise RuntimeError("flaky")
            finally:
                running -= 1
            done.append(event.n)

    async with InMemoryProvider(lock_duration=60) as provider:
        provider.create_queue(JOBS, requires_session=False)
        await send_jobs(
            provider, *(Event(n=i, sleep=1, fail=1 if i == 0 else 9 if i == 1 else 0) for i in range(8))
        )
        supervisor = Supervisor(provider, Worker, jobs_config(max_concurrent_sessions=slots))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(30)
            assert sorted(done) == [0, *range(2, 8)]
            stats = supervisor.stats()
            assert (stats.completed, stats.dead_lettered) == (7, 1)
            # Then a stop while handlers run: they finish, the rest is handed back.
            await send_jobs(provider, *(Event(n=100 + i, sleep=3) for i in range(2 * slots)))
            await trio.sleep(1)
            supervisor.stop()
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at == pytest.approx(2, abs=0.1)
        assert most == slots
        assert supervisor.stats().completed == 7 + slots
        queue = await provider.queue_stats(JOBS)
        assert (queue.active, queue.in_flight) == (slots, 0)


@pytest.mark.parametrize("queue", ["session", "non-session"])
@pytest.mark.parametrize("running", [1, 2])
async def test_a_message_arriving_while_handlers_run_long_starts_at_once(
    autojump_clock: Any, queue: str, running: int
) -> None:
    """A free slot keeps receiving while ``running`` handlers run: it never waits for a busy
    one to come back and receive."""
    starts: list[tuple[int, float]] = []

    class Timed(SessionActor[Event]):
        async def handle(self, event: Event, ctx: MessageContext) -> None:
            starts.append((event.n, trio.current_time()))
            await trio.sleep(event.sleep)

    async with InMemoryProvider(lock_duration=60) as provider:
        first = [Event(n=-i, sleep=10) for i in range(running)]
        if queue == "session":
            await send(provider, "a", *first)
            supervisor = Supervisor(provider, Timed, config(per_session_concurrency=running + 1))
        else:
            provider.create_queue(JOBS, requires_session=False)
            await send_jobs(provider, *first)
            supervisor = Supervisor(provider, Timed, jobs_config(max_concurrent_sessions=running + 1))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            if queue == "session":
                await send(provider, "a", Event(n=1))
            else:
                await send_jobs(provider, Event(n=1))
            await trio.sleep(1)
            assert sorted(n for n, _ in starts) == [*range(1 - running, 1), 1]
            assert starts[-1] == (1, pytest.approx(1, abs=0.1))
            supervisor.stop()


@pytest.mark.parametrize("own_handled", [False, True])
async def test_a_telemetry_subclass_with_the_older_message_completed_signature_still_works(
    autojump_clock: Any, own_handled: bool
) -> None:
    """``message_completed(message, *, seconds)`` without ``handled`` (as before issue 15,
    and as `benchmarks/latency.py` overrides it): the runtime passes ``handled`` only to the
    method it defines itself, and reports it through ``handled()`` otherwise."""
    from queue_runtime.message import ReceivedMessage
    from queue_runtime.telemetry import Telemetry

    completed: list[str] = []
    handled: list[float] = []

    class Old(Telemetry):
        def message_completed(self, message: ReceivedMessage, *, seconds: float) -> None:
            completed.append(message.message_id)

    class OldWithHandled(Old):
        def handled(self, seconds: float) -> None:
            handled.append(seconds)

    log = Log()
    kind = OldWithHandled if own_handled else Old
    async with InMemoryProvider(lock_duration=60) as provider:
        ids = await send(provider, "a", Event(n=1), Event(n=2))
        supervisor = Supervisor(
            provider, make_actor(log), config(session_idle_timeout=1), telemetry=kind(QUEUE, "memory")
        )
        await run_for(supervisor, 5)
    assert completed == ids
    assert len(handled) == (2 if own_handled else 0)
    assert log.stops == [("a", "idle")]


async def test_a_settlement_failing_for_good_ends_the_session_with_error_after_the_others_return(
    autojump_clock: Any,
) -> None:
    """A provider failure in one slot (a permanent ``complete`` error) ends the session with
    ``"error"``; the other slot's running ``handle()`` is not cancelled but finishes first,
    and what was not settled is handed back."""
    from queue_runtime.errors import AuthenticationFailed

    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=0, sleep=1), Event(n=1, sleep=3), Event(n=2), Event(n=3))
        provider.inject_fault("complete", AuthenticationFailed("denied"), times=1)
        supervisor = Supervisor(provider, make_actor(log), config(per_session_concurrency=2))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(2)  # n=0's complete failed at t=1; n=1 runs until t=3
            assert log.stops == []
            await trio.sleep(2)
            assert log.stops[0] == ("a", "error")
            supervisor.stop()
    stats = supervisor.stats()
    # n=1 completed; n=2 and n=3 handed back; n=0 (not completed), 2 and 3 then redelivered
    # to a new actor of the session and completed.
    assert (stats.completed, stats.abandoned) == (4, 2)
    assert log.cancelled == []
    assert sorted(done_order(log, "a")) == [0, 0, 1, 2, 3]


async def test_a_non_session_message_whose_lock_is_lost_cancels_only_its_handler(autojump_clock: Any) -> None:
    """A non-session queue locks each message on its own: when one message's lock is lost,
    only its ``handle()`` is cancelled (and nothing settled for it); the other handler runs on,
    the slot goes on with the next messages, and the broker redelivers the lost one."""
    events: list[tuple[str, int, int, float]] = []
    running = 0
    most_after = 0

    class Worker(SessionActor[Event]):
        async def handle(self, event: Event, ctx: MessageContext) -> None:
            nonlocal running, most_after
            events.append(("start", event.n, ctx.delivery_count, trio.current_time()))
            running += 1
            if event.n >= 10:
                most_after = max(most_after, running)
            try:
                await trio.sleep(1000 if event.n == 0 and ctx.delivery_count == 1 else event.sleep)
            except trio.Cancelled:
                events.append(("cancelled", event.n, ctx.delivery_count, trio.current_time()))
                raise
            finally:
                running -= 1
            events.append(("done", event.n, ctx.delivery_count, trio.current_time()))

    async with InMemoryProvider(lock_duration=2.0) as provider:
        provider.create_queue(JOBS, requires_session=False)
        await send_jobs(provider, Event(n=0))
        supervisor = Supervisor(provider, Worker, jobs_config(max_concurrent_sessions=2, max_lock_renewal=10))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(6)
            await send_jobs(provider, Event(n=1, sleep=8))  # runs from 6 s to 14 s
            await trio.sleep(9)  # 10 s of renewal, then message 0's 2 s lock runs out
            [lost] = [e for e in events if e[0] == "cancelled"]
            assert lost[:3] == ("cancelled", 0, 1) and 10 < lost[3] < 12.5
            # Message 1 ran on through it, on the other slot.
            assert [e for e in events if e[1] == 1] == [("start", 1, 1, 6.0), ("done", 1, 1, 14.0)]
            await trio.sleep(10)
            assert ("done", 0, 2) in [e[:3] for e in events]  # redelivered, handled again
            # The slot whose message was lost goes on: two new messages run at once.
            await send_jobs(provider, Event(n=10, sleep=1), Event(n=11, sleep=1))
            await trio.sleep(3)
            supervisor.stop()
    assert most_after == 2
    assert sorted(e[1] for e in events if e[0] == "done") == [0, 1, 10, 11]
    stats = supervisor.stats()
    assert (stats.completed, stats.abandoned) == (4, 0)
