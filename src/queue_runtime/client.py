"""`QueueClient`: sending, and dead-letter operations, for producers and operators.

The client is written once against `providers.base.Provider`: it validates and chunks
batches to the provider's limits, adds the W3C trace context to every message it sends, and
replays dead-lettered messages without ever losing one (the copy is sent before the
dead-lettered original is completed).

`open_client` builds the provider from configuration and closes it on exit::

    async with open_client(queue="orders") as client:
        await client.send("orders", Message(body=b"...", session_id="order-1"))
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import trio

from .errors import ConfigurationError, MessageTooLarge, QueueError, ValidationError
from .message import Message, ReceivedMessage
from .providers.base import Provider, Receiver
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["REPLAYED_REASON_PROPERTY", "QueueClient", "ReplayOutcome", "ReplayResult", "open_client"]

REPLAYED_REASON_PROPERTY = "x-replayed-dead-letter-reason"
"""Property added to a replayed message: the reason it had been dead-lettered for."""


ReplayOutcome = Literal["replayed", "failed", "skipped"]
"""What happened to one dead-lettered message in a replay pass (``"replayed"`` with ``dry_run``:
it would have been)."""


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    """What `QueueClient.replay_dead_letters` did.

    ``replayed``: sent back to the queue and removed from the dead-letter queue (with
    ``dry_run``: would have been). ``failed``: the send failed; the message stays dead-lettered.
    ``skipped``: another session's message, left dead-lettered.
    """

    replayed: int = 0
    failed: int = 0
    skipped: int = 0


class QueueClient:
    """Producer and operator operations over one provider (which the caller owns and closes).

    Every method is cancellable. A cancelled `send_batch` may have sent some chunks already
    (the provider's send of one chunk is all-or-nothing where the broker allows).
    """

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self._telemetry: dict[str, Telemetry] = {}

    def __repr__(self) -> str:
        return f"<QueueClient system={self.provider.system!r}>"

    def telemetry(self, queue: str) -> Telemetry:
        """The (cached) `Telemetry` of ``queue`` on this provider."""
        telemetry = self._telemetry.get(queue)
        if telemetry is None:
            telemetry = self._telemetry[queue] = Telemetry(queue, self.provider.system)
        return telemetry

    async def send(self, queue: str, message: Message) -> None:
        """Send one message. Raises `ValidationError` / `MessageTooLarge` before any I/O."""
        await self.send_batch(queue, [message])

    async def send_batch(
        self,
        queue: str,
        messages: Sequence[Message],
        *,
        on_sent: Callable[[Sequence[Message]], object] | None = None,
    ) -> None:
        """Send ``messages`` in order, in chunks that fit the provider's batch limits
        (``max_batch_count`` messages and ``max_batch_bytes`` bytes, as `Provider.message_size`
        counts them).

        Every message is validated first (queue name, type, size with the trace context
        added): nothing is sent if any is invalid. If a chunk fails, the earlier chunks stay
        sent and the error is raised. ``on_sent(chunk)`` is called after each chunk was sent
        (the command line prints the ids as they go, so an interrupted send shows what went).
        """
        provider = self.provider
        provider.validate_queue_name(queue)
        telemetry = self.telemetry(queue)
        caps = provider.capabilities
        limit = min(caps.max_message_size, caps.max_batch_bytes)
        prepared: list[tuple[Message, int]] = []
        for message in messages:
            if not isinstance(message, Message):
                raise ValidationError(f"expected a Message, got {type(message).__name__}")
            if message.session_id is not None:
                provider.validate_session_id(message.session_id)
            traced = msgspec.structs.replace(message, properties=telemetry.inject(message.properties))
            if caps.max_properties is not None and len(traced.properties) > caps.max_properties:
                raise ValidationError(
                    f"message {message.message_id!r} has {len(traced.properties)} properties"
                    f" (trace context included); the provider allows {caps.max_properties}"
                )
            size = provider.message_size(traced)
            if size > limit:
                raise MessageTooLarge(size, limit, what=f"message {message.message_id!r}")
            # Sized with a trace context of the same shape as the one sent (inject is redone
            # inside the send span, so the consumer's span is its child; the size is equal).
            prepared.append((message, size))
        if not prepared:
            await trio.lowlevel.checkpoint()
            return
        for chunk in _chunks(prepared, caps.max_batch_count, caps.max_batch_bytes):
            await self._send_chunk(queue, telemetry, chunk)
            if on_sent is not None:
                on_sent(chunk)

    async def _send_chunk(self, queue: str, telemetry: Telemetry, chunk: list[Message]) -> None:
        started = trio.current_time()
        try:
            with telemetry.send_span(chunk):
                traced = [
                    msgspec.structs.replace(message, properties=telemetry.inject(message.properties))
                    for message in chunk
                ]
                await self.provider.send(queue, traced)
        except QueueError as error:
            telemetry.messages_sent(len(chunk), status="failure", seconds=trio.current_time() - started)
            telemetry.error(error, operation="send")
            raise
        telemetry.messages_sent(len(chunk), status="success", seconds=trio.current_time() - started)

    async def peek_dead_letters(self, queue: str, max_messages: int = 32) -> list[ReceivedMessage]:
        """Up to ``max_messages`` dead-lettered messages of ``queue``, oldest first, left in
        place (each with ``dead_letter_reason`` and ``dead_letter_description``)."""
        self.provider.validate_queue_name(queue)
        if not isinstance(max_messages, int) or max_messages < 1:
            raise ValidationError(f"max_messages must be an integer >= 1, got {max_messages!r}")
        return await self.provider.peek_dead_letters(queue, max_messages)

    async def replay_dead_letters(
        self,
        queue: str,
        *,
        max_messages: int | None = None,
        session_id: str | None = None,
        dry_run: bool = False,
        on_message: Callable[[ReceivedMessage, ReplayOutcome], None] | None = None,
    ) -> ReplayResult:
        """Send dead-lettered messages of ``queue`` back to it, oldest first.

        Each replayed message is a copy (same body, session id, properties, correlation id and
        content type; a new message id; property ``x-replayed-dead-letter-reason``). The
        dead-lettered original is completed only after its copy was sent, so a message is
        never lost (a crash in between leaves a duplicate, not a gap). ``max_messages`` bounds
        how many are replayed; ``session_id`` replays only that session (others are counted
        ``skipped`` and left dead-lettered); ``dry_run`` counts without changing anything.

        Messages not replayed are held locked during the pass (so the pass sees each message
        once) and abandoned back to the dead-letter queue at the end, also when cancelled.
        """
        provider = self.provider
        provider.validate_queue_name(queue)
        if session_id is not None:
            provider.validate_session_id(session_id)
        if max_messages is not None and (not isinstance(max_messages, int) or max_messages < 1):
            raise ValidationError(f"max_messages must be an integer >= 1 or None, got {max_messages!r}")
        replayed = failed = skipped = 0
        held: list[ReceivedMessage] = []
        seen: set[tuple[int | None, str]] = set()
        batch_size = min(provider.capabilities.max_batch_count, 10)
        receiver = await provider.open_receiver(queue, dead_letter=True)
        try:
            while max_messages is None or replayed < max_messages:
                want = batch_size if max_messages is None else min(batch_size, max_messages - replayed)
                batch = await receiver.receive(want, timeout=0.0)
                if not batch:
                    break
                again = False
                for index, dead in enumerate(batch):
                    key = (dead.sequence_number, dead.message_id)
                    done = max_messages is not None and replayed >= max_messages
                    if key in seen or done:
                        # A held message came back (its lock expired) or we have enough: stop.
                        held.extend(batch[index:])
                        again = True
                        break
                    seen.add(key)
                    outcome: ReplayOutcome
                    if session_id is not None and dead.session_id != session_id:
                        held.append(dead)
                        skipped += 1
                        outcome = "skipped"
                    elif dry_run:
                        held.append(dead)
                        replayed += 1
                        outcome = "replayed"
                    elif await self._replay_one(queue, receiver, dead):
                        replayed += 1
                        outcome = "replayed"
                    else:
                        held.append(dead)
                        failed += 1
                        outcome = "failed"
                    if on_message is not None:
                        on_message(dead, outcome)
                if again:
                    break
        finally:
            with trio.CancelScope(shield=True):
                await _abandon_all(receiver, held)
                await receiver.aclose()
        return ReplayResult(replayed=replayed, failed=failed, skipped=skipped)

    async def _replay_one(self, queue: str, receiver: Receiver, dead: ReceivedMessage) -> bool:
        original = dead.message
        properties = dict(original.properties)
        properties[REPLAYED_REASON_PROPERTY] = dead.dead_letter_reason or ""
        copy = Message(
            body=original.body,
            session_id=original.session_id,
            correlation_id=original.correlation_id,
            properties=properties,
            content_type=original.content_type,
        )
        try:
            await self.send(queue, copy)
        except QueueError as error:
            self.telemetry(queue).error(error, operation="replay")
            return False
        # Sent: now the original may go. If completing fails, the copy is already out (a
        # duplicate at worst), and the error tells the operator.
        await receiver.complete(dead)
        return True


async def _abandon_all(receiver: Receiver, messages: list[ReceivedMessage]) -> None:
    for message in messages:
        try:
            await receiver.abandon(message)
        except QueueError:
            pass  # lock already gone: the broker makes it available again by itself


def _chunks(prepared: list[tuple[Message, int]], max_count: int, max_bytes: int) -> list[list[Message]]:
    """Greedy, order-keeping chunks of at most ``max_count`` messages and ``max_bytes`` bytes."""
    chunks: list[list[Message]] = []
    current: list[Message] = []
    size = 0
    for message, message_bytes in prepared:
        if current and (len(current) >= max_count or size + message_bytes > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(message)
        size += message_bytes
    if current:
        chunks.append(current)
    return chunks


@asynccontextmanager
async def open_client(settings: Settings | None = None, **overrides: Any) -> AsyncIterator[QueueClient]:
    """A `QueueClient` over the provider the configuration names; the provider is closed on exit.

    Without ``settings``, configuration is loaded with ``load_settings(**overrides)``
    (defaults < config file < environment < keyword arguments). With ``settings``, keyword
    ``overrides`` replace its top-level fields. Secret references (``keyvault://``,
    ``secretsmanager://``) are read first (`queue_runtime.providers.open_provider`). Raises
    `ConfigurationError` for bad configuration.
    """
    from .config import load_settings
    from .providers import open_provider

    if settings is None:
        settings = load_settings(**overrides)
    elif overrides:
        try:
            settings = msgspec.structs.replace(settings, **overrides)
        except TypeError as error:
            raise ConfigurationError(f"cannot override settings: {error}") from None
    async with open_provider(settings) as provider:
        yield QueueClient(provider)
