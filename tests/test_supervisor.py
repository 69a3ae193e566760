"""The eleven semantics of DESIGN.md, on the in-memory broker and trio's MockClock."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queue_runtime import (
    DeadLetter,
    Message,
    MessageContext,
    RetryPolicy,
    SessionActor,
    Supervisor,
    SupervisorConfig,
)
from queue_runtime.errors import ConfigurationError, ConnectionFailed, SessionLockLost, Throttled
from queue_runtime.providers.memory import InMemoryProvider

QUEUE = "orders"
NO_BACKOFF = RetryPolicy(max_attempts=3, initial_backoff=0.0, jitter=0.0)


class Event(msgspec.Struct):
    n: int
    fail: int = 0  # handle() raises on attempts <= fail
    sleep: float = 0.0


class Log:
    """What actors did, shared by the actors of one test."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.stops: list[tuple[str, str]] = []
        self.actors: dict[str, set[int]] = defaultdict(set)
        # Every actor instance, kept alive: a collected actor's id() can be reused by the next
        # one, which would make two actors count as one in `actors`.
        self.instances: list[object] = []
        self.active_handles: dict[str, int] = defaultdict(int)
        self.max_handles: dict[str, int] = defaultdict(int)
        self.live_actors = 0
        self.max_live_actors = 0
        # Actors of one session alive at once (on_start to the end of on_stop), across every
        # supervisor sharing this log: never more than one (DESIGN 12).
        self.live_by_session: dict[str, int] = defaultdict(int)
        self.max_live_by_session: dict[str, int] = defaultdict(int)
        self.cancelled: list[int] = []
        self.stop_delay = 0.0  # on_stop sleeps this long (a slow clean-up)


def make_actor(log: Log) -> type[SessionActor[Event]]:
    class Recorder(SessionActor[Event]):
        async def on_start(self) -> None:
            log.live_actors += 1
            log.max_live_actors = max(log.max_live_actors, log.live_actors)
            log.live_by_session[self.session_id] += 1
            log.max_live_by_session[self.session_id] = max(
                log.max_live_by_session[self.session_id], log.live_by_session[self.session_id]
            )
            log.actors[self.session_id].add(id(self))
            log.instances.append(self)

        async def handle(self, event: Event, ctx: MessageContext) -> None:
            sid = ctx.session_id or ""
            log.events.append(("start", sid, event.n, ctx.attempt, ctx.delivery_count, id(self)))
            log.active_handles[sid] += 1
            log.max_handles[sid] = max(log.max_handles[sid], log.active_handles[sid])
            try:
                if event.sleep:
                    await trio.sleep(event.sleep)
                if ctx.attempt <= event.fail:
                    raise RuntimeError(f"flaky {event.n} attempt {ctx.attempt}")
                if event.n < 0:
                    raise DeadLetter("Negative", f"n={event.n}")
            except trio.Cancelled:
                log.cancelled.append(event.n)
                raise
            finally:
                log.active_handles[sid] -= 1
            log.events.append(("done", sid, event.n))

        async def on_stop(self, reason: str) -> None:
            try:
                if log.stop_delay:
                    await trio.sleep(log.stop_delay)
            finally:
                log.live_actors -= 1
                log.live_by_session[self.session_id] -= 1
                log.stops.append((self.session_id, reason))

    return Recorder


async def send(provider: InMemoryProvider, session: str, *events: Event) -> list[str]:
    messages = [Message.json(event, session_id=session) for event in events]
    await provider.send(QUEUE, messages)
    return [m.message_id for m in messages]


async def run_for(supervisor: Supervisor, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        await trio.sleep(seconds)
        supervisor.stop()


def config(**kwargs: Any) -> SupervisorConfig:
    kwargs.setdefault("retry", NO_BACKOFF)
    kwargs.setdefault("receive_timeout", 1.0)
    return SupervisorConfig(queue=QUEUE, **kwargs)


def done_order(log: Log, session: str) -> list[int]:
    return [e[2] for e in log.events if e[0] == "done" and e[1] == session]


# -- 1. order ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.0, 0.3, 2.0])), min_size=1, max_size=8),
        min_size=1,
        max_size=5,
    ),
    prefetch=st.integers(0, 4),
    lock_duration=st.sampled_from([1.0, 60.0]),
)
def test_order_holds_per_session_under_random_failures(
    plan: list[list[tuple[int, float]]], prefetch: int, lock_duration: float
) -> None:
    """handle(k+1) never starts before k settled; every message ends completed or
    dead-lettered, exactly once, whatever fails and however slow handlers are."""
    log = Log()

    async def main() -> None:
        async with InMemoryProvider(lock_duration=lock_duration) as provider:
            for s, session_plan in enumerate(plan):
                await send(
                    provider, f"s{s}", *(Event(n=i, fail=f, sleep=t) for i, (f, t) in enumerate(session_plan))
                )
            supervisor = Supervisor(provider, make_actor(log), config(prefetch=prefetch))
            await run_for(supervisor, 200)
            stats = supervisor.stats()
            dead = await provider.peek_dead_letters(QUEUE, 1000)
            dead_ns = defaultdict(set)
            for d in dead:
                dead_ns[d.session_id].add(msgspec.json.decode(d.message.body, type=Event).n)
                assert d.dead_letter_reason == "MaxAttemptsExceeded"
                assert "RuntimeError: flaky" in (d.dead_letter_description or "")
            for s, session_plan in enumerate(plan):
                sid = f"s{s}"
                expected_dead = {i for i, (f, _) in enumerate(session_plan) if f >= 3}
                assert dead_ns[sid] == expected_dead
                done = done_order(log, sid)
                assert done == [i for i in range(len(session_plan)) if i not in expected_dead]
                # Strict order of starts: never go back to an earlier message once a later started.
                starts = [e[2] for e in log.events if e[0] == "start" and e[1] == sid]
                assert starts == sorted(starts)
            assert stats.completed + stats.dead_lettered == sum(len(p) for p in plan)
            assert stats.lock_lost == 0
            assert (await provider.queue_stats(QUEUE)).active == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- 2. at-least-once: complete only after handle() returned ---------------------------------


async def test_message_completed_only_after_handle_returns(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=1, sleep=10))
        supervisor = Supervisor(provider, make_actor(log), config())
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(5)
            # handle() is still running: the message is in flight, not completed.
            assert supervisor.stats().completed == 0
            assert (await provider.queue_stats(QUEUE)).in_flight == 1
            await trio.sleep(6)
            assert supervisor.stats().completed == 1
            supervisor.stop()


# -- 3. in-place retry ------------------------------------------------------------------------


async def test_retry_in_place_same_actor_attempts_count_and_delivery_count_unchanged(
    autojump_clock: Any,
) -> None:
    log = Log()
    policy = RetryPolicy(max_attempts=4, initial_backoff=1.0, multiplier=2.0, jitter=0.0)
    async with InMemoryProvider() as provider:
        await send(provider, "a", Event(n=1, fail=2))
        supervisor = Supervisor(provider, make_actor(log), config(retry=policy))
        await run_for(supervisor, 10)
    starts = [e for e in log.events if e[0] == "start"]
    assert [e[3] for e in starts] == [1, 2, 3]
    assert {e[4] for e in starts} == {1}  # delivery_count unchanged by in-place retries
    assert len({e[5] for e in starts}) == 1  # one actor instance
    stats = supervisor.stats()
    assert (stats.completed, stats.failed_attempts, stats.retries, stats.dead_lettered) == (1, 2, 2, 0)


async def test_retry_backoff_follows_policy(autojump_clock: Any) -> None:
    times: list[float] = []

    class Flaky(SessionActor[bytes]):
        async def handle(self, body: bytes, ctx: MessageContext) -> None:
            times.append(trio.current_time())
            raise ValueError("nope")

    policy = RetryPolicy(max_attempts=4, initial_backoff=1.0, multiplier=3.0, jitter=0.0)
    async with InMemoryProvider() as provider:
        await provider.send(QUEUE, [Message(b"x", session_id="a")])
        await run_for(Supervisor(provider, Flaky, config(retry=policy)), 30)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert gaps == [1.0, 3.0, 9.0]


async def test_max_attempts_dead_letters_with_type_and_text_capped(autojump_clock: Any) -> None:
    class Boom(SessionActor[bytes]):
        async def handle(self, body: bytes, ctx: MessageContext) -> None:
            raise KeyError("x" * 5000)

    async with InMemoryProvider() as provider:
        await provider.send(QUEUE, [Message(b"secret-body-content", session_id="a")])
        supervisor = Supervisor(provider, Boom, config())
        await run_for(supervisor, 10)
        [dead] = await provider.peek_dead_letters(QUEUE)
    assert dead.dead_letter_reason == "MaxAttemptsExceeded"
    description = dead.dead_letter_description or ""
    assert description.startswith("KeyError: ")
    assert len(description.encode()) <= 1024
    assert "secret-body-content" not in description
    assert supervisor.stats().failed_attempts == 3


async def test_dead_letter_exception_is_never_retried(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider() as provider:
        await send(provider, "a", Event(n=-5), Event(n=2))
        supervisor = Supervisor(provider, make_actor(log), config())
        await run_for(supervisor, 10)
        [dead] = await provider.peek_dead_letters(QUEUE)
    assert [e[2] for e in log.events if e[0] == "start"] == [-5, 2]
    assert (dead.dead_letter_reason, dead.dead_letter_description) == ("Negative", "n=-5")
    assert supervisor.stats().failed_attempts == 0
    assert done_order(log, "a") == [2]


async def test_context_dead_letter_settles_and_skips_completion(autojump_clock: Any) -> None:
    class Manual(SessionActor[bytes]):
        async def handle(self, body: bytes, ctx: MessageContext) -> None:
            await ctx.dead_letter("Manual", "by hand")

    async with InMemoryProvider() as provider:
        await provider.send(QUEUE, [Message(b"x", session_id="a")])
        supervisor = Supervisor(provider, Manual, config())
        await run_for(supervisor, 5)
        [dead] = await provider.peek_dead_letters(QUEUE)
    assert dead.dead_letter_reason == "Manual"
    assert (supervisor.stats().completed, supervisor.stats().dead_lettered) == (0, 1)


# -- 4. poison --------------------------------------------------------------------------------


async def test_delivery_count_over_limit_dead_lettered_without_handle(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(max_delivery_count=10) as provider:
        await send(provider, "a", Event(n=1))
        # Deliver it twice and hand it back: delivery_count is 3 at the next delivery.
        for _ in range(2):
            receiver = await provider.accept_session(QUEUE, timeout=1)
            assert receiver is not None
            [message] = await receiver.receive(1, 1)
            await receiver.abandon(message)
            await receiver.aclose()
        supervisor = Supervisor(provider, make_actor(log), config(max_delivery_count=2))
        await run_for(supervisor, 5)
        [dead] = await provider.peek_dead_letters(QUEUE)
    assert log.events == []
    assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
    assert "3" in (dead.dead_letter_description or "")


async def test_undecodable_body_dead_lettered_at_once(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider() as provider:
        await provider.send(QUEUE, [Message(b'{"n": "not-an-int"}', session_id="a")])
        await provider.send(QUEUE, [Message(b"{not json", session_id="a")])
        await send(provider, "a", Event(n=3))
        supervisor = Supervisor(provider, make_actor(log), config())
        await run_for(supervisor, 5)
        dead = await provider.peek_dead_letters(QUEUE)
    assert [d.dead_letter_reason for d in dead] == ["DeserializationFailed"] * 2
    assert "$.n" in (dead[0].dead_letter_description or "")
    assert "not valid JSON" in (dead[1].dead_letter_description or "")
    assert done_order(log, "a") == [3]
    assert supervisor.stats().failed_attempts == 0


# -- 5. lock renewal and lock loss --------------------------------------------------------------


async def test_lock_renewed_while_handler_outlives_the_lock(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=2.0) as provider:
        await send(provider, "a", Event(n=1, sleep=30), Event(n=2))
        supervisor = Supervisor(provider, make_actor(log), config())
        await run_for(supervisor, 40)
    stats = supervisor.stats()
    assert done_order(log, "a") == [1, 2]
    assert stats.lock_lost == 0
    assert stats.lock_renewals >= 15  # 30 s of handling on a 2 s lock renewed every ~1 s
    assert next(e for e in log.events if e[0] == "start")[4] == 1  # never redelivered


async def test_idle_session_keeps_its_lock_renewed(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=1.0) as provider:
        await send(provider, "a", Event(n=1))
        supervisor = Supervisor(provider, make_actor(log), config(session_idle_timeout=10))
        await run_for(supervisor, 8)
    assert supervisor.stats().lock_lost == 0
    assert supervisor.stats().lock_renewals >= 10


async def test_lock_loss_cancels_handle_and_settles_nothing(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=4.0) as provider:
        await send(provider, "a", Event(n=1, sleep=100))
        supervisor = Supervisor(
            provider, make_actor(log), config(session_idle_timeout=1000, shutdown_grace=1)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            provider.inject_fault("renew_lock", SessionLockLost("refused"), times=1)
            await trio.sleep(3)
            assert log.cancelled == [1]
            assert log.stops == [("a", "lock_lost")]
            stats = supervisor.stats()
            assert (stats.completed, stats.dead_lettered, stats.abandoned, stats.lock_lost) == (0, 0, 0, 1)
            supervisor.stop()
    # Nothing was settled: the broker delivered the same message again, counting it.
    starts = [(e[2], e[4]) for e in log.events if e[0] == "start"]
    assert starts == [(1, 1), (1, 2)]
    assert supervisor.stats().completed == 0


async def test_transient_renewal_error_retried_while_lock_valid(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=4.0) as provider:
        await send(provider, "a", Event(n=1, sleep=12))
        provider.inject_fault("renew_lock", ConnectionFailed("blip"), times=2)
        supervisor = Supervisor(provider, make_actor(log), config())
        await run_for(supervisor, 20)
    assert supervisor.stats().lock_lost == 0
    assert done_order(log, "a") == [1]


async def test_renewal_stops_after_max_lock_renewal_and_lock_is_lost(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=2.0) as provider:
        await send(provider, "a", Event(n=1, sleep=1000))
        supervisor = Supervisor(provider, make_actor(log), config(max_lock_renewal=10))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(8)
            assert log.cancelled == []
            await trio.sleep(6)  # 10 s of renewal, then the 2 s lock runs out
            assert log.cancelled == [1]
            assert log.stops == [("a", "lock_lost")]
            supervisor.stop()


# -- 12. one holder, live locks only -----------------------------------------------------------


async def test_a_renewal_that_hangs_past_the_deadline_ends_the_session_before_another_worker_starts(
    autojump_clock: Any,
) -> None:
    """Issue 14: the broker stops answering renewals; the lock runs out while handle() runs and
    the broker gives the session to another worker. The first worker's handle() must have been
    cancelled before that (two actors of one session never handle at once)."""
    log = Log()
    async with InMemoryProvider(lock_duration=10) as provider:
        await send(provider, "a", Event(n=0, sleep=15), Event(n=1))
        first = Supervisor(provider, make_actor(log), config(session_idle_timeout=100))
        second = Supervisor(provider, make_actor(log), config(session_idle_timeout=100))
        async with trio.open_nursery() as nursery:
            await nursery.start(first.serve)
            await trio.sleep(1)
            provider.stall(30, operations=["renew_lock"])
            await nursery.start(second.serve)
            await trio.sleep(120)
            first.stop()
            second.stop()
    assert log.max_handles["a"] == 1, log.events
    assert done_order(log, "a") == [0, 1]
    assert first.stats().lock_lost >= 1
    cancelled_at = [e for e in log.events if e[0] == "start"]
    assert cancelled_at[0][4] == 1 and log.cancelled[0] == 0


class _Watched:
    """The in-memory session receivers with `Receiver.watch_lock` recorded (the memory provider
    keeps the default, which keeps nothing), and a lock deadline the test may move earlier."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from queue_runtime.providers import memory

        self.callbacks: dict[str | None, Any] = {}  # the first callback per session
        self.calls: list[Any] = []  # every callback given, None included
        self.until: float | None = None  # set: what `locked_until` reads instead of the broker's
        real = memory._SessionReceiver.locked_until
        watched = self

        def watch_lock(receiver: Any, callback: Any) -> None:
            watched.calls.append(callback)
            if callback is not None:
                watched.callbacks.setdefault(receiver.session_id, callback)

        def locked_until(receiver: Any) -> float | None:
            return real.fget(receiver) if watched.until is None else watched.until  # type: ignore[attr-defined]

        monkeypatch.setattr(memory._SessionReceiver, "watch_lock", watch_lock, raising=False)
        monkeypatch.setattr(memory._SessionReceiver, "locked_until", property(locked_until))


async def test_a_lock_the_receiver_finds_lost_ends_the_running_handle_at_once(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 (found by the freeze-short drill): the provider learns that a session's lock
    is gone while its handle() runs and the session calls nothing on its receiver (SQS: a
    delete another task flushed comes back refused). The session must end then, not at the
    expiry the renewer set from the deadline it saw last: by that time another worker may be
    handling the session's messages."""
    watched = _Watched(monkeypatch)
    log = Log()
    async with InMemoryProvider(lock_duration=30.0) as provider:
        await send(provider, "a", Event(n=1, sleep=100))
        supervisor = Supervisor(provider, make_actor(log), config(session_idle_timeout=1000))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            assert watched.callbacks.get("a") is not None, "the session does not watch its receiver's lock"
            started = trio.current_time()
            watched.callbacks["a"](SessionLockLost("a delete came back refused"))
            await trio.sleep(0.01)
            assert log.cancelled == [1]
            assert log.stops == [("a", "lock_lost")]
            assert trio.current_time() - started < 0.1
            assert supervisor.stats().completed == 0
            assert watched.calls[1] is None  # no longer watched once the session ended
            supervisor.stop()


async def test_a_lock_deadline_the_receiver_moves_earlier_is_timed_again_at_once(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQS: another task's poll hands the session messages under an earlier deadline than the
    one the renewer timed expiry from. Told so (None), the session's lock expires by the new
    deadline (less the 2 s margin of a 30 s lock), not by the old one 28 s on."""
    watched = _Watched(monkeypatch)
    log = Log()
    async with InMemoryProvider(lock_duration=30.0) as provider:
        await send(provider, "a", Event(n=1, sleep=100))
        supervisor = Supervisor(provider, make_actor(log), config(session_idle_timeout=1000))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            watched.until = trio.current_time() + 5
            watched.callbacks["a"](None)
            await trio.sleep(2.5)
            assert log.cancelled == []  # renewed meanwhile, to the same (earlier) deadline
            await trio.sleep(1)
            # (The session is accepted again at once, and lost again while `until` holds.)
            assert log.cancelled[:1] == [1]
            assert log.stops[:1] == [("a", "lock_lost")]
            watched.until = None
            supervisor.stop()


async def test_one_worker_never_runs_two_actors_of_a_session_after_its_lock_lapsed(
    autojump_clock: Any,
) -> None:
    """The same inside one worker: when the broker hands the session out again (the old lock
    ran out while renewal hung), the old actor has stopped before the new one starts."""
    log = Log()
    async with InMemoryProvider(lock_duration=10) as provider:
        await send(provider, "a", Event(n=0, sleep=15), Event(n=1))
        supervisor = Supervisor(provider, make_actor(log), config(session_idle_timeout=100))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            provider.stall(30, operations=["renew_lock"])
            await trio.sleep(120)
            supervisor.stop()
    assert log.max_handles["a"] == 1, log.events
    assert log.max_live_by_session["a"] == 1, log.stops
    assert done_order(log, "a") == [0, 1]


async def test_a_new_actor_waits_until_the_old_one_of_its_session_has_closed(autojump_clock: Any) -> None:
    """The old actor lost its lock and is still ending (a slow on_stop) when the broker hands
    the session out again: the new actor starts only after the old one has stopped."""
    log = Log()
    log.stop_delay = 8.0
    async with InMemoryProvider(lock_duration=10) as provider:
        await send(provider, "a", Event(n=0, sleep=100), Event(n=1))
        supervisor = Supervisor(
            provider, make_actor(log), config(session_idle_timeout=100, max_concurrent_sessions=4)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            provider.inject_fault("renew_lock", SessionLockLost("refused"))  # at t=5: lock lost
            await trio.sleep(60)
            supervisor.stop()
    assert log.stops[0] == ("a", "lock_lost")
    assert log.max_live_by_session["a"] == 1, log.stops
    assert done_order(log, "a") == [0, 1] or log.events


# -- 6. idle and release ------------------------------------------------------------------------


class SlotWanted(InMemoryProvider):
    """An in-memory broker whose sessions are asked to end as soon as they have nothing to do,
    as the SQS provider asks while groups it received wait for a slot."""

    async def accept_session(self, queue: str, *, timeout: float) -> Any:
        receiver = await super().accept_session(queue, timeout=timeout)
        if receiver is not None:
            receiver.release_requested = True
        return receiver


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_session_whose_slot_is_wanted_stops_as_idle_once_its_handlers_returned(
    autojump_clock: Any, concurrency: int
) -> None:
    log = Log()
    async with SlotWanted(lock_duration=60) as provider:
        await send(provider, "a", Event(n=1, sleep=3), Event(n=2, sleep=3))
        supervisor = Supervisor(
            provider,
            make_actor(log),
            config(session_idle_timeout=100, per_session_concurrency=concurrency),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            handled_at = 6 if concurrency == 1 else 3  # one after the other, or at once
            await trio.sleep(handled_at - 0.5)
            assert log.stops == []  # not while a handler runs
            await trio.sleep(2)  # then one empty receive (1 s here)
            assert log.stops == [("a", "idle")]  # without waiting out the 100 s idle timeout
            supervisor.stop()
    assert sorted(done_order(log, "a")) == [1, 2]


async def test_idle_actor_stops_and_releases_its_session(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=1))
        supervisor = Supervisor(provider, make_actor(log), config(session_idle_timeout=5))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(4.5)
            assert log.stops == []
            await trio.sleep(1)
            assert log.stops == [("a", "idle")]
            assert supervisor.stats().active_sessions == 0
            # Released: a new message for the session is picked up by a new actor at once.
            await send(provider, "a", Event(n=2))
            await trio.sleep(1.5)
            assert done_order(log, "a") == [1, 2]
            assert len(log.actors["a"]) == 2
            supervisor.stop()


# -- 7. graceful shutdown -----------------------------------------------------------------------


async def test_stop_finishes_running_handle_and_hands_back_the_rest_at_once(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        ids = await send(provider, "a", Event(n=0, sleep=3), *(Event(n=i) for i in range(1, 5)))
        supervisor = Supervisor(provider, make_actor(log), config(prefetch=10, shutdown_grace=30))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at == pytest.approx(2, abs=0.1)  # waited for handle()
        assert done_order(log, "a") == [0]
        assert log.stops == [("a", "shutdown")]
        assert supervisor.stats().abandoned == 4
        # Handed back at once: deliverable now, long before the 60 s lock would expire.
        receiver = await provider.accept_session(QUEUE, timeout=0)
        assert receiver is not None
        again = await receiver.receive(10, 0)
        assert [m.message_id for m in again] == ids[1:]
        assert all(m.delivery_count == 2 for m in again)


async def test_stop_cancels_handle_after_grace_without_settling(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        [mid] = await send(provider, "a", Event(n=0, sleep=1000))
        supervisor = Supervisor(provider, make_actor(log), config(shutdown_grace=5))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at == pytest.approx(5, abs=0.1)
        assert log.cancelled == [0]
        assert supervisor.stats().completed == 0
        receiver = await provider.accept_session(QUEUE, timeout=0)
        assert receiver is not None
        [again] = await receiver.receive(1, 0)
        assert again.message_id == mid


async def test_a_lock_lost_while_handing_back_the_message_the_grace_deadline_cut_is_lock_loss(
    autojump_clock: Any,
) -> None:
    # The grace deadline cuts handle() short; handing its message back then finds the session
    # lock gone: the session ends as lock loss, nothing is settled.
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=0, sleep=1000))
        provider.inject_fault("abandon", SessionLockLost("gone"))
        supervisor = Supervisor(provider, make_actor(log), config(shutdown_grace=5))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
        assert log.cancelled == [0]
        assert log.stops == [("a", "lock_lost")]
        stats = supervisor.stats()
        assert (stats.completed, stats.abandoned, stats.lock_lost) == (0, 0, 1)


@pytest.mark.parametrize("path", ["quiet", "observed"])
async def test_settling_after_handle_returns_is_not_cut_short_by_the_grace_deadline(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # stop() at t=1 gives handle() until t=4; it returns at t=2, and its complete is throttled
    # for 3 s. That retry outlives the grace deadline, but the work is done: it must complete.
    # ("observed": message logging on, so the message takes the session's full path.)
    import logging

    caplog.set_level(logging.DEBUG if path == "observed" else logging.INFO, logger="queue_runtime")
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=0, sleep=2))
        provider.inject_fault("complete", Throttled("slow down", retry_after=3))
        supervisor = Supervisor(provider, make_actor(log), config(shutdown_grace=3))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at == pytest.approx(4, abs=0.1)
        assert done_order(log, "a") == [0]
        assert (supervisor.stats().completed, supervisor.stats().abandoned) == (1, 0)
        assert (await provider.queue_stats(QUEUE)).active == 0


async def test_stop_during_retry_backoff_hands_message_back_at_once(autojump_clock: Any) -> None:
    log = Log()
    policy = RetryPolicy(max_attempts=5, initial_backoff=100.0, jitter=0.0)
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=0, fail=10))
        supervisor = Supervisor(provider, make_actor(log), config(retry=policy))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
            stopped_at = trio.current_time()
        assert trio.current_time() - stopped_at < 0.1
        assert supervisor.stats().abandoned == 1
        assert (await provider.queue_stats(QUEUE)).active == 1


async def test_stop_accepts_nothing_new(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider() as provider:
        supervisor = Supervisor(provider, make_actor(log), config())
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            supervisor.stop()
            await send(provider, "late", Event(n=1))
        assert log.events == []
        assert supervisor.stats().sessions_started == 0


async def test_cancelling_serve_settles_nothing_and_hands_sessions_back(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider(lock_duration=60) as provider:
        await send(provider, "a", Event(n=0, sleep=1000), Event(n=1))
        supervisor = Supervisor(provider, make_actor(log), config())
        with trio.move_on_after(2):
            await supervisor.serve()
        stats = supervisor.stats()
        assert (stats.completed, stats.abandoned, stats.dead_lettered) == (0, 0, 0)
        assert log.cancelled == [0]
        # The session was released: another consumer can take it now.
        receiver = await provider.accept_session(QUEUE, timeout=0)
        assert receiver is not None


# -- 8. bounds -------------------------------------------------------------------------------


async def test_never_more_actors_than_max_concurrent_sessions(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider() as provider:
        for s in range(12):
            await send(provider, f"s{s}", Event(n=0, sleep=1), Event(n=1, sleep=1))
        supervisor = Supervisor(
            provider, make_actor(log), config(max_concurrent_sessions=3, session_idle_timeout=0.5)
        )
        await run_for(supervisor, 60)
    assert log.max_live_actors == 3
    assert all(done_order(log, f"s{s}") == [0, 1] for s in range(12))


@pytest.mark.parametrize("concurrency", [2, 3])
async def test_per_session_concurrency_bounds_handles_of_one_session(
    autojump_clock: Any, concurrency: int
) -> None:
    log = Log()
    async with InMemoryProvider() as provider:
        await send(provider, "a", *(Event(n=i, sleep=1) for i in range(9)))
        supervisor = Supervisor(provider, make_actor(log), config(per_session_concurrency=concurrency))
        await run_for(supervisor, 30)
    assert log.max_handles["a"] == concurrency
    assert sorted(done_order(log, "a")) == list(range(9))


# -- 9. provider faults --------------------------------------------------------------------------


async def test_circuit_breaker_pauses_acceptance_then_recovers(autojump_clock: Any) -> None:
    log = Log()
    calls: list[float] = []
    async with InMemoryProvider() as provider:
        original = provider.accept_session

        async def counting(queue: str, *, timeout: float) -> Any:
            calls.append(trio.current_time())
            return await original(queue, timeout=timeout)

        provider.accept_session = counting  # type: ignore[method-assign]
        provider.inject_fault("accept_session", ConnectionFailed("broker down"), times=6)
        await send(provider, "a", Event(n=1))
        supervisor = Supervisor(provider, make_actor(log), config(max_concurrent_sessions=1))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(20)
            assert supervisor.stats().circuit == "open"
            assert not supervisor.ready
            assert len(calls) == 5  # paused: no calls while open
            await trio.sleep(60)
            assert supervisor.stats().circuit == "closed"
            assert done_order(log, "a") == [1]
            supervisor.stop()
    # One trial call when half-open failed (the 6th fault), re-opened for 30 s, then success.
    assert len(calls) >= 7
    assert calls[5] - calls[4] >= 30 - 1e-6  # float sums of the clock: allow rounding


async def test_transient_complete_errors_are_retried(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider() as provider:
        await send(provider, "a", Event(n=1), Event(n=2))
        provider.inject_fault("complete", Throttled("slow down"), times=2)
        supervisor = Supervisor(provider, make_actor(log), config())
        await run_for(supervisor, 10)
    assert supervisor.stats().completed == 2
    assert (await provider.queue_stats(QUEUE)).active == 0


async def test_permanent_startup_errors_raise_with_a_clear_message() -> None:
    from queue_runtime.errors import QueueNotFound

    async with InMemoryProvider() as provider:

        async def missing(queue: str) -> Any:
            raise QueueNotFound(f"queue {queue!r} does not exist")

        provider.describe = missing  # type: ignore[method-assign]
        supervisor = Supervisor(provider, make_actor(Log()), config())
        with pytest.raises(QueueNotFound, match="'orders' does not exist"):
            await supervisor.serve()


# -- 10. bad input ---------------------------------------------------------------------------------


def test_supervisor_rejects_bad_actor_and_queue() -> None:
    provider = InMemoryProvider()
    with pytest.raises(ConfigurationError, match="not a SessionActor"):
        Supervisor(provider, object, config())  # type: ignore[arg-type]

    class NoHandle(SessionActor[bytes]):
        pass

    with pytest.raises(ConfigurationError, match="does not implement handle"):
        Supervisor(provider, NoHandle, config())
    with pytest.raises(Exception, match="queue name"):
        Supervisor(provider, make_actor(Log()), SupervisorConfig(queue="bad name!"))
    with pytest.raises(ConfigurationError, match="max_concurrent_sessions"):
        SupervisorConfig(queue="q", max_concurrent_sessions=0)


# -- actors, state, non-session queues --------------------------------------------------------------


async def test_session_state_is_available_to_the_actor(autojump_clock: Any) -> None:
    seen: list[bytes | None] = []

    class Stateful(SessionActor[str]):
        async def on_start(self) -> None:
            seen.append(await self.session.get_state())

        async def handle(self, text: str, ctx: MessageContext) -> None:
            await self.session.set_state(text.encode())

    async with InMemoryProvider() as provider:
        await provider.send(QUEUE, [Message("first", session_id="a")])
        supervisor = Supervisor(provider, Stateful, config(session_idle_timeout=1))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(3)
            await provider.send(QUEUE, [Message("second", session_id="a")])
            await trio.sleep(3)
            supervisor.stop()
    assert seen == [None, b"first"]


async def test_non_session_queue_messages_are_handled_concurrently(autojump_clock: Any) -> None:
    handled: list[float] = []

    class Worker(SessionActor[bytes]):
        async def handle(self, body: bytes, ctx: MessageContext) -> None:
            assert ctx.session_id is None
            await trio.sleep(1)
            handled.append(trio.current_time())

    async with InMemoryProvider() as provider:
        provider.create_queue("jobs", requires_session=False)
        await provider.send("jobs", [Message(b"%d" % i) for i in range(20)])
        supervisor = Supervisor(provider, Worker, SupervisorConfig(queue="jobs", max_concurrent_sessions=10))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(2.5)
            assert len(handled) == 20  # 10 at a time: two rounds of 1 s
            supervisor.stop()
    assert supervisor.stats().completed == 20


async def test_stats_snapshot_counts(autojump_clock: Any) -> None:
    log = Log()
    async with InMemoryProvider() as provider:
        await send(provider, "a", Event(n=1), Event(n=2, fail=1), Event(n=-1))
        await send(provider, "b", Event(n=1, fail=5))
        supervisor = Supervisor(provider, make_actor(log), config())
        await run_for(supervisor, 20)
    stats = supervisor.stats()
    assert stats.sessions_started == 2
    assert stats.completed == 2
    assert stats.dead_lettered == 2
    assert stats.failed_attempts == 1 + 3
    assert stats.retries == 1 + 2
    assert stats.active_sessions == 0
    assert stats.draining
    assert stats.received == 4
    assert (stats.abandoned, stats.lock_lost) == (0, 0)


async def test_a_telemetry_subclass_sees_every_span_call_with_tracing_off(autojump_clock: Any) -> None:
    """The runtime skips the span helpers per message while tracing is off, but not when a
    `Telemetry` subclass overrides them: it asked to see every call."""
    from contextlib import AbstractContextManager, nullcontext

    from queue_runtime.message import ReceivedMessage
    from queue_runtime.telemetry import Telemetry, tracing_enabled

    assert not tracing_enabled()
    calls: list[tuple[str, str]] = []

    class Watching(Telemetry):
        def process_span(self, message: ReceivedMessage, attempt: int) -> AbstractContextManager[None]:
            calls.append(("process", message.message_id))
            return super().process_span(message, attempt)

        def settle_span(self, operation: str, message: ReceivedMessage) -> AbstractContextManager[None]:
            calls.append((operation, message.message_id))
            return nullcontext()

    log = Log()
    async with InMemoryProvider() as provider:
        ids = await send(provider, "a", Event(n=1), Event(n=2), Event(n=3))
        supervisor = Supervisor(provider, make_actor(log), config(), telemetry=Watching("orders", "memory"))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            supervisor.stop()
    assert done_order(log, "a") == [1, 2, 3]
    assert calls == [(kind, i) for i in ids for kind in ("process", "complete")]


async def test_message_logs_follow_the_log_level_with_metrics_and_tracing_off(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Sessions skip the per-message telemetry hooks while nothing would see them, but turn
    them back on as soon as message logging is enabled (checked at every receive)."""
    import logging

    caplog.set_level(logging.INFO, logger="queue_runtime")
    log = Log()

    def completions() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "operation", None) == "complete"]

    async with InMemoryProvider() as provider:
        await send(provider, "a", Event(n=1), Event(n=2))
        supervisor = Supervisor(provider, make_actor(log), config())
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            await trio.sleep(1)
            assert done_order(log, "a") == [1, 2] and completions() == []
            caplog.set_level(logging.DEBUG, logger="queue_runtime")
            await send(provider, "a", Event(n=3))
            await trio.sleep(1)
            supervisor.stop()
    assert done_order(log, "a") == [1, 2, 3]
    assert [r.levelno for r in completions()] == [logging.DEBUG]


async def test_the_context_describes_the_delivery_and_its_properties_are_the_handlers_own(
    autojump_clock: Any,
) -> None:
    seen: list[tuple[Any, ...]] = []
    dead: list[str] = []

    class Inspector(SessionActor[Event]):
        async def handle(self, event: Event, ctx: MessageContext) -> None:
            seen.append(
                (ctx.message_id, ctx.session_id, ctx.correlation_id, ctx.content_type,
                 ctx.delivery_count, ctx.attempt, dict(ctx.properties), ctx.enqueued_at)
            )  # fmt: skip
            ctx.properties["tenant"] = "changed"  # the handler's copy only
            if ctx.attempt == 1:
                raise RuntimeError("retry me")
            await ctx.dead_letter("Inspected", "seen twice")
            try:
                await ctx.dead_letter("Again")
            except RuntimeError as error:
                dead.append(str(error))

    async with InMemoryProvider() as provider:
        message = Message.json(Event(n=1), session_id="a", correlation_id="c-1", properties={"tenant": "t1"})
        await provider.send(QUEUE, [message])
        await run_for(Supervisor(provider, Inspector, config()), 1)
        [letter] = await provider.peek_dead_letters(QUEUE)
    assert len(seen) == 2
    for attempt, row in enumerate(seen, start=1):
        assert row[:7] == (message.message_id, "a", "c-1", "application/json", 1, attempt, {"tenant": "t1"})
        assert row[7] is not None and row[7].tzinfo is not None
    assert dead == [f"message {message.message_id} is already settled"]
    assert (letter.dead_letter_reason, letter.message.properties) == ("Inspected", {"tenant": "t1"})
