"""What users write: a `SessionActor` subclass, and what its ``handle()`` receives.

One actor instance lives per active session: the runtime creates it with no arguments when it
accepts the session, sets ``session_id`` and ``session``, calls ``on_start()``, then
``handle()`` once per message — strictly in order by default — and finally ``on_stop(reason)``
with one of ``"idle"``, ``"shutdown"``, ``"lock_lost"`` or ``"error"``. Attributes set on the
instance are the session's state for as long as the actor lives; use `SessionHandle` for
state that must survive the actor (where the provider supports session state).
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, overload

from .codec import Decoder, make_decoder
from .errors import ConfigurationError
from .redaction import redact

if TYPE_CHECKING:
    from .message import ReceivedMessage
    from .providers.base import Receiver

__all__ = ["DeadLetter", "MessageContext", "SessionActor", "SessionHandle", "StopReason"]

T = TypeVar("T")

StopReason = typing.Literal["idle", "shutdown", "lock_lost", "error"]


@overload
def _redacted(text: str) -> str: ...
@overload
def _redacted(text: None) -> None: ...
def _redacted(text: str | None) -> str | None:
    """``text`` through `redact` (a dead-letter reason or description is stored, then shown)."""
    return redact(text) if isinstance(text, str) else text


class DeadLetter(Exception):
    """Raise from ``handle()`` to dead-letter the message at once, without retrying.

    ``reason`` is a short machine-readable code (``"NegativeAmount"``); ``description`` is a
    human-readable sentence. Neither should contain personal data from the body. Both are
    redacted (`queue_runtime.redaction.redact`: configured secrets and credential patterns are
    masked) before they are stored in the dead-letter queue.
    """

    def __init__(self, reason: str, description: str | None = None) -> None:
        if not isinstance(reason, str) or not reason:
            raise ValueError("DeadLetter needs a non-empty reason")
        reason = redact(reason)
        description = redact(description) if isinstance(description, str) else description
        super().__init__(reason if description is None else f"{reason}: {description}")
        self.reason = reason
        self.description = description


class SessionHandle:
    """The session as the broker sees it: its persistent state (bytes or None).

    ``get_state``/``set_state`` raise `queue_runtime.errors.NotSupported` on providers without
    session state (SQS).
    """

    __slots__ = ("_get", "_set", "session_id")

    def __init__(
        self,
        session_id: str,
        get_state: Callable[[], Awaitable[bytes | None]],
        set_state: Callable[[bytes | None], Awaitable[None]],
    ) -> None:
        self.session_id = session_id
        self._get = get_state
        self._set = set_state

    async def get_state(self) -> bytes | None:
        """The session's state, or None when never set."""
        return await self._get()

    async def set_state(self, state: bytes | None) -> None:
        """Replace the session's state; None clears it."""
        await self._set(state)

    def __repr__(self) -> str:
        return f"SessionHandle(session_id={self.session_id!r})"


class _ReceiverHandle(SessionHandle):
    """The runtime's `SessionHandle`: calls its receiver's methods when asked, instead of
    keeping two bound methods (two more objects per live session for the garbage collector)."""

    __slots__ = ("_receiver",)

    def __init__(self, session_id: str, receiver: Receiver) -> None:
        self.session_id = session_id
        self._receiver = receiver

    async def get_state(self) -> bytes | None:
        return await self._receiver.get_state()

    async def set_state(self, state: bytes | None) -> None:
        await self._receiver.set_state(state)


class MessageContext:
    """Metadata of the message being handled, and what ``handle()`` may do with it.

    ``attempt`` is 1 on the first ``handle()`` call for this delivery and grows with in-place
    retries; ``delivery_count`` is the broker's count and does not change across them.
    ``properties`` is the handler's own copy: changing it changes nothing elsewhere.
    """

    __slots__ = (
        "_content_type",
        "_correlation_id",
        "_dead_letter",
        "_delivery_count",
        "_enqueued_at",
        "_message_id",
        "_properties",
        "_renew_lock",
        "_session_id",
        "attempt",
        "settled",
    )

    def __init__(
        self,
        *,
        message_id: str,
        session_id: str | None,
        correlation_id: str | None,
        delivery_count: int,
        enqueued_at: datetime | None,
        properties: Mapping[str, str],
        content_type: str | None,
        attempt: int,
        dead_letter: Callable[[str, str | None], Awaitable[None]],
        renew_lock: Callable[[], Awaitable[None]],
    ) -> None:
        self._message_id = message_id
        self._session_id = session_id
        self._correlation_id = correlation_id
        self._delivery_count = delivery_count
        self._enqueued_at = enqueued_at
        self._properties: dict[str, str] | None = dict(properties)
        self._content_type = content_type
        self.attempt = attempt
        self.settled = False
        self._dead_letter = dead_letter
        self._renew_lock = renew_lock

    @property
    def message_id(self) -> str:
        return self._message_id

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def correlation_id(self) -> str | None:
        return self._correlation_id

    @property
    def delivery_count(self) -> int:
        return self._delivery_count

    @property
    def enqueued_at(self) -> datetime | None:
        return self._enqueued_at

    @property
    def properties(self) -> dict[str, str]:
        assert self._properties is not None
        return self._properties

    @property
    def content_type(self) -> str | None:
        return self._content_type

    async def dead_letter(self, reason: str, description: str | None = None) -> None:
        """Dead-letter this message now. ``handle()`` may return afterwards; the runtime will
        not complete or retry it. Calling it twice is an error. ``reason`` and ``description``
        are redacted like `DeadLetter`'s."""
        if self.settled:
            raise RuntimeError(f"message {self.message_id} is already settled")
        await self._dead_letter(_redacted(reason), _redacted(description))
        self.settled = True

    async def renew_lock(self) -> None:
        """Renew the session lock now (the runtime also renews it on its own)."""
        await self._renew_lock()

    def __repr__(self) -> str:
        return (
            f"MessageContext(message_id={self.message_id!r}, session_id={self.session_id!r},"
            f" attempt={self.attempt}, delivery_count={self.delivery_count})"
        )


class _Settler(Protocol):
    """What a `_DeliveredContext` calls back: its `queue_runtime.session.Session`."""

    async def _dead_letter(self, message: ReceivedMessage, reason: str, description: str | None) -> None: ...

    async def _renew_now(self) -> None: ...


class _DeliveredContext(MessageContext):
    """The runtime's context for one attempt at a delivered message: its fields are read from
    the delivery when asked for (building them one by one, and a dead-letter closure, was ~7%
    of the CPU per message), and ``properties`` is copied on first use."""

    # The session itself rather than two bound methods of it: those would be two more objects
    # per live session, and a reference cycle through it.
    __slots__ = ("_delivery", "_session")

    def __init__(self, delivery: ReceivedMessage, attempt: int, session: _Settler) -> None:
        self._delivery = delivery
        self.attempt = attempt
        self.settled = False
        self._session = session
        self._properties = None

    @property
    def message_id(self) -> str:
        return self._delivery.message.message_id

    @property
    def session_id(self) -> str | None:
        return self._delivery.message.session_id

    @property
    def correlation_id(self) -> str | None:
        return self._delivery.message.correlation_id

    @property
    def delivery_count(self) -> int:
        return self._delivery.delivery_count

    @property
    def enqueued_at(self) -> datetime | None:
        return self._delivery.enqueued_at

    @property
    def properties(self) -> dict[str, str]:
        properties = self._properties
        if properties is None:
            properties = self._properties = dict(self._delivery.message.properties)
        return properties

    @property
    def content_type(self) -> str | None:
        return self._delivery.message.content_type

    async def dead_letter(self, reason: str, description: str | None = None) -> None:
        if self.settled:
            raise RuntimeError(f"message {self.message_id} is already settled")
        await self._session._dead_letter(self._delivery, _redacted(reason), _redacted(description))
        self.settled = True

    async def renew_lock(self) -> None:
        await self._session._renew_now()


class SessionActor(Generic[T]):
    """Subclass this and implement ``handle()``. ``T`` is the body type.

    Example::

        class OrderActor(SessionActor[OrderEvent]):
            async def on_start(self) -> None:
                self.total = 0

            async def handle(self, event: OrderEvent, ctx: MessageContext) -> None:
                if event.amount < 0:
                    raise DeadLetter("NegativeAmount", "amount must be >= 0")
                self.total += event.amount

    Exceptions from ``handle()`` are retried in place by the same instance (see
    `RetryPolicy`), then dead-lettered with reason ``MaxAttemptsExceeded``. ``handle()`` may be
    cancelled (lock lost, shutdown grace over): keep it cancellation-safe.
    """

    session_id: str
    session: SessionHandle

    __body_type__: ClassVar[Any] = bytes
    __decoder__: ClassVar[Decoder]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        body_type = _declared_body_type(cls)
        if body_type is not None:
            cls.__body_type__ = body_type
        try:
            cls.__decoder__ = make_decoder(cls.__body_type__)
        except TypeError as error:
            raise ConfigurationError(
                f"{cls.__qualname__}: body type {cls.__body_type__!r} cannot be decoded: {error}"
            ) from None

    async def on_start(self) -> None:
        """Called once after the session is accepted, before the first ``handle()``."""

    async def handle(self, message: T, ctx: MessageContext) -> None:
        """Process one message. Return to complete it; raise to retry; raise `DeadLetter`
        to dead-letter it."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement handle()")

    async def on_stop(self, reason: str) -> None:
        """Called once when the actor stops: "idle", "shutdown", "lock_lost" or "error"."""


def _declared_body_type(cls: type) -> Any | None:
    """``T`` from the nearest ``SessionActor[T]`` base, or None when not given."""
    for klass in cls.__mro__:
        for base in klass.__dict__.get("__orig_bases__", ()):
            origin = typing.get_origin(base)
            if isinstance(origin, type) and issubclass(origin, SessionActor):
                args = typing.get_args(base)
                if args and not isinstance(args[0], TypeVar):
                    return args[0]
    return None
