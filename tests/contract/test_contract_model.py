"""Model-based contract tests: random interleavings checked against a model of the broker.

Hypothesis generates operation lists (send, accept, receive, complete, abandon, receive-and-abandon,
renew, release, advance time, settle with a stale receiver) over a few sessions; each list runs in
its own ``trio.run`` on ``MockClock`` with a fresh harness. After every operation the
provider must agree with the model:

* a receive returns exactly the model's next message of the session (never reordered, never
  a message that is settled, dead-lettered or in flight), with ``delivery_count`` equal to
  the deliveries the model saw plus one;
* a held session is never handed to a second receiver, and ``accept_session`` returns None
  only when no unheld session has anything left;
* a receiver whose lock expired (or was closed) can settle, receive or renew nothing;
* at the end, every message was completed exactly once or dead-lettered by the broker after
  ``max_delivery_count`` deliveries — nothing lost, nothing duplicated.

Only for harnesses that run on MockClock (marked ``model``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from queue_runtime.errors import InvalidReceipt, MessageLockLost, SessionLockLost
from queue_runtime.message import Message, ReceivedMessage
from queue_runtime.providers.base import Receiver

pytestmark = pytest.mark.model

STALE = (InvalidReceipt, MessageLockLost, SessionLockLost)
SESSIONS = ("s0", "s1", "s2")
EPS = 1e-6
EXAMPLES = int(os.environ.get("CONTRACT_MODEL_EXAMPLES", "150"))

# Weighted so short, meaningful sequences (send, accept, receive, abandon, receive...) on one
# session come up often; other sessions interleave.
session_index = st.sampled_from([0, 0, 1, 2])
_kinds = st.sampled_from(
    ["send"] * 3 + ["accept"] * 3 + ["receive"] * 3 + ["complete"] * 2 + ["abandon"] * 2
    + ["bounce"] * 2 + ["advance"] * 2 + ["stale"] * 2 + ["renew", "release"]
)  # fmt: skip


@st.composite
def operation(draw: st.DrawFn) -> tuple[str, int, int]:
    kind = draw(_kinds)
    index = draw(session_index)
    if kind == "send":
        return (kind, index, draw(st.integers(1, 3)))
    if kind in ("receive", "bounce"):
        return (kind, index, draw(st.integers(1, 2)))
    if kind in ("complete", "abandon", "stale"):
        return (kind, index, draw(st.integers(0, 1)))
    if kind == "advance":
        return (kind, index, draw(st.sampled_from([3, 6, 12])))  # tenths of a lock duration
    return (kind, index, 0)


operations = st.lists(operation(), min_size=3, max_size=50)


@dataclass
class Holder:
    receiver: Receiver
    deadline: float
    in_flight: list[ReceivedMessage] = field(default_factory=list)
    lost: list[ReceivedMessage] = field(default_factory=list)  # in flight when the lock was lost


@dataclass
class Model:
    lock_duration: float
    max_delivery_count: int
    sent: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SESSIONS})
    deliveries: dict[str, int] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)
    holders: dict[str, Holder] = field(default_factory=dict)
    stale: list[Holder] = field(default_factory=list)
    counter: int = 0

    def next_expected(self, session: str, holder: Holder) -> str | None:
        flying = {m.message_id for m in holder.in_flight}
        for message_id in self.sent[session]:
            if message_id not in self.done and message_id not in self.dead and message_id not in flying:
                return message_id
        return None

    def remaining(self, session: str) -> list[str]:
        return [i for i in self.sent[session] if i not in self.done and i not in self.dead]

    def hand_back(self, holder: Holder) -> None:
        """The broker takes back what a holder had in flight (abandon, expiry, release)."""
        for message in holder.in_flight:
            self.returned(message.message_id)
        holder.in_flight.clear()

    def returned(self, message_id: str) -> None:
        if self.deliveries[message_id] >= self.max_delivery_count:
            self.dead.add(message_id)  # its next delivery would exceed the limit

    def expire(self, now: float) -> None:
        for session, holder in list(self.holders.items()):
            if now >= holder.deadline:
                holder.lost = list(holder.in_flight)
                self.hand_back(holder)
                self.stale.append(holder)
                del self.holders[session]

    def near_deadline(self, now: float) -> bool:
        return any(abs(now - h.deadline) < EPS for h in self.holders.values())


async def run_scenario(harness_cls: type, ops: list[tuple[str, int, int]]) -> None:
    h = harness_cls()
    await h.setup()
    try:
        queue = await h.make_queue()
        model = Model(lock_duration=h.lock_duration, max_delivery_count=h.max_delivery_count)
        for op in ops:
            await step(h, queue, model, op)
        await finish(h, queue, model)
    finally:
        await h.teardown()


async def step(h: Any, queue: str, model: Model, op: tuple[str, int, int]) -> None:
    kind, index, arg = op
    session = SESSIONS[index]
    provider = h.provider
    now = trio.current_time()
    if model.near_deadline(now):
        await trio.sleep(0.01)  # stay off exact lock deadlines, where either outcome is fair
        now = trio.current_time()
    model.expire(now)
    # Operations on a receiver pick one of the held sessions (so few draws are wasted); with
    # none held they accept one first.
    if kind in ("receive", "bounce", "complete", "abandon", "renew", "release"):
        if not model.holders and kind != "release":
            await step(h, queue, model, ("accept", 0, 0))
        if model.holders:
            held = sorted(model.holders)
            session = held[index % len(held)]
    if kind == "stale" and not model.stale:
        kind, arg = "advance", 12  # make a stale receiver to probe next time
    holder = model.holders.get(session)

    if kind == "send":
        batch = []
        for _ in range(arg):
            model.counter += 1
            message = Message(body=f"{session}-{model.counter}".encode(), session_id=session)
            model.sent[session].append(message.message_id)
            model.deliveries[message.message_id] = 0
            batch.append(message)
        await provider.send(queue, batch)

    elif kind == "accept":
        receiver = await provider.accept_session(queue, timeout=0)
        if receiver is None:
            for s in SESSIONS:
                if s not in model.holders:
                    assert model.remaining(s) == [], f"accept found nothing but {s} has messages left"
            return
        sid = receiver.session_id
        assert sid in SESSIONS
        assert sid not in model.holders, f"session {sid} handed to a second receiver while held"
        assert model.remaining(sid), f"accepted {sid}, which has nothing left"
        model.holders[sid] = Holder(receiver, trio.current_time() + model.lock_duration)

    elif kind in ("receive", "bounce"):
        if holder is None:
            return
        got = await holder.receiver.receive(arg, timeout=0)
        assert len(got) <= arg
        for message in got:
            expected = model.next_expected(session, holder)
            assert message.message_id == expected, "delivered out of order (or a settled message)"
            assert message.session_id == session
            model.deliveries[message.message_id] += 1
            assert message.delivery_count == model.deliveries[message.message_id]
            holder.in_flight.append(message)
        if len(got) < arg:
            assert model.next_expected(session, holder) is None, "a receive missed an available message"
        if kind == "bounce":  # a handler that keeps failing: abandon what came, at once
            for message in got:
                holder.in_flight.remove(message)
                await holder.receiver.abandon(message)
                model.returned(message.message_id)

    elif kind in ("complete", "abandon"):
        if holder is None or not holder.in_flight:
            return
        message = holder.in_flight.pop(min(arg, len(holder.in_flight) - 1))
        if kind == "complete":
            await holder.receiver.complete(message)
            assert message.message_id not in model.done
            model.done.add(message.message_id)
        else:
            await holder.receiver.abandon(message)
            model.returned(message.message_id)

    elif kind == "renew":
        if holder is None:
            return
        deadline = await holder.receiver.renew_lock()
        holder.deadline = trio.current_time() + model.lock_duration
        assert abs(deadline - holder.deadline) < 1e-3

    elif kind == "release":
        if holder is not None:
            await holder.receiver.aclose()
            model.hand_back(holder)
            del model.holders[session]
        for old in model.stale:
            await old.receiver.aclose()  # idempotent, never raises for a lost lock
        model.stale.clear()

    elif kind == "advance":
        await trio.sleep(model.lock_duration * arg / 10)
        model.expire(trio.current_time())

    elif kind == "stale":
        for old in model.stale:
            for message in old.lost:
                with pytest.raises(STALE):
                    if arg:
                        await old.receiver.complete(message)
                    else:
                        await old.receiver.abandon(message)
            with pytest.raises(SessionLockLost):
                await old.receiver.receive(1, timeout=0)
            with pytest.raises(SessionLockLost):
                await old.receiver.renew_lock()


async def finish(h: Any, queue: str, model: Model) -> None:
    provider = h.provider
    for holder in model.holders.values():
        await holder.receiver.aclose()
        model.hand_back(holder)
    model.holders.clear()
    for old in model.stale:
        await old.receiver.aclose()
    # Everything left is delivered, in order, and completed.
    while (receiver := await provider.accept_session(queue, timeout=0)) is not None:
        sid = receiver.session_id
        assert sid is not None
        holder = Holder(receiver, trio.current_time() + model.lock_duration)
        async with receiver:
            while got := await receiver.receive(10, timeout=0):
                for message in got:
                    assert message.message_id == model.next_expected(sid, holder)
                    model.deliveries[message.message_id] += 1
                    assert message.delivery_count == model.deliveries[message.message_id]
                    await receiver.complete(message)
                    assert message.message_id not in model.done
                    model.done.add(message.message_id)
    every = {i for ids in model.sent.values() for i in ids}
    assert model.done.isdisjoint(model.dead)
    assert model.done | model.dead == every, "a message was lost"
    dead = await provider.peek_dead_letters(queue, max(len(every), 1))
    assert sorted(m.message_id for m in dead) == sorted(model.dead)
    assert all(m.dead_letter_reason in (None, "MaxDeliveryCountExceeded") for m in dead)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
def test_contract_model_random_interleavings(harness_class: type, ops: list[tuple[str, int, int]]) -> None:
    trio.run(run_scenario, harness_class, ops, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(
    max_examples=max(EXAMPLES // 2, 10),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.binary(min_size=1, max_size=4096))
def test_contract_model_arbitrary_bytes_byte_exact(harness_class: type, body: bytes) -> None:
    async def scenario() -> None:
        h = harness_class()
        await h.setup()
        try:
            queue = await h.make_queue()
            await h.provider.send(queue, [Message(body=body, session_id="s")])
            receiver = await h.provider.accept_session(queue, timeout=1)
            assert receiver is not None
            async with receiver:
                got = await receiver.receive(1, timeout=1)
                assert [m.message.body for m in got] == [body]
                await receiver.complete(got[0])
        finally:
            await h.teardown()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
