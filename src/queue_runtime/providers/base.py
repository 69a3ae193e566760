"""The provider interface: what the runtime and the client need from a broker.

A provider is a transport, like an httpx transport: the supervisor, the session loop and
`QueueClient` are written once against these two classes, and each broker adapts to them.

* `Provider` sends, accepts sessions, opens receivers on non-session queues and dead-letter
  queues, peeks and describes queues.
* `Receiver` is what a consumer holds: one session (``session_id`` set; every message it hands
  out belongs to that session, in order) or a whole non-session queue (``session_id`` None).
  It receives, settles (complete / abandon / dead-letter), renews locks, reads and writes
  session state, and is closed to release the session.

Guarantees every implementation keeps (the contract suite in ``tests/contract`` checks them):

* All methods are trio-native and cancellable. A cancelled ``receive`` loses nothing: a
  message the broker handed out but the caller never saw is redelivered when its lock expires
  (or at once, where the broker allows).
* ``receive`` on an empty source waits at most ``timeout`` seconds and returns ``[]``.
* Within a session, messages come out in send order, one holder at a time; an abandoned
  message is delivered again before any later message of its session.
* Settling with a receipt that is no longer valid raises `InvalidReceipt` (or
  `MessageLockLost` / `SessionLockLost` where the broker can tell), and changes nothing.
* Times (``locked_until``) are on trio's clock, ``trio.current_time()``, so tests can run the
  broker model on ``MockClock``; a lock deadline is never later than the broker's.
* Errors are `queue_runtime.errors` types only; SDK exceptions never escape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

import msgspec

from ..errors import NotSupported
from ..message import Message, ReceivedMessage, System, message_size, validate_queue_name
from ..message import validate_session_id as _validate_session_id

__all__ = ["Capabilities", "Provider", "QueueInfo", "QueueStats", "Receiver"]


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider can do, and its limits. The runtime and client adapt to these."""

    system: System
    """The OpenTelemetry ``messaging.system`` value."""
    native_sessions: bool
    """True when the broker has session locks (Service Bus, memory); False for SQS groups."""
    session_state: bool
    """`Receiver.get_state` / `set_state` work."""
    max_batch_count: int
    """Most messages in one send call (SQS 10, Service Bus 100)."""
    max_batch_bytes: int
    """Most bytes in one send call (SQS 256 KiB, Service Bus the message size limit)."""
    max_message_size: int
    """Most bytes in one message, as `Provider.message_size` counts them."""
    max_properties: int | None = None
    """Most application properties per message (SQS: 10 attributes, less our own)."""
    scheduled_messages: bool = True
    abandon_delay: bool = False
    """``abandon(delay=...)`` keeps the message invisible for ``delay`` seconds."""
    max_lock_duration: float | None = None
    """Longest total time a lock can be held (SQS: 12 hours of visibility)."""


class QueueInfo(msgspec.Struct, frozen=True, kw_only=True):
    """How a queue is set up, as far as the provider can tell."""

    name: str
    requires_session: bool
    lock_duration: float | None = None
    max_delivery_count: int | None = None
    dead_letter_queue: str | None = None


class QueueStats(msgspec.Struct, frozen=True, kw_only=True):
    """Depth figures for operators and autoscaling; None where the provider cannot tell.

    What each provider reports (docs/operations.md, "What each provider reports"): memory
    everything; SQS ``active``, ``in_flight``, ``scheduled`` and ``dead_letter`` (when it
    knows the DLQ), approximate; Service Bus ``active`` (locked messages included),
    ``scheduled`` and ``dead_letter``, with Manage rights only.
    """

    queue: str
    active: int | None = None
    """Messages waiting for delivery (Service Bus: its active count, locked messages included)."""
    in_flight: int | None = None
    """Messages delivered and locked (SQS: not visible), not yet settled."""
    scheduled: int | None = None
    """Messages not yet visible: scheduled or delayed."""
    dead_letter: int | None = None
    """Messages in the dead-letter queue."""
    oldest_message_age: float | None = None
    """Seconds since the oldest stored message was enqueued."""


class Receiver(ABC):
    """One consumer's hold on a session, or on a whole non-session queue.

    Use it as an async context manager or call `aclose`: closing releases the session so
    another consumer may accept it. Closing does not settle anything: unsettled messages stay
    locked until their lock expires, so the runtime abandons what it hands back before closing.
    """

    queue: str
    session_id: str | None
    """The session this receiver holds, or None for a non-session queue or a dead-letter queue."""

    release_requested: bool = False
    """Set by the provider when it wants this session's slot for sessions waiting for one, and
    read by the runtime only when a `receive` came back empty: the actor then stops as idle
    without waiting out ``session_idle_timeout`` (once no ``handle()`` of it runs). The SQS
    provider sets it while groups it received wait unclaimed and its poll is held back (see
    its module docstring); other providers never do."""

    @property
    @abstractmethod
    def locked_until(self) -> float | None:
        """The session lock's deadline on trio's clock; None for non-session receivers.

        Never later than the broker's own deadline (a provider that cannot know it exactly
        reports an earlier bound), and ``-inf`` once the receiver knows the lock is gone: the
        runtime starts no ``handle()`` on a lock with less than its safety margin left.
        """

    @abstractmethod
    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        """Up to ``max_messages`` messages, waiting at most ``timeout`` seconds for the first.

        Returns ``[]`` on timeout. Raises `SessionLockLost` once the session lock is gone.
        """

    @abstractmethod
    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message for good. Invalid receipt → `InvalidReceipt`/lock-lost errors."""

    @abstractmethod
    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        """Make the message deliverable again (after ``delay`` seconds where supported).

        The broker counts the delivery: the next delivery has ``delivery_count + 1``.
        """

    @abstractmethod
    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        """Move the message to the dead-letter queue with ``reason`` and ``description``.

        The copy exists in the DLQ before the original is removed; if the move fails, the
        original stays where it was and an error is raised.
        """

    @abstractmethod
    async def renew_lock(self) -> float:
        """Extend the session lock (SQS: the visibility of every message this receiver holds).

        Returns the new deadline on trio's clock. Raises `SessionLockLost` if the broker refuses
        (the lock expired or another consumer holds the session), a transient error if it could
        not be reached. Non-session receivers raise `NotSupported`: use `renew_message_lock`.
        """

    def watch_lock(self, callback: Callable[[BaseException | None], None] | None) -> None:
        """Have ``callback`` called whenever `locked_until` moves earlier other than by time
        passing: with the error when the receiver learns that its lock is gone (SQS: a delete
        another task sent came back refused), with None when it took messages under an earlier
        deadline than the one it had. Called synchronously from trio's thread, by whichever task
        learnt it; None stops the calls.

        The runtime watches every session it runs, so a lock known lost ends the session at
        once (its running ``handle()`` cancelled), not at the renewal or expiry it timed from
        the deadline it saw last. This default keeps nothing: right for a provider whose
        deadline moves only with `renew_lock` and time, which the runtime times itself.
        """
        return None

    async def renew_message_lock(self, message: ReceivedMessage) -> float:
        """Extend one message's lock (non-session receivers). Returns the new deadline.

        Raises `MessageLockLost` when the lock already expired.
        """
        raise NotSupported("this receiver renews its session lock, not message locks")

    async def get_state(self) -> bytes | None:
        """The session's state, or None when never set."""
        raise NotSupported("this provider has no session state")

    async def set_state(self, state: bytes | None) -> None:
        """Replace the session's state (None clears it)."""
        raise NotSupported("this provider has no session state")

    @abstractmethod
    async def aclose(self) -> None:
        """Release the session (or the queue receiver). Idempotent; safe when cancelled."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Provider(ABC):
    """A broker adapter. Use as an async context manager, or call `aclose` when done."""

    capabilities: Capabilities

    @property
    def system(self) -> System:
        return self.capabilities.system

    def validate_queue_name(self, queue: str) -> str:
        """Raise `ValidationError` if ``queue`` breaks this provider's naming rules."""
        return validate_queue_name(queue, self.capabilities.system)

    def validate_session_id(self, session_id: str) -> str:
        """Raise `ValidationError` if ``session_id`` breaks this provider's rules."""
        return _validate_session_id(session_id, self.capabilities.system)

    def message_size(self, message: Message) -> int:
        """The size of ``message`` as this broker counts it against its limits."""
        return message_size(message)

    @abstractmethod
    async def describe(self, queue: str) -> QueueInfo:
        """How ``queue`` is set up. Raises `QueueNotFound`, `AuthenticationFailed`, ...

        The supervisor calls it at start-up, so permanent problems stop start-up with one line.
        """

    @abstractmethod
    async def send(self, queue: str, messages: Sequence[Message]) -> None:
        """Send one batch that fits this provider's limits (`QueueClient` does the chunking).

        Validates everything before any I/O: `MessageTooLarge`, `ValidationError` (a session
        queue needs a session id on every message). All or nothing where the broker allows;
        otherwise a partial failure raises after the successful ones were sent.
        """

    @abstractmethod
    async def accept_session(self, queue: str, *, timeout: float) -> Receiver | None:
        """The next session with available messages that nobody holds, or None after
        ``timeout`` seconds. Raises `NotSupported` on a non-session queue."""

    @abstractmethod
    async def open_receiver(self, queue: str, *, dead_letter: bool = False) -> Receiver:
        """A receiver for a non-session queue, or for ``queue``'s dead-letter queue.

        Raises `NotSupported` for a session queue when ``dead_letter`` is False.
        """

    @abstractmethod
    async def peek_dead_letters(self, queue: str, max_messages: int = 32) -> list[ReceivedMessage]:
        """Up to ``max_messages`` dead-lettered messages of ``queue``, oldest first, unlocked
        (their ``receipt`` is empty) and left in place."""

    async def queue_stats(self, queue: str) -> QueueStats:
        """Depth figures for ``queue``; fields the provider cannot tell are None."""
        return QueueStats(queue=queue)

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead-lettered message of ``queue``; returns how many."""
        removed = 0
        async with await self.open_receiver(queue, dead_letter=True) as receiver:
            while batch := await receiver.receive(self.capabilities.max_batch_count, 0.0):
                for message in batch:
                    await receiver.complete(message)
                    removed += 1
        return removed

    @abstractmethod
    async def aclose(self) -> None:
        """Close connections. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
