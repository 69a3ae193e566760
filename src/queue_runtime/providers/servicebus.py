"""Azure Service Bus: native sessions through ``azure.servicebus.aio``, adapted to trio.

The SDK is asyncio-only. It runs on a private asyncio loop in one daemon thread
(`_asyncio_bridge.AsyncioThread`); every SDK call is a coroutine scheduled there, and trio
awaits it without holding a worker thread. Cancelling the trio side cancels the asyncio task
and waits (bounded, real time) for its clean-up; a session receiver accepted just as the caller
gave up is closed, not leaked.

Guarantees beyond `providers.base`:

* One ``ServiceBusClient`` per provider (one AMQP connection, reused by every receiver and the
  cached senders), created on the loop at first use.
* ``accept_session`` uses ``NEXT_AVAILABLE_SESSION`` with ``max_wait_time=timeout``; the SDK's
  "no session available" ``OperationTimeoutError`` means "nothing to do": ``None`` is returned
  and only a DEBUG record is written, so a quiet queue neither logs errors nor spins.
* Receivers never prefetch (``prefetch_count=0``): a prefetched message could be delivered
  out of order after an abandon.
* SDK exceptions are mapped to `queue_runtime.errors` with the right ``transient`` flag, in
  one line, with any ``SharedAccessKey=``/``sig=`` value (and the configured key itself)
  redacted; SDK exceptions are not chained, so a traceback cannot echo the key either.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import trio

from ..errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    InvalidReceipt,
    MessageLockLost,
    MessageTooLarge,
    NotSupported,
    QueueError,
    QueueFull,
    QueueNotFound,
    SessionLockLost,
    Throttled,
    Timeout,
    ValidationError,
)
from ..message import Message, ReceivedMessage, validate_message_id
from ._asyncio_bridge import AsyncioThread, BridgeClosed
from .base import Capabilities, Provider, QueueInfo, QueueStats, Receiver

if TYPE_CHECKING:
    from ..config import Settings
    from ..secrets import CredentialSource

__all__ = ["PREMIUM_MAX_MESSAGE_SIZE", "STANDARD_MAX_MESSAGE_SIZE", "ServiceBusProvider", "redact"]

logger = logging.getLogger("queue_runtime.providers.servicebus")

STANDARD_MAX_MESSAGE_SIZE = 256 * 1024
PREMIUM_MAX_MESSAGE_SIZE = 1024 * 1024
MAX_BATCH_COUNT = 100
# The SDK refuses max_wait_time <= 0; a "do not wait" receive waits this long instead.
_MIN_WAIT = 0.05
# Lock tokens of messages handed out and not yet settled, per receiver. A session receiver
# holds at most what the runtime prefetches; the bound protects against a caller that never
# settles (the oldest entries fall out and then settle as InvalidReceipt).
_MAX_OUTSTANDING = 4096
_DEAD_LETTER_TEXT_LIMIT = 4096

_SECRET_PATTERN = re.compile(
    r"(?i)(SharedAccessKey|SharedAccessSignature|AccountKey|sig|client_secret|password)=([^;&\s\"',)\]}<>]+)"
)


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with key material removed: ``SharedAccessKey=...`` values, SAS ``sig=``
    values and any of ``secrets`` found verbatim; on one line and at most 400 characters."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _SECRET_PATTERN.sub(lambda m: f"{m.group(1)}=***", text)
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."


def _key_of(connection_string: str | None) -> str | None:
    if not connection_string:
        return None
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() in ("sharedaccesskey", "sharedaccesssignature") and value:
            return value.strip()
    return None


def _host_of(connection_string: str) -> str | None:
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "endpoint":
            return value.strip().removeprefix("sb://").removeprefix("amqps://").rstrip("/") or None
    return None


class _Clock:
    """Converts the broker's UTC datetimes to trio's clock."""

    @staticmethod
    def to_trio(when: datetime | None) -> float | None:
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return trio.current_time() + (when - datetime.now(UTC)).total_seconds()


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _body_bytes(body: Any) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    if body is None:
        return b""
    # A DATA body is an iterable of byte sections.
    return b"".join(bytes(section) if not isinstance(section, str) else section.encode() for section in body)


def _to_received(sdk: Any, *, receipt: str, session_receiver: bool = False) -> ReceivedMessage:
    """Map an SDK ``ServiceBusReceivedMessage`` to ours. Never fails on odd broker data."""
    properties: dict[str, str] = {}
    for key, value in (getattr(sdk, "application_properties", None) or {}).items():
        name = _text(key)
        if name:
            properties[name] = _text(value)
    sequence_number = getattr(sdk, "sequence_number", None)
    message_id = getattr(sdk, "message_id", None)
    try:
        message_id = validate_message_id(_text(message_id)) if message_id else None
    except ValidationError:
        message_id = None
    if message_id is None:
        message_id = f"sb-sequence-{sequence_number}"
    correlation_id = getattr(sdk, "correlation_id", None)
    if correlation_id is not None:
        correlation_id = _text(correlation_id)[:128]
    ttl = getattr(sdk, "time_to_live", None)
    ttl_seconds = ttl.total_seconds() if isinstance(ttl, timedelta) and ttl.total_seconds() > 0 else None
    scheduled = getattr(sdk, "scheduled_enqueue_time_utc", None)
    if isinstance(scheduled, datetime) and scheduled.tzinfo is None:
        scheduled = scheduled.replace(tzinfo=UTC)
    session_id = getattr(sdk, "session_id", None)
    content_type = getattr(sdk, "content_type", None)
    try:
        message = Message(
            body=_body_bytes(sdk.body),
            session_id=_text(session_id) if session_id else None,
            message_id=message_id,
            correlation_id=correlation_id,
            properties=properties,
            content_type=_text(content_type) if content_type else None,
            time_to_live=ttl_seconds,
            scheduled_enqueue_time=scheduled if isinstance(scheduled, datetime) else None,
        )
    except ValidationError:
        # A foreign producer's odd field must not make the message undeliverable.
        message = Message(body=_body_bytes(sdk.body), message_id=message_id)
    enqueued = getattr(sdk, "enqueued_time_utc", None)
    if isinstance(enqueued, datetime) and enqueued.tzinfo is None:
        enqueued = enqueued.replace(tzinfo=UTC)
    return ReceivedMessage(
        message=message,
        receipt=receipt,
        delivery_count=int(getattr(sdk, "delivery_count", None) or 1),
        enqueued_at=enqueued if isinstance(enqueued, datetime) else None,
        sequence_number=sequence_number,
        locked_until=_Clock.to_trio(getattr(sdk, "locked_until_utc", None)) if receipt else None,
        dead_letter_reason=getattr(sdk, "dead_letter_reason", None),
        dead_letter_description=getattr(sdk, "dead_letter_error_description", None),
        dead_letter_source=getattr(sdk, "dead_letter_source", None),
    )


def _count(props: Any, name: str) -> int | None:
    """An SDK count property as an int, or None when absent (the SDK's fields are Optional)."""
    value = getattr(props, name, None)
    return int(value) if isinstance(value, int) else None


def _to_sdk_message(message: Message) -> Any:
    from azure.servicebus import ServiceBusMessage

    return ServiceBusMessage(
        message.body,
        session_id=message.session_id,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        application_properties=dict(message.properties) or None,  # type: ignore[arg-type]
        content_type=message.content_type,
        time_to_live=timedelta(seconds=message.time_to_live) if message.time_to_live else None,
        scheduled_enqueue_time_utc=message.scheduled_enqueue_time,
    )


class ServiceBusProvider(Provider):
    """Azure Service Bus through ``azure.servicebus.aio`` on a private asyncio thread.

    Authenticate with ``connection_string`` or with ``fully_qualified_namespace`` plus a
    ``credential`` (default: ``azure.identity.aio.DefaultAzureCredential``, which covers
    managed identity; ``client_id`` selects a user-assigned identity). ``client_factory`` (a
    callable run on the loop, returning a ``ServiceBusClient``-shaped object) and
    ``admin_client_factory`` let tests inject a fake. ``max_message_size`` is 256 KiB
    (Standard); pass `PREMIUM_MAX_MESSAGE_SIZE` for Premium. ``operation_timeout`` bounds
    each SDK call in real seconds (``accept_session`` and ``receive`` add their wait).
    ``retry_total`` is the SDK's own retry count per call (small: the runtime retries too).

    ``credentials`` (a `queue_runtime.secrets.SecretResolver`) makes the provider follow a
    rotated connection string: when the broker refuses the credential it asks for a re-read,
    and when the connection string changed (then, or at a periodic re-read) the next call
    builds a new client with it; the refused error is then transient, so callers retry.
    Receivers and senders already open keep the old client (their links stay authorised
    until they close): live sessions are not dropped. Old clients are closed with the provider.
    """

    def __init__(
        self,
        *,
        connection_string: str | None = None,
        fully_qualified_namespace: str | None = None,
        credential: Any = None,
        client_id: str | None = None,
        tenant_id: str | None = None,
        client_factory: Callable[[], Any] | None = None,
        admin_client_factory: Callable[[], Any] | None = None,
        max_message_size: int = STANDARD_MAX_MESSAGE_SIZE,
        operation_timeout: float = 60.0,
        retry_total: int = 2,
        cancel_grace: float = 5.0,
        credentials: CredentialSource | None = None,
    ) -> None:
        if client_factory is None and not connection_string and not fully_qualified_namespace:
            raise ConfigurationError(
                "Azure Service Bus needs a connection string (AZURE_SERVICE_BUS_CONNECTION_STRING)"
                " or a fully qualified namespace for managed identity"
            )
        if connection_string is not None and "endpoint=" not in connection_string.lower():
            raise ConfigurationError(
                "the Azure Service Bus connection string has no Endpoint=sb://... part (value not shown)"
            )
        if not isinstance(max_message_size, int) or max_message_size < 1024:
            raise ConfigurationError(f"max_message_size must be an integer >= 1024, got {max_message_size!r}")
        self._connection_string = connection_string
        self._secret = _key_of(connection_string)
        self._namespace = fully_qualified_namespace or (
            _host_of(connection_string) if connection_string else None
        )
        self._credential = credential
        self._client_id = client_id
        self._tenant_id = tenant_id
        self._client_factory = client_factory
        self._admin_client_factory = admin_client_factory
        self._operation_timeout = operation_timeout
        self._retry_total = retry_total
        self.capabilities = Capabilities(
            system="azure_service_bus",
            native_sessions=True,
            session_state=True,
            max_batch_count=MAX_BATCH_COUNT,
            max_batch_bytes=max_message_size,
            max_message_size=max_message_size,
            abandon_delay=False,
            scheduled_messages=True,
        )
        self._bridge = AsyncioThread(name="queue-runtime-servicebus", cancel_grace=cancel_grace)
        self._client: Any = None
        self._owned_credential: Any = None
        self._admin: Any = None
        self._stats_unavailable: set[str] = set()
        self._client_lock = trio.Lock()
        self._senders: dict[str, Any] = {}
        self._requires_session: dict[str, bool | None] = {}
        self._receivers: set[_ServiceBusReceiver] = set()
        self._closed = False
        self._credentials = credentials
        self._retired: list[Any] = []  # clients (and their senders) of rotated-away credentials

    @classmethod
    def from_settings(
        cls, settings: Settings, *, credentials: CredentialSource | None = None
    ) -> ServiceBusProvider:
        """Build from `Settings.azure`: the connection string when set, else the namespace
        with azure-identity (``client_id`` picks a user-assigned managed identity)."""
        azure = settings.azure
        secret = azure.connection_string
        return cls(
            connection_string=secret.get_secret_value() if secret is not None else None,
            fully_qualified_namespace=azure.fully_qualified_namespace,
            client_id=azure.client_id,
            tenant_id=azure.tenant_id,
            credentials=credentials,
        )

    def __repr__(self) -> str:
        auth = "connection string" if self._connection_string else "azure-identity"
        return f"ServiceBusProvider(namespace={self._namespace!r}, auth={auth})"

    # -- plumbing --------------------------------------------------------------------------
    @property
    def bridge(self) -> AsyncioThread:
        return self._bridge

    def _map(self, exc: BaseException, operation: str, queue: str | None = None) -> QueueError:
        return map_error(
            exc, operation=operation, queue=queue, secrets=(self._secret, self._connection_string)
        )

    async def _call(
        self,
        operation: str,
        queue: str | None,
        fn: Callable[..., Any],
        *args: Any,
        wait: float = 0.0,
        discard: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Run ``fn(*args)`` on the loop; map every failure to `queue_runtime.errors`."""
        if self._closed:
            raise ConnectionFailed("the Service Bus provider is closed", transient=False)
        try:
            return await self._bridge.run(fn, *args, discard=discard, timeout=self._operation_timeout + wait)
        except QueueError:
            raise
        except Exception as exc:
            error = self._map(exc, operation, queue)
        if isinstance(error, AuthenticationFailed) and self._credentials is not None:
            # A rotated key? Re-read the secrets; if the connection string changed, the next
            # call connects with the new one, so this failure is worth retrying.
            await self._credentials.refresh_after_failure()
            if self._rotated():
                error.transient = True
        raise error from None

    def _rotated(self) -> bool:
        """Whether the credential source holds a connection string other than the one in use."""
        if self._credentials is None:
            return False
        secret = self._credentials.settings.azure.connection_string
        value = secret.get_secret_value() if secret is not None else None
        return bool(value) and value != self._connection_string

    async def _ensure_client(self) -> Any:
        if self._client is not None and not self._rotated():
            return self._client
        async with self._client_lock:
            if self._rotated():
                # New links use a client with the new connection string; open receivers and
                # in-flight calls keep the old one (closed with the provider).
                secret = self._credentials.settings.azure.connection_string  # type: ignore[union-attr]
                assert secret is not None
                self._connection_string = secret.get_secret_value()
                self._secret = _key_of(self._connection_string)
                old = [self._client, self._admin, *self._senders.values()]
                self._retired.extend(handle for handle in old if handle is not None)
                self._client = self._admin = None
                self._senders.clear()
            if self._client is None:
                self._client = await self._call("connect", None, self._create_client)
        return self._client

    async def _create_client(self) -> Any:
        """On the loop: one ServiceBusClient per provider."""
        if self._client_factory is not None:
            return self._client_factory()
        from azure.servicebus.aio import ServiceBusClient

        if self._connection_string:
            return ServiceBusClient.from_connection_string(
                self._connection_string, retry_total=self._retry_total
            )
        credential = self._credential
        if credential is None:
            try:
                from azure.identity.aio import DefaultAzureCredential
            except ImportError as exc:  # pragma: no cover - the azure extra includes it
                raise ConfigurationError(
                    "managed identity needs azure-identity: pip install 'queue-runtime[azure]'"
                ) from exc
            kwargs: dict[str, Any] = {}
            if self._client_id:
                kwargs["managed_identity_client_id"] = self._client_id
            if self._tenant_id:
                kwargs["additionally_allowed_tenants"] = [self._tenant_id]
            credential = self._owned_credential = DefaultAzureCredential(**kwargs)
        return ServiceBusClient(self._namespace or "", credential, retry_total=self._retry_total)

    # -- Provider --------------------------------------------------------------------------
    async def describe(self, queue: str) -> QueueInfo:
        """Queue settings from the management API (needs Manage rights). Without them the
        queue's existence and our access are checked by opening a sender, and the session
        requirement is reported as True (what this runtime is for)."""
        self.validate_queue_name(queue)
        await self._ensure_client()

        async def get_properties() -> Any:
            if self._admin is None:
                self._admin = self._make_admin()
            return await self._admin.get_queue(queue)

        try:
            props = await self._call("describe", queue, get_properties)
        except (AuthenticationFailed, NotSupported):
            logger.debug("no Manage rights to describe queue %s; checking access with a sender", queue)
            await self._sender(queue)
            return QueueInfo(name=queue, requires_session=True)
        lock = getattr(props, "lock_duration", None)
        info = QueueInfo(
            name=queue,
            requires_session=bool(props.requires_session),
            lock_duration=lock.total_seconds() if isinstance(lock, timedelta) else None,
            max_delivery_count=getattr(props, "max_delivery_count", None),
            dead_letter_queue=f"{queue}/$DeadLetterQueue",
        )
        self._requires_session[queue] = info.requires_session
        return info

    async def queue_stats(self, queue: str) -> QueueStats:
        """The queue's runtime properties from the management API (Manage rights).

        ``active`` is Service Bus's ``active_message_count``, which counts **locked** (in-flight)
        messages too: Service Bus cannot tell waiting from locked, so ``in_flight`` stays None
        (a worker holds at most ``max_concurrent_sessions`` sessions' worth of locked messages,
        small next to a backlog). ``scheduled`` and ``dead_letter`` are the scheduled and
        dead-letter counts; ``oldest_message_age`` is None (no broker figure tells it). Without
        Manage rights every figure is None, and a WARNING says so once per queue.
        """
        self.validate_queue_name(queue)
        await self._ensure_client()

        async def runtime_properties() -> Any:
            if self._admin is None:
                self._admin = self._make_admin()
            return await self._admin.get_queue_runtime_properties(queue)

        try:
            props = await self._call("queue_stats", queue, runtime_properties)
        except (AuthenticationFailed, NotSupported) as exc:
            if queue not in self._stats_unavailable:
                self._stats_unavailable.add(queue)
                logger.warning(
                    "no queue depth for %s: the management API refused (%s); the queue_depth and"
                    " queue_dead_letter_depth gauges stay absent (grant Manage rights, or use Azure"
                    " Monitor's ActiveMessages/DeadletteredMessages metrics)",
                    queue,
                    type(exc).__name__,
                )
            return QueueStats(queue=queue)
        return QueueStats(
            queue=queue,
            active=_count(props, "active_message_count"),
            scheduled=_count(props, "scheduled_message_count"),
            dead_letter=_count(props, "dead_letter_message_count"),
        )

    def _make_admin(self) -> Any:
        """On the loop: the management client (queue properties)."""
        if self._admin_client_factory is not None:
            return self._admin_client_factory()
        if self._client_factory is not None:
            raise NotSupported("no administration client configured for this provider")
        from azure.servicebus.aio.management import ServiceBusAdministrationClient

        if self._connection_string:
            return ServiceBusAdministrationClient.from_connection_string(
                self._connection_string, retry_total=self._retry_total
            )
        credential = self._credential or self._owned_credential
        return ServiceBusAdministrationClient(
            self._namespace or "", credential, retry_total=self._retry_total
        )

    async def _sender(self, queue: str) -> Any:
        client = await self._ensure_client()

        async def open_sender() -> Any:
            sender = self._senders.get(queue)
            if sender is None:
                sender = client.get_queue_sender(queue)
                await sender.__aenter__()
                self._senders[queue] = sender
            return sender

        return await self._call("open_sender", queue, open_sender)

    async def send(self, queue: str, messages: Sequence[Message]) -> None:
        """Send up to 100 messages, all validated before any I/O. One message: one
        ``send_messages``; several: SDK batches filled until the SDK's own size accounting says
        full (each batch is one transfer). A failure after the first batch raises with the
        earlier batches sent."""
        self.validate_queue_name(queue)
        messages = list(messages)
        if not messages:
            return
        if len(messages) > MAX_BATCH_COUNT:
            raise ValidationError(
                f"a Service Bus send takes at most {MAX_BATCH_COUNT} messages, got {len(messages)}"
            )
        requires_session = self._requires_session.get(queue)
        if requires_session is None and any(m.session_id is None for m in messages if isinstance(m, Message)):
            # Learn (once per queue) whether the queue needs a session id, so a bad batch is
            # refused before any I/O; without Manage rights the broker refuses it instead.
            try:
                requires_session = (await self.describe(queue)).requires_session
            except AuthenticationFailed:
                requires_session = None
            if queue not in self._requires_session:
                requires_session = None
        limit = self.capabilities.max_message_size
        for message in messages:
            if not isinstance(message, Message):
                raise ValidationError(f"send takes Message objects, got {type(message).__name__}")
            size = self.message_size(message)
            if size > limit:
                raise MessageTooLarge(size, limit)
            if message.session_id is not None:
                self.validate_session_id(message.session_id)
            elif requires_session:
                raise ValidationError(
                    f"queue {queue!r} requires sessions: message {message.message_id!r} has no session_id"
                )
        sdk_messages = [_to_sdk_message(m) for m in messages]
        sender = await self._sender(queue)

        async def send_all() -> None:
            from azure.servicebus.exceptions import MessageSizeExceededError

            if len(sdk_messages) == 1:
                await sender.send_messages(sdk_messages[0])
                return
            batch = await sender.create_message_batch(max_size_in_bytes=limit)
            for sdk_message in sdk_messages:
                try:
                    batch.add_message(sdk_message)
                except MessageSizeExceededError:
                    if len(batch) == 0:
                        raise
                    await sender.send_messages(batch)
                    batch = await sender.create_message_batch(max_size_in_bytes=limit)
                    batch.add_message(sdk_message)
            if len(batch):
                await sender.send_messages(batch)

        try:
            await self._call("send", queue, send_all)
        except ValidationError as exc:
            if "size" in str(exc).lower() or "larger" in str(exc).lower():
                biggest = max(self.message_size(m) for m in messages)
                raise MessageTooLarge(biggest, limit, what="message (as encoded by the SDK)") from None
            raise
        except QueueError:
            # The sender may be broken (a shut-down handler does not recover): open a fresh
            # one next time. The client, and so the connection, stays.
            await self._drop_sender(queue, sender)
            raise

    async def _drop_sender(self, queue: str, sender: Any) -> None:
        if self._senders.get(queue) is sender:
            del self._senders[queue]

        async def close() -> None:
            await sender.close()

        with trio.CancelScope(shield=True):
            try:
                await self._call("close_sender", queue, close)
            except QueueError as exc:
                logger.debug("closing a Service Bus sender failed: %s", exc.error_type)

    async def accept_session(self, queue: str, *, timeout: float) -> Receiver | None:
        """The next free session with messages, or None after ``timeout`` seconds (quietly)."""
        self.validate_queue_name(queue)
        if self._requires_session.get(queue) is False:
            raise NotSupported(f"queue {queue!r} does not require sessions: use open_receiver")
        client = await self._ensure_client()
        wait = max(timeout, _MIN_WAIT)

        async def accept() -> Any:
            from azure.servicebus import NEXT_AVAILABLE_SESSION
            from azure.servicebus.exceptions import OperationTimeoutError, SessionCannotBeLockedError

            receiver = client.get_queue_receiver(
                queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=wait, prefetch_count=0
            )
            try:
                await receiver.__aenter__()
            except (OperationTimeoutError, SessionCannotBeLockedError):
                # No session with messages is free: "nothing to do", not an error.
                await receiver.close()
                return None
            except BaseException:
                await receiver.close()
                raise
            return receiver

        async def close_late(receiver: Any) -> None:
            if receiver is not None:
                await receiver.close()

        try:
            sdk_receiver = await self._call("accept_session", queue, accept, wait=wait, discard=close_late)
        except QueueError as exc:
            if "does not require sessions" in str(exc):
                self._requires_session[queue] = False
                raise NotSupported(f"queue {queue!r} does not require sessions: use open_receiver") from None
            raise
        if sdk_receiver is None:
            logger.debug("no session available on %s within %.1f s", queue, wait)
            return None
        session = sdk_receiver.session
        receiver = _ServiceBusReceiver(
            self, queue, sdk_receiver, session_id=str(session.session_id), session=session
        )
        receiver._locked_until = _Clock.to_trio(session.locked_until_utc)
        self._receivers.add(receiver)
        return receiver

    async def open_receiver(self, queue: str, *, dead_letter: bool = False) -> Receiver:
        self.validate_queue_name(queue)
        if not dead_letter and self._requires_session.get(queue):
            raise NotSupported(f"queue {queue!r} requires sessions: use accept_session")
        client = await self._ensure_client()

        async def open_() -> Any:
            from azure.servicebus import ServiceBusSubQueue

            receiver = client.get_queue_receiver(
                queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER if dead_letter else None, prefetch_count=0
            )
            try:
                await receiver.__aenter__()
            except BaseException:
                await receiver.close()
                raise
            return receiver

        async def close_late(receiver: Any) -> None:
            await receiver.close()

        try:
            sdk_receiver = await self._call("open_receiver", queue, open_, discard=close_late)
        except QueueError as exc:
            if "requires sessions" in str(exc):
                self._requires_session[queue] = True
                raise NotSupported(f"queue {queue!r} requires sessions: use accept_session") from None
            raise
        receiver = _ServiceBusReceiver(self, queue, sdk_receiver, session_id=None, session=None)
        receiver.is_dead_letter = dead_letter
        self._receivers.add(receiver)
        return receiver

    async def peek_dead_letters(self, queue: str, max_messages: int = 32) -> list[ReceivedMessage]:
        if max_messages < 1:
            raise ValidationError(f"max_messages must be >= 1, got {max_messages}")
        async with await self.open_receiver(queue, dead_letter=True) as receiver:
            assert isinstance(receiver, _ServiceBusReceiver)
            sdk_receiver = receiver._sdk

            async def peek() -> list[Any]:
                # The service may return fewer than asked per call: page by sequence number.
                out: list[Any] = []
                next_sequence = 0
                while len(out) < max_messages:
                    batch = list(
                        await sdk_receiver.peek_messages(
                            max_message_count=max_messages - len(out), sequence_number=next_sequence
                        )
                    )
                    if not batch:
                        break
                    out.extend(batch)
                    last = batch[-1].sequence_number
                    if last is None:
                        break
                    next_sequence = last + 1
                return out

            peeked = await self._call("peek_dead_letters", queue, peek)
        return [_to_received(m, receipt="") for m in peeked]

    async def aclose(self) -> None:
        """Close receivers, senders, the client and the loop thread (bounded). Idempotent."""
        if self._closed:
            return
        self._closed = True
        receivers = list(self._receivers)
        senders = list(self._senders.values())
        client, admin, credential = self._client, self._admin, self._owned_credential
        retired, self._retired = self._retired, []

        async def close_all() -> None:
            for handle in [*(r._sdk for r in receivers), *senders, admin, client, *retired, credential]:
                if handle is None:
                    continue
                try:
                    await handle.close()
                except Exception as exc:
                    logger.debug("closing a Service Bus handle failed: %s", type(exc).__name__)

        with trio.CancelScope(shield=True):
            try:
                if self._bridge.running:
                    await self._bridge.run(close_all, timeout=self._bridge.cancel_grace)
            except (Exception, BridgeClosed) as exc:
                logger.debug("closing the Service Bus client failed: %s", type(exc).__name__)
            finally:
                for receiver in receivers:
                    receiver._closed = True
                self._receivers.clear()
                self._senders.clear()
                await self._bridge.aclose(timeout=self._bridge.cancel_grace)


class _ServiceBusReceiver(Receiver):
    """A session receiver (``session`` set) or a queue / dead-letter receiver."""

    def __init__(
        self, provider: ServiceBusProvider, queue: str, sdk: Any, *, session_id: str | None, session: Any
    ) -> None:
        self.queue = queue
        self.session_id = session_id
        self.is_dead_letter = False
        self._provider = provider
        self._sdk = sdk
        self._session = session
        self._locked_until: float | None = None
        self._lost = False  # the broker said the session lock is gone
        self._outstanding: OrderedDict[str, Any] = OrderedDict()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ServiceBusReceiver queue={self.queue!r} session_id={self.session_id!r}>"

    @property
    def locked_until(self) -> float | None:
        """The session lock's deadline as of the accept or the last renewal (the broker's UTC
        time on trio's clock), ``-inf`` once the broker reported the lock lost (by any call,
        a receive in flight included), None for queue receivers."""
        if self._lost:
            return -math.inf
        return self._locked_until

    async def _call(self, operation: str, fn: Callable[..., Any], *args: Any, wait: float = 0.0) -> Any:
        """`ServiceBusProvider._call` for this receiver: a lost session lock is remembered."""
        try:
            return await self._provider._call(operation, self.queue, fn, *args, wait=wait)
        except SessionLockLost:
            if self._session is not None:
                self._lost = True
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidReceipt(f"the receiver for {self.queue!r} is closed")

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        self._check_open()
        if max_messages < 1:
            raise ValidationError(f"max_messages must be >= 1, got {max_messages}")
        wait = max(timeout, _MIN_WAIT)
        sdk = self._sdk

        async def receive() -> list[Any]:
            return list(await sdk.receive_messages(max_message_count=max_messages, max_wait_time=wait))

        # Messages received by a cancelled call stay locked and are redelivered after expiry.
        batch = await self._call("receive", receive, wait=wait)
        out: list[ReceivedMessage] = []
        for sdk_message in batch:
            receipt = str(sdk_message.lock_token)
            self._outstanding[receipt] = sdk_message
            while len(self._outstanding) > _MAX_OUTSTANDING:
                self._outstanding.popitem(last=False)
            out.append(_to_received(sdk_message, receipt=receipt))
        return out

    def _lookup(self, message: ReceivedMessage) -> Any:
        self._check_open()
        sdk_message = self._outstanding.get(message.receipt) if message.receipt else None
        if sdk_message is None:
            raise InvalidReceipt(
                f"message {message.message_id!r}: unknown or already settled receipt on this receiver"
            )
        return sdk_message

    async def _settle(
        self, operation: str, message: ReceivedMessage, fn: Callable[..., Any], *args: Any
    ) -> None:
        sdk_message = self._lookup(message)
        try:
            await self._call(operation, fn, sdk_message, *args)
        except (InvalidReceipt, MessageLockLost, SessionLockLost):
            # Final: this token will never settle again.
            self._outstanding.pop(message.receipt, None)
            raise
        self._outstanding.pop(message.receipt, None)

    async def complete(self, message: ReceivedMessage) -> None:
        await self._settle("complete", message, self._sdk.complete_message)

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        # Service Bus has no abandon delay (capabilities.abandon_delay is False).
        await self._settle("abandon", message, self._sdk.abandon_message)

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        sdk = self._sdk

        async def dead_letter(sdk_message: Any) -> None:
            await sdk.dead_letter_message(
                sdk_message,
                reason=reason[:_DEAD_LETTER_TEXT_LIMIT],
                error_description=description[:_DEAD_LETTER_TEXT_LIMIT] if description else None,
            )

        await self._settle("dead_letter", message, dead_letter)

    async def renew_lock(self) -> float:
        self._check_open()
        if self._session is None:
            raise NotSupported("this receiver holds no session: use renew_message_lock")
        session = self._session

        async def renew() -> datetime:
            return await session.renew_lock()  # type: ignore[no-any-return]

        when = await self._call("renew_lock", renew)
        self._locked_until = _Clock.to_trio(when)
        assert self._locked_until is not None
        return self._locked_until

    async def renew_message_lock(self, message: ReceivedMessage) -> float:
        if self._session is not None:
            raise NotSupported("a session receiver renews its session lock: use renew_lock")
        sdk_message = self._lookup(message)
        sdk = self._sdk

        async def renew() -> datetime:
            return await sdk.renew_message_lock(sdk_message)  # type: ignore[no-any-return]

        try:
            when = await self._call("renew_message_lock", renew)
        except (MessageLockLost, InvalidReceipt):
            self._outstanding.pop(message.receipt, None)
            raise
        locked_until = _Clock.to_trio(when)
        assert locked_until is not None
        return locked_until

    async def get_state(self) -> bytes | None:
        self._check_open()
        if self._session is None:
            raise NotSupported("session state needs a session receiver")
        session = self._session

        async def get() -> Any:
            return await session.get_state()

        state = await self._call("get_state", get)
        return None if state is None else bytes(state)

    async def set_state(self, state: bytes | None) -> None:
        self._check_open()
        if self._session is None:
            raise NotSupported("session state needs a session receiver")
        if state is not None and not isinstance(state, (bytes, bytearray)):
            raise ValidationError(f"session state must be bytes or None, got {type(state).__name__}")
        session = self._session

        async def set_() -> None:
            await session.set_state(state)

        await self._call("set_state", set_)

    async def aclose(self) -> None:
        """Release the session (unsettled messages return to the queue). Idempotent; the
        close runs shielded, bounded by the provider's operation timeout."""
        if self._closed:
            return
        self._closed = True
        self._outstanding.clear()
        self._provider._receivers.discard(self)
        sdk = self._sdk

        async def close() -> None:
            await sdk.close()

        with trio.CancelScope(shield=True):
            try:
                await self._provider._call("close", self.queue, close)
            except QueueError as exc:
                logger.debug("closing a Service Bus receiver failed: %s", exc)


# -- error mapping -----------------------------------------------------------------------------


def map_error(
    exc: BaseException,
    *,
    operation: str,
    queue: str | None = None,
    secrets: Sequence[str | None] = (),
) -> QueueError:
    """The `queue_runtime.errors` equivalent of an SDK / azure-core / OS exception.

    One line: what failed, where, the SDK's exception type and its (redacted) text.
    """
    if isinstance(exc, QueueError):
        return exc
    where = f"Service Bus {operation}" + (f" on queue {queue!r}" if queue else "")
    detail = redact(str(exc), *secrets) or "no detail"
    text = f"{where} failed: {type(exc).__name__}: {detail}"

    from azure.core import exceptions as core
    from azure.servicebus import exceptions as sb

    if isinstance(exc, sb.SessionLockLostError):
        return SessionLockLost(f"{where}: the session lock was lost (expired or taken by another receiver)")
    if isinstance(exc, sb.MessageLockLostError):
        return MessageLockLost(f"{where}: the message lock expired; the message will be redelivered")
    if isinstance(exc, sb.MessageAlreadySettled):
        return InvalidReceipt(f"{where}: the message was already settled")
    if isinstance(exc, sb.MessageNotFoundError):
        return InvalidReceipt(f"{where}: the message was not found (settled or expired)")
    if isinstance(exc, sb.MessagingEntityNotFoundError):
        return QueueNotFound(f"{where} failed: the queue does not exist in this namespace")
    if isinstance(exc, sb.MessagingEntityDisabledError):
        return QueueNotFound(f"{where} failed: the queue is disabled", transient=False)
    if isinstance(exc, (sb.ServiceBusAuthenticationError, core.ClientAuthenticationError)):
        return AuthenticationFailed(f"{text} (check the connection string, or the managed identity)")
    if isinstance(exc, sb.ServiceBusAuthorizationError):
        return AuthenticationFailed(
            f"{text} (the identity needs the 'Azure Service Bus Data Sender/Receiver' role)"
        )
    if isinstance(exc, sb.OperationTimeoutError):
        return Timeout(text)
    if isinstance(exc, sb.ServiceBusServerBusyError):
        # Service Bus asks clients to back off about 10 s when busy.
        return Throttled(text, retry_after=10.0)
    if isinstance(exc, sb.ServiceBusQuotaExceededError):
        return QueueFull(text)
    if isinstance(exc, sb.MessageSizeExceededError):
        return ValidationError(f"{where} failed: the message is larger than the Service Bus size limit")
    if isinstance(exc, sb.SessionCannotBeLockedError):
        return QueueError(f"{where} failed: the session is locked by another receiver", transient=True)
    if isinstance(exc, (sb.ServiceBusConnectionError, sb.ServiceBusCommunicationError)):
        return ConnectionFailed(text)
    if isinstance(exc, core.ResourceNotFoundError):
        return QueueNotFound(f"{where} failed: the queue does not exist in this namespace")
    if isinstance(exc, core.HttpResponseError) and getattr(exc, "status_code", None) in (401, 403):
        return AuthenticationFailed(text)
    if isinstance(exc, TimeoutError):  # before OSError, its base class
        return Timeout(f"{where} did not finish in time")
    if isinstance(exc, (core.ServiceRequestError, core.ServiceResponseError, OSError, ConnectionError)):
        return ConnectionFailed(text)
    if isinstance(exc, BridgeClosed):
        return ConnectionFailed(f"{where} failed: the provider is closing", transient=False)
    if isinstance(exc, sb.ServiceBusError) and "SessionId" in str(exc) and "not set" in str(exc):
        return ValidationError(f"{where} failed: the queue requires sessions and a message has no session_id")
    if isinstance(exc, sb.ServiceBusError):
        return QueueError(text, transient=bool(getattr(exc, "_retryable", False)))
    if isinstance(exc, core.AzureError):
        return QueueError(text, transient=False)
    if isinstance(exc, NotSupported):  # pragma: no cover - QueueError handled above
        return exc
    return QueueError(text, transient=False)
