"""The provider contract: behaviour every `Provider` / `Receiver` must show.

Written only against `providers.base` (and `QueueClient`), never a provider's internals. Each
test runs once per harness (see ``conftest.py``); waits derive from the harness's
``lock_duration`` so real-time harnesses stay cheap.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

from queue_runtime.client import REPLAYED_REASON_PROPERTY, QueueClient
from queue_runtime.errors import (
    InvalidReceipt,
    MessageLockLost,
    MessageTooLarge,
    NotSupported,
    SessionLockLost,
    ValidationError,
)
from queue_runtime.message import Message, ReceivedMessage
from queue_runtime.providers.base import Receiver

STALE = (InvalidReceipt, MessageLockLost, SessionLockLost)


# -- helpers --------------------------------------------------------------------------------------
def msg(session: str | None, label: str | int, **fields: Any) -> Message:
    return Message(body=str(label).encode(), session_id=session, **fields)


def bodies(messages: list[ReceivedMessage]) -> list[str]:
    return [m.message.body.decode() for m in messages]


def wait(h: Any) -> float:
    """How long to wait for a session that should be available at once (no lock held)."""
    return 5.0 if h.real_time else 1.0


def arrive(h: Any) -> float:
    """How long a session holder waits for a message that should come at once: well inside
    the session lock, which the suite renews only where it says so."""
    return max(min(5.0, h.lock_duration * 0.4), 0.5) if h.real_time else 1.0


def quiet(h: Any) -> float:
    """How long to wait to conclude that nothing more is coming."""
    return max(min(1.0, h.lock_duration * 0.3), 0.3) if h.real_time else 0.5


def margin(h: Any) -> float:
    """Timing tolerance: scheduling and network jitter in real time, none on MockClock."""
    return 1.0 + 0.2 * h.lock_duration if h.real_time else 1e-6


def past_lock(h: Any) -> float:
    """A sleep after which a lock taken now has certainly expired."""
    return h.lock_duration * 1.5 + (margin(h) if h.real_time else 0.0)


async def send(h: Any, queue: str, *messages: Message) -> None:
    await h.provider.send(queue, list(messages))


async def accept(h: Any, queue: str, timeout: float | None = None) -> Receiver:
    receiver = await h.provider.accept_session(queue, timeout=wait(h) if timeout is None else timeout)
    assert receiver is not None, "expected a session to be available"
    return receiver


async def take(h: Any, receiver: Receiver, count: int) -> list[ReceivedMessage]:
    """Receive until ``count`` messages arrived or a wait came back empty."""
    out: list[ReceivedMessage] = []
    while len(out) < count:
        batch = await receiver.receive(count - len(out), timeout=arrive(h))
        if not batch:
            break
        out.extend(batch)
    return out


async def take_one(h: Any, receiver: Receiver) -> ReceivedMessage:
    got = await take(h, receiver, 1)
    assert len(got) == 1, "expected a message"
    return got[0]


async def keep_alive(h: Any, receiver: Receiver) -> None:
    """Renew the session lock when less than half of it is left (long drains in real time)."""
    until = receiver.locked_until
    if until is not None and until - trio.current_time() < h.lock_duration / 2:
        await receiver.renew_lock()


async def drain_session(h: Any, receiver: Receiver) -> list[str]:
    """Complete everything the receiver gets until it is empty; return the bodies in order."""
    seen: list[str] = []
    timeout = arrive(h)
    while batch := await receiver.receive(10, timeout=timeout):
        for message in batch:
            seen.append(message.message.body.decode())
            await receiver.complete(message)
        await keep_alive(h, receiver)
        timeout = quiet(h)
    return seen


async def assert_queue_empty(h: Any, queue: str) -> None:
    """No session (or message) is available within a short wait."""
    receiver = await h.provider.accept_session(queue, timeout=2 * quiet(h))
    if receiver is not None:
        async with receiver:
            got = await receiver.receive(10, timeout=quiet(h))
            assert got == [], f"expected an empty queue, got {bodies(got)}"


# -- describe, validation -------------------------------------------------------------------------
async def test_contract_describe_reports_requires_session(harness: Any, contract_clock: Any) -> None:
    h = harness
    session_queue = await h.make_queue()
    plain_queue = await h.make_queue(requires_session=False)
    info = await h.provider.describe(session_queue)
    assert info.requires_session is True
    assert (
        info.name == session_queue or session_queue.endswith(info.name) or info.name.endswith(session_queue)
    )
    assert (await h.provider.describe(plain_queue)).requires_session is False


async def test_contract_invalid_queue_name_rejected(harness: Any, contract_clock: Any) -> None:
    h = harness
    for bad in ("", "bad name!", "x" * 300, "semi;colon"):
        with pytest.raises(ValidationError):
            h.provider.validate_queue_name(bad)
        with pytest.raises(ValidationError):
            await h.provider.send(bad, [msg("s", 1)])
        with pytest.raises(ValidationError):
            await h.provider.accept_session(bad, timeout=0)


async def test_contract_invalid_session_id_rejected(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    for bad in ("", "a" * 129, "line\nbreak", "tab\there", "caf\u00e9"):
        with pytest.raises(ValidationError):
            h.provider.validate_session_id(bad)
        with pytest.raises(ValidationError):
            Message(body=b"x", session_id=bad)
    await assert_queue_empty(h, queue)


async def test_contract_missing_session_id_rejected(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    with pytest.raises(ValidationError, match="session"):
        await send(h, queue, msg("s1", "ok"), msg(None, "no-session"))
    await assert_queue_empty(h, queue)  # the valid one was not sent either


async def test_contract_oversize_rejected_before_io(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    limit = h.provider.capabilities.max_message_size
    huge = Message(body=b"x" * (limit + 1), session_id="s1")
    with pytest.raises(MessageTooLarge) as caught:
        await h.provider.send(queue, [huge])
    assert caught.value.limit == limit
    assert caught.value.size > limit
    client = QueueClient(h.provider)
    with pytest.raises(MessageTooLarge):
        await client.send_batch(queue, [msg("s1", "small"), huge])
    with pytest.raises(MessageTooLarge):
        await client.send(queue, huge)
    await assert_queue_empty(h, queue)


# -- order and sessions -----------------------------------------------------------------------------
async def test_contract_order_within_session(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    for i in range(8):
        await send(h, queue, msg("s1", i))
    async with await accept(h, queue) as receiver:
        assert receiver.session_id == "s1"
        assert await drain_session(h, receiver) == [str(i) for i in range(8)]


async def test_contract_interleaved_sessions_keep_own_order(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    sessions = ["a", "b", "c"]
    for i in range(5):
        await send(h, queue, *[msg(s, f"{s}{i}") for s in sessions])
    seen: dict[str, list[str]] = {}
    for _ in sessions:
        async with await accept(h, queue) as receiver:
            assert receiver.session_id is not None
            assert receiver.session_id not in seen
            seen[receiver.session_id] = await drain_session(h, receiver)
    assert seen == {s: [f"{s}{i}" for i in range(5)] for s in sessions}


async def test_contract_sessions_held_concurrently_are_disjoint(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    for i in range(3):
        await send(h, queue, msg("a", f"a{i}"), msg("b", f"b{i}"))
    first = await accept(h, queue)
    second = await accept(h, queue)
    try:
        assert {first.session_id, second.session_id} == {"a", "b"}
        for receiver in (first, second):
            got = await take(h, receiver, 3)
            assert bodies(got) == [f"{receiver.session_id}{i}" for i in range(3)]
            assert all(m.session_id == receiver.session_id for m in got)
            for m in got:
                await receiver.complete(m)
    finally:
        await first.aclose()
        await second.aclose()


async def test_contract_session_exclusivity(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2))
    holder = await accept(h, queue)
    try:
        assert holder.session_id == "s1"
        # Well inside the holder's lock: the session must not be handed out meanwhile.
        other = await h.provider.accept_session(queue, timeout=min(wait(h) / 2, h.lock_duration * 0.4))
        assert other is None, "a held session was handed to a second receiver"
        await send(h, queue, msg("s2", 1))
        async with await accept(h, queue) as other:
            assert other.session_id == "s2"
            assert bodies(await take(h, other, 1)) == ["1"]
    finally:
        await holder.aclose()


async def test_contract_accept_returns_none_on_empty_queue_within_timeout(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    timeout = 1.0
    started = trio.current_time()
    assert await h.provider.accept_session(queue, timeout=timeout) is None
    elapsed = trio.current_time() - started
    assert timeout - 0.05 <= elapsed <= timeout + margin(h)


async def test_contract_accept_is_cancellable(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    started = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await h.provider.accept_session(queue, timeout=60.0)
    assert scope.cancelled_caught
    assert trio.current_time() - started <= 0.5 + margin(h)
    # Cancelling the wait lost nothing: a message sent now is available (at once, or, if a
    # networked broker's abandoned long poll took it, when that lock expires).
    await send(h, queue, msg("s1", "after"))
    async with await accept(h, queue, timeout=past_lock(h) + wait(h)) as receiver:
        assert bodies(await take(h, receiver, 1)) == ["after"]


async def test_contract_accept_wakes_on_send(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    got: list[Receiver | None] = []
    long_wait = 30.0 if h.real_time else 1000.0

    async def waiter() -> None:
        got.append(await h.provider.accept_session(queue, timeout=long_wait))

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.5)
        await send(h, queue, msg("late", 1))
    assert got and got[0] is not None
    async with got[0] as receiver:
        assert receiver.session_id == "late"
        assert bodies(await take(h, receiver, 1)) == ["1"]
    assert trio.current_time() - started < long_wait / 2


async def test_contract_receive_on_empty_returns_empty_within_timeout(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1))
    async with await accept(h, queue) as receiver:
        await receiver.complete(await take_one(h, receiver))
        timeout = 1.0
        started = trio.current_time()
        assert await receiver.receive(5, timeout=timeout) == []
        elapsed = trio.current_time() - started
        assert timeout - 0.05 <= elapsed <= timeout + margin(h)


async def test_contract_receive_is_cancellable(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1))
    async with await accept(h, queue) as receiver:
        await receiver.complete(await take_one(h, receiver))
        started = trio.current_time()
        with trio.move_on_after(0.5) as scope:
            await receiver.receive(1, timeout=60.0)
        assert scope.cancelled_caught
        assert trio.current_time() - started <= 0.5 + margin(h)


async def test_contract_receive_wakes_on_send_to_held_session(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1))
    async with await accept(h, queue) as receiver:
        await receiver.complete(await take_one(h, receiver))
        got: list[ReceivedMessage] = []

        async def waiter() -> None:
            got.extend(await receiver.receive(1, timeout=h.lock_duration * 0.8))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.2)
            await send(h, queue, msg("s1", 2))
        assert bodies(got) == ["2"]
        await receiver.complete(got[0])


async def test_contract_cancelled_receive_loses_nothing(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", "a"), msg("s1", "b"))
    receiver = await accept(h, queue)
    with trio.CancelScope() as scope:
        scope.cancel()
        await receiver.receive(2, timeout=wait(h))
    await receiver.aclose()
    # Whatever the cancelled call may have taken comes back (at once, or after the lock).
    async with await accept(h, queue, timeout=past_lock(h) + wait(h)) as again:
        assert await drain_session(h, again) == ["a", "b"]


async def test_contract_release_makes_session_acceptable_by_another(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2))
    first = await accept(h, queue)
    m1 = await take_one(h, first)
    assert bodies([m1]) == ["1"]
    await first.abandon(m1)
    await first.aclose()
    await first.aclose()  # idempotent
    async with await accept(h, queue) as second:
        assert second.session_id == "s1"
        redelivered = await take_one(h, second)
        assert bodies([redelivered]) == ["1"]
        assert redelivered.delivery_count == m1.delivery_count + 1
        await second.complete(redelivered)
        assert await drain_session(h, second) == ["2"]


async def test_contract_close_hands_back_unsettled_messages(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2), msg("s1", 3))
    first = await accept(h, queue)
    held = await take(h, first, 2)
    assert bodies(held) == ["1", "2"]
    await first.aclose()
    # Unsettled messages come back in order, counted (at once, or when their lock expires).
    async with await accept(h, queue, timeout=past_lock(h) + wait(h)) as second:
        again = await take(h, second, 3)
        assert bodies(again) == ["1", "2", "3"]
        assert [m.delivery_count for m in again[:2]] == [2, 2]
        for m in again:
            await second.complete(m)
    await assert_queue_empty(h, queue)


# -- locks ------------------------------------------------------------------------------------------
async def test_contract_locked_until_reported(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1))
    before = trio.current_time()
    async with await accept(h, queue) as receiver:
        assert receiver.locked_until is not None
        assert before < receiver.locked_until <= trio.current_time() + h.lock_duration + margin(h)
        m = await take_one(h, receiver)
        assert m.receipt
        await receiver.complete(m)


async def test_contract_lock_expiry_redelivers_with_count_plus_one(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2))
    first = await accept(h, queue)
    m1 = await take_one(h, first)
    assert m1.delivery_count == 1
    await trio.sleep(past_lock(h))
    # Closing a receiver whose lock was lost does not raise. (Closed first: an SQS provider
    # hands a group out again only once its lapsed holder has closed, DESIGN 12.)
    await first.aclose()
    async with await accept(h, queue, timeout=wait(h)) as second:
        redelivered = await take_one(h, second)
        assert bodies([redelivered]) == ["1"]
        assert redelivered.message_id == m1.message_id
        assert redelivered.delivery_count == 2
        await second.complete(redelivered)
        assert await drain_session(h, second) == ["2"]


async def test_contract_renew_extends_past_original_deadline(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1))
    async with await accept(h, queue) as receiver:
        m = await take_one(h, receiver)
        original = receiver.locked_until
        assert original is not None
        await trio.sleep(h.lock_duration * 0.6)
        renewed = await receiver.renew_lock()
        assert renewed > original
        assert receiver.locked_until == renewed
        await trio.sleep(h.lock_duration * 0.6)  # now past the original deadline
        assert trio.current_time() > original
        other = await h.provider.accept_session(queue, timeout=0.1)
        assert other is None
        await receiver.complete(m)


async def test_contract_lost_session_lock_raises_session_lock_lost(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2))
    old = await accept(h, queue)
    m1 = await take_one(h, old)
    await trio.sleep(past_lock(h))
    with pytest.raises(SessionLockLost):
        await old.receive(1, timeout=0)
    with pytest.raises(SessionLockLost):
        await old.renew_lock()
    with pytest.raises(STALE):
        await old.complete(m1)
    with pytest.raises(STALE):
        await old.abandon(m1)
    await old.aclose()
    # Nothing the old holder tried changed anything: m1 is delivered again, first.
    async with await accept(h, queue) as new:
        again = await take_one(h, new)
        assert bodies([again]) == ["1"]
        assert again.delivery_count == 2
        await new.complete(again)
        assert await drain_session(h, new) == ["2"]


# -- settlement -------------------------------------------------------------------------------------
async def test_contract_complete_removes(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1))
    async with await accept(h, queue) as receiver:
        await receiver.complete(await take_one(h, receiver))
    await trio.sleep(past_lock(h))  # not even a lock expiry brings it back
    await assert_queue_empty(h, queue)
    assert await h.provider.peek_dead_letters(queue) == []


async def test_contract_complete_twice_rejected_and_state_unchanged(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2))
    async with await accept(h, queue) as receiver:
        m1 = await take_one(h, receiver)
        await receiver.complete(m1)
        with pytest.raises(STALE):
            await receiver.complete(m1)
        with pytest.raises(STALE):
            await receiver.abandon(m1)
        with pytest.raises(STALE):
            await receiver.dead_letter(m1, "Late")
        # The receiver and the session are unharmed.
        m2 = await take_one(h, receiver)
        assert bodies([m2]) == ["2"]
        assert m2.delivery_count == 1
        await receiver.complete(m2)
    assert await h.provider.peek_dead_letters(queue) == []


async def test_contract_abandon_redelivers_first_with_count_plus_one(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2), msg("s1", 3))
    async with await accept(h, queue) as receiver:
        m1 = await take_one(h, receiver)
        await receiver.abandon(m1)
        again = await take_one(h, receiver)
        assert bodies([again]) == ["1"]
        assert again.delivery_count == m1.delivery_count + 1
        await receiver.complete(again)
        m2 = await take_one(h, receiver)
        assert bodies([m2]) == ["2"]
        # m2 was never handed out before; a broker that prefetches (SQS) may still have
        # counted a receive of it when m1 was released, so only a lower bound is portable.
        assert m2.delivery_count >= 1
        await receiver.complete(m2)
        assert await drain_session(h, receiver) == ["3"]


async def test_contract_abandon_delay_keeps_message_invisible(harness: Any, contract_clock: Any) -> None:
    h = harness
    if not h.provider.capabilities.abandon_delay:
        pytest.skip("provider has no abandon delay (capabilities.abandon_delay is False)")
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2))
    delay = h.lock_duration * 0.4
    async with await accept(h, queue) as receiver:
        m1 = await take_one(h, receiver)
        abandoned_at = trio.current_time()
        await receiver.abandon(m1, delay=delay)
        # Neither m1 (delayed) nor m2 (it would overtake m1) comes during the delay.
        early = await receiver.receive(1, timeout=delay * 0.5)
        assert early == []
        again = await receiver.receive(1, timeout=delay + margin(h))
        assert bodies(again) == ["1"]
        assert trio.current_time() - abandoned_at >= delay - 0.05
        assert again[0].delivery_count == 2
        await receiver.complete(again[0])
        assert await drain_session(h, receiver) == ["2"]


async def test_contract_dead_letter_keeps_message_and_reason(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    original = Message(
        body=b"\x00poison\xff",
        session_id="s1",
        correlation_id="corr-1",
        properties={"kind": "order", "n": "7"},
        content_type="application/octet-stream",
    )
    await send(h, queue, original, msg("s1", "next"))
    async with await accept(h, queue) as receiver:
        m = await take_one(h, receiver)
        await receiver.dead_letter(m, "NegativeAmount", "amount must be >= 0")
        # The rest of the session continues, in order.
        assert await drain_session(h, receiver) == ["next"]
    peeked = await h.provider.peek_dead_letters(queue)
    assert len(peeked) == 1
    dead = peeked[0]
    assert dead.receipt == ""
    assert dead.message.body == original.body
    assert dead.message.message_id == original.message_id
    assert dead.message.session_id == "s1"
    assert dead.message.correlation_id == "corr-1"
    assert {
        k: v for k, v in dead.message.properties.items() if k in original.properties
    } == original.properties
    assert dead.dead_letter_reason == "NegativeAmount"
    assert dead.dead_letter_description == "amount must be >= 0"
    # Peeking leaves it in place.
    assert [p.message_id for p in await h.provider.peek_dead_letters(queue)] == [original.message_id]


async def test_contract_dead_letter_receiver_locks_and_settles(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", "d1"), msg("s1", "d2"))
    async with await accept(h, queue) as receiver:
        for m in await take(h, receiver, 2):
            await receiver.dead_letter(m, "Bad", None)
    async with await h.provider.open_receiver(queue, dead_letter=True) as dlq:
        got = await take(h, dlq, 2)
        assert sorted(bodies(got)) == ["d1", "d2"]
        assert all(m.receipt for m in got)
        assert all(m.dead_letter_reason == "Bad" for m in got)
        first, second = got
        await dlq.complete(first)
        await dlq.abandon(second)
        back = await take(h, dlq, 1)
        assert [m.message_id for m in back] == [second.message_id]
        await dlq.complete(back[0])
        with pytest.raises(STALE):
            await dlq.complete(first)
    assert await h.provider.peek_dead_letters(queue) == []


async def test_contract_peek_dead_letters_oldest_first_and_bounded(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, *[msg("s1", i) for i in range(4)])
    async with await accept(h, queue) as receiver:
        for m in await take(h, receiver, 4):
            await receiver.dead_letter(m, "Bad", f"number {m.message.body.decode()}")
    assert bodies(await h.provider.peek_dead_letters(queue, 2)) == ["0", "1"]
    everything = await h.provider.peek_dead_letters(queue, 32)
    assert bodies(everything) == ["0", "1", "2", "3"]
    assert [m.dead_letter_description for m in everything] == [f"number {i}" for i in range(4)]


async def test_contract_purge_dead_letters(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2), msg("s1", 3))
    async with await accept(h, queue) as receiver:
        got = await take(h, receiver, 3)
        await receiver.dead_letter(got[0], "Bad")
        await receiver.dead_letter(got[1], "Bad")
        await receiver.complete(got[2])
    assert await h.provider.purge_dead_letters(queue) == 2
    assert await h.provider.peek_dead_letters(queue) == []


async def test_contract_broker_dead_letters_after_max_delivery_count(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", "poison"))
    for attempt in range(1, h.max_delivery_count + 1):
        async with await accept(h, queue) as receiver:
            m = await take_one(h, receiver)
            assert bodies([m]) == ["poison"]
            assert m.delivery_count == attempt
            await receiver.abandon(m)
    # The next delivery would exceed the limit: the broker dead-letters it instead, and the
    # session goes on. ("fine" is sent only now: a prefetching broker would count its
    # receives along with the poison's.)
    await send(h, queue, msg("s1", "fine"))
    async with await accept(h, queue) as receiver:
        assert await drain_session(h, receiver) == ["fine"]
    dead = await h.provider.peek_dead_letters(queue)
    assert bodies(dead) == ["poison"]
    if dead[0].dead_letter_reason is not None:  # SQS redrive records no reason
        assert dead[0].dead_letter_reason == "MaxDeliveryCountExceeded"


async def test_contract_dlq_replay_restores_session_and_empties_dlq(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    await send(
        h,
        queue,
        Message(
            body=b"r1", session_id="s1", correlation_id="c1", properties={"p": "1"}, content_type="text/plain"
        ),
        msg("s2", "r2"),
    )
    for _ in range(2):
        async with await accept(h, queue) as receiver:
            m = await take_one(h, receiver)
            await receiver.dead_letter(m, "Transient", "downstream was down")
    assert len(await h.provider.peek_dead_letters(queue)) == 2
    client = QueueClient(h.provider)
    result = await client.replay_dead_letters(queue, session_id="s1")
    assert (result.replayed, result.failed, result.skipped) == (1, 0, 1)
    assert bodies(await h.provider.peek_dead_letters(queue)) == ["r2"]
    async with await accept(h, queue) as receiver:
        assert receiver.session_id == "s1"
        replayed = await take_one(h, receiver)
        assert replayed.message.body == b"r1"
        assert replayed.message.correlation_id == "c1"
        assert replayed.message.content_type == "text/plain"
        assert replayed.message.properties["p"] == "1"
        assert replayed.message.properties[REPLAYED_REASON_PROPERTY] == "Transient"
        await receiver.complete(replayed)
    result = await client.replay_dead_letters(queue)
    assert (result.replayed, result.failed, result.skipped) == (1, 0, 0)
    assert await h.provider.peek_dead_letters(queue) == []
    async with await accept(h, queue) as receiver:
        assert receiver.session_id == "s2"
        assert await drain_session(h, receiver) == ["r2"]


# -- session state ----------------------------------------------------------------------------------
async def test_contract_session_state_round_trip(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1))
    async with await accept(h, queue) as receiver:
        if not h.provider.capabilities.session_state:
            with pytest.raises(NotSupported):
                await receiver.get_state()
            with pytest.raises(NotSupported):
                await receiver.set_state(b"x")
            return
        assert await receiver.get_state() is None
        await receiver.set_state(b"\x00state\xff")
        assert await receiver.get_state() == b"\x00state\xff"
        await receiver.set_state(None)
        assert await receiver.get_state() is None
        await receiver.complete(await take_one(h, receiver))


async def test_contract_session_state_persists_across_holders(harness: Any, contract_clock: Any) -> None:
    h = harness
    if not h.provider.capabilities.session_state:
        pytest.skip("provider has no session state (capabilities.session_state is False)")
    queue = await h.make_queue()
    await send(h, queue, msg("s1", 1), msg("s1", 2))
    async with await accept(h, queue) as first:
        await first.complete(await take_one(h, first))
        await first.set_state(b"total=1")
    async with await accept(h, queue) as second:
        assert second.session_id == "s1"
        assert await second.get_state() == b"total=1"
        await second.complete(await take_one(h, second))


# -- sending ----------------------------------------------------------------------------------------
async def test_contract_send_batch_chunks_large_batches_in_order(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    count = max(250, h.provider.capabilities.max_batch_count * 2 + 5) if not h.real_time else 25
    assert count > h.provider.capabilities.max_batch_count or h.real_time
    client = QueueClient(h.provider)
    await client.send_batch(queue, [msg("s1", i) for i in range(count)])
    async with await accept(h, queue) as receiver:
        assert await drain_session(h, receiver) == [str(i) for i in range(count)]


async def test_contract_properties_round_trip(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    sent = Message(
        body=b"{}",
        session_id="s-1:x/y",
        correlation_id="corr-\u00e9",
        properties={"tenant": "acme", "unicode": "\u00fc\u2713", "empty": ""},
        content_type="application/json",
    )
    await send(h, queue, sent)
    async with await accept(h, queue) as receiver:
        got = await take_one(h, receiver)
        assert got.message.message_id == sent.message_id
        assert got.message.session_id == sent.session_id
        assert got.message.correlation_id == sent.correlation_id
        assert got.message.content_type == "application/json"
        for key, value in sent.properties.items():
            assert got.message.properties.get(key) == value
        assert got.enqueued_at is None or got.enqueued_at.tzinfo is not None
        await receiver.complete(got)


async def test_contract_bytes_bodies_byte_exact(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    samples = [
        bytes(range(256)),
        b"\x00",
        b"\xc3\x28 invalid utf-8 \xff\xfe",
        "\u00e9\u2713 utf-8 text".encode(),
        b"\r\n\t trailing space ",
        os.urandom(16 * 1024),
    ]
    await send(h, queue, *[Message(body=body, session_id="s1") for body in samples])
    async with await accept(h, queue) as receiver:
        got = await take(h, receiver, len(samples))
        assert [m.message.body for m in got] == samples
        for m in got:
            await receiver.complete(m)


async def test_contract_ttl_expiry(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    ttl = h.lock_duration * 0.5
    await send(h, queue, msg("s1", "short-lived", time_to_live=ttl), msg("s1", "keeper"))
    await trio.sleep(ttl * 1.5 + (margin(h) if h.real_time else 0))
    async with await accept(h, queue) as receiver:
        assert await drain_session(h, receiver) == ["keeper"]


async def test_contract_scheduled_delivery_not_before_its_time(harness: Any, contract_clock: Any) -> None:
    h = harness
    if not h.provider.capabilities.scheduled_messages:
        pytest.skip("provider has no scheduled messages (capabilities.scheduled_messages is False)")
    queue = await h.make_queue()
    delay = max(h.lock_duration * 0.5, 2.0)
    started = trio.current_time()
    when = datetime.now(UTC) + timedelta(seconds=delay)
    await send(h, queue, msg("s1", "later", scheduled_enqueue_time=when))
    assert await h.provider.accept_session(queue, timeout=delay * 0.5) is None
    async with await accept(h, queue, timeout=delay * 2 + margin(h)) as receiver:
        got = await take_one(h, receiver)
        assert bodies([got]) == ["later"]
        assert trio.current_time() - started >= delay - 0.1 - (margin(h) if h.real_time else 0)
        await receiver.complete(got)


# -- non-session queues -----------------------------------------------------------------------------
async def test_contract_non_session_receive_and_complete(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue(requires_session=False)
    with pytest.raises(NotSupported):
        await h.provider.accept_session(queue, timeout=0)
    await send(h, queue, msg(None, 1), msg(None, 2), msg(None, 3))
    async with await h.provider.open_receiver(queue) as receiver:
        assert receiver.session_id is None
        got = await take(h, receiver, 3)
        assert sorted(bodies(got)) == ["1", "2", "3"]
        assert len({m.receipt for m in got}) == 3
        for m in got:
            await receiver.complete(m)
        assert await receiver.receive(1, timeout=0.5) == []


async def test_contract_non_session_abandon_and_renew_message_lock(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue(requires_session=False)
    await send(h, queue, msg(None, "only"))
    async with await h.provider.open_receiver(queue) as receiver:
        first = await take_one(h, receiver)
        await receiver.abandon(first)
        second = await take_one(h, receiver)
        assert second.message_id == first.message_id
        assert second.delivery_count == first.delivery_count + 1
        with pytest.raises(NotSupported):
            await receiver.renew_lock()
        await trio.sleep(h.lock_duration * 0.6)
        deadline = await receiver.renew_message_lock(second)
        assert deadline >= trio.current_time() + h.lock_duration * 0.5
        await trio.sleep(h.lock_duration * 0.6)  # past the first lock's deadline
        await receiver.complete(second)
        assert await receiver.receive(1, timeout=0.5) == []


async def test_contract_non_session_lock_expiry_and_stale_receipt(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue(requires_session=False)
    await send(h, queue, msg(None, "x"))
    async with await h.provider.open_receiver(queue) as receiver:
        first = await take_one(h, receiver)
        await trio.sleep(past_lock(h))
        with pytest.raises((MessageLockLost, InvalidReceipt)):
            await receiver.renew_message_lock(first)
        again = await take_one(h, receiver)
        assert again.message_id == first.message_id
        assert again.delivery_count == 2
        with pytest.raises((InvalidReceipt, MessageLockLost)):
            await receiver.complete(first)
        await receiver.complete(again)
        with pytest.raises((InvalidReceipt, MessageLockLost)):
            await receiver.complete(again)
        assert await receiver.receive(1, timeout=0.5) == []


async def test_contract_open_receiver_on_session_queue_not_supported(
    harness: Any, contract_clock: Any
) -> None:
    h = harness
    queue = await h.make_queue()
    with pytest.raises(NotSupported):
        await h.provider.open_receiver(queue)


# -- stats --------------------------------------------------------------------------------------------
async def test_contract_queue_stats_depth_counts(harness: Any, contract_clock: Any) -> None:
    h = harness
    queue = await h.make_queue()
    await send(h, queue, msg("a", 1), msg("a", 2), msg("b", 1))
    stats = await h.provider.queue_stats(queue)
    assert stats.queue == queue
    if stats.active is not None:
        assert stats.active == 3
    if stats.in_flight is not None:
        assert stats.in_flight == 0
    if stats.dead_letter is not None:
        assert stats.dead_letter == 0
    if stats.scheduled is not None:
        assert stats.scheduled == 0
    # A prefetching broker (SQS) may hold more in flight than it handed out: check sums.
    async with await accept(h, queue) as receiver:
        m = await take_one(h, receiver)
        stats = await h.provider.queue_stats(queue)
        if stats.in_flight is not None:
            assert stats.in_flight >= 1
        if stats.active is not None and stats.in_flight is not None:
            assert stats.active + stats.in_flight == 3
        if stats.oldest_message_age is not None:
            assert stats.oldest_message_age >= 0
        await receiver.dead_letter(m, "Bad")
        stats = await h.provider.queue_stats(queue)
        if stats.active is not None and stats.in_flight is not None:
            assert stats.active + stats.in_flight == 2
        if stats.dead_letter is not None:
            assert stats.dead_letter == 1
