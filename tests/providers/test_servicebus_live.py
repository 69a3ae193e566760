"""Live Azure Service Bus round trips (opt-in).

Run with ``AZURE_SERVICE_BUS_CONNECTION_STRING`` and ``QUEUE_RUNTIME_TEST_QUEUE`` (a
session-enabled queue these tests may use; each test uses its own unique session id and
settles everything it sends). Skipped with that reason otherwise.
"""

from __future__ import annotations

import os
import uuid

import pytest
import trio

from queue_runtime.message import Message
from queue_runtime.providers.base import Receiver
from queue_runtime.providers.servicebus import ServiceBusProvider

CONNECTION = os.environ.get("AZURE_SERVICE_BUS_CONNECTION_STRING")
QUEUE = os.environ.get("QUEUE_RUNTIME_TEST_QUEUE")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (CONNECTION and QUEUE),
        reason="live Service Bus tests need AZURE_SERVICE_BUS_CONNECTION_STRING and"
        " QUEUE_RUNTIME_TEST_QUEUE (a session-enabled queue)",
    ),
]


@pytest.fixture
async def provider():
    p = ServiceBusProvider(connection_string=CONNECTION, operation_timeout=60.0)
    yield p
    await p.aclose()


async def _accept_session(provider: ServiceBusProvider, session_id: str) -> Receiver:
    """Accept sessions until ours comes up; other sessions are released untouched."""
    assert QUEUE
    with trio.fail_after(120):
        while True:
            receiver = await provider.accept_session(QUEUE, timeout=30)
            if receiver is None:
                continue
            if receiver.session_id == session_id:
                return receiver
            await receiver.aclose()


async def test_live_send_accept_receive_complete(provider: ServiceBusProvider) -> None:
    assert QUEUE
    info = await provider.describe(QUEUE)
    assert info.requires_session
    session = f"live-{uuid.uuid4()}"
    sent = [Message(body=f"m{i}".encode(), session_id=session, properties={"i": str(i)}) for i in range(3)]
    await provider.send(QUEUE, sent)
    receiver = await _accept_session(provider, session)
    try:
        assert receiver.locked_until is not None and receiver.locked_until > trio.current_time()
        got = []
        while len(got) < 3:
            batch = await receiver.receive(3 - len(got), timeout=10)
            assert batch, "expected the messages just sent"
            got.extend(batch)
        assert [m.message.body for m in got] == [b"m0", b"m1", b"m2"]
        assert [m.message.properties["i"] for m in got] == ["0", "1", "2"]
        assert [m.message_id for m in got] == [m.message_id for m in sent]
        renewed = await receiver.renew_lock()
        assert renewed > trio.current_time()
        await receiver.set_state(b"live-state")
        assert await receiver.get_state() == b"live-state"
        await receiver.set_state(None)
        for m in got:
            await receiver.complete(m)
    finally:
        await receiver.aclose()


async def test_live_dead_letter_round_trip(provider: ServiceBusProvider) -> None:
    assert QUEUE
    session = f"live-dlq-{uuid.uuid4()}"
    message = Message(body=b"poison", session_id=session)
    await provider.send(QUEUE, [message])
    receiver = await _accept_session(provider, session)
    try:
        (got,) = await receiver.receive(1, timeout=10)
        await receiver.dead_letter(got, "LiveTest", "dead-lettered by the live test")
    finally:
        await receiver.aclose()
    # Find our dead letter and remove it again, leaving the DLQ as it was.
    async with await provider.open_receiver(QUEUE, dead_letter=True) as dlq:
        with trio.fail_after(120):
            while True:
                batch = await dlq.receive(32, timeout=10)
                mine = [m for m in batch if m.message_id == message.message_id]
                for m in batch:
                    if m not in mine:
                        await dlq.abandon(m)
                if mine:
                    break
        (dead,) = mine
        assert dead.dead_letter_reason == "LiveTest"
        assert dead.dead_letter_description == "dead-lettered by the live test"
        assert dead.session_id == session
        await dlq.complete(dead)
