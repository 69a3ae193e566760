"""A fake of the ``azure.servicebus.aio`` surface the Service Bus adapter uses.

It runs on the adapter's asyncio loop (it is called through the bridge exactly like the SDK)
and raises the SDK's real exception classes. State lives in a `FakeNamespace` (the broker):
queues with sessions, session locks and state, peek-lock with lock expiry, delivery counts,
max delivery count → dead-letter subqueue, TTL, scheduled messages and the "no session
available" `OperationTimeoutError` after ``max_wait_time``.

All broker state is guarded by one ``threading.RLock`` so tests may poke it from the trio
thread (inject faults, lose locks) while the loop thread serves the adapter. Waiting receivers
poll the state every few milliseconds (a fake's convenience; the adapter above makes one call).

Fault injection: `FakeNamespace.inject_fault` (next N calls of an operation raise),
`FakeNamespace.unreachable` (every call raises a connection error), `lose_session_lock`,
`delay` (an operation hangs for a while: cancellation tests).

Keys: once `FakeNamespace.rotate_key` is called, only the keys it was given are accepted. A
client whose connection string holds another ``SharedAccessKey`` is refused
(`ServiceBusAuthenticationError`) when it opens a new link: a receiver (accepting a session
included), a sender, a management call. Links opened before the rotation keep working until
they close, as Service Bus's do until their token is renewed. `sdk_classes` gives stand-ins for
``ServiceBusClient`` and ``ServiceBusAdministrationClient`` whose ``from_connection_string``
builds clients of this namespace, for tests that patch them into the SDK's modules.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusMessageBatch,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthenticationError,
    ServiceBusConnectionError,
    ServiceBusError,
    SessionLockLostError,
)

__all__ = ["FakeAdministrationClient", "FakeNamespace", "FakeServiceBusClient"]

_POLL = 0.01
MAX_MESSAGE_BYTES = 256 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Entry:
    seq: int
    body: bytes
    message_id: str | None
    session_id: str | None
    correlation_id: str | None
    content_type: str | None
    application_properties: dict[Any, Any]
    enqueued: datetime
    visible_at: datetime
    expires_at: datetime | None
    time_to_live: timedelta | None
    deliveries: int = 0
    lock_token: str | None = None
    locked_until: datetime | None = None
    holder: object | None = None
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    dead_letter_source: str | None = None


@dataclass
class _Session:
    holder: object | None = None
    locked_until: datetime | None = None
    state: bytes | None = None


@dataclass
class _Queue:
    name: str
    requires_session: bool
    lock_duration: float
    max_delivery_count: int
    dead_lettering_on_message_expiration: bool
    active: list[_Entry] = field(default_factory=list)
    dlq: list[_Entry] = field(default_factory=list)
    sessions: dict[str, _Session] = field(default_factory=dict)


class FakeReceivedMessage:
    """What the SDK's ``ServiceBusReceivedMessage`` exposes and the adapter reads."""

    def __init__(self, entry: _Entry, *, peeked: bool = False) -> None:
        self._body = entry.body
        self.message_id = entry.message_id
        self.session_id = entry.session_id
        self.correlation_id = entry.correlation_id
        self.content_type = entry.content_type
        # The SDK hands application properties back with bytes keys and values (AMQP).
        self.application_properties = {
            (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
            for k, v in entry.application_properties.items()
        } or None
        self.delivery_count = entry.deliveries
        self.enqueued_time_utc = entry.enqueued
        self.sequence_number = entry.seq
        self.time_to_live = entry.time_to_live
        self.scheduled_enqueue_time_utc = entry.visible_at if entry.visible_at > entry.enqueued else None
        self.dead_letter_reason = entry.dead_letter_reason
        self.dead_letter_error_description = entry.dead_letter_description
        self.dead_letter_source = entry.dead_letter_source
        self.lock_token = None if peeked else entry.lock_token
        self.locked_until_utc = None if peeked else entry.locked_until
        self._settled = False
        self._entry = entry

    @property
    def body(self) -> Iterable[bytes]:
        # Like the SDK for a DATA body: an iterable of byte sections.
        return iter([self._body])

    def __str__(self) -> str:
        return self._body.decode("utf-8", "replace")


class FakeNamespace:
    """The broker: queues, sessions, locks. Thread-safe; time from ``clock`` (+ `advance`)."""

    def __init__(
        self,
        *,
        host: str = "fake.servicebus.windows.net",
        clock: Callable[[], datetime] = _utcnow,
        max_message_size: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.host = host
        self._clock = clock
        self._offset = timedelta()
        self.max_message_size = max_message_size
        self.lock = threading.RLock()
        self.queues: dict[str, _Queue] = {}
        self._seq = itertools.count(1)
        self.calls: Counter[str] = Counter()
        self.faults: dict[str, list[Callable[[], BaseException]]] = {}
        self.delays: dict[str, float] = {}
        self.stalls: dict[str, float] = {}
        self.unreachable: Callable[[], BaseException] | None = None
        self.clients_created = 0
        self.open_receivers = 0
        self.open_senders = 0
        #: SharedAccessKey values accepted; None: any (until `rotate_key`).
        self.keys: set[str] | None = None
        #: New links refused because their key was rotated away.
        self.auth_failures = 0
        #: The connection string of every client created, in order.
        self.connection_strings: list[str | None] = []

    # -- test controls ---------------------------------------------------------------------
    def now(self) -> datetime:
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the broker's clock forward (lock expiry without waiting)."""
        with self.lock:
            self._offset += timedelta(seconds=seconds)

    def create_queue(
        self,
        name: str,
        *,
        requires_session: bool = True,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        dead_lettering_on_message_expiration: bool = False,
    ) -> None:
        with self.lock:
            self.queues[name] = _Queue(
                name,
                requires_session,
                lock_duration,
                max_delivery_count,
                dead_lettering_on_message_expiration,
            )

    def inject_fault(
        self, operation: str, error: BaseException | Callable[[], BaseException], times: int = 1
    ) -> None:
        """The next ``times`` calls of ``operation`` raise ``error`` (an instance or factory).

        Operations: ``client``, ``open_receiver``, ``accept``, ``receive``, ``complete``,
        ``abandon``, ``dead_letter``, ``renew_lock``, ``renew_message_lock``, ``get_state``,
        ``set_state``, ``peek``, ``open_sender``, ``send``, ``get_queue``.
        """
        factory = error if callable(error) and not isinstance(error, BaseException) else (lambda: error)
        with self.lock:
            self.faults.setdefault(operation, []).extend([factory] * times)  # type: ignore[list-item]

    def delay(self, operation: str, seconds: float) -> None:
        """Every call of ``operation`` first sleeps ``seconds`` (0 removes the delay)."""
        with self.lock:
            self.delays[operation] = seconds

    def stall(self, operation: str, seconds: float) -> None:
        """``operation`` finishes its work, then takes ``seconds`` more and ignores cancellation
        meanwhile (an SDK completing an AMQP attach it already started). Only ``accept``."""
        with self.lock:
            self.stalls[operation] = seconds

    async def _stall(self, operation: str) -> None:
        with self.lock:
            seconds = self.stalls.get(operation, 0.0)
        if not seconds:
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                continue  # swallowed: the result will arrive anyway

    def rotate_key(self, old: str, new: str) -> None:
        """Regenerate a key: ``old`` is refused for new links from now on, ``new`` accepted
        (with any key accepted before, other than ``old``)."""
        with self.lock:
            keys = set(self.keys) if self.keys is not None else {old}
            keys.discard(old)
            keys.add(new)
            self.keys = keys

    def authorize(self, connection_string: str | None) -> None:
        """Raise `ServiceBusAuthenticationError` if a new link made with ``connection_string``
        would be refused (its key was rotated away). Clients built without a connection string
        (``client_factory`` in tests) are always accepted."""
        with self.lock:
            if self.keys is None or connection_string is None:
                return
            key = _key_of(connection_string)
            if key in self.keys:
                return
            self.auth_failures += 1
        raise ServiceBusAuthenticationError(
            message="Unauthorized access. 'Listen' claim(s) are required to perform this operation"
            " (put-token: the SharedAccessKey is not valid)."
        )

    def sdk_classes(self) -> tuple[type, type]:
        """``(ServiceBusClient, ServiceBusAdministrationClient)`` stand-ins whose
        ``from_connection_string`` builds clients of this namespace."""
        namespace = self

        class ServiceBusClient:
            @staticmethod
            def from_connection_string(conn_str: str, **_: Any) -> FakeServiceBusClient:
                return namespace.client(conn_str)

        class ServiceBusAdministrationClient:
            @staticmethod
            def from_connection_string(conn_str: str, **_: Any) -> FakeAdministrationClient:
                return FakeAdministrationClient(namespace, connection_string=conn_str)

        return ServiceBusClient, ServiceBusAdministrationClient

    def lose_session_lock(self, queue: str, session_id: str) -> None:
        """Another receiver "stole" the session: the holder's lock is gone."""
        with self.lock:
            session = self.queues[queue].sessions.get(session_id)
            if session is not None and session.holder is not None:
                self._release_session(self.queues[queue], session_id, session, count_delivery=True)

    def session_state(self, queue: str, session_id: str) -> bytes | None:
        with self.lock:
            session = self.queues[queue].sessions.get(session_id)
            return None if session is None else session.state

    def depth(self, queue: str) -> tuple[int, int]:
        """(active messages incl. locked, dead-lettered)."""
        with self.lock:
            q = self.queues[queue]
            self._sweep(q)
            return len(q.active), len(q.dlq)

    # -- broker internals (call with the lock held) ----------------------------------------
    async def _enter(self, operation: str) -> None:
        with self.lock:
            self.calls[operation] += 1
            delay = self.delays.get(operation, 0.0)
        if delay:
            await asyncio.sleep(delay)
        with self.lock:
            if self.unreachable is not None:
                raise self.unreachable()
            pending = self.faults.get(operation)
            if pending:
                raise pending.pop(0)()

    def _queue(self, name: str) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            raise MessagingEntityNotFoundError(
                message=f"The messaging entity '{self.host}/{name}' could not be found.",
                condition=b"amqp:not-found",
            )
        return q

    def _sweep(self, q: _Queue) -> None:
        now = self.now()
        for sid, session in list(q.sessions.items()):
            if (
                session.holder is not None
                and session.locked_until is not None
                and session.locked_until <= now
            ):
                self._release_session(q, sid, session, count_delivery=True)
        for entry in list(q.active):
            # In a session queue the session lock covers its messages (released above).
            expired = entry.locked_until is not None and entry.locked_until <= now
            if not q.requires_session and entry.holder is not None and expired:
                self._return(q, entry)
            if entry.expires_at is not None and entry.expires_at <= now and entry.holder is None:
                q.active.remove(entry)
                if q.dead_lettering_on_message_expiration:
                    entry.dead_letter_reason = "TTLExpiredException"
                    entry.dead_letter_description = "The message expired and was dead lettered."
                    q.dlq.append(entry)
        for entry in list(q.dlq):
            if entry.holder is not None and entry.locked_until is not None and entry.locked_until <= now:
                entry.holder = entry.lock_token = entry.locked_until = None

    def _return(self, q: _Queue, entry: _Entry) -> None:
        """A delivered message comes back (abandon, lock expiry, session release)."""
        entry.holder = entry.lock_token = entry.locked_until = None
        if entry.deliveries >= q.max_delivery_count:
            q.active.remove(entry)
            entry.dead_letter_reason = "MaxDeliveryCountExceeded"
            entry.dead_letter_description = (
                f"Message could not be consumed after {q.max_delivery_count} delivery attempts."
            )
            q.dlq.append(entry)

    def _release_session(self, q: _Queue, sid: str, session: _Session, *, count_delivery: bool) -> None:
        holder = session.holder
        session.holder = None
        session.locked_until = None
        for entry in list(q.active):
            if entry.session_id == sid and entry.holder is holder and holder is not None:
                self._return(q, entry)

    def _available(self, q: _Queue, session_id: str | None) -> list[_Entry]:
        now = self.now()
        return [
            e
            for e in q.active
            if e.holder is None and e.visible_at <= now and (session_id is None or e.session_id == session_id)
        ]

    def _next_session(self, q: _Queue) -> str | None:
        for entry in self._available(q, None):
            session = q.sessions.get(entry.session_id or "")
            if session is None or session.holder is None:
                return entry.session_id
        return None

    def _enqueue(self, q: _Queue, message: ServiceBusMessage) -> None:
        if q.requires_session and not message.session_id:
            raise ServiceBusError(
                "The SessionId was not set on a message, and it cannot be sent to the entity."
                " Entities that have session support enabled can only receive messages that have"
                " the SessionId set to a valid value."
            )
        body = message.body
        if not isinstance(body, (bytes, bytearray)):
            body = b"".join(body) if not isinstance(body, str) else body.encode()
        props = dict(message.application_properties or {})
        size = len(body) + sum(len(str(k)) + len(str(v)) for k, v in props.items())
        if size > self.max_message_size:
            raise MessageSizeExceededError(
                message=f"The received message (delivery-id:0, size:{size} bytes) exceeds the limit"
                f" ({self.max_message_size} bytes) currently allowed on the link."
            )
        now = self.now()
        scheduled = message.scheduled_enqueue_time_utc
        ttl = message.time_to_live
        q.active.append(
            _Entry(
                seq=next(self._seq),
                body=bytes(body),
                message_id=message.message_id,
                session_id=message.session_id,
                correlation_id=message.correlation_id,
                content_type=message.content_type,
                application_properties=props,
                enqueued=now,
                visible_at=scheduled if scheduled is not None and scheduled > now else now,
                expires_at=(now + ttl) if ttl else None,
                time_to_live=ttl,
            )
        )

    def client(self, connection_string: str | None = None) -> FakeServiceBusClient:
        return FakeServiceBusClient(self, connection_string=connection_string)


class FakeSession:
    """``receiver.session`` of a session receiver."""

    def __init__(self, receiver: FakeReceiver, session_id: str) -> None:
        self._receiver = receiver
        self.session_id = session_id
        self.locked_until_utc: datetime | None = None

    def _check(self) -> tuple[_Queue, _Session]:
        ns = self._receiver._ns
        q = ns._queue(self._receiver._queue_name)
        ns._sweep(q)
        session = q.sessions.get(self.session_id)
        if session is None or session.holder is not self._receiver:
            raise SessionLockLostError(message="The session lock has expired on the MessageSession.")
        return q, session

    async def renew_lock(self, *, timeout: float | None = None) -> datetime:
        ns = self._receiver._ns
        await ns._enter("renew_lock")
        with ns.lock:
            q, session = self._check()
            session.locked_until = ns.now() + timedelta(seconds=q.lock_duration)
            for entry in q.active:
                if entry.holder is self._receiver:
                    entry.locked_until = session.locked_until
            self.locked_until_utc = session.locked_until
            return session.locked_until

    async def get_state(self, *, timeout: float | None = None) -> bytes | None:
        ns = self._receiver._ns
        await ns._enter("get_state")
        with ns.lock:
            _, session = self._check()
            return session.state

    async def set_state(self, state: bytes | str | None, *, timeout: float | None = None) -> None:
        ns = self._receiver._ns
        await ns._enter("set_state")
        with ns.lock:
            _, session = self._check()
            session.state = (
                state.encode() if isinstance(state, str) else (None if state is None else bytes(state))
            )


class FakeReceiver:
    """``ServiceBusReceiver``: session, non-session or dead-letter subqueue receiver."""

    def __init__(
        self,
        client: FakeServiceBusClient,
        queue_name: str,
        *,
        session_id: Any = None,
        sub_queue: Any = None,
        max_wait_time: float | None = None,
        prefetch_count: int = 0,
    ) -> None:
        self._client = client
        self._ns = client._ns
        self._queue_name = queue_name
        self._requested_session = session_id
        self._dead_letter = sub_queue in (ServiceBusSubQueue.DEAD_LETTER, "deadletter")
        self._max_wait_time = max_wait_time
        self.prefetch_count = prefetch_count
        self._session: FakeSession | None = None
        self._open = False
        self._closed = False

    @property
    def session(self) -> FakeSession:
        if self._session is None:
            raise AttributeError("session")
        return self._session

    def _check_live(self) -> None:
        if self._closed:
            raise ValueError("The handler has already been shutdown.")
        if not self._open:
            raise ValueError("The receiver is not open")

    async def __aenter__(self) -> FakeReceiver:
        ns = self._ns
        if self._closed:
            raise ValueError("The handler has already been shutdown.")
        await ns._enter("open_receiver")
        ns.authorize(self._client._connection_string)
        with ns.lock:
            q = ns._queue(self._queue_name)
            if not q.requires_session and self._requested_session is not None:
                raise ServiceBusError(
                    "A sessionful message receiver cannot be created on an entity that does not require"
                    " sessions. Ensure RequiresSession is set to true when creating a Queue or Subscription"
                    " to enable sessionful behavior."
                )
            if q.requires_session and not self._dead_letter and self._requested_session is None:
                raise ServiceBusError(
                    "It is not possible for an entity that requires sessions to create a non-sessionful"
                    " message receiver."
                )
        if self._requested_session is not None and not self._dead_letter:
            await ns._enter("accept")
            deadline = time.monotonic() + (self._max_wait_time if self._max_wait_time is not None else 60.0)
            while True:
                with ns.lock:
                    q = ns._queue(self._queue_name)
                    ns._sweep(q)
                    if self._requested_session is NEXT_AVAILABLE_SESSION:
                        sid = ns._next_session(q)
                    else:
                        sid = str(self._requested_session)
                        s = q.sessions.get(sid)
                        if s is not None and s.holder is not None:
                            sid = None
                    if sid is not None:
                        session = q.sessions.setdefault(sid, _Session())
                        session.holder = self
                        session.locked_until = ns.now() + timedelta(seconds=q.lock_duration)
                        self._session = FakeSession(self, sid)
                        self._session.locked_until_utc = session.locked_until
                        break
                if time.monotonic() >= deadline:
                    # What the SDK raises when no session frees up within max_wait_time.
                    raise OperationTimeoutError(
                        message="Failed to initiate the connection due to exception: no session available",
                        condition=b"com.microsoft:timeout",
                    )
                await asyncio.sleep(_POLL)
            await ns._stall("accept")
        with ns.lock:
            self._open = True
            ns.open_receivers += 1
            self._client._children.add(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        ns = self._ns
        with ns.lock:
            if self._closed:
                return
            self._closed = True
            if self._open:
                ns.open_receivers -= 1
            self._client._children.discard(self)
            q = ns.queues.get(self._queue_name)
            if q is not None and self._session is not None:
                session = q.sessions.get(self._session.session_id)
                if session is not None and session.holder is self:
                    ns._release_session(q, self._session.session_id, session, count_delivery=True)
            elif q is not None:
                for entry in list(q.dlq if self._dead_letter else q.active):
                    if entry.holder is self:
                        if self._dead_letter:
                            entry.holder = entry.lock_token = entry.locked_until = None
                        else:
                            ns._return(q, entry)

    async def receive_messages(
        self, max_message_count: int | None = 1, max_wait_time: float | None = None
    ) -> list[FakeReceivedMessage]:
        self._check_live()
        if max_wait_time is not None and max_wait_time <= 0:
            raise ValueError("The max_wait_time must be greater than 0.")
        if max_message_count is not None and max_message_count <= 0:
            raise ValueError("The max_message_count must be greater than 0")
        if self.prefetch_count:
            raise AssertionError("the adapter must not prefetch (order after abandon)")
        ns = self._ns
        await ns._enter("receive")
        wait = max_wait_time if max_wait_time is not None else (self._max_wait_time or 60.0)
        deadline = time.monotonic() + wait
        count = max_message_count or 1
        while True:
            with ns.lock:
                q = ns._queue(self._queue_name)
                ns._sweep(q)
                out: list[FakeReceivedMessage] = []
                if self._dead_letter:
                    for entry in q.dlq:
                        if entry.holder is None and len(out) < count:
                            self._lock(entry, q)
                            out.append(FakeReceivedMessage(entry))
                elif self._session is not None:
                    self.session._check()
                    for entry in ns._available(q, self._session.session_id)[:count]:
                        entry.deliveries += 1
                        entry.holder = self
                        entry.lock_token = str(uuid.uuid4())
                        entry.locked_until = q.sessions[self._session.session_id].locked_until
                        out.append(FakeReceivedMessage(entry))
                else:
                    for entry in ns._available(q, None)[:count]:
                        entry.deliveries += 1
                        self._lock(entry, q)
                        out.append(FakeReceivedMessage(entry))
                if out:
                    return out
            if time.monotonic() >= deadline:
                return []
            await asyncio.sleep(_POLL)

    def _lock(self, entry: _Entry, q: _Queue) -> None:
        entry.holder = self
        entry.lock_token = str(uuid.uuid4())
        entry.locked_until = self._ns.now() + timedelta(seconds=q.lock_duration)

    def _settle_target(self, message: FakeReceivedMessage, action: str) -> tuple[_Queue, _Entry]:
        if message._settled:
            raise MessageAlreadySettled(action=action)
        ns = self._ns
        q = ns._queue(self._queue_name)
        ns._sweep(q)
        if self._session is not None:
            self.session._check()
        entry = message._entry
        box = q.dlq if self._dead_letter else q.active
        if entry not in box or entry.lock_token != message.lock_token or entry.holder is not self:
            if self._session is not None:
                raise SessionLockLostError(message="The session lock has expired on the MessageSession.")
            raise MessageLockLostError()
        return q, entry

    async def complete_message(self, message: FakeReceivedMessage) -> None:
        self._check_live()
        ns = self._ns
        await ns._enter("complete")
        with ns.lock:
            q, entry = self._settle_target(message, "complete")
            (q.dlq if self._dead_letter else q.active).remove(entry)
            message._settled = True

    async def abandon_message(self, message: FakeReceivedMessage) -> None:
        self._check_live()
        ns = self._ns
        await ns._enter("abandon")
        with ns.lock:
            q, entry = self._settle_target(message, "abandon")
            message._settled = True
            if self._dead_letter:
                entry.holder = entry.lock_token = entry.locked_until = None
            else:
                ns._return(q, entry)

    async def dead_letter_message(
        self, message: FakeReceivedMessage, reason: str | None = None, error_description: str | None = None
    ) -> None:
        self._check_live()
        ns = self._ns
        await ns._enter("dead_letter")
        with ns.lock:
            q, entry = self._settle_target(message, "dead-letter")
            message._settled = True
            if self._dead_letter:
                return  # dead-lettering a dead letter is a no-op in the broker
            q.active.remove(entry)
            entry.holder = entry.lock_token = entry.locked_until = None
            entry.dead_letter_reason = reason
            entry.dead_letter_description = error_description
            q.dlq.append(entry)

    async def renew_message_lock(
        self, message: FakeReceivedMessage, *, timeout: float | None = None
    ) -> datetime:
        self._check_live()
        if self._session is not None:
            raise TypeError("Renewing message lock is an invalid operation when working with sessions.")
        ns = self._ns
        await ns._enter("renew_message_lock")
        with ns.lock:
            q, entry = self._settle_target(message, "renew")
            entry.locked_until = ns.now() + timedelta(seconds=q.lock_duration)
            message.locked_until_utc = entry.locked_until
            return entry.locked_until

    async def peek_messages(
        self, max_message_count: int = 1, *, sequence_number: int = 0, timeout: float | None = None
    ) -> list[FakeReceivedMessage]:
        self._check_live()
        ns = self._ns
        await ns._enter("peek")
        with ns.lock:
            q = ns._queue(self._queue_name)
            ns._sweep(q)
            box = q.dlq if self._dead_letter else q.active
            if self._session is not None:
                box = [e for e in box if e.session_id == self._session.session_id]
            return [FakeReceivedMessage(e, peeked=True) for e in box if e.seq >= sequence_number][
                :max_message_count
            ]


class FakeSender:
    """``ServiceBusSender`` for one queue."""

    def __init__(self, client: FakeServiceBusClient, queue_name: str) -> None:
        self._client = client
        self._ns = client._ns
        self._queue_name = queue_name
        self._open = False
        self._closed = False

    async def __aenter__(self) -> FakeSender:
        await self._ns._enter("open_sender")
        self._ns.authorize(self._client._connection_string)
        with self._ns.lock:
            self._ns._queue(self._queue_name)
            self._open = True
            self._ns.open_senders += 1
            self._client._children.add(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        with self._ns.lock:
            if self._closed:
                return
            self._closed = True
            if self._open:
                self._ns.open_senders -= 1
            self._client._children.discard(self)

    async def create_message_batch(self, max_size_in_bytes: int | None = None) -> ServiceBusMessageBatch:
        if self._closed:
            raise ValueError("The handler has already been shutdown.")
        # The SDK's own batch (pure Python, no connection needed): real size accounting.
        return ServiceBusMessageBatch(max_size_in_bytes=max_size_in_bytes or self._ns.max_message_size)

    async def send_messages(
        self, message: ServiceBusMessage | Iterable[ServiceBusMessage] | ServiceBusMessageBatch, **_: Any
    ) -> None:
        if self._closed:
            raise ValueError("The handler has already been shutdown.")
        ns = self._ns
        await ns._enter("send")
        if isinstance(message, ServiceBusMessageBatch):
            messages = list(message._messages)
        elif isinstance(message, ServiceBusMessage):
            messages = [message]
        else:
            messages = list(message)
        with ns.lock:
            q = ns._queue(self._queue_name)
            # All or nothing, like one AMQP transfer.
            snapshot = list(q.active)
            try:
                for m in messages:
                    ns._enqueue(q, m)
            except BaseException:
                q.active[:] = snapshot
                raise


class FakeServiceBusClient:
    """``azure.servicebus.aio.ServiceBusClient`` over a `FakeNamespace`."""

    def __init__(self, namespace: FakeNamespace, *, connection_string: str | None = None) -> None:
        self._ns = namespace
        self._connection_string = connection_string
        self._children: set[FakeReceiver | FakeSender] = set()
        self.closed = False
        with namespace.lock:
            namespace.clients_created += 1
            namespace.connection_strings.append(connection_string)
            namespace.calls["client"] += 1
            if namespace.unreachable is not None:
                pass  # like the SDK: creating the client does no I/O; the first call fails

    @property
    def fully_qualified_namespace(self) -> str:
        return self._ns.host

    def get_queue_receiver(
        self,
        queue_name: str,
        *,
        session_id: Any = None,
        sub_queue: Any = None,
        max_wait_time: float | None = None,
        prefetch_count: int = 0,
        **_: Any,
    ) -> FakeReceiver:
        if self.closed:
            raise ValueError("The client has been closed.")
        return FakeReceiver(
            self,
            queue_name,
            session_id=session_id,
            sub_queue=sub_queue,
            max_wait_time=max_wait_time,
            prefetch_count=prefetch_count,
        )

    def get_queue_sender(self, queue_name: str, **_: Any) -> FakeSender:
        if self.closed:
            raise ValueError("The client has been closed.")
        return FakeSender(self, queue_name)

    async def close(self) -> None:
        self.closed = True
        for child in list(self._children):
            await child.close()

    async def __aenter__(self) -> FakeServiceBusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class FakeQueueProperties:
    """The fields of ``azure.servicebus.management.QueueProperties`` the adapter reads."""

    name: str
    requires_session: bool
    lock_duration: timedelta
    max_delivery_count: int
    dead_lettering_on_message_expiration: bool


class FakeAdministrationClient:
    """``azure.servicebus.aio.management.ServiceBusAdministrationClient`` (``get_queue`` only)."""

    def __init__(self, namespace: FakeNamespace, *, connection_string: str | None = None) -> None:
        self._ns = namespace
        self._connection_string = connection_string

    async def get_queue(self, queue_name: str, **_: Any) -> FakeQueueProperties:
        await self._ns._enter("get_queue")
        self._ns.authorize(self._connection_string)
        with self._ns.lock:
            q = self._ns._queue(queue_name)
            return FakeQueueProperties(
                name=q.name,
                requires_session=q.requires_session,
                lock_duration=timedelta(seconds=q.lock_duration),
                max_delivery_count=q.max_delivery_count,
                dead_lettering_on_message_expiration=q.dead_lettering_on_message_expiration,
            )

    async def get_queue_runtime_properties(self, queue_name: str, **_: Any) -> FakeQueueRuntimeProperties:
        await self._ns._enter("get_queue_runtime_properties")
        self._ns.authorize(self._connection_string)
        with self._ns.lock:
            q = self._ns._queue(queue_name)
            self._ns._sweep(q)
            now = self._ns.now()
            scheduled = sum(1 for e in q.active if e.visible_at > now)
            return FakeQueueRuntimeProperties(
                name=q.name,
                # Like Service Bus: locked messages still count as active.
                active_message_count=len(q.active) - scheduled,
                scheduled_message_count=scheduled,
                dead_letter_message_count=len(q.dlq),
                total_message_count=len(q.active) + len(q.dlq),
            )

    async def close(self) -> None:
        return None


@dataclass
class FakeQueueRuntimeProperties:
    """The fields of ``azure.servicebus.management.QueueRuntimeProperties`` the adapter reads."""

    name: str
    active_message_count: int
    scheduled_message_count: int
    dead_letter_message_count: int
    total_message_count: int


def _key_of(connection_string: str) -> str | None:
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "sharedaccesskey":
            return value.strip()
    return None


def connection_error_echoing(connection_string: str) -> Callable[[], BaseException]:
    """A connection error whose text echoes the connection string, as a careless SDK might."""

    def make() -> BaseException:
        return ServiceBusConnectionError(
            message=f"Failed to initiate the connection due to exception: [Errno 111] Connection refused"
            f" (connection string: {connection_string})"
        )

    return make
