"""InMemoryProvider behaviour beyond the shared contract: fault injection, bounds, exact
stats, TTL/scheduling details, waiter fairness and internal invariants at scale.

Every test runs on MockClock (``autojump_clock``): lock expiry and scheduling are instant.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing

from queue_runtime.errors import (
    ConnectionFailed,
    InvalidReceipt,
    MessageLockLost,
    MessageTooLarge,
    NotSupported,
    QueueError,
    QueueFull,
    SessionLockLost,
    Throttled,
    ValidationError,
)
from queue_runtime.message import Message, ReceivedMessage
from queue_runtime.providers.base import Receiver
from queue_runtime.providers.memory import FAULT_OPERATIONS, InMemoryProvider


def msg(session: str | None, label: object, **fields: Any) -> Message:
    return Message(body=str(label).encode(), session_id=session, **fields)


async def accept(provider: InMemoryProvider, queue: str = "q", timeout: float = 0) -> Receiver:
    receiver = await provider.accept_session(queue, timeout=timeout)
    assert receiver is not None
    return receiver


def bodies(messages: list[ReceivedMessage]) -> list[str]:
    return [m.message.body.decode() for m in messages]


def internal(provider: InMemoryProvider, queue: str = "q") -> Any:
    return provider._queues[queue]


# -- construction and queues ----------------------------------------------------------------------
def test_constructor_validates_arguments() -> None:
    for kwargs in (
        {"lock_duration": 0},
        {"lock_duration": float("inf")},
        {"max_delivery_count": 0},
        {"max_queue_messages": 0},
        {"max_message_size": 0},
    ):
        with pytest.raises(ValidationError):
            InMemoryProvider(**kwargs)


def test_capabilities() -> None:
    caps = InMemoryProvider(max_message_size=1000).capabilities
    assert caps.system == "memory"
    assert caps.native_sessions and caps.session_state and caps.abandon_delay and caps.scheduled_messages
    assert caps.max_batch_count == 100
    assert caps.max_batch_bytes == caps.max_message_size == 1000


async def test_queue_created_on_first_use_as_session_queue(autojump_clock: Any) -> None:
    provider = InMemoryProvider(lock_duration=7, max_delivery_count=4)
    info = await provider.describe("orders")
    assert info.requires_session is True
    assert info.lock_duration == 7
    assert info.max_delivery_count == 4


async def test_create_queue_is_idempotent_and_rejects_conflicts(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    provider.create_queue("plain", requires_session=False, lock_duration=5)
    provider.create_queue("plain", requires_session=False, lock_duration=5)
    with pytest.raises(ValidationError, match="different settings"):
        provider.create_queue("plain", requires_session=True, lock_duration=5)
    with pytest.raises(ValidationError):
        provider.create_queue("bad name")
    with pytest.raises(ValidationError):
        provider.create_queue("q2", lock_duration=-1)


async def test_closed_provider_refuses_calls(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    await provider.aclose()
    await provider.aclose()
    with pytest.raises(QueueError, match="closed"):
        await provider.send("q", [msg("s", 2)])
    with pytest.raises(QueueError, match="closed"):
        await receiver.receive(1)
    await receiver.aclose()  # still safe


# -- fault injection --------------------------------------------------------------------------------
async def _prepared(provider: InMemoryProvider) -> tuple[Receiver, ReceivedMessage]:
    await provider.send("q", [msg("s", 1), msg("s", 2)])
    receiver = await accept(provider)
    [first] = await receiver.receive(1)
    return receiver, first


@pytest.mark.parametrize("operation", FAULT_OPERATIONS)
async def test_inject_fault_each_operation_fails_then_recovers(autojump_clock: Any, operation: str) -> None:
    provider = InMemoryProvider()
    receiver, first = await _prepared(provider)
    error = ConnectionFailed(f"injected {operation}")
    provider.inject_fault(operation, error, times=2)

    calls = {
        "send": lambda: provider.send("q", [msg("s", 3)]),
        "receive": lambda: receiver.receive(1),
        "accept_session": lambda: provider.accept_session("q", timeout=0),
        "complete": lambda: receiver.complete(first),
        "abandon": lambda: receiver.abandon(first),
        "dead_letter": lambda: receiver.dead_letter(first, "Bad"),
        "renew_lock": lambda: receiver.renew_lock(),
    }
    before = await provider.queue_stats("q")
    for _ in range(2):
        with pytest.raises(ConnectionFailed) as caught:
            await calls[operation]()
        assert caught.value is error
    # The failed calls changed nothing.
    assert await provider.queue_stats("q") == before
    # The third call works.
    result = await calls[operation]()
    if operation == "accept_session":
        assert result is None  # the only session is held
    stats = await provider.queue_stats("q")
    expected_active = {"send": 2, "receive": 0, "abandon": 2, "dead_letter": 1, "complete": 1}
    if operation in expected_active:
        assert stats.active == expected_active[operation]


async def test_inject_fault_applies_to_message_lock_renewal_too(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    provider.create_queue("plain", requires_session=False)
    await provider.send("plain", [msg(None, 1)])
    receiver = await provider.open_receiver("plain")
    [m] = await receiver.receive(1)
    provider.inject_fault("renew_lock", Throttled("slow down", retry_after=2))
    await trio.sleep(1)
    with pytest.raises(Throttled):
        await receiver.renew_message_lock(m)
    assert await receiver.renew_message_lock(m) > m.locked_until  # type: ignore[operator]


async def test_inject_fault_validates_arguments() -> None:
    provider = InMemoryProvider()
    with pytest.raises(ValidationError, match="unknown fault operation"):
        provider.inject_fault("explode", ConnectionFailed("x"))
    with pytest.raises(ValidationError):
        provider.inject_fault("send", "not an exception")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        provider.inject_fault("send", ConnectionFailed("x"), times=0)


async def test_faults_queue_up_in_order(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    first, second = ConnectionFailed("one"), Throttled("two")
    provider.inject_fault("send", first)
    provider.inject_fault("send", second)
    for expected in (first, second):
        with pytest.raises(QueueError) as caught:
            await provider.send("q", [msg("s", 1)])
        assert caught.value is expected
    await provider.send("q", [msg("s", 1)])
    assert (await provider.queue_stats("q")).active == 1


# -- stalls -----------------------------------------------------------------------------------------
def _calls(provider: InMemoryProvider, receiver: Receiver, first: ReceivedMessage) -> dict[str, Any]:
    return {
        "send": lambda: provider.send("q", [msg("s", 3)]),
        "receive": lambda: receiver.receive(1),
        "accept_session": lambda: provider.accept_session("q", timeout=0),
        "complete": lambda: receiver.complete(first),
        "abandon": lambda: receiver.abandon(first),
        "dead_letter": lambda: receiver.dead_letter(first, "Bad"),
        "renew_lock": lambda: receiver.renew_lock(),
    }


async def _counts(provider: InMemoryProvider) -> tuple[int | None, ...]:
    stats = await provider.queue_stats("q")
    return stats.active, stats.in_flight, stats.scheduled, stats.dead_letter


@pytest.mark.parametrize("operation", FAULT_OPERATIONS)
async def test_a_hanging_call_waits_out_the_stall_then_runs(autojump_clock: Any, operation: str) -> None:
    provider = InMemoryProvider(lock_duration=60)
    receiver, first = await _prepared(provider)
    before = await _counts(provider)
    provider.stall(5, operations=[operation])
    assert provider.stalled_until(operation) == trio.current_time() + 5
    started = trio.current_time()
    call = _calls(provider, receiver, first)[operation]
    with trio.move_on_after(4.9):
        await call()
    assert await _counts(provider) == before  # cancelled while hanging: nothing changed
    await call()
    assert trio.current_time() == started + 5  # it ran when the stall ended, not before
    assert provider.stalled_until(operation) is None


@pytest.mark.parametrize("operation", ["complete", "renew_lock", "send"])
async def test_a_late_call_takes_effect_at_once_and_answers_when_the_stall_ends(
    autojump_clock: Any, operation: str
) -> None:
    provider = InMemoryProvider(lock_duration=60)
    receiver, first = await _prepared(provider)
    before = await _counts(provider)
    provider.stall(5, operations=[operation], mode="late")
    with trio.move_on_after(1) as scope:
        await _calls(provider, receiver, first)[operation]()
    assert scope.cancelled_caught  # no answer within the stall...
    assert await _counts(provider) != before or operation == "renew_lock"  # ...but done
    if operation == "renew_lock":
        assert receiver.locked_until == 60  # renewed at t=0, before the answer was lost


async def test_a_stall_longer_than_the_lock_loses_the_session_and_redelivers(autojump_clock: Any) -> None:
    provider = InMemoryProvider(lock_duration=10)
    receiver, first = await _prepared(provider)
    provider.stall(15)  # every operation
    other: list[Receiver | None] = []

    async def accept_later() -> None:
        other.append(await provider.accept_session("q", timeout=30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_later)
        with pytest.raises(SessionLockLost):
            await receiver.complete(first)  # hung until t=15, when the lock had gone at t=10
        assert trio.current_time() == 15
    assert other[0] is not None
    [again] = await other[0].receive(1)
    assert (bodies([again]), again.delivery_count) == (["1"], 2)


async def test_a_waiting_receive_hands_nothing_out_during_a_stall(autojump_clock: Any) -> None:
    provider = InMemoryProvider(lock_duration=60)
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    [first] = await receiver.receive(1)
    await receiver.complete(first)
    got: list[tuple[float, list[str]]] = []

    async def wait_for_more() -> None:
        got.append((0, bodies(await receiver.receive(1, timeout=30))))
        got[-1] = (trio.current_time(), got[-1][1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_more)
        await trio.testing.wait_all_tasks_blocked()
        provider.stall(5, operations=["receive"])
        await provider.send("q", [msg("s", 2)])  # sends still work
    assert got == [(5, ["2"])]


async def test_stall_validates_arguments(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    with pytest.raises(ValidationError, match="unknown stall operation"):
        provider.stall(1, operations=["explode"])
    with pytest.raises(ValidationError):
        provider.stall(-1)
    with pytest.raises(ValidationError):
        provider.stall(1, mode="slow")  # type: ignore[arg-type]


# -- bounds and validation --------------------------------------------------------------------------
async def test_queue_full_bound_counts_dead_letters_and_frees_on_settle(autojump_clock: Any) -> None:
    provider = InMemoryProvider(max_queue_messages=4)
    await provider.send("q", [msg("s", i) for i in range(3)])
    with pytest.raises(QueueFull, match="bound is 4") as caught:
        await provider.send("q", [msg("s", "x"), msg("s", "y")])
    assert caught.value.transient
    assert (await provider.queue_stats("q")).active == 3  # all or nothing
    await provider.send("q", [msg("s", 3)])
    receiver = await accept(provider)
    got = await receiver.receive(2)
    await receiver.dead_letter(got[0], "Bad")
    with pytest.raises(QueueFull):
        await provider.send("q", [msg("s", 4)])  # the dead letter still counts
    await receiver.complete(got[1])
    await provider.send("q", [msg("s", 4)])
    assert await provider.purge_dead_letters("q") == 1
    await provider.send("q", [msg("s", 5)])


async def test_send_validates_everything_before_storing(autojump_clock: Any) -> None:
    provider = InMemoryProvider(max_message_size=100)
    with pytest.raises(MessageTooLarge) as caught:
        await provider.send("q", [msg("s", "ok"), Message(body=b"x" * 200, session_id="s")])
    assert caught.value.limit == 100
    with pytest.raises(ValidationError, match="requires sessions"):
        await provider.send("q", [msg("s", "ok"), msg(None, "no session")])
    with pytest.raises(ValidationError, match="at most 100 messages"):
        await provider.send("q", [msg("s", i) for i in range(101)])
    with pytest.raises(MessageTooLarge, match="batch"):
        await provider.send("q", [Message(body=b"x" * 60, session_id="s") for _ in range(2)])
    with pytest.raises(ValidationError, match="expected a Message"):
        await provider.send("q", [b"raw"])  # type: ignore[list-item]
    assert (await provider.queue_stats("q")).active == 0


async def test_non_session_queue_accepts_messages_with_session_ids(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    provider.create_queue("plain", requires_session=False)
    await provider.send("plain", [msg("s", 1), msg(None, 2)])
    async with await provider.open_receiver("plain") as receiver:
        assert bodies(await receiver.receive(5)) == ["1", "2"]


# -- stats, TTL, scheduling -------------------------------------------------------------------------
async def test_queue_stats_exact(autojump_clock: Any) -> None:
    provider = InMemoryProvider(lock_duration=1000)
    later = datetime.now(UTC) + timedelta(seconds=100)
    await provider.send(
        "q", [msg("a", 1), msg("a", 2), msg("b", 1), msg("c", 9, scheduled_enqueue_time=later)]
    )
    await trio.sleep(10)
    stats = await provider.queue_stats("q")
    assert (stats.active, stats.in_flight, stats.scheduled, stats.dead_letter) == (3, 0, 1, 0)
    assert stats.oldest_message_age == pytest.approx(10)
    receiver = await accept(provider)
    [m] = await receiver.receive(1)
    await receiver.dead_letter(m, "Bad")
    await receiver.receive(1)
    stats = await provider.queue_stats("q")
    assert (stats.active, stats.in_flight, stats.scheduled, stats.dead_letter) == (1, 1, 1, 1)
    await trio.sleep(95)
    stats = await provider.queue_stats("q")
    assert (stats.active, stats.scheduled) == (2, 0)
    empty = await provider.queue_stats("other")
    assert empty.oldest_message_age is None and empty.active == 0


async def test_ttl_expiry_drops_by_default(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", "short", time_to_live=5), msg("t", "long", time_to_live=50)])
    await trio.sleep(6)
    stats = await provider.queue_stats("q")
    assert (stats.active, stats.dead_letter) == (1, 0)
    receiver = await accept(provider)
    assert receiver.session_id == "t"


async def test_ttl_expiry_dead_letters_when_the_queue_says_so(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    provider.create_queue("q", dead_letter_on_expiration=True)
    await provider.send("q", [msg("s", "short", time_to_live=5)])
    await trio.sleep(6)
    [dead] = await provider.peek_dead_letters("q")
    assert dead.dead_letter_reason == "TTLExpiredException"
    assert dead.dead_letter_source == "q"
    assert dead.delivery_count == 0


async def test_ttl_of_a_locked_message_applies_when_it_comes_back(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", "m", time_to_live=5), msg("s", "n")])
    receiver = await accept(provider)
    [m] = await receiver.receive(1)
    await trio.sleep(10)  # expired while locked: the holder may still complete...
    await receiver.abandon(m)  # ...but once handed back it is gone
    assert bodies(await receiver.receive(5)) == ["n"]


async def test_scheduled_message_ttl_starts_at_its_enqueue_time(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    when = datetime.now(UTC) + timedelta(seconds=100)
    await provider.send("q", [msg("s", "m", scheduled_enqueue_time=when, time_to_live=20)])
    receiver = await provider.accept_session("q", timeout=110)
    assert receiver is not None
    assert trio.current_time() == pytest.approx(100, abs=0.01)
    [m] = await receiver.receive(1)
    assert m.enqueued_at is not None
    assert abs((m.enqueued_at - when).total_seconds()) < 0.5


async def test_scheduled_message_gets_its_place_when_it_becomes_due(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    when = datetime.now(UTC) + timedelta(seconds=30)
    await provider.send("q", [msg("s", "scheduled", scheduled_enqueue_time=when)])
    await provider.send("q", [msg("s", "now")])
    await trio.sleep(40)
    await provider.send("q", [msg("s", "after")])
    receiver = await accept(provider)
    assert bodies(await receiver.receive(5)) == ["now", "scheduled", "after"]


async def test_scheduled_in_the_past_is_available_at_once(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1, scheduled_enqueue_time=datetime.now(UTC) - timedelta(hours=1))])
    assert (await provider.queue_stats("q")).active == 1


async def test_enqueued_at_follows_the_trio_clock(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    start = datetime.now(UTC)
    await trio.sleep(3600)
    await provider.send("q", [msg("s", 1)])
    [m] = await (await accept(provider)).receive(1)
    assert m.enqueued_at is not None and m.enqueued_at.tzinfo is not None
    assert abs((m.enqueued_at - start).total_seconds() - 3600) < 5


# -- locks and settlement details -----------------------------------------------------------------
async def test_receipts_are_bound_to_their_receiver(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("a", 1), msg("b", 1)])
    first = await accept(provider)
    second = await accept(provider)
    [m] = await first.receive(1)
    with pytest.raises(InvalidReceipt):
        await second.complete(m)
    peeked = ReceivedMessage(message=m.message)  # no receipt
    with pytest.raises(InvalidReceipt):
        await first.complete(peeked)
    await first.complete(m)


async def test_abandon_delay_on_plain_queue_lets_others_through(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    provider.create_queue("plain", requires_session=False)
    await provider.send("plain", [msg(None, 1), msg(None, 2)])
    receiver = await provider.open_receiver("plain")
    [m1] = await receiver.receive(1)
    await receiver.abandon(m1, delay=10)
    assert bodies(await receiver.receive(5)) == ["2"]
    assert (await provider.queue_stats("plain")).active == 1  # m1 waits, counted as active
    started = trio.current_time()
    again = await receiver.receive(1, timeout=60)
    assert bodies(again) == ["1"]
    assert trio.current_time() - started == pytest.approx(10)
    with pytest.raises(ValidationError):
        await receiver.abandon(again[0], delay=-1)


async def test_plain_receiver_close_keeps_locks_until_expiry(autojump_clock: Any) -> None:
    provider = InMemoryProvider(lock_duration=10)
    provider.create_queue("plain", requires_session=False)
    await provider.send("plain", [msg(None, 1)])
    first = await provider.open_receiver("plain")
    await first.receive(1)
    await first.aclose()
    with pytest.raises(QueueError, match="closed"):
        await first.receive(1)
    second = await provider.open_receiver("plain")
    assert await second.receive(1, timeout=5) == []
    [again] = await second.receive(1, timeout=10)
    assert again.delivery_count == 2


async def test_renew_message_lock_after_settle_is_lock_lost(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    provider.create_queue("plain", requires_session=False)
    await provider.send("plain", [msg(None, 1)])
    receiver = await provider.open_receiver("plain")
    [m] = await receiver.receive(1)
    await receiver.complete(m)
    with pytest.raises(MessageLockLost):
        await receiver.renew_message_lock(m)


async def test_dead_letter_receiver_cannot_dead_letter_again(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    [m] = await receiver.receive(1)
    await receiver.dead_letter(m, "Bad", "why")
    dlq = await provider.open_receiver("q", dead_letter=True)
    [dead] = await dlq.receive(1)
    assert dead.dead_letter_source == "q"
    with pytest.raises(NotSupported):
        await dlq.dead_letter(dead, "Again")
    with pytest.raises(NotSupported):
        await dlq.renew_lock()


async def test_received_messages_are_copies(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    sent = msg("s", 1, properties={"k": "v"})
    await provider.send("q", [sent])
    sent.properties["k"] = "changed by the producer"
    receiver = await accept(provider)
    [m] = await receiver.receive(1)
    m.message.properties["k"] = "changed by the consumer"
    await receiver.abandon(m)
    [again] = await receiver.receive(1)
    assert again.message.properties == {"k": "v"}


async def test_session_state_validation_and_lost_lock(autojump_clock: Any) -> None:
    provider = InMemoryProvider(lock_duration=10)
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    with pytest.raises(ValidationError):
        await receiver.set_state("text")  # type: ignore[arg-type]
    await receiver.set_state(bytearray(b"abc"))
    assert await receiver.get_state() == b"abc"
    await trio.sleep(11)
    with pytest.raises(SessionLockLost):
        await receiver.get_state()
    with pytest.raises(SessionLockLost):
        await receiver.set_state(b"x")


async def test_cancelled_close_still_releases_the_session(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    await receiver.receive(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await receiver.aclose()
    again = await accept(provider)
    [m] = await again.receive(1)
    assert m.delivery_count == 2


async def test_max_messages_must_be_positive(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    with pytest.raises(ValidationError):
        await receiver.receive(0)


# -- waiting --------------------------------------------------------------------------------------
async def test_many_waiting_acceptors_each_get_a_distinct_session(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    got: list[str | None] = []

    async def acceptor() -> None:
        receiver = await provider.accept_session("q", timeout=100)
        got.append(receiver.session_id if receiver is not None else None)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(acceptor)
        await trio.sleep(1)
        for i in range(50):
            await provider.send("q", [msg(f"s{i}", i)])
    assert trio.current_time() < 100  # all woke on the sends, none waited for the timeout
    assert sorted(got, key=str) == sorted((f"s{i}" for i in range(50)), key=str)


async def test_a_cancelled_waiter_passes_its_wakeup_on(autojump_clock: Any) -> None:
    from queue_runtime.providers.memory import _Alarm, _Waiters

    waiters = _Waiters()
    alarm = _Alarm()
    woken: list[str] = []
    cancel_first = trio.CancelScope()

    async def first() -> None:
        with cancel_first:
            await waiters.wait(1000, alarm)
            woken.append("first")

    async def second() -> None:
        await waiters.wait(1000, alarm)
        woken.append("second")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.sleep(1)
        nursery.start_soon(second)
        await trio.sleep(1)
        # Cancel the first waiter, then wake it before it runs (no checkpoint in between):
        # the wake-up it cannot use must pass on to the second.
        cancel_first.cancel()
        waiters.notify()
    assert woken == ["second"]
    assert trio.current_time() < 100


async def test_held_receiver_wakes_when_an_abandon_delay_ends(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    [m] = await receiver.receive(1)
    await receiver.abandon(m, delay=7)
    started = trio.current_time()
    assert bodies(await receiver.receive(1, timeout=30)) == ["1"]
    assert trio.current_time() - started == pytest.approx(7)


async def test_waiting_holder_sees_its_lock_expire(autojump_clock: Any) -> None:
    provider = InMemoryProvider(lock_duration=10)
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    await receiver.receive(1)
    with pytest.raises(SessionLockLost):
        await receiver.receive(1, timeout=100)
    assert trio.current_time() == pytest.approx(10)


async def test_a_waiting_holder_is_handed_new_messages_locked_and_in_order(autojump_clock: Any) -> None:
    # A send to a session whose holder waits in receive delivers to that receive directly.
    provider = InMemoryProvider(lock_duration=30)
    await provider.send("q", [msg("s", 0)])
    receiver = await accept(provider)
    [first] = await receiver.receive(1)
    await receiver.complete(first)
    got: list[ReceivedMessage] = []

    async def wait_for_two() -> None:
        got.extend(await receiver.receive(2, timeout=60))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_two)
        await trio.testing.wait_all_tasks_blocked()
        await provider.send("q", [msg("s", 1), msg("s", 2), msg("s", 3)])
    assert bodies(got) == ["1", "2"]
    assert [m.delivery_count for m in got] == [1, 1]
    assert all(m.locked_until == receiver.locked_until for m in got)
    assert internal(provider).n_locked == 2
    check_invariants(provider)
    for m in got:
        await receiver.complete(m)
    assert bodies(await receiver.receive(5)) == ["3"]


async def test_a_hand_over_waits_behind_a_delayed_earlier_message(autojump_clock: Any) -> None:
    # Order first: a message sent while an earlier one is abandoned with a delay is not handed
    # to the waiting holder ahead of it.
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    [m] = await receiver.receive(1)
    await receiver.abandon(m, delay=5)
    got: list[tuple[list[str], float]] = []
    start = trio.current_time()

    async def receive_twice() -> None:
        for _ in range(2):
            received = bodies(await receiver.receive(1, timeout=60))
            got.append((received, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_twice)
        await trio.testing.wait_all_tasks_blocked()
        await provider.send("q", [msg("s", 2)])
    # 2 was sent at once but waits for 1, which is delivered when its delay ends.
    assert got == [(["1"], pytest.approx(5)), (["2"], pytest.approx(5))]


@pytest.mark.parametrize("kind", ["time_to_live", "scheduled_in_the_past"])
async def test_a_hand_over_stops_at_a_message_of_the_batch_that_was_queued(
    autojump_clock: Any, kind: str
) -> None:
    # A send locks plain messages for the waiting receive as it goes; one it has to queue
    # (time to live, schedule) stops that, so nothing after it overtakes it.
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 0)])
    receiver = await accept(provider)
    await receiver.complete((await receiver.receive(1))[0])
    extra: dict[str, Any] = (
        {"time_to_live": 600.0}
        if kind == "time_to_live"
        else {"scheduled_enqueue_time": datetime.now(UTC) - timedelta(seconds=5)}
    )
    received: list[list[str]] = []

    async def receive_twice() -> None:
        for _ in range(2):
            batch = await receiver.receive(10, timeout=60)
            received.append(bodies(batch))
            for m in batch:
                await receiver.complete(m)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_twice)
        await trio.testing.wait_all_tasks_blocked()
        await provider.send("q", [msg("s", 1), msg("s", 2, **extra), msg("s", 3)])
    assert [body for batch in received for body in batch] == ["1", "2", "3"]
    assert received[0] == ["1"]  # handed over; 2 and 3 were queued in order
    check_invariants(provider)


async def test_a_hand_over_to_a_holder_that_lost_its_session_raises(autojump_clock: Any) -> None:
    # Handed a message, then released before it ran: the receive raises as a fresh look would,
    # and the message goes back (its delivery counted).
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 0)])
    receiver = await accept(provider)
    await receiver.complete((await receiver.receive(1))[0])
    raised: list[BaseException] = []

    async def wait() -> None:
        try:
            await receiver.receive(1, timeout=60)
        except SessionLockLost as error:
            raised.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        await provider.send("q", [msg("s", 1)])  # handed over to the waiting receive ...
        await receiver.aclose()  # ... which is released before it runs again
    assert len(raised) == 1
    again = await accept(provider)
    [m] = await again.receive(1)
    assert (bodies([m]), m.delivery_count) == (["1"], 2)


# -- scale and invariants -------------------------------------------------------------------------
def check_invariants(provider: InMemoryProvider, queue: str = "q") -> None:
    q = internal(provider, queue)
    states = [rec.state for rec in q.live.values()]
    assert states.count("locked") == q.n_locked
    assert states.count("delayed") == q.n_delayed
    assert "gone" not in states and "scheduled" not in states
    in_flight = sum(len(s.in_flight) for s in q.sessions.values()) + len(q.locked)
    assert in_flight == q.n_locked
    for session in q.sessions.values():
        pending = sorted(rec.seq for _, rec in session.pending if rec.state == "pending")
        head = provider._head(session)
        assert (head.seq if head is not None else None) == (pending[0] if pending else None)
        for rec in session.in_flight.values():
            assert rec.session_id == session.id and rec.state == "locked"


async def test_ten_thousand_sessions_oldest_first_and_memory_released(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    sessions = 10_000
    client_batch: list[Message] = []
    for i in range(sessions):
        client_batch.append(msg(f"s{i}", i))
        if len(client_batch) == 100:
            await provider.send("q", client_batch)
            client_batch = []
    order: list[str] = []
    for _ in range(sessions):
        receiver = await accept(provider)
        assert receiver.session_id is not None
        order.append(receiver.session_id)
        [m] = await receiver.receive(1)
        await receiver.complete(m)
        await receiver.aclose()
    assert order == [f"s{i}" for i in range(sessions)]  # oldest available session first
    assert await provider.accept_session("q", timeout=0) is None
    q = internal(provider)
    assert q.sessions == {} and q.live == {}  # nothing kept for finished sessions
    assert len(q.ready) == 0


async def test_many_messages_many_holders_with_faults_and_expiry(autojump_clock: Any) -> None:
    """10^4 messages over 100 sessions, concurrent holders, abandons and lock losses: every
    message is completed exactly once, in order per session, and the bookkeeping is exact."""
    provider = InMemoryProvider(lock_duration=5, max_delivery_count=100)
    per_session = 100
    for i in range(per_session):
        await provider.send("q", [msg(f"s{s}", f"s{s}:{i}") for s in range(100)])
    completed: dict[str, list[int]] = {}
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while (receiver := await provider.accept_session("q", timeout=1)) is not None:
            try:
                while batch := await receiver.receive(7, timeout=0.5):
                    for m in batch:
                        counter += 1
                        if counter % 13 == 0:
                            await receiver.abandon(m)
                            break  # later ones in the batch must come again after it
                        session, index = m.message.body.decode().split(":")
                        completed.setdefault(session, []).append(int(index))
                        await receiver.complete(m)
                    else:
                        continue
                    for rest in batch[batch.index(m) + 1 :]:
                        await receiver.abandon(rest)
                    if counter % 7 == 0:
                        await trio.sleep(6)  # lose the lock now and then
            except SessionLockLost:
                pass
            finally:
                await receiver.aclose()
            check_invariants(provider)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(worker)
    assert sorted(completed) == sorted(f"s{s}" for s in range(100))
    for indexes in completed.values():
        assert indexes == list(range(per_session))
    stats = await provider.queue_stats("q")
    assert (stats.active, stats.in_flight, stats.dead_letter) == (0, 0, 0)


def test_mock_clock_fixture_is_not_needed_for_construction() -> None:
    # Built outside trio (as at import time in a user's test module), used inside a run.
    provider = InMemoryProvider()

    async def main() -> list[ReceivedMessage]:
        await provider.send("q", [msg("s", 1)])
        receiver = await accept(provider)
        return await receiver.receive(1)

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert bodies(got) == ["1"]


async def test_ready_heap_holds_one_entry_per_waiting_session(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    for i in range(10):
        await provider.send("q", [msg(f"s{s}", i) for s in range(100)])
    assert len(internal(provider).ready) == 100
    receiver = await accept(provider)
    [m] = await receiver.receive(1)
    await receiver.abandon(m)
    await receiver.aclose()  # back in the heap once, ahead of the others (oldest head)
    assert len(internal(provider).ready) == 100
    assert (await accept(provider)).session_id == receiver.session_id


async def test_timed_waits_wake_at_their_own_deadlines(autojump_clock: Any) -> None:
    """The alarm wakes each timed wait at its deadline, also one added later with an earlier
    deadline than the alarm's current sleep, and ones due after it (listed until it wakes)."""
    from queue_runtime.providers.memory import _Alarm, _Waiters

    waiters = _Waiters()
    alarm = _Alarm()
    woke: dict[str, float] = {}

    async def wait(name: str, until: float) -> None:
        await waiters.wait(until, alarm)
        woke[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "late", start + 100)
        await trio.sleep(1)
        nursery.start_soon(wait, "early", start + 10)
        nursery.start_soon(wait, "middle", start + 50)
        nursery.start_soon(wait, "last", start + 300)
        nursery.start_soon(wait, "later", start + 200)
    assert woke == {
        "early": start + 10,
        "middle": start + 50,
        "late": start + 100,
        "later": start + 200,
        "last": start + 300,
    }


async def test_alarm_stays_bounded_when_waits_end_early(autojump_clock: Any) -> None:
    """Waits notified long before their deadline leave stale alarm entries; the alarm drops
    them, so its heap and list are bounded by the waiting tasks, not by how many waits there
    were."""
    from queue_runtime.providers.memory import _Alarm, _Waiters

    waiters = _Waiters()
    alarm = _Alarm()
    largest = 0

    async def one_wait(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await waiters.wait(trio.current_time() + 1000, alarm)

    async with trio.open_nursery() as nursery:
        for _ in range(5000):
            await nursery.start(one_wait)
            await trio.lowlevel.checkpoint()  # let it park
            waiters.notify()
            largest = max(largest, len(alarm._heap) + len(alarm._later))
    assert alarm.live == 0
    assert largest <= 2 * (2 * 1 + 65)  # each of the two within twice the live waits, plus slack


def test_alarm_restarts_in_a_later_run() -> None:
    """The alarm task ends with its run; a provider used again in a new run (tests do this)
    still wakes timed waits there."""
    provider = InMemoryProvider()

    async def empty_receive_times_out() -> float:
        await provider.send("q", [msg("s", 1)])
        receiver = await accept(provider)
        [m] = await receiver.receive(1)
        await receiver.complete(m)
        started = trio.current_time()
        with trio.fail_after(60):  # without an alarm the wait would never end
            assert await receiver.receive(1, timeout=5) == []
        await receiver.aclose()
        return trio.current_time() - started

    for _ in range(2):
        waited = trio.run(empty_receive_times_out, clock=trio.testing.MockClock(autojump_threshold=0))
        assert waited == pytest.approx(5)


@pytest.mark.parametrize("operation", ["complete", "abandon", "dead_letter"])
async def test_a_cancelled_settlement_changes_nothing(autojump_clock: Any, operation: str) -> None:
    """Settlements do not yield to the scheduler, but they are still cancellation points: a
    call made in a cancelled scope raises Cancelled before anything changes."""
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1), msg("s", 2)])
    receiver = await accept(provider)
    [first] = await receiver.receive(1)
    settle = {
        "complete": lambda: receiver.complete(first),
        "abandon": lambda: receiver.abandon(first),
        "dead_letter": lambda: receiver.dead_letter(first, "Reason"),
    }[operation]
    with trio.CancelScope() as scope:
        scope.cancel()
        await settle()
    assert scope.cancelled_caught
    assert await provider.peek_dead_letters("q") == []
    await receiver.complete(first)  # still locked by us: the cancelled call did nothing
    assert bodies(await receiver.receive(1)) == ["2"]


async def test_a_cancelled_receive_takes_nothing_even_with_messages_waiting(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    await provider.send("q", [msg("s", 1)])
    receiver = await accept(provider)
    with trio.CancelScope() as scope:
        scope.cancel()
        await receiver.receive(1)
    assert scope.cancelled_caught
    [message] = await receiver.receive(1)
    assert bodies([message]) == ["1"] and message.delivery_count == 1


async def test_messages_of_many_sends_received_in_turn_keep_their_own_enqueue_time(
    autojump_clock: Any,
) -> None:
    """Receives across many sessions take messages from many sends in turn: each keeps the
    enqueue time of its own send (the provider converts each send's time to wall time once,
    and keeps a bounded number of them)."""
    sessions = 1500  # 3,000 sends: more than the conversions kept
    async with InMemoryProvider() as p:
        for _ in range(2):
            for i in range(sessions):
                await p.send("q", [Message(body=b"x", session_id=f"s{i}")])
                await trio.sleep(1)
        times: list[list[datetime]] = []
        for _ in range(sessions):
            receiver = await p.accept_session("q", timeout=0)
            assert receiver is not None
            got = await receiver.receive(2, timeout=0)
            assert [m.session_id for m in got] == [receiver.session_id] * 2
            times.append([m.enqueued_at for m in got])  # type: ignore[misc]
            for m in got:
                await receiver.complete(m)
            await receiver.aclose()
    for i, (first, second) in enumerate(times):
        assert (second - first).total_seconds() == pytest.approx(sessions, abs=1e-3)
        if i:
            assert (first - times[i - 1][0]).total_seconds() == pytest.approx(1.0, abs=1e-3)
