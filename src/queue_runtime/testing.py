"""Unit-test an actor without a broker.

`ActorHarness` runs your `SessionActor` subclass through the real runtime (the same session
loop, retries, dead-lettering and lock handling as production) on a private in-memory broker,
and records what happened::

    from queue_runtime.testing import ActorHarness

    async def test_negative_amounts_are_dead_lettered(autojump_clock):
        async with ActorHarness(OrderActor) as harness:
            await harness.send(OrderEvent("o-1", "created", 10), session_id="o-1")
            await harness.send(OrderEvent("o-1", "refund", -5), session_id="o-1")
            await harness.run_until_idle()
        assert harness.actor("o-1").total == 10
        assert [d.reason for d in harness.dead_lettered] == ["NegativeAmount"]

Use trio's ``autojump_clock`` fixture (or ``MockClock(autojump_threshold=0)``) so retry
backoffs and timeouts take no real time. Retries default to the policy you pass (the
harness's default retries three times with no backoff, so tests stay quick).
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import msgspec
import trio

from .actor import SessionActor
from .config import SupervisorConfig
from .message import Message, ReceivedMessage
from .providers.memory import InMemoryProvider
from .retry import RetryPolicy
from .supervisor import Supervisor, SupervisorStats
from .telemetry import Telemetry

__all__ = ["ActorHarness", "Call", "DeadLettered"]

A = TypeVar("A", bound=SessionActor[Any])

QUEUE = "harness"


class Call(msgspec.Struct, frozen=True):
    """One ``handle()`` call: which message, which attempt, and how it ended."""

    session_id: str | None
    message_id: str
    attempt: int
    outcome: str
    """``"returned"``, ``"raised"`` (with ``error``) or ``"cancelled"``."""
    error: str | None = None


class DeadLettered(msgspec.Struct, frozen=True):
    """A message the runtime dead-lettered, with its reason and description."""

    session_id: str | None
    message_id: str
    reason: str
    description: str | None
    body: bytes


class _Recorder(Telemetry):
    def __init__(self, harness: ActorHarness[Any]) -> None:
        super().__init__(QUEUE, "memory")
        self._harness = harness

    def message_completed(
        self, message: ReceivedMessage, *, seconds: float, handled: float | None = None
    ) -> None:
        super().message_completed(message, seconds=seconds, handled=handled)
        self._harness.completed_messages.append(message)

    def message_dead_lettered(self, message: ReceivedMessage, reason: str, description: str | None) -> None:
        super().message_dead_lettered(message, reason, description)
        self._harness.dead_lettered.append(
            DeadLettered(message.session_id, message.message_id, reason, description, message.message.body)
        )


class ActorHarness(Generic[A]):
    """Runs ``actor`` on a private in-memory broker; see the module docstring.

    ``lock_duration`` and ``max_delivery_count`` configure the broker; every other keyword is
    a `SupervisorConfig` field (``session_idle_timeout``, ``per_session_concurrency``...).
    """

    def __init__(
        self,
        actor: type[A],
        *,
        retry: RetryPolicy | None = None,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        **config: Any,
    ) -> None:
        harness = self

        class Probe(actor):  # type: ignore[valid-type,misc]
            async def on_start(self) -> None:
                harness._actors[self.session_id] = self
                await super().on_start()

            async def handle(self, message: Any, ctx: Any) -> None:
                try:
                    await super().handle(message, ctx)
                except trio.Cancelled:
                    harness.calls.append(Call(ctx.session_id, ctx.message_id, ctx.attempt, "cancelled"))
                    raise
                except BaseException as error:
                    harness.calls.append(
                        Call(
                            ctx.session_id,
                            ctx.message_id,
                            ctx.attempt,
                            "raised",
                            f"{type(error).__name__}: {error}",
                        )
                    )
                    raise
                harness.calls.append(Call(ctx.session_id, ctx.message_id, ctx.attempt, "returned"))

            async def on_stop(self, reason: str) -> None:
                harness.stop_reasons.append((self.session_id, reason))
                await super().on_stop(reason)

        Probe.__name__ = Probe.__qualname__ = actor.__name__
        config.setdefault("session_idle_timeout", 3600.0)
        config.setdefault("receive_timeout", 1.0)
        self.provider = InMemoryProvider(lock_duration=lock_duration, max_delivery_count=max_delivery_count)
        self.config = SupervisorConfig(
            queue=QUEUE, retry=retry or RetryPolicy(max_attempts=3, initial_backoff=0.0, jitter=0.0), **config
        )
        self.supervisor = Supervisor(self.provider, Probe, self.config, telemetry=_Recorder(self))
        self.calls: list[Call] = []
        self.completed_messages: list[ReceivedMessage] = []
        self.dead_lettered: list[DeadLettered] = []
        self.stop_reasons: list[tuple[str, str]] = []
        self._actors: dict[str, A] = {}
        self._stack = contextlib.AsyncExitStack()

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        try:
            nursery = await self._stack.enter_async_context(trio.open_nursery())
            await nursery.start(self.supervisor.serve)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self.supervisor.stop()  # graceful: actors get on_stop("shutdown"); serve() then returns
        return await self._stack.__aexit__(exc_type, exc, tb)

    # -- feeding ------------------------------------------------------------------------------
    async def send(self, body: Any, *, session_id: str | None = "session", **fields: Any) -> str:
        """Send one message; returns its id. ``body`` may be bytes, str, a `Message`, or any
        value msgspec can encode as JSON (a Struct, a dict...)."""
        if isinstance(body, Message):
            message = body
        elif isinstance(body, (bytes, str)):
            raw = body.encode("utf-8") if isinstance(body, str) else body
            message = Message(raw, session_id=session_id, **fields)
        else:
            message = Message.json(body, session_id=session_id, **fields)
        await self.provider.send(QUEUE, [message])
        return message.message_id

    async def run_until_idle(self, timeout: float = 300.0) -> None:
        """Wait until every message sent so far is settled and no ``handle()`` runs.

        Raises ``AssertionError`` naming what is still pending after ``timeout`` seconds
        (trio clock), so a stuck actor fails the test instead of hanging it.
        """
        with trio.move_on_after(timeout):
            while True:
                stats = await self.provider.queue_stats(QUEUE)
                if not (stats.active or stats.in_flight or stats.scheduled):
                    return
                await trio.sleep(0.01)
        raise AssertionError(f"still pending after {timeout} s: {stats}")

    # -- observing ----------------------------------------------------------------------------
    def actor(self, session_id: str = "session") -> A:
        """The (latest) actor instance of ``session_id``: its attributes are its state."""
        try:
            return self._actors[session_id]
        except KeyError:
            raise AssertionError(f"no actor ran for session {session_id!r}") from None

    def completed(self, session_id: str | None = None) -> list[str]:
        """Ids of completed messages (of one session, if given), in completion order."""
        return [
            m.message_id for m in self.completed_messages if session_id is None or m.session_id == session_id
        ]

    def attempts(self, message_id: str) -> list[Call]:
        """Every ``handle()`` call of one message."""
        return [call for call in self.calls if call.message_id == message_id]

    def stats(self) -> SupervisorStats:
        return self.supervisor.stats()
