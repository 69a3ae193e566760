"""The supervisor: accepts sessions and runs one actor per active session.

`Supervisor.serve()` owns one trio nursery. Inside it, a few acceptor loops take sessions
from the provider while a slot is free (never more than ``max_concurrent_sessions`` actors),
each accepted session runs as a `Session`, and one `LockRenewer` keeps every lock alive.

Stopping:

* ``stop()`` asks for a graceful drain and returns at once: acceptance stops, no new
  ``handle()`` starts, running calls get ``shutdown_grace`` seconds to finish and are settled,
  everything else that was received is handed back (abandoned) at once, every actor gets
  ``on_stop("shutdown")``, and then ``serve()`` returns normally.
* Cancelling ``serve()`` settles nothing: receivers are closed, which hands every session
  back to the broker (messages reappear when the broker releases their locks).

Provider faults: a failing ``accept_session`` is retried with backoff; five failures in a row
open a circuit breaker that pauses acceptance for 30 s (then one trial call) instead of
spinning, so the worker rides out a broker outage and resumes by itself.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from .actor import SessionActor
from .config import SupervisorConfig
from .counters import Counters
from .errors import ConfigurationError, QueueError
from .introspection import WorkerSnapshot
from .providers.base import Provider, QueueInfo
from .retry import Backoff, BreakerState, CircuitBreaker
from .session import LockRenewer, Runtime, Session
from .telemetry import Telemetry

__all__ = ["Supervisor", "SupervisorStats"]

#: Concurrent acceptor loops. More than one hides the latency of an accept round trip
#: (a Service Bus session link takes tens of milliseconds) without flooding the broker.
ACCEPTORS = 4
#: Start-up tries for a transient failure of the first `describe()` before giving up.
STARTUP_ATTEMPTS = 5


class SupervisorStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a supervisor's counters since it was created."""

    active_sessions: int
    sessions_started: int
    received: int
    completed: int
    """Messages completed after ``handle()`` returned (dead-lettered ones not included)."""
    dead_lettered: int
    failed_attempts: int
    """``handle()`` calls that raised (`DeadLetter` excluded)."""
    retries: int
    """In-place retries started (``handle()`` calls after the first)."""
    abandoned: int
    """Messages handed back to the broker (shutdown, retry interrupted by a stop)."""
    lock_renewals: int
    """Successful lock renewals, idle sessions included."""
    lock_lost: int
    """Sessions that ended because their lock was lost."""
    circuit: str
    """``"closed"``, ``"open"`` or ``"half_open"``."""
    draining: bool


class Supervisor:
    """Runs ``actor`` (a `SessionActor` subclass) over ``config.queue`` of ``provider``.

    Example::

        async with InMemoryProvider() as provider, trio.open_nursery() as nursery:
            supervisor = Supervisor(provider, OrderActor, SupervisorConfig(queue="orders"))
            await nursery.start(supervisor.serve)
            ...
            supervisor.stop()   # serve() returns once drained
    """

    def __init__(
        self,
        provider: Provider,
        actor: type[SessionActor[Any]],
        config: SupervisorConfig,
        *,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not (isinstance(actor, type) and issubclass(actor, SessionActor)):
            raise ConfigurationError(f"{actor!r} is not a SessionActor subclass")
        if actor.handle is SessionActor.handle:
            raise ConfigurationError(f"{actor.__qualname__} does not implement handle()")
        if not isinstance(config, SupervisorConfig):
            raise ConfigurationError(f"config must be a SupervisorConfig, got {type(config).__name__}")
        provider.validate_queue_name(config.queue)
        self.provider = provider
        self.actor = actor
        self.config = config
        self.telemetry = telemetry or Telemetry(config.queue, provider.system)
        self._counters = Counters()
        self._breaker = CircuitBreaker(failure_threshold=5, open_duration=30.0)
        self._renewer = LockRenewer(max_lock_renewal=config.max_lock_renewal, counters=self._counters)
        self._runtime = Runtime(
            actor_class=actor,
            config=config,
            telemetry=self.telemetry,
            counters=self._counters,
            renewer=self._renewer,
            breaker=self._breaker,
        )
        self._slots = trio.Semaphore(config.max_concurrent_sessions)
        # Bound once: each live session keeps its ``on_exit``, and one shared object is less
        # for the garbage collector than one per session.
        self._release_slot = self._slots.release
        self._accept_scopes: set[trio.CancelScope] = set()
        self._serving = False
        self._accepting = False
        self.queue_info: QueueInfo | None = None
        self.telemetry.observe_gauges(
            active_sessions=lambda: len(self._runtime.sessions),
            breaker_state=lambda: int(self._breaker.last_state),
        )

    # -- control -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Request a graceful drain and return at once; ``serve()`` returns when drained.

        Safe to call from a signal handler task, more than once, or before ``serve()``.
        """
        if self._runtime.stopping:
            return
        self._accepting = False
        self._runtime.request_stop(self.config.shutdown_grace)
        for scope in self._accept_scopes:
            scope.cancel()
        self.telemetry.log(20, "draining: no new sessions or messages", operation="shutdown")

    @property
    def ready(self) -> bool:
        """True while accepting work: serving, not draining, circuit not open."""
        return self._accepting and self._breaker.state is not BreakerState.OPEN

    def stats(self) -> SupervisorStats:
        """A snapshot of the counters."""
        c = self._counters
        return SupervisorStats(
            active_sessions=len(self._runtime.sessions),
            sessions_started=c.sessions_started,
            received=c.received,
            completed=c.completed,
            dead_lettered=c.dead_lettered,
            failed_attempts=c.failed_attempts,
            retries=c.retries,
            abandoned=c.abandoned,
            lock_renewals=c.lock_renewals,
            lock_lost=c.lock_lost,
            circuit=self._breaker.state.name.lower(),
            draining=self._runtime.stopping,
        )

    def snapshot(self) -> WorkerSnapshot:
        """The stats, the circuit and what every active session is doing, for ``/sessions``
        (`queue_runtime.introspection` renders it). Read-only, built only when asked; call it in
        the supervisor's trio run (it reads trio's clock)."""
        breaker = self._breaker
        info = self.queue_info
        return WorkerSnapshot(
            queue=self.config.queue,
            system=self.provider.system,
            now=trio.current_time(),
            stats=self.stats(),
            lock_duration=info.lock_duration if info is not None else None,
            lock_margin=self._runtime.lock_margin,
            circuit_open_until=breaker.open_until,
            circuit_times_opened=breaker.times_opened,
            max_concurrent_sessions=self.config.max_concurrent_sessions,
            sessions=[session.snapshot() for session in self._runtime.sessions],
        )

    # -- serving -----------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop()`` drained everything (then return normally) or cancelled.

        Start-up first checks the queue (`Provider.describe`): a permanent error
        (`QueueNotFound`, `AuthenticationFailed`, `ConfigurationError`...) is raised at once; a
        transient one is retried a few times with backoff, then raised. ``task_status.started()``
        is called once acceptance begins.
        """
        if self._serving:
            raise RuntimeError("serve() is already running")
        self._serving = True
        self._runtime.bind_clock()
        try:
            info = await self._describe()
            self.queue_info = info
            self._runtime.set_lock_duration(info.lock_duration)
            if self._runtime.stopping:
                task_status.started()
                return
            async with trio.open_nursery() as nursery:
                await nursery.start(self._renewer.run)
                async with trio.open_nursery() as sessions:
                    self._accepting = True
                    if info.requires_session:
                        for _ in range(min(ACCEPTORS, self.config.max_concurrent_sessions)):
                            sessions.start_soon(self._accept_loop, sessions)
                    else:
                        sessions.start_soon(self._queue_loop)
                    self.telemetry.log(
                        20,
                        f"accepting {'sessions' if info.requires_session else 'messages'} on"
                        f" {self.config.queue} ({self.provider.system})",
                        operation="receive",
                    )
                    task_status.started()
                nursery.cancel_scope.cancel()  # every session is done: stop the renewer
        finally:
            self._accepting = False
            self._serving = False

    async def _describe(self) -> QueueInfo:
        backoff = Backoff(initial=0.5, maximum=5.0)
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            try:
                return await self.provider.describe(self.config.queue)
            except QueueError as error:
                if not error.transient or attempt == STARTUP_ATTEMPTS:
                    raise
                self.telemetry.error(error, operation="describe")
                await trio.sleep(backoff.next_delay())
        raise AssertionError("unreachable")  # pragma: no cover

    async def _accept_loop(self, sessions: trio.Nursery) -> None:
        provider = self.provider
        config = self.config
        breaker = self._breaker
        backoff = Backoff(initial=0.5, maximum=30.0)
        with trio.CancelScope() as scope:
            self._accept_scopes.add(scope)
            if self._runtime.stopping:
                scope.cancel()
            try:
                while True:
                    await self._slots.acquire()
                    handed_over = False
                    try:
                        await breaker.wait()
                        try:
                            receiver = await provider.accept_session(
                                config.queue, timeout=config.receive_timeout
                            )
                        except QueueError as error:
                            breaker.record_failure()
                            self.telemetry.error(error, operation="accept_session")
                            await trio.sleep(backoff.next_delay())
                            continue
                        breaker.record_success()
                        backoff.reset()
                        if receiver is None:
                            continue
                        session = Session(self._runtime, receiver, on_exit=self._release_slot)
                        sessions.start_soon(session.run)
                        handed_over = True
                    finally:
                        if not handed_over:
                            self._slots.release()
            finally:
                self._accept_scopes.discard(scope)

    async def _queue_loop(self) -> None:
        """Non-session queue: one receiver, messages handled concurrently (no order)."""
        backoff = Backoff(initial=0.5, maximum=30.0)
        while not self._runtime.stopping:
            await self._breaker.wait()
            try:
                receiver = await self.provider.open_receiver(self.config.queue)
            except QueueError as error:
                self._breaker.record_failure()
                self.telemetry.error(error, operation="receive")
                await trio.sleep(backoff.next_delay())
                continue
            self._breaker.record_success()
            reason = await Session(self._runtime, receiver).run()
            if reason == "error":
                await trio.sleep(backoff.next_delay())
