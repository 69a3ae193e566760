"""ServiceBusProvider against the SDK-shaped fake (and, where it fails fast, the real SDK).

The fake runs on the provider's private asyncio thread like the SDK, so these tests run on the
real clock with short waits; each test is well under a few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from azure.core import exceptions as core
from azure.servicebus import exceptions as sb
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fakes package

from fakes.servicebus import (
    FakeAdministrationClient,
    FakeNamespace,
    connection_error_echoing,
)
from queue_runtime import errors
from queue_runtime.message import Message
from queue_runtime.providers.base import QueueStats
from queue_runtime.providers.servicebus import ServiceBusProvider, map_error, redact

KEY = "Zq9TEST0nlyKEYdoNotLeak7x2PqR4sT6uV8wX0yZ1aB3cD5eF7g="
CONN = f"Endpoint=sb://unit-test.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY}"


@pytest.fixture
def namespace() -> FakeNamespace:
    ns = FakeNamespace()
    ns.create_queue("orders", lock_duration=2.0, max_delivery_count=3)
    ns.create_queue("plain", requires_session=False, lock_duration=2.0, max_delivery_count=3)
    return ns


def make_provider(ns: FakeNamespace, **kwargs: object) -> ServiceBusProvider:
    return ServiceBusProvider(
        connection_string=CONN,
        client_factory=lambda: ns.client(CONN),
        admin_client_factory=lambda: FakeAdministrationClient(ns),
        operation_timeout=10.0,
        cancel_grace=2.0,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
async def provider(namespace: FakeNamespace):
    p = make_provider(namespace)
    yield p
    await p.aclose()


def pending_asyncio_tasks(p: ServiceBusProvider) -> int:
    if not p.bridge.running:
        return 0
    box: list[int] = []
    done = threading.Event()

    def count() -> None:
        box.append(sum(1 for t in asyncio.all_tasks(p.bridge.loop) if not t.done()))
        done.set()

    p.bridge.loop.call_soon_threadsafe(count)
    assert done.wait(5)
    return box[0]


def msg(session: str | None, body: bytes = b"x", **kw: object) -> Message:
    return Message(body=body, session_id=session, **kw)  # type: ignore[arg-type]


# -- sessions, order, settlement ---------------------------------------------------------------


async def test_round_trip_in_order_with_state_and_mapping(provider: ServiceBusProvider) -> None:
    sent = [
        msg(
            "s1",
            f"m{i}".encode(),
            properties={"k": str(i)},
            correlation_id=f"c{i}",
            content_type="text/plain",
        )
        for i in range(5)
    ]
    await provider.send("orders", sent)
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None and receiver.session_id == "s1"
    assert receiver.locked_until is not None
    assert 1.0 < receiver.locked_until - trio.current_time() <= 2.1
    got = await receiver.receive(10, 1)
    assert [m.message.body for m in got] == [f"m{i}".encode() for i in range(5)]
    first = got[0]
    # bytes keys/values from the SDK become str
    assert first.message.properties == {"k": "0"}
    assert first.message.correlation_id == "c0" and first.message.content_type == "text/plain"
    assert first.message.message_id == sent[0].message_id
    assert first.delivery_count == 1 and first.sequence_number is not None
    assert first.enqueued_at is not None and first.enqueued_at.tzinfo is not None
    assert first.receipt
    await receiver.abandon(got[0])
    for m in got[1:]:
        await receiver.complete(m)
    again = await receiver.receive(10, 1)
    assert [m.message.body for m in again] == [b"m0"]
    assert again[0].delivery_count == 2
    await receiver.set_state(b"state-1")
    assert await receiver.get_state() == b"state-1"
    await receiver.complete(again[0])
    # A settled receipt cannot settle twice.
    with pytest.raises(errors.InvalidReceipt):
        await receiver.complete(again[0])
    await receiver.aclose()
    await receiver.aclose()  # idempotent


async def test_abandon_goes_before_later_messages_no_prefetch(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    await provider.send("orders", [msg("s", f"{i}".encode()) for i in range(3)])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    one = await receiver.receive(1, 1)
    await receiver.abandon(one[0])
    bodies = [m.message.body for m in await receiver.receive(3, 1)]
    assert bodies == [b"0", b"1", b"2"]
    await receiver.aclose()


async def test_max_delivery_count_dead_letters_broker_side(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    await provider.send("orders", [msg("s", b"poison")])
    for attempt in range(1, 4):
        receiver = await provider.accept_session("orders", timeout=1)
        assert receiver is not None
        (m,) = await receiver.receive(1, 1)
        assert m.delivery_count == attempt
        await receiver.abandon(m)
        await receiver.aclose()
    assert await provider.accept_session("orders", timeout=0.2) is None
    (dead,) = await provider.peek_dead_letters("orders")
    assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
    assert dead.receipt == "" and dead.message.body == b"poison"


async def test_dead_letter_with_reason_then_purge(provider: ServiceBusProvider) -> None:
    await provider.send("orders", [msg("s", b"a"), msg("s", b"b")])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    a, b = await receiver.receive(2, 1)
    await receiver.dead_letter(a, "NegativeAmount", "amount must be >= 0")
    await receiver.complete(b)
    await receiver.aclose()
    (dead,) = await provider.peek_dead_letters("orders")
    assert (dead.dead_letter_reason, dead.dead_letter_description) == (
        "NegativeAmount",
        "amount must be >= 0",
    )
    assert await provider.purge_dead_letters("orders") == 1
    assert await provider.peek_dead_letters("orders") == []


async def test_peek_dead_letters_pages_and_is_bounded(provider: ServiceBusProvider) -> None:
    await provider.send("orders", [msg("s", str(i).encode()) for i in range(7)])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    for m in await receiver.receive(7, 1):
        await receiver.dead_letter(m, f"R{m.message.body.decode()}")
    await receiver.aclose()
    five = await provider.peek_dead_letters("orders", max_messages=5)
    assert [m.dead_letter_reason for m in five] == [f"R{i}" for i in range(5)]
    everything = await provider.peek_dead_letters("orders", max_messages=100)
    assert [m.message.body for m in everything] == [str(i).encode() for i in range(7)]
    # Peeking leaves them in place.
    assert len(await provider.peek_dead_letters("orders")) == 7


async def test_non_session_queue_message_lock(provider: ServiceBusProvider, namespace: FakeNamespace) -> None:
    await provider.send("plain", [msg(None, b"p")])
    with pytest.raises(errors.NotSupported):
        await provider.open_receiver("orders")
    receiver = await provider.open_receiver("plain")
    (m,) = await receiver.receive(1, 1)
    assert m.locked_until is not None
    new_deadline = await receiver.renew_message_lock(m)
    assert new_deadline > trio.current_time() + 1
    with pytest.raises(errors.NotSupported):
        await receiver.renew_lock()
    namespace.advance(5)  # the message lock expires
    with pytest.raises(errors.MessageLockLost):
        await receiver.complete(m)
    (again,) = await receiver.receive(1, 1)
    assert again.delivery_count == 2
    await receiver.complete(again)
    await receiver.aclose()


async def test_scheduled_and_ttl_reach_the_sdk_message(provider: ServiceBusProvider) -> None:
    when = datetime.now(UTC) + timedelta(seconds=0.5)
    await provider.send("orders", [msg("s", b"later", scheduled_enqueue_time=when, time_to_live=60.0)])
    assert await provider.accept_session("orders", timeout=0.1) is None
    receiver = await provider.accept_session("orders", timeout=2)
    assert receiver is not None
    (m,) = await receiver.receive(1, 1)
    assert m.message.time_to_live == 60.0
    await receiver.complete(m)
    await receiver.aclose()


# -- lock loss ---------------------------------------------------------------------------------


async def test_lock_loss_renew_and_settle(provider: ServiceBusProvider, namespace: FakeNamespace) -> None:
    await provider.send("orders", [msg("s", b"a")])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    (m,) = await receiver.receive(1, 1)
    before = receiver.locked_until
    renewed = await receiver.renew_lock()
    assert before is not None and renewed >= before and receiver.locked_until == renewed
    namespace.lose_session_lock("orders", "s")
    with pytest.raises(errors.SessionLockLost) as lost:
        await receiver.renew_lock()
    assert lost.value.transient is False
    with pytest.raises(errors.SessionLockLost):
        await receiver.complete(m)
    with pytest.raises(errors.SessionLockLost):
        await receiver.receive(1, 0.1)
    await receiver.aclose()
    # Nothing was settled: the message is delivered again, counted.
    again = await provider.accept_session("orders", timeout=1)
    assert again is not None
    (m2,) = await again.receive(1, 1)
    assert m2.message.body == b"a" and m2.delivery_count == 2
    await again.aclose()


async def test_a_session_lock_lost_during_a_receive_in_flight_is_remembered(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    """The runtime starts no handle() on a lock it knows is gone (DESIGN 12): a receive the
    broker ends with a lost session lock leaves the receiver reporting no lock left."""
    await provider.send("orders", [msg("s", b"a")])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    (m,) = await receiver.receive(1, 1)
    await receiver.complete(m)
    assert receiver.locked_until is not None and receiver.locked_until > trio.current_time()

    async def lose_it_soon() -> None:
        await trio.sleep(0.3)
        namespace.lose_session_lock("orders", "s")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lose_it_soon)
        with pytest.raises(errors.SessionLockLost):
            await receiver.receive(1, 3)  # waiting when the lock goes
    assert receiver.locked_until == -math.inf
    await receiver.aclose()


async def test_lock_expiry_is_lock_loss(provider: ServiceBusProvider, namespace: FakeNamespace) -> None:
    await provider.send("orders", [msg("s", b"a")])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    (m,) = await receiver.receive(1, 1)
    namespace.advance(3)  # past the 2 s lock
    with pytest.raises(errors.SessionLockLost):
        await receiver.renew_lock()
    with pytest.raises(errors.SessionLockLost):
        await receiver.abandon(m)
    await receiver.aclose()


# -- quiet queue -------------------------------------------------------------------------------


async def test_quiet_queue_returns_none_quietly_without_spinning(
    provider: ServiceBusProvider, namespace: FakeNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    assert await provider.accept_session("orders", timeout=0.6) is None
    elapsed = time.monotonic() - start
    assert 0.55 <= elapsed < 2.0  # it waited (no spin) and not much longer
    assert namespace.calls["open_receiver"] == 1 and namespace.calls["accept"] == 1
    assert namespace.open_receivers == 0  # the timed-out receiver was closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # A few quiet polls in a row: one SDK accept each, nothing else.
    for _ in range(3):
        assert await provider.accept_session("orders", timeout=0.1) is None
    assert namespace.calls["accept"] == 4
    assert namespace.calls["receive"] == 0


async def test_busy_sessions_are_not_handed_out_twice(provider: ServiceBusProvider) -> None:
    await provider.send("orders", [msg("a"), msg("b")])
    r1 = await provider.accept_session("orders", timeout=1)
    r2 = await provider.accept_session("orders", timeout=1)
    assert r1 is not None and r2 is not None
    assert {r1.session_id, r2.session_id} == {"a", "b"}
    assert await provider.accept_session("orders", timeout=0.2) is None
    await r1.aclose()
    r3 = await provider.accept_session("orders", timeout=1)
    assert r3 is not None and r3.session_id == r1.session_id
    await r2.aclose()
    await r3.aclose()


# -- cancellation, close -----------------------------------------------------------------------


async def test_cancel_in_the_middle_of_an_sdk_call(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    await provider.send("orders", [msg("s")])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    namespace.delay("receive", 30)  # the SDK call hangs
    start = time.monotonic()
    with trio.move_on_after(0.3) as scope:
        await receiver.receive(1, 1)
    assert scope.cancelled_caught
    assert time.monotonic() - start < 2.0
    assert pending_asyncio_tasks(provider) == 0  # the asyncio task really was cancelled
    namespace.delay("receive", 0)
    # The receiver still works after a cancelled call.
    (m,) = await receiver.receive(1, 1)
    await receiver.complete(m)
    await receiver.aclose()


async def test_cancelled_accept_leaks_no_session(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    await provider.send("orders", [msg("s")])
    namespace.delay("accept", 30)
    with trio.move_on_after(0.2):
        await provider.accept_session("orders", timeout=5)
    namespace.delay("accept", 0)
    assert pending_asyncio_tasks(provider) == 0
    assert namespace.open_receivers == 0
    receiver = await provider.accept_session("orders", timeout=1)  # the session is free
    assert receiver is not None and receiver.session_id == "s"
    await receiver.aclose()


async def test_close_with_a_deadline_stops_everything(namespace: FakeNamespace) -> None:
    baseline = threading.active_count()
    p = make_provider(namespace)
    await p.send("orders", [msg("s")])
    receiver = await p.accept_session("orders", timeout=1)
    assert receiver is not None
    assert threading.active_count() == baseline + 1
    namespace.delay("receive", 60)
    outcome: list[BaseException] = []

    async def stuck() -> None:
        try:
            await receiver.receive(1, 1)
        except errors.QueueError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck)
        await trio.sleep(0.2)
        start = time.monotonic()
        await p.aclose()
        assert time.monotonic() - start < 3.0
    assert len(outcome) == 1 and isinstance(outcome[0], errors.ConnectionFailed)
    assert threading.active_count() == baseline
    assert namespace.open_receivers == 0 and namespace.open_senders == 0
    with pytest.raises(errors.ConnectionFailed):
        await p.send("orders", [msg("s")])
    await p.aclose()  # idempotent


async def test_one_client_per_provider(provider: ServiceBusProvider, namespace: FakeNamespace) -> None:
    async def one(i: int) -> None:
        await provider.send("orders", [msg(f"s{i}")])

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    for _ in range(3):
        r = await provider.accept_session("orders", timeout=1)
        assert r is not None
        await r.aclose()
    assert namespace.clients_created == 1
    assert namespace.calls["open_sender"] == 1  # the sender is cached too


# -- send batching -----------------------------------------------------------------------------


async def test_send_batches_by_size_and_keeps_order(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    body = b"x" * (20 * 1024)  # 100 x 20 KiB does not fit one 256 KiB transfer
    messages = [msg("s", body, properties={"i": str(i)}) for i in range(100)]
    await provider.send("orders", messages)
    assert namespace.calls["send"] >= 8  # size-aware split into several SDK batches
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    seen: list[str] = []
    while len(seen) < 100:
        batch = await receiver.receive(50, 1)
        assert batch
        for m in batch:
            seen.append(m.message.properties["i"])
            await receiver.complete(m)
    assert seen == [str(i) for i in range(100)]
    await receiver.aclose()


async def test_send_validates_before_io(provider: ServiceBusProvider, namespace: FakeNamespace) -> None:
    with pytest.raises(errors.ValidationError, match="at most 100"):
        await provider.send("orders", [msg("s")] * 101)
    with pytest.raises(errors.MessageTooLarge):
        await provider.send("orders", [msg("s", b"x" * (256 * 1024 + 1))])
    await provider.describe("orders")  # learns that the queue requires sessions
    with pytest.raises(errors.ValidationError, match="session"):
        await provider.send("orders", [msg(None)])
    with pytest.raises(errors.ValidationError):
        await provider.send("bad name!", [msg("s")])
    assert namespace.calls["send"] == 0


async def test_premium_size_is_configurable(namespace: FakeNamespace) -> None:
    p = make_provider(namespace, max_message_size=1024 * 1024)
    try:
        assert p.capabilities.max_message_size == 1024 * 1024
        assert p.capabilities.max_batch_count == 100
        assert p.capabilities.system == "azure_service_bus"
        assert p.capabilities.native_sessions and p.capabilities.session_state
        assert not p.capabilities.abandon_delay
    finally:
        await p.aclose()


# -- error mapping -----------------------------------------------------------------------------

MAPPING = [
    (sb.ServiceBusConnectionError(), errors.ConnectionFailed, True),
    (sb.ServiceBusCommunicationError(), errors.ConnectionFailed, True),
    (sb.ServiceBusAuthenticationError(), errors.AuthenticationFailed, False),
    (sb.ServiceBusAuthorizationError(), errors.AuthenticationFailed, False),
    (sb.MessagingEntityNotFoundError(), errors.QueueNotFound, False),
    (sb.MessagingEntityDisabledError(), errors.QueueNotFound, False),
    (sb.OperationTimeoutError(), errors.Timeout, True),
    (sb.SessionLockLostError(), errors.SessionLockLost, False),
    (sb.MessageLockLostError(), errors.MessageLockLost, False),
    (sb.ServiceBusQuotaExceededError(), errors.QueueFull, True),
    (sb.ServiceBusServerBusyError(), errors.Throttled, True),
    (sb.MessageAlreadySettled(action="complete"), errors.InvalidReceipt, False),
    (sb.MessageNotFoundError(), errors.InvalidReceipt, False),
    (sb.MessageSizeExceededError(), errors.ValidationError, False),
    (sb.SessionCannotBeLockedError(), errors.QueueError, True),
    (sb.ServiceBusError("generic", retryable=True), errors.QueueError, True),
    (sb.ServiceBusError("generic"), errors.QueueError, False),
    (core.ClientAuthenticationError("token refused"), errors.AuthenticationFailed, False),
    (core.ServiceRequestError("dns failure"), errors.ConnectionFailed, True),
    (core.ResourceNotFoundError("missing"), errors.QueueNotFound, False),
    (ConnectionRefusedError(111, "refused"), errors.ConnectionFailed, True),
    (TimeoutError(), errors.Timeout, True),
    (RuntimeError("???"), errors.QueueError, False),
]


@pytest.mark.parametrize(
    ("sdk_error", "expected", "transient"),
    MAPPING,
    ids=[f"{type(e).__name__}-{i}" for i, (e, _, _) in enumerate(MAPPING)],
)
async def test_error_mapping_through_the_provider(
    provider: ServiceBusProvider,
    namespace: FakeNamespace,
    sdk_error: BaseException,
    expected: type[errors.QueueError],
    transient: bool,
) -> None:
    await provider.send("orders", [msg("s")])  # open the sender first
    namespace.inject_fault("send", sdk_error)
    with pytest.raises(expected) as caught:
        await provider.send("orders", [msg("s")])
    assert caught.value.transient is transient
    assert "\n" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    # The fault is used up: the next call works.
    await provider.send("orders", [msg("s")])


async def test_failed_send_reopens_the_sender_not_the_client(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    await provider.send("orders", [msg("s")])
    namespace.inject_fault("send", sb.ServiceBusConnectionError())
    with pytest.raises(errors.ConnectionFailed):
        await provider.send("orders", [msg("s")])
    await provider.send("orders", [msg("s")])
    assert namespace.calls["open_sender"] == 2 and namespace.open_senders == 1
    assert namespace.clients_created == 1


async def test_managed_identity_builds_the_real_client_with_default_credential() -> None:
    """No connection string: the real SDK client over azure-identity's DefaultAzureCredential,
    built on the loop without I/O, and both closed with the provider."""
    p = ServiceBusProvider(fully_qualified_namespace="acme.servicebus.windows.net", client_id="mi-client-id")
    try:
        client = await p._ensure_client()
        assert type(client).__name__ == "ServiceBusClient"
        assert client.fully_qualified_namespace == "acme.servicebus.windows.net"
        assert type(p._owned_credential).__name__ == "DefaultAzureCredential"
        assert "azure-identity" in repr(p)
    finally:
        await p.aclose()
    assert not p.bridge.running


def test_http_401_maps_to_authentication() -> None:
    exc = core.HttpResponseError(message="Unauthorized")
    exc.status_code = 401
    assert isinstance(map_error(exc, operation="describe"), errors.AuthenticationFailed)


async def test_transient_fault_on_accept_then_recovery(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    await provider.send("orders", [msg("s")])
    namespace.inject_fault("accept", sb.ServiceBusConnectionError(), times=2)
    for _ in range(2):
        with pytest.raises(errors.ConnectionFailed):
            await provider.accept_session("orders", timeout=1)
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    await receiver.aclose()
    assert namespace.open_receivers == 0


async def test_describe_reads_queue_settings_and_missing_queue(provider: ServiceBusProvider) -> None:
    info = await provider.describe("orders")
    assert info.requires_session and info.lock_duration == 2.0 and info.max_delivery_count == 3
    with pytest.raises(errors.QueueNotFound) as missing:
        await provider.describe("nope")
    assert "nope" in str(missing.value) and not missing.value.transient


# -- secrets -----------------------------------------------------------------------------------


def test_redact_patterns() -> None:
    text = f"failed for {CONN} and https://x/?sv=1&sig=abcDEF123%3D&se=9 SharedAccessSignature=tok;"
    out = redact(text)
    assert KEY not in out and "abcDEF123" not in out and "tok;" not in out
    assert "SharedAccessKey=***" in out
    assert redact("line one\nline two") == "line one line two"


async def test_secrets_never_in_errors_logs_or_reprs(
    namespace: FakeNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = make_provider(namespace)
    seen: list[str] = [repr(p), str(p)]
    try:
        namespace.unreachable = connection_error_echoing(CONN)  # an SDK message echoing the key
        calls = [
            lambda: p.describe("orders"),
            lambda: p.send("orders", [msg("s")]),
            lambda: p.accept_session("orders", timeout=0.2),
            lambda: p.open_receiver("plain"),
            lambda: p.peek_dead_letters("orders"),
        ]
        for call in calls:
            with pytest.raises(errors.ConnectionFailed) as caught:
                await call()
            seen += [str(caught.value), repr(caught.value), caught.value.message]
            assert caught.value.__cause__ is None
            assert "***" in str(caught.value)
        namespace.unreachable = None
        receiver = await p.accept_session("orders", timeout=0.1)
        assert receiver is None
    finally:
        await p.aclose()
    for record in caplog.records:
        seen.append(record.getMessage())
        if record.exc_info:
            seen.append(logging.Formatter().formatException(record.exc_info))
    assert seen
    for text in seen:
        assert KEY not in text
        assert KEY[:12] not in text


async def test_unreachable_namespace_at_start_is_one_line_connection_failed(namespace: FakeNamespace) -> None:
    """What a worker's start-up sees: one ConnectionFailed line, transient, no key."""
    namespace.unreachable = connection_error_echoing(CONN)
    p = make_provider(namespace)
    try:
        with pytest.raises(errors.ConnectionFailed) as caught:
            await p.describe("orders")
    finally:
        await p.aclose()
    text = str(caught.value)
    assert caught.value.transient
    assert "\n" not in text and KEY not in text
    assert "ServiceBusConnectionError" in text and "describe" in text


def _port_5671_closed() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 5671)) != 0


@pytest.mark.skipif(not _port_5671_closed(), reason="something listens on 127.0.0.1:5671")
async def test_real_sdk_against_a_closed_port_fails_fast_without_the_key() -> None:
    """The real azure-servicebus SDK (AMQP on 5671) pointed at 127.0.0.1: ConnectionFailed."""
    conn = f"Endpoint=sb://127.0.0.1/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY}"
    p = ServiceBusProvider(connection_string=conn, operation_timeout=8.0, retry_total=0)
    start = time.monotonic()
    try:
        with pytest.raises(errors.ConnectionFailed) as caught:
            await p.send("orders", [msg("s")])
    finally:
        await p.aclose()
    assert time.monotonic() - start < 12
    assert KEY not in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.transient


# -- configuration -----------------------------------------------------------------------------


def test_configuration_errors_are_one_line_without_key() -> None:
    with pytest.raises(errors.ConfigurationError, match="connection string"):
        ServiceBusProvider()
    with pytest.raises(errors.ConfigurationError) as bad:
        ServiceBusProvider(connection_string=f"SharedAccessKey={KEY}")
    assert KEY not in str(bad.value)


def test_from_settings_uses_the_connection_string_secret() -> None:
    from queue_runtime.config import AzureSettings, Secret, Settings

    settings = Settings(provider="azure", azure=AzureSettings(connection_string=Secret(CONN)))
    p = ServiceBusProvider.from_settings(settings)
    assert KEY not in repr(p)
    assert "unit-test.servicebus.windows.net" in repr(p)
    mi = ServiceBusProvider.from_settings(
        Settings(
            provider="azure",
            azure=AzureSettings(fully_qualified_namespace="ns.servicebus.windows.net", client_id="abc"),
        )
    )
    assert "azure-identity" in repr(mi)


async def test_session_accepted_after_cancellation_is_closed_not_leaked(
    provider: ServiceBusProvider, namespace: FakeNamespace
) -> None:
    """The SDK finishes accepting a session although the caller was cancelled: the bridge
    hands the late receiver to the discard hook, which closes it and frees the session."""
    await provider.send("orders", [msg("s")])
    namespace.stall("accept", 0.5)
    with trio.move_on_after(0.2) as scope:
        await provider.accept_session("orders", timeout=5)
    assert scope.cancelled_caught
    namespace.stall("accept", 0)
    with trio.fail_after(5):
        while namespace.open_receivers or pending_asyncio_tasks(provider):
            await trio.sleep(0.05)
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None and receiver.session_id == "s"
    (m,) = await receiver.receive(1, 1)
    assert m.delivery_count == 1  # the leaked-then-closed holder never received it
    await receiver.aclose()


async def test_queue_stats_from_runtime_properties(provider: ServiceBusProvider) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    scheduled = Message(b"c", session_id="t", scheduled_enqueue_time=later)
    await provider.send("orders", [msg("s", b"a"), msg("s", b"b"), scheduled])
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    (a,) = await receiver.receive(1, 1)
    await receiver.dead_letter(a, "Bad")
    (b,) = await receiver.receive(1, 1)
    # b is locked: Service Bus still counts it as active, and cannot tell it from a waiting one.
    stats = await provider.queue_stats("orders")
    assert (stats.active, stats.in_flight, stats.scheduled, stats.dead_letter) == (1, None, 1, 1)
    assert stats.oldest_message_age is None  # no broker figure for it
    await receiver.complete(b)
    await receiver.aclose()
    stats = await provider.queue_stats("orders")
    assert (stats.active, stats.scheduled, stats.dead_letter) == (0, 1, 1)


async def test_queue_stats_without_manage_rights_is_empty_and_says_so_once(
    provider: ServiceBusProvider, namespace: FakeNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    refused = core.ClientAuthenticationError(message="Unauthorized: Manage claim required")
    namespace.inject_fault("get_queue_runtime_properties", refused, times=2)
    caplog.set_level(logging.WARNING, logger="queue_runtime")
    assert await provider.queue_stats("orders") == QueueStats(queue="orders")
    assert await provider.queue_stats("orders") == QueueStats(queue="orders")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no queue depth for orders" in warnings[0], warnings
    assert KEY not in caplog.text
    assert (await provider.queue_stats("orders")).active == 0  # rights granted: figures again


_WORKER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from fakes.servicebus import FakeAdministrationClient, FakeNamespace, connection_error_echoing
import queue_runtime.providers.servicebus as servicebus
from queue_runtime import SessionActor, run

namespace = FakeNamespace()
namespace.create_queue("orders")


def from_settings(cls, settings):
    # The real settings path (Secret from the environment); only the SDK client is the fake,
    # and it is unreachable with an error text that echoes the connection string.
    conn = settings.azure.connection_string.get_secret_value()
    namespace.unreachable = connection_error_echoing(conn)
    return cls(
        connection_string=conn,
        client_factory=lambda: namespace.client(conn),
        admin_client_factory=lambda: FakeAdministrationClient(namespace),
    )


servicebus.ServiceBusProvider.from_settings = classmethod(from_settings)

# Speed only: two start-up attempts instead of five (the supervisor's retry schedule has its
# own tests); what matters here is what the worker prints once it gives up.
import queue_runtime.supervisor as supervisor_module
supervisor_module.STARTUP_ATTEMPTS = 2


class Actor(SessionActor[bytes]):
    async def handle(self, message, ctx):
        pass


run(Actor, queue="orders")
"""


@pytest.fixture
def worker_script(tmp_path: Path) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1])))
    return script


async def test_worker_against_unreachable_namespace_exits_with_one_line_and_no_key(
    worker_script: Path,
) -> None:
    """The whole worker path (settings from the environment, create_provider, supervisor
    start-up retries, entrypoint): exits non-zero, one error line, no key, no traceback."""
    import os

    env = {
        **os.environ,
        "QUEUE_PROVIDER": "azure",
        "AZURE_SERVICE_BUS_CONNECTION_STRING": CONN,
        "QUEUE_NAME": "orders",
    }
    result = await trio.run_process(
        [sys.executable, str(worker_script)], env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode not in (0, None)
    assert KEY not in out
    assert "SharedAccessKey=***" in out  # the echoed connection string was redacted, not dropped
    assert "Traceback" not in out
    error_lines = [line for line in out.splitlines() if line.startswith("queue-runtime: error:")]
    assert len(error_lines) == 1, out
    assert "ServiceBusConnectionError" in error_lines[0] or "connect" in error_lines[0].lower()


# -- contention, invariants, end to end ---------------------------------------------------------


async def test_session_contention_on_accept_is_quiet_none(
    provider: ServiceBusProvider, namespace: FakeNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await provider.send("orders", [msg("s")])
    namespace.inject_fault("accept", sb.SessionCannotBeLockedError())
    assert await provider.accept_session("orders", timeout=1) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    receiver = await provider.accept_session("orders", timeout=1)
    assert receiver is not None
    await receiver.aclose()


_KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@settings(max_examples=200, deadline=None)
@given(
    key=st.text(alphabet=_KEY_CHARS, min_size=8, max_size=64).map(lambda k: k + "="),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    template=st.sampled_from(
        [
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=n;SharedAccessKey={key}",
            "SharedAccessKey={key};Endpoint=sb://h/",
            "https://h/q?sv=1&sig={key}&se=2",
            "SharedAccessSignature sr=h&sig={key}&skn=n",
            "(connection string: SharedAccessKey={key})",
        ]
    ),
)
def test_redact_never_leaves_the_key(key: str, before: str, after: str, template: str) -> None:
    text = before + " " + template.format(key=key) + " " + after
    out = redact(text)
    assert key not in out
    assert "\n" not in out and len(out) <= 400


@settings(max_examples=100, deadline=None)
@given(
    properties=st.dictionaries(
        st.one_of(st.binary(max_size=20), st.text(max_size=20)),
        st.one_of(st.binary(max_size=20), st.text(max_size=20), st.integers(), st.booleans()),
        max_size=6,
    ),
    message_id=st.one_of(st.none(), st.text(max_size=200)),
    correlation_id=st.one_of(st.none(), st.text(max_size=300)),
)
def test_received_mapping_never_fails_on_odd_broker_data(
    properties: dict[object, object], message_id: str | None, correlation_id: str | None
) -> None:
    """A foreign producer's odd fields must not make a message undeliverable."""
    from queue_runtime.providers.servicebus import _to_received

    class Odd:
        body = iter([b"a", b"b"])
        application_properties = properties
        session_id = "s"
        delivery_count = 2
        sequence_number = 7
        enqueued_time_utc = datetime(2024, 1, 1)  # naive, as some SDK paths give
        locked_until_utc = None
        time_to_live = None
        scheduled_enqueue_time_utc = None
        content_type = None
        dead_letter_reason = None
        dead_letter_error_description = None
        dead_letter_source = None

    odd = Odd()
    odd.message_id = message_id  # type: ignore[attr-defined]
    odd.correlation_id = correlation_id  # type: ignore[attr-defined]
    received = _to_received(odd, receipt="")
    assert received.message.body == b"ab"
    assert received.delivery_count == 2 and received.sequence_number == 7
    assert received.enqueued_at is not None and received.enqueued_at.tzinfo is not None
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in received.message.properties.items())


async def test_supervisor_end_to_end_order_and_dead_letter(namespace: FakeNamespace) -> None:
    """The real session loop and supervisor over the adapter and the fake: per-session order,
    a DeadLetter reason reaching the dead-letter subqueue, a graceful drain."""
    from queue_runtime import DeadLetter, SessionActor
    from queue_runtime.config import SupervisorConfig
    from queue_runtime.supervisor import Supervisor

    seen: list[tuple[str, int]] = []

    class Actor(SessionActor[bytes]):
        async def handle(self, message: bytes, ctx: object) -> None:
            value = int(message)
            if value < 0:
                raise DeadLetter("NegativeAmount", "amount must be >= 0")
            seen.append((self.session_id, value))

    p = make_provider(namespace)
    try:
        for i in range(6):
            await p.send("orders", [msg(s, str(i if (s, i) != ("b", 3) else -1).encode()) for s in "abc"])
        supervisor = Supervisor(
            p,
            Actor,
            SupervisorConfig(
                queue="orders", session_idle_timeout=0.3, receive_timeout=0.3, max_concurrent_sessions=3
            ),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            with trio.fail_after(15):
                while supervisor.stats().completed + supervisor.stats().dead_lettered < 18:
                    await trio.sleep(0.05)
            supervisor.stop()
        for s in "abc":
            expected = [i for i in range(6) if (s, i) != ("b", 3)]
            assert [v for sid, v in seen if sid == s] == expected
        (dead,) = await p.peek_dead_letters("orders")
        assert (dead.dead_letter_reason, dead.session_id) == ("NegativeAmount", "b")
    finally:
        await p.aclose()
