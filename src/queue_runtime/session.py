"""One actor's life: mailbox, ordered handler loop, lock renewal, retries and settlement.

This module is written once for every provider. A `Session` holds one `Receiver` (a
session, or a whole non-session queue) and one actor instance, and guarantees:

* **Order.** With ``per_session_concurrency=1``, ``handle()`` for message k+1 starts only
  after message k was settled (completed or dead-lettered). Prefetched messages wait in a
  bounded mailbox in broker order.
* **At-least-once.** A message is completed only after ``handle()`` returned. Anything not
  settled when the session ends is abandoned (handed back at once), or — when the lock was
  lost or the supervisor was cancelled — simply left to the broker.
* **In-place retry.** A failing ``handle()`` is called again by the same actor instance after
  the policy's backoff, while the lock keeps being renewed; after ``max_attempts`` calls the
  message is dead-lettered with ``MaxAttemptsExceeded``.
* **Lock loss.** When renewal is refused, or does not succeed before the lock's deadline less
  a safety margin (`lock_margin`), the running ``handle()`` is cancelled, nothing is settled
  and the actor stops with ``"lock_lost"``.
* **Live locks only.** No ``handle()`` (first call or retry) starts on a message whose lock
  deadline is less than the margin away by the runtime's clock: that is lock loss too. The
  deadline the providers report is never later than the broker's, and the margin covers the
  time a cancellation takes to reach a handler, so a handler of a lost lock has stopped before
  the broker can give the message to anyone else.
* **One holder.** Within one supervisor at most one actor per session is alive: when the
  broker hands a session out again while an older actor of it is still ending, the new one
  waits until the old one has stopped and released its receiver.

Locks are renewed by one `LockRenewer` task per supervisor rather than a task per session:
a parked trio task costs about 4.5 KiB, and 100k idle sessions should not pay that twice.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Protocol

import trio

from .actor import DeadLetter, MessageContext, SessionActor, StopReason, _DeliveredContext, _ReceiverHandle
from .codec import DecodeError
from .config import SupervisorConfig
from .counters import Counters
from .errors import InvalidReceipt, MessageLockLost, QueueError, SessionLockLost, Throttled, Timeout
from .introspection import SessionSnapshot
from .message import ReceivedMessage
from .providers.base import Receiver
from .redaction import redact
from .retry import Backoff, CircuitBreaker, call_with_retry
from .tally import QueueTally
from .telemetry import Telemetry, observed, tracing_enabled

__all__ = ["LockRenewer", "Runtime", "Session"]

#: Most bytes of exception text kept in a dead-letter description (DESIGN: at most 1 KiB).
MAX_DESCRIPTION_BYTES = 1024
#: How long clean-up (abandon, on_stop, release) may take once a session is ending.
CLEANUP_TIMEOUT = 10.0
#: Renew when this fraction of the remaining lock time has passed: leaves half the lock
#: for retrying a transient renewal failure before the lock is really gone.
RENEW_AT_FRACTION = 0.5

#: Calls of one settlement (complete, abandon, dead-letter) before a transient error is final.
SETTLE_ATTEMPTS = 6

#: The safety margin before a lock's deadline, at most this many seconds: see `lock_margin`.
LOCK_MARGIN_MAX = 2.0
#: ... and at most this fraction of the lock duration, so short locks keep most of their time.
LOCK_MARGIN_FRACTION = 0.2
#: The renewal heap's least size at which stale entries are dropped (`LockRenewer._push`).
COMPACT_MIN = 256


def lock_margin(lock_duration: float | None) -> float:
    """How long before a lock's deadline the runtime treats the lock as lost.

    A lock whose deadline is nearer than this is not used to start a ``handle()``, and a lock
    not renewed by then is lost: the running ``handle()`` is cancelled. The margin covers what
    happens between the runtime's decision and the broker's: the event loop's lag on a busy
    worker and the time a cancellation takes to reach the handler's next checkpoint. It is
    ``min(2 s, lock_duration / 5)``: 2 s for the usual 30-60 s locks, less for short ones (a
    6 s SQS visibility timeout keeps 4.8 s of use). With no known duration, 2 s.
    """
    if lock_duration is None or not math.isfinite(lock_duration) or lock_duration <= 0:
        return LOCK_MARGIN_MAX
    return min(LOCK_MARGIN_MAX, lock_duration * LOCK_MARGIN_FRACTION)


_LOCK_ERRORS = (SessionLockLost, MessageLockLost, InvalidReceipt)

# What an ordered session loop is doing, so `Session.stop` knows how to interrupt it.
_BUSY = 0  # between steps or settling: the loop sees the stop request at its next step
_WAITING = 1  # receiving or in a retry backoff: stop() interrupts at once
_WORKING = 2  # inside handle(): stop() lets it run until the grace deadline


def describe_exception(error: BaseException) -> str:
    """``"TypeName: text"``, redacted (configured secrets, credential patterns), cut to
    `MAX_DESCRIPTION_BYTES` of UTF-8."""
    text = redact(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
    data = text.encode("utf-8")
    if len(data) <= MAX_DESCRIPTION_BYTES:
        return text
    return data[: MAX_DESCRIPTION_BYTES - 3].decode("utf-8", "ignore") + "..."


class _LockLost(Exception):
    """Internal: the session's lock is gone; unwind without settling anything."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _SessionFailed(Exception):
    """Internal: a provider call failed for good; end the session with ``"error"``.
    ``reported`` when the error was logged and counted already."""

    def __init__(self, cause: BaseException, *, reported: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.reported = reported


class LockHolder(Protocol):
    """Something whose lock the renewer keeps alive."""

    renew_generation: int
    renewals: int

    @property
    def locked_until(self) -> float | None: ...

    @property
    def busy_since(self) -> float | None: ...

    async def renew(self) -> float: ...

    def lock_lost(self, error: BaseException) -> None: ...


_RENEW = 0  # a renewal is due
_EXPIRE = 1  # the lock's deadline less the margin: lost unless renewed since


class LockRenewer:
    """Renews every lock of one supervisor from a single task, and ends locks that run out.

    A holder is renewed when half its remaining lock time has passed (at the latest ``margin``
    seconds before its deadline); a transient failure is retried with backoff while the lock is
    still valid. Each time a holder is tracked, an expiry entry is also set at its deadline
    less ``margin``: if no renewal succeeded by then — refused, failing, or hanging on a broker
    that stopped answering — the holder is told its lock is lost, at that moment, whatever the
    renewal call is doing. A holder whose current ``handle()`` has run for
    ``max_lock_renewal`` seconds is no longer renewed, so its lock then runs out the same way.
    Renewal calls run concurrently, at most ``concurrency`` at once, each cancelled at the
    holder's deadline less the margin.
    """

    def __init__(
        self,
        *,
        max_lock_renewal: float,
        counters: Counters,
        concurrency: int = 32,
        margin: float = LOCK_MARGIN_MAX,
    ) -> None:
        self._max_lock_renewal = max_lock_renewal
        self._counters = counters
        #: Seconds before a lock's deadline at which it counts as lost (see `lock_margin`).
        self.margin = margin
        self._heap: list[tuple[float, int, LockHolder, int, int]] = []
        self._sequence = itertools.count()
        self._wake = trio.Event()
        self._next_wake = math.inf
        self._limiter = trio.CapacityLimiter(concurrency)
        # Stale entries are skipped when they come due, a lock duration later: until then they
        # would keep ended sessions alive. The heap is rebuilt without them when it has grown
        # to this size (twice its size after the last rebuild: amortised O(1) per push).
        self._compact_at = COMPACT_MIN

    def track(self, holder: LockHolder) -> None:
        """(Re)schedule ``holder``'s renewal and expiry from its current ``locked_until``."""
        holder.renew_generation += 1
        locked_until = holder.locked_until
        if locked_until is None:
            return
        now = trio.current_time()
        expiry = locked_until - self.margin
        self._push(min(now + max(locked_until - now, 0.0) * RENEW_AT_FRACTION, expiry), holder, _RENEW)
        self._push(expiry, holder, _EXPIRE)

    def untrack(self, holder: LockHolder) -> None:
        """Stop renewing ``holder`` (its heap entries become stale and are skipped)."""
        holder.renew_generation += 1

    def _push(self, due: float, holder: LockHolder, kind: int) -> None:
        heap = self._heap
        if len(heap) >= self._compact_at:
            heap[:] = [entry for entry in heap if entry[2].renew_generation == entry[3]]
            heapq.heapify(heap)
            self._compact_at = max(COMPACT_MIN, 2 * len(heap))
        heapq.heappush(heap, (due, next(self._sequence), holder, holder.renew_generation, kind))
        if due < self._next_wake:
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = trio.current_time()
                heap = self._heap
                while heap and heap[0][0] <= now:
                    _, _, holder, generation, kind = heapq.heappop(heap)
                    if holder.renew_generation != generation:
                        continue  # renewed (or untracked) since: stale
                    if kind == _EXPIRE:
                        holder.renew_generation += 1  # its pending renewal is moot now
                        holder.lock_lost(
                            Timeout(
                                f"the lock was not renewed before its deadline (less the {self.margin:g} s"
                                " safety margin)"
                            )
                        )
                        continue
                    nursery.start_soon(self._renew, holder, generation)
                self._next_wake = heap[0][0] if heap else math.inf
                self._wake = trio.Event()
                with trio.move_on_at(self._next_wake):
                    await self._wake.wait()

    async def _renew(self, holder: LockHolder, generation: int) -> None:
        locked_until = holder.locked_until
        if locked_until is None:
            return
        deadline = locked_until - self.margin
        # Past the deadline the expiry entry has declared the lock lost: give up the call.
        with trio.move_on_at(deadline):
            async with self._limiter:
                if holder.renew_generation != generation:
                    return
                busy_since = holder.busy_since
                now = trio.current_time()
                if busy_since is not None and now - busy_since >= self._max_lock_renewal:
                    # handle() ran past max_lock_renewal: no renewal. Look again later, in case it
                    # returns before the lock runs out; otherwise the expiry entry ends it.
                    self._push(now + max((deadline - now) / 2, self.margin / 4), holder, _RENEW)
                    return
                try:
                    await call_with_retry(holder.renew, attempts=1000, deadline=deadline)
                except QueueError as error:
                    if holder.renew_generation == generation:
                        holder.renew_generation += 1
                        holder.lock_lost(error)
                    return
                if holder.renew_generation == generation:
                    self._counters.lock_renewals += 1
                    holder.renewals += 1
                    self.track(holder)


def _always() -> bool:
    return True


class Runtime:
    """What every session of one supervisor shares."""

    def __init__(
        self,
        *,
        actor_class: type[SessionActor[Any]],
        config: SupervisorConfig,
        telemetry: Telemetry,
        counters: Counters,
        renewer: LockRenewer,
        breaker: CircuitBreaker,
    ) -> None:
        self.actor_class = actor_class
        # The default hooks do nothing: not calling them saves a cancel scope per session
        # (on_stop runs under its own timeout), which counts when sessions are short.
        self.calls_on_start = actor_class.on_start is not SessionActor.on_start
        self.calls_on_stop = actor_class.on_stop is not SessionActor.on_stop
        self.decode = actor_class.__decoder__
        self.config = config
        self.telemetry = telemetry
        # Per message the span helpers are skipped while tracing is off, unless a subclass
        # overrides them (it asked to see every call).
        kind = type(telemetry)
        self.own_process_span = kind.process_span is not Telemetry.process_span
        self.own_settle_span = kind.settle_span is not Telemetry.settle_span
        self.own_message_spans = self.own_process_span or self.own_settle_span
        # `message_completed(handled=...)` records both durations in one call; a subclass that
        # overrides either hook (perhaps with the older signature) gets the two calls instead.
        self.own_handled = (
            kind.handled is not Telemetry.handled or kind.message_completed is not Telemetry.message_completed
        )
        # The per-message hooks (received, spans, handled, completed) do nothing unless metrics,
        # tracing or message-level logging is on, or a subclass overrides one of them; see
        # `observing`.
        self.own_message_hooks = (
            self.own_process_span
            or self.own_settle_span
            or any(
                getattr(kind, hook) is not getattr(Telemetry, hook)
                for hook in ("messages_received", "handled", "message_completed")
            )
        )
        #: Whether the per-message telemetry hooks have anything to do now. Sessions ask once
        #: per receive and skip the hooks (and the clock reads for their durations) otherwise.
        #: Turns True as soon as a meter or tracer provider is set or message logging enabled.
        #: (`telemetry.observed` itself unless a subclass overrides a hook: one call less.)
        self.observing: Callable[[], bool] = _always if self.own_message_hooks else observed
        #: Whether a message's counts and durations would be seen now (metrics, message logs):
        #: asked per receive while `observing`; untraced messages skip their clock reads and
        #: hooks otherwise.
        self.timing: Callable[[], QueueTally | bool] = _always if self.own_message_hooks else telemetry.timing
        self.counters = counters
        self.renewer = renewer
        self.breaker = breaker
        self.stopping = False
        self.grace_deadline = math.inf
        self.sessions: set[Session] = set()
        #: The live `Session` of each session id (the newest, when an old one is still ending).
        self.holders: dict[str, Session] = {}
        #: Seconds before a lock's deadline at which it counts as lost (`set_lock_duration`).
        self.lock_margin = renewer.margin
        #: ``trio.current_time``, or once serving the run's clock's own ``current_time``: the
        #: same value in one call instead of three (it is read several times per message).
        self.now: Callable[[], float] = trio.current_time

    def set_lock_duration(self, lock_duration: float | None) -> None:
        """Size the lock safety margin for the queue's lock duration (see `lock_margin`)."""
        self.lock_margin = self.renewer.margin = lock_margin(lock_duration)

    def bind_clock(self) -> None:
        """Read time straight from the current run's clock (call inside the run)."""
        self.now = trio.lowlevel.current_clock().current_time

    def request_stop(self, grace: float) -> None:
        """Begin the drain: no new ``handle()``; running ones get ``grace`` seconds."""
        if self.stopping:
            return
        self.stopping = True
        self.grace_deadline = trio.current_time() + grace
        for session in list(self.sessions):
            session.stop()


class _MessageLock:
    """A renewal target for one message of a non-session queue (each has its own lock)."""

    __slots__ = ("busy_since", "message", "receiver", "renew_generation", "renewals", "session", "slot")

    def __init__(self, session: Session, message: ReceivedMessage) -> None:
        self.session = session
        self.receiver = session.receiver
        self.message = message
        self.renew_generation = 0
        self.renewals = 0
        self.busy_since: float | None = None
        self.slot: _Slot | None = None  # the slot whose handle() runs it: cancelled if it is lost

    @property
    def locked_until(self) -> float | None:
        return self.message.locked_until

    async def renew(self) -> float:
        deadline = await self.receiver.renew_message_lock(self.message)
        self.message.locked_until = deadline
        return deadline

    def lock_lost(self, error: BaseException) -> None:
        self.session.message_lock_lost(self, error)


class Session:
    """Runs one actor over one receiver; see the module docstring for the guarantees."""

    # (No per-instance dict: one object less per live session for the garbage collector.)
    __slots__ = (
        "_busy_since",
        "_children_dropped",
        "_current",
        "_ended",
        "_finished",
        "_lock_scope",
        "_loop_scope",
        "_lost",
        "_mailbox",
        "_message_locks",
        "_on_exit",
        "_phase",
        "_previous",
        "_quiet",
        "_receive_backoff",
        "_receive_spans",
        "_slots",
        "_spans_on",
        "_timed",
        "_tracked_generation",
        "_tracked_until",
        "_wait_scopes",
        "_waiting",
        "_work_scopes",
        "_working",
        "attempt",
        "failures",
        "last_error",
        "received",
        "receiver",
        "renew_generation",
        "renewals",
        "retry_at",
        "runtime",
        "session_id",
        "started_at",
        "stop_reason",
    )

    def __init__(
        self, runtime: Runtime, receiver: Receiver, on_exit: Callable[[], object] | None = None
    ) -> None:
        self.runtime = runtime
        self.receiver = receiver
        # Called last when `run` ends, however it ends (the supervisor frees the session's
        # slot): the session's task runs `run` itself, with no wrapper level to pass through
        # at every wait and wake-up.
        self._on_exit = on_exit
        self.session_id = receiver.session_id
        self.renew_generation = 0
        self._busy_since: float | None = None  # the ordered loop's `handle()` start (`busy_since`)
        # Read by `snapshot` (``/sessions``) only: set where the loop already has the values,
        # never a clock read or an allocation of their own on a message's path.
        self.started_at: float | None = None  # the trio time `run` began
        self.received = 0  # messages received (handled = received - mailbox - current)
        self.renewals = 0  # successful lock renewals of this session
        self.attempt = 1  # the attempt in hand: set by `_process_fully` per call (fast path: stays 1)
        self.failures = 0  # handle() calls that raised (DeadLetter excluded)
        self.last_error: str | None = None  # the type name of the last one
        self.retry_at: float | None = None  # while in a retry backoff: when the next attempt is due
        self._mailbox: deque[ReceivedMessage] = deque()
        # Cancelled when the lock is lost (`_lost` set first) and, while the ordered loop runs
        # in it, by `stop`.
        self._lock_scope = trio.CancelScope()
        # Per-call scopes of the slower paths, for `stop`: sets made on first use, as most
        # sessions never need one.
        self._wait_scopes: set[trio.CancelScope] | None = None
        self._work_scopes: set[trio.CancelScope] | None = None
        # The ordered loop of a session runs in one cancel scope rather than a scope per
        # receive and per handle() (those were a quarter of the CPU per message): the lock
        # scope itself, so a session enters one scope, not two. `_phase` says what it is doing
        # and `_current` which message it is on.
        self._loop_scope: trio.CancelScope | None = None
        # Whether the loop's scope stands in for a wait's / a handle()'s own scope (a `_Phase`
        # marks it then, made by the slower paths that need one).
        self._waiting = False
        self._working = False
        self._phase = _BUSY
        self._current: ReceivedMessage | None = None
        # The handler slots of a concurrent session (`_concurrent_loop`), each with the fields
        # above of its own; None in the ordered loop, where the session is its only slot.
        self._slots: list[_Slot] | None = None
        # The renewal entry made last (generation, lock deadline): see `_receive`.
        self._tracked_generation = -1
        self._tracked_until: float | None = None
        self._receive_backoff: Backoff | None = None  # while receives fail in a row
        self._quiet = False  # `not Runtime.observing()`, as of the last receive
        self._timed: QueueTally | bool = True  # `Runtime.timing()`, as of then too
        #: Whether spans under the session span are all dropped (tracing off, or the session
        #: span unsampled under a parent-based sampler): then only messages that carry their
        #: own trace context get spans. Set when the session span opens.
        self._children_dropped = False
        self._spans_on = False
        self._receive_spans = False  # receives get spans: tracing on, the session span sampled
        self._lost: BaseException | None = None
        self._message_locks: dict[str, _MessageLock] = {}
        self.stop_reason: StopReason | None = None
        # Set when `run` has ended, made only when a newer session of the same id waits for it.
        self._ended: trio.Event | None = None
        self._finished = False
        # The session of the same id this supervisor accepted before this one, if still
        # registered: it must have ended before this one starts (registered now, in acceptance
        # order, not when the task first runs).
        self._previous: Session | None = None
        if self.session_id is not None:
            self._previous = runtime.holders.get(self.session_id)
            runtime.holders[self.session_id] = self

    # -- signals from outside ----------------------------------------------------------------
    @property
    def locked_until(self) -> float | None:
        return self.receiver.locked_until

    @property
    def busy_since(self) -> float | None:
        """When the running ``handle()`` started (the oldest, with concurrent handlers)."""
        slots = self._slots
        if slots is None:
            return self._busy_since
        return min((slot._busy_since for slot in slots if slot._busy_since is not None), default=None)

    async def renew(self) -> float:
        return await self.receiver.renew_lock()

    def lock_lost(self, error: BaseException) -> None:
        """The session lock is gone: cancel everything, settle nothing."""
        if self._lost is None:
            self._lost = error
        self._lock_scope.cancel()

    def _lock_moved(self, error: BaseException | None) -> None:
        """The receiver's word (`Receiver.watch_lock`) that its lock moved other than by time:
        gone (``error``), so the session ends now, whatever it is doing; or due earlier than
        the renewer was told, so renewal and expiry are timed again from it."""
        if error is not None:
            self.lock_lost(error)
            return
        self.runtime.renewer.track(self)
        self._tracked_generation = self.renew_generation
        self._tracked_until = self.receiver.locked_until

    def message_lock_lost(self, lock: _MessageLock, error: BaseException) -> None:
        """One message's lock is gone (non-session queues): cancel its ``handle()`` only (the
        slot's scope, which its loop replaces and goes on with the next message)."""
        self.runtime.telemetry.error(error, operation="renew_lock")
        self._message_locks.pop(lock.message.receipt, None)
        slot = lock.slot
        if slot is not None and slot._loop_scope is not None:
            slot._message_lost = True
            slot._loop_scope.cancel()

    def stop(self) -> None:
        """Graceful stop: stop waiting (for messages or a retry backoff) and let running
        ``handle()`` calls finish until the grace deadline."""
        for scope in self._wait_scopes or ():
            scope.cancel()
        for scope in self._work_scopes or ():
            scope.deadline = self.runtime.grace_deadline
        _interrupt(self)
        for slot in self._slots or ():
            _interrupt(slot)

    def snapshot(self) -> SessionSnapshot:
        """What this session is doing now, as raw facts on the runtime's clock, for
        ``/sessions`` (`queue_runtime.introspection` builds the view). Read-only; built only
        when asked, so it costs the message path nothing."""
        current = self._current
        if current is None and self._slots is not None:
            current = next((slot._current for slot in self._slots if slot._current is not None), None)
        return SessionSnapshot(
            session_id=self.session_id,
            started_at=self.started_at,
            received=self.received,
            pending=len(self._mailbox),
            message_id=current.message_id if current is not None else None,
            delivery_count=current.delivery_count if current is not None else None,
            attempt=self.attempt,
            busy_since=self.busy_since,
            retry_at=self.retry_at,
            locked_until=self.receiver.locked_until,
            renewals=self.renewals,
            failures=self.failures,
            last_error=self.last_error,
        )

    # -- the life ----------------------------------------------------------------------------
    async def run(self) -> StopReason:
        """Run the actor until idle, stopped, lock lost or failed; returns the stop reason.

        Cancellation (the supervisor itself cancelled) settles nothing: the receiver is
        closed, which hands the session back to the broker.
        """
        rt = self.runtime
        telemetry = rt.telemetry
        started = self.started_at = trio.current_time()
        actor: SessionActor[Any] | None = None
        reason: StopReason = "error"
        # The session span covers the whole life, clean-up included, so the end reason is
        # set on it (`session_ended`) before it closes.
        with telemetry.session_span(self.session_id):
            self._spans_on = rt.own_message_spans or tracing_enabled()
            self._children_dropped = not rt.own_message_spans and telemetry.children_dropped()
            self._receive_spans = self._spans_on and not self._children_dropped
            try:
                rt.sessions.add(self)
                rt.counters.sessions_started += 1
                telemetry.session_accepted(self.session_id)
                with self._lock_scope:
                    rt.renewer.track(self)
                    self.receiver.watch_lock(self._lock_moved)
                    # (What the first receive compares with: it re-tracks only if this changed.)
                    self._tracked_generation = self.renew_generation
                    self._tracked_until = self.receiver.locked_until
                    try:
                        previous, self._previous = self._previous, None
                        if previous is not None and not await self._outlive(previous):
                            reason = "shutdown"  # stopped while waiting: the finally hands it back
                            return reason
                        actor = rt.actor_class()
                        if self.session_id is not None:
                            actor.session_id = self.session_id
                            actor.session = _ReceiverHandle(self.session_id, self.receiver)
                        if rt.calls_on_start:
                            await actor.on_start()
                        # (Dispatched here, not in a helper: every await level is paid again at
                        # each wait and wake-up of the session.)
                        concurrency = self._concurrency()
                        if concurrency == 1 and self.session_id is not None:
                            reason = await self._ordered_loop(actor)
                        else:
                            reason = await self._concurrent_loop(actor, concurrency)
                    except Exception as error:
                        reason = self._failed(error, reason)
                if self._lock_scope.cancelled_caught and self._lost is None:
                    # stop() cancelled the ordered loop, which runs in this scope, in a wait or
                    # (at the grace deadline) in handle(): hand back the message it was on, still
                    # under a lock scope, so a lock lost meanwhile cuts the call short as before.
                    reason = "shutdown"
                    interrupted, self._current = self._current, None
                    if interrupted is not None:
                        self._lock_scope = trio.CancelScope()
                        with self._lock_scope:
                            try:
                                await self._abandon(interrupted)
                            except Exception as error:
                                reason = self._failed(error, reason)
                if self._lost is not None:
                    reason = "lock_lost"
                    rt.counters.lock_lost += 1
                    telemetry.error(self._lost, operation="renew_lock")
            finally:
                try:
                    rt.renewer.untrack(self)
                    self.receiver.watch_lock(None)
                    rt.sessions.discard(self)
                    cancelled = await _being_cancelled()
                    if cancelled:
                        reason = "shutdown"
                    self.stop_reason = reason
                    # Each clean-up step has its own bound and runs whatever happened to the one
                    # before: a hand-back stuck on a stalled broker must not skip on_stop, nor the
                    # close that releases the session.
                    if self._lost is None and not cancelled and self._mailbox:
                        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                            await self._hand_back()
                    if actor is not None and rt.calls_on_stop:
                        limit = 1.0 if cancelled else CLEANUP_TIMEOUT
                        with trio.CancelScope(shield=True, deadline=trio.current_time() + limit):
                            try:
                                await actor.on_stop(reason)
                            except Exception as error:
                                telemetry.log(
                                    40,
                                    f"on_stop failed: {describe_exception(error)}",
                                    operation="process",
                                    session_id=self.session_id,
                                )
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                        try:
                            await self.receiver.aclose()
                        except QueueError as error:
                            telemetry.error(error, operation="release")
                    telemetry.session_ended(
                        self.session_id, seconds=trio.current_time() - started, reason=reason
                    )
                finally:
                    self._finished = True
                    if self.session_id is not None and rt.holders.get(self.session_id) is self:
                        del rt.holders[self.session_id]
                    if self._ended is not None:
                        self._ended.set()
                if self._on_exit is not None:
                    self._on_exit()
        return reason

    def _failed(self, error: Exception, reason: StopReason) -> StopReason:
        """The stop reason once ``error`` ended the session's work in its lock scope (``reason``
        stays for a lost lock: `run` reports that itself)."""
        if isinstance(error, _LockLost):
            self.lock_lost(error.cause)
            return reason
        if isinstance(error, _SessionFailed):
            if not error.reported:
                self.runtime.telemetry.error(error.cause, operation="settle")
            return "error"
        self.runtime.telemetry.log(
            40,
            f"actor failed outside handle(): {describe_exception(error)}",
            operation="process",
            session_id=self.session_id,
        )
        return "error"

    async def _outlive(self, previous: Session) -> bool:
        """Wait until ``previous``, an older session of the same id in this supervisor, has
        ended and released its receiver. The broker handed the session out again, so the old
        lock is gone: tell ``previous`` so, at once. False when a stop request came first."""
        previous.lock_lost(
            SessionLockLost(
                f"session {self.session_id!r} was handed out again: this worker's earlier lock on it is gone"
            )
        )
        if previous._finished:
            return True
        if previous._ended is None:
            previous._ended = trio.Event()
        scope = self._add_wait_scope()
        try:
            with scope:
                await previous._ended.wait()
        finally:
            self._end_wait(scope)
        return not scope.cancelled_caught

    def _concurrency(self) -> int:
        config = self.runtime.config
        if self.session_id is None:
            # A non-session queue has no order to keep: each message is independent.
            return max(config.per_session_concurrency, config.max_concurrent_sessions)
        return config.per_session_concurrency

    async def _ordered_loop(self, actor: SessionActor[Any]) -> StopReason:
        """One message at a time, in order.

        A session's loop runs in the session's lock scope instead of a scope per receive and
        per ``handle()`` (or one of its own): `stop` cancels it while the loop waits (receive,
        retry backoff) and gives it the grace deadline while ``handle()`` runs (lifted again
        once ``handle()`` returned, so settling is never cut short). A message interrupted that
        way is abandoned by `run` (with ``_lost`` unset, a cancellation the lock scope caught
        came from `stop`), as with per-call scopes. Sessions only: a non-session queue runs
        `_concurrent_loop` (with one slot when ``max_concurrent_sessions`` is 1).
        """
        rt = self.runtime
        config = rt.config
        idle = config.session_idle_timeout
        receive_timeout = config.receive_timeout
        max_messages = 1 + config.prefetch
        mailbox = self._mailbox
        receiver = self.receiver
        now = rt.now
        self._loop_scope = self._lock_scope  # (entered by `run`)
        self._waiting = self._working = True
        try:
            # The receive call is written in (the loop's scope stands in for a wait's own):
            # this loop turns once per message, and each await level it saves is paid at
            # every wait and wake-up of the session. What follows a receive is `_took`,
            # shared with `_receive`.
            started = now()  # read when the mailbox empties: the clock read per message
            idle_deadline = started + idle
            while True:
                if rt.stopping:
                    return "shutdown"
                if not mailbox:
                    timeout = idle_deadline - started
                    if timeout <= 0:
                        return "idle"
                    self._phase = _WAITING  # what `self._waiting` marks, without the calls
                    try:
                        received = await receiver.receive(
                            max_messages, timeout if timeout < receive_timeout else receive_timeout
                        )
                    except _LOCK_ERRORS as error:
                        raise _LockLost(error) from None
                    except QueueError as error:
                        self._phase = _BUSY
                        if not await self._receive_failed(error):
                            return "shutdown"
                        started = now()
                        continue
                    finally:
                        self._phase = _BUSY
                    self._receive_backoff = None
                    self._took(received, started)
                    if not received:
                        if receiver.release_requested:
                            return "idle"  # its slot is wanted: no need to wait out the idle time
                        started = now()
                        continue  # the next turn ends the session if it is idle
                    del received  # not kept alive while the session waits (less for the GC)
                if not await self._process(actor, mailbox.popleft(), self):
                    return "shutdown"
                if not mailbox:  # only a receive reads them: no clock read per prefetched message
                    started = now()
                    idle_deadline = started + idle
        finally:
            self._loop_scope = None
            self._waiting = self._working = False
            self._phase = _BUSY

    async def _concurrent_loop(self, actor: SessionActor[Any], concurrency: int) -> StopReason:
        """Up to ``concurrency`` ``handle()`` calls at once (no order): a session with
        ``per_session_concurrency > 1``, or a non-session queue.

        ``concurrency`` slots, each a task running the ordered loop's steps in a cancel scope
        of its own, share the session's mailbox: a slot takes the next message from it and
        handles it; a slot that finds it empty receives for all (up to ``concurrency +
        prefetch`` messages), or parks while another slot receives. Stop, grace period and
        hand-back work per slot as in the ordered loop. A lock error in any slot ends the
        session as lock loss; a provider failure ends it with ``"error"`` once the other
        slots' ``handle()`` calls returned.
        """
        rt = self.runtime
        slots = self._slots = [_Slot(rt) for _ in range(concurrency)]
        pool = _Pool(slots, rt.config.session_idle_timeout, rt.now())
        try:
            async with trio.open_nursery() as nursery:
                for slot in slots[1:]:
                    nursery.start_soon(self._slot_loop, actor, slot, pool, concurrency)
                await self._slot_loop(actor, slots[0], pool, concurrency)
        finally:
            self._slots = None
        if pool.error is not None:
            raise pool.error
        return pool.reason or "shutdown"

    async def _slot_loop(self, actor: SessionActor[Any], slot: _Slot, pool: _Pool, concurrency: int) -> None:
        """One slot of `_concurrent_loop`; sets ``pool.reason`` when the session should end."""
        rt = self.runtime
        mailbox = self._mailbox
        lot = pool.lot
        max_messages = concurrency + rt.config.prefetch
        while True:
            with trio.CancelScope() as scope:
                slot._loop_scope = scope
                slot._waiting = True
                if self.session_id is not None:
                    slot._working = True
                # else: each message has its own lock (`_process_fully`); this scope stands in
                # for its handle() too, and is replaced when that lock is lost.
                try:
                    while pool.reason is None:
                        if rt.stopping:
                            pool.end("shutdown")
                            break
                        if mailbox:
                            message = mailbox.popleft()
                            if lot and not pool.waking and (mailbox or not pool.receiving):
                                # One more slot, for the rest (it wakes the next in turn), or to
                                # receive while this one handles. One at a time: a handler that
                                # never awaits drains the mailbox before that slot runs.
                                pool.waking += len(lot.unpark())
                            pool.busy += 1
                            try:
                                if not await self._process(actor, message, slot):
                                    pool.end("shutdown")
                            finally:
                                pool.busy -= 1
                            if slot._message_lost:
                                break  # lost as handle() returned: leave the cancelled scope now
                        elif pool.receiving:
                            slot._phase = _WAITING  # stop() cancels a parked slot like a waiting one
                            try:
                                await lot.park()
                            finally:
                                slot._phase = _BUSY
                            if pool.waking:
                                pool.waking -= 1
                        else:
                            pool.receiving = True
                            try:
                                received = await self._receive(
                                    math.inf if self.session_id is None else pool.idle_deadline,
                                    max_messages,
                                    slot,
                                )
                            finally:
                                pool.receiving = False
                            if lot and not pool.waking:
                                # A parked slot takes over: it handles what is left, or receives
                                # while this one handles (nobody would receive otherwise).
                                pool.waking += len(lot.unpark())
                            if received is None:
                                pool.end("shutdown")
                            elif received or pool.busy:  # not idle while a handler runs
                                pool.idle_deadline = rt.now() + pool.idle
                            elif rt.now() >= pool.idle_deadline or self.receiver.release_requested:
                                pool.end("idle")
                except _LockLost as lost:
                    self.lock_lost(lost.cause)  # cancels every slot; `run` reports it
                    return
                except _SessionFailed as failed:
                    pool.fail(failed)
                    return
                finally:
                    slot._loop_scope = None
                    slot._waiting = slot._working = False
                    slot._phase = _BUSY
            if slot._message_lost:
                # Only its message's lock is gone: leave it to the broker, go on in a new scope.
                slot._message_lost = False
                slot._current = None
                continue
            if not scope.cancelled_caught:
                return
            # stop() or the session's end cancelled the slot's scope: a wait or a handle() was cut.
            pool.end("shutdown")
            interrupted, slot._current = slot._current, None
            if interrupted is not None:
                try:
                    await self._abandon(interrupted)
                except _LockLost as lost:
                    self.lock_lost(lost.cause)
                except _SessionFailed as failed:
                    pool.fail(failed)
            return

    async def _receive(
        self, idle_deadline: float, max_messages: int, slot: _Slot
    ) -> list[ReceivedMessage] | None:
        """Fill the mailbox; ``[]`` on timeout, None when interrupted by a stop request."""
        rt = self.runtime
        backoff: Backoff | None = None  # built on the first error only (receive is hot)
        while True:
            started = rt.now()
            timeout = idle_deadline - started
            if timeout <= 0 and idle_deadline != math.inf:
                return []
            timeout = min(timeout, rt.config.receive_timeout) if timeout > 0 else rt.config.receive_timeout
            scope = self._wait_scope(slot)
            if scope is None:
                return None
            with scope:
                try:
                    received = await self.receiver.receive(max_messages, timeout)
                except _LOCK_ERRORS as error:
                    raise _LockLost(error) from None
                except QueueError as error:
                    rt.telemetry.error(error, operation="receive")
                    if not self._may_receive_again(error):
                        raise _SessionFailed(error, reported=True) from None
                    if backoff is None:
                        backoff = Backoff(initial=0.2, maximum=5.0)
                    await trio.sleep(backoff.next_delay())
                    continue
                finally:
                    self._end_wait(scope)
            if scope.cancelled_caught:
                return None
            self._took(received, started)
            return received

    def _took(self, received: list[ReceivedMessage], started: float) -> None:
        """After a receive that began at ``started``: report it (an empty long poll is a
        receive call too), put the messages in the mailbox, count them and keep their locks
        renewed. The one copy of this for both loops."""
        rt = self.runtime
        if not received:
            if rt.observing():
                self._received(received, rt.now() - started)
            return
        self._quiet = quiet = not rt.observing()
        if quiet:
            self._timed = False
        else:
            # Tracing alone needs no counts or durations: a message's spans time themselves.
            self._timed = timed = rt.timing()
            if timed is not True and timed and not self._receive_spans:  # metrics only: the tally
                timed.messages_received(len(received), rt.now() - started)
            elif timed or self._receive_spans or rt.own_message_hooks:
                self._received(received, rt.now() - started)
        rt.counters.received += len(received)
        self.received += len(received)
        self._mailbox.extend(received)
        if self.session_id is None:
            for message in received:
                lock = _MessageLock(self, message)
                self._message_locks[message.receipt] = lock
                rt.renewer.track(lock)
        elif (
            self.receiver.locked_until != self._tracked_until
            or self.renew_generation != self._tracked_generation
        ):
            # Re-schedule renewal only when the lock deadline moved (or renewal was re-scheduled
            # elsewhere): the current entry is still right otherwise, and a push per receive
            # filled the heap with stale entries.
            rt.renewer.track(self)
            self._tracked_generation = self.renew_generation
            self._tracked_until = self.receiver.locked_until

    def _may_receive_again(self, error: QueueError) -> bool:
        """Whether receiving again on this receiver after ``error`` keeps the session's order.

        A receive that failed may still have taken messages at the broker (the answer was lost
        on the way back): they stay locked to this receiver, and the next receive would hand out
        the ones after them. So a session receiver is given up (closing it hands everything back,
        in order) unless the broker refused the call outright (`Throttled`). A non-session queue
        has no order to keep: its transient errors are retried."""
        if not error.transient:
            return False
        return self.session_id is None or isinstance(error, Throttled)

    async def _receive_failed(self, error: QueueError) -> bool:
        """A receive of the ordered loop failed: report it, raise `_SessionFailed` unless it may
        be retried (`_may_receive_again`), else back off before the next try. False when a stop
        interrupted the wait."""
        self.runtime.telemetry.error(error, operation="receive")
        if not self._may_receive_again(error):
            raise _SessionFailed(error, reported=True) from None
        if self._receive_backoff is None:
            self._receive_backoff = Backoff(initial=0.2, maximum=5.0)
        return await self._backoff(self._receive_backoff.next_delay(), self)

    def _wait_scope(self, slot: Session | _Slot) -> trio.CancelScope | _Phase | None:
        """Where a wait of ``slot`` runs; None when a stop request already came (do not wait)."""
        if slot._waiting:
            if self.runtime.stopping:
                return None
            return _Phase(slot, _WAITING)
        scope = self._add_wait_scope()
        return scope

    def _add_wait_scope(self) -> trio.CancelScope:
        scope = trio.CancelScope()
        if self._wait_scopes is None:
            self._wait_scopes = set()
        self._wait_scopes.add(scope)
        if self.runtime.stopping:
            scope.cancel()
        return scope

    def _end_wait(self, scope: trio.CancelScope | _Phase) -> None:
        if isinstance(scope, trio.CancelScope) and self._wait_scopes is not None:
            self._wait_scopes.discard(scope)

    # -- one message -------------------------------------------------------------------------
    async def _process(
        self, actor: SessionActor[Any], message: ReceivedMessage, slot: Session | _Slot
    ) -> bool:
        """Handle one message to settlement in ``slot`` (the session itself in the ordered
        loop). False when a stop interrupted it (handed back).

        The first attempt of a session's message without spans runs here with as few steps as
        it needs (the path of nearly every message); anything else, and whatever the first
        attempt did other than return, goes on in `_process_fully`.
        """
        rt = self.runtime
        if not slot._working or rt.stopping or (self._spans_on and self._traced(message)):
            return await self._process_fully(actor, message, slot)
        limit = rt.config.max_delivery_count
        if limit is not None and message.delivery_count > limit:
            return await self._process_fully(actor, message, slot)
        inner = message.message
        try:
            body = rt.decode(inner.body, inner.content_type)
        except DecodeError:
            return await self._process_fully(actor, message, slot)  # decodes again, dead-letters
        now = rt.now()
        until = self.receiver.locked_until
        if until is not None and until - rt.lock_margin <= now:
            raise _LockLost(self._too_late(until))
        context = _DeliveredContext(message, 1, self)
        slot._current = message
        slot._busy_since = now
        slot._phase = _WORKING  # what `slot._working` marks (see stop()), without its calls
        failure: Exception | None = None
        # Untraced here: only counts and durations (metrics, message logs) may be wanted.
        timed = self._timed
        started = perf_counter() if timed else 0.0  # durations for the metrics (no trio clock)
        handled = 0.0
        try:
            await actor.handle(body, context)
        except (_LockLost, _SessionFailed):
            raise
        except Exception as error:  # (trio.Cancelled is not one: `_current` stays for the loop)
            failure = error
        finally:
            slot._phase = _BUSY
            slot._busy_since = None
            if timed:
                ended = perf_counter()
                started, handled = ended, ended - started  # `started`: of the complete call now
            if self.runtime.stopping and slot._loop_scope is not None:
                # stop() came while handle() ran: settling must not be cut short.
                slot._loop_scope.deadline = math.inf
        if failure is not None:  # DeadLetter, or an error to retry
            if timed:
                rt.telemetry.handled(handled)
            return await self._process_fully(actor, message, slot, first=(body, context, failure))
        if not context.settled:
            try:
                await self.receiver.complete(message)
            except QueueError as error:
                receiver = self.receiver
                await self._settle("complete", lambda: receiver.complete(message), message, error)
            rt.counters.completed += 1
            if timed:
                if timed is not True:  # metrics only: straight into the tally
                    timed.message_completed(perf_counter() - started, handled)
                elif rt.own_handled:  # a Telemetry subclass with its own hooks: the two calls
                    rt.telemetry.handled(handled)
                    rt.telemetry.message_completed(message, seconds=perf_counter() - started)
                else:
                    rt.telemetry.message_completed(message, seconds=perf_counter() - started, handled=handled)
        elif timed:
            rt.telemetry.handled(handled)
        slot._current = None
        return True

    def _received(self, received: list[ReceivedMessage], seconds: float) -> None:
        """Report a receive call (asked only while observing). With tracing off when the
        session started, or under an unsampled session span, there is no receive span to make:
        say so, which spares the tracing and sampling questions."""
        rt = self.runtime
        if rt.own_message_hooks:  # a subclass's hook, perhaps without ``span``
            rt.telemetry.messages_received(received, seconds=seconds)
        else:
            rt.telemetry.messages_received(received, seconds=seconds, span=self._receive_spans)

    def _traced(self, message: ReceivedMessage) -> bool:
        """Whether ``message`` gets spans (asked only while observing): a Telemetry subclass
        asked to see every span call, or tracing is on and the spans are not known to be
        dropped (an unsampled session's messages that carry no trace context of their own).
        Tracing is as it was when the session started: an SDK installed later traces the
        sessions that start after it."""
        if self._spans_on:  # tracing on when the session started (or a Telemetry subclass)
            if not self._children_dropped:
                return True
            inner = message.message  # an unsampled session: only a message's own context counts
            return "traceparent" in inner.properties or inner.correlation_id is not None
        return False

    async def _process_fully(
        self,
        actor: SessionActor[Any],
        message: ReceivedMessage,
        slot: Session | _Slot,
        first: tuple[Any, MessageContext, Exception] | None = None,
    ) -> bool:
        """`_process` with every case: any concurrency, telemetry, the delivery limit, decode
        errors, dead-lettering, retries. ``first`` is ``(body, context, error)`` when the
        first attempt already ran in `_process` and raised ``error``."""
        rt = self.runtime
        config = rt.config
        telemetry = rt.telemetry
        receiver = self.receiver
        lock = self._message_locks.get(message.receipt) if self.session_id is None else None
        quiet = self._quiet
        traced = not quiet and self._traced(message)
        slot._current = message
        cancelled = False
        try:
            if first is None:
                limit = config.max_delivery_count
                if limit is not None and message.delivery_count > limit:
                    await self._dead_letter(
                        message,
                        "MaxDeliveryCountExceeded",
                        f"delivered {message.delivery_count} times; max_delivery_count is {limit}",
                    )
                    return True
                inner = message.message
                try:
                    body = rt.decode(inner.body, inner.content_type)
                except DecodeError as error:
                    await self._dead_letter(message, "DeserializationFailed", describe_exception(error))
                    return True
            else:
                body = first[0]
            attempt = 1
            context: MessageContext
            while True:
                failure: Exception | None = None
                work: trio.CancelScope | _Phase | None = None
                if first is not None:
                    # The first attempt ran in `_process` (its phase marker is reset already).
                    _, context, failure = first
                    first = None
                    if isinstance(failure, DeadLetter):
                        if not context.settled:
                            await self._dead_letter(message, failure.reason, failure.description)
                        return True
                else:
                    now = rt.now()
                    if self.session_id is None:
                        until = message.locked_until
                        if lock is None or (until is not None and until - rt.lock_margin <= now):
                            # Only this message's lock is gone or running out: leave it to the broker.
                            rt.telemetry.error(self._too_late(until or now, message), operation="process")
                            return True
                    else:
                        until = receiver.locked_until
                        if until is not None and until - rt.lock_margin <= now:
                            raise _LockLost(self._too_late(until))
                    context = _DeliveredContext(message, attempt, self)
                    self.attempt = attempt
                    slot._busy_since = now
                    if lock is not None:
                        lock.busy_since = now
                    if slot._working or lock is not None:
                        work = _Phase(slot, _WORKING)  # the loop's scope stands in (see stop())
                        if lock is not None:
                            lock.slot = slot  # type: ignore[assignment]  # (a non-session queue's slot)
                    else:
                        work = trio.CancelScope(deadline=rt.grace_deadline)
                        if self._work_scopes is None:
                            self._work_scopes = set()
                        self._work_scopes.add(work)
                    with work:
                        try:
                            if quiet:
                                await actor.handle(body, context)
                            elif traced:
                                with telemetry.process_span(message, attempt):
                                    await actor.handle(body, context)
                            else:
                                # The same duration metric without a span's context manager.
                                started = perf_counter()
                                try:
                                    await actor.handle(body, context)
                                finally:
                                    telemetry.handled(perf_counter() - started)
                        except DeadLetter as dead:
                            if not context.settled:
                                await self._dead_letter(message, dead.reason, dead.description)
                            return True
                        except (_LockLost, _SessionFailed):
                            raise
                        except Exception as error:
                            failure = error
                        finally:
                            if isinstance(work, trio.CancelScope) and self._work_scopes is not None:
                                self._work_scopes.discard(work)
                            slot._busy_since = None
                            if lock is not None:
                                lock.busy_since = None
                                lock.slot = None
                if lock is not None and message.receipt not in self._message_locks:
                    return True  # its lock was lost as handle() returned: leave it to the broker
                if work is not None and work.cancelled_caught:
                    await self._abandon(message)  # the grace period ended: hand it back
                    return False
                if failure is None:
                    if context.settled:
                        return True
                    if traced:
                        await self._complete(message)
                        return True
                    # `_complete` without a span, written in (once per message): the broker is
                    # called directly; the retry and error mapping only when it fails.
                    started = 0.0 if quiet else perf_counter()  # a duration, as `handled()` measures
                    try:
                        await receiver.complete(message)
                    except QueueError as error:
                        await self._settle("complete", lambda: receiver.complete(message), message, error)
                    rt.counters.completed += 1
                    if not quiet:
                        telemetry.message_completed(message, seconds=perf_counter() - started)
                    return True
                if context.settled:
                    telemetry.log(
                        30,
                        f"handle() raised after dead-lettering: {describe_exception(failure)}",
                        operation="process",
                        message=message,
                    )
                    return True
                rt.counters.failed_attempts += 1
                telemetry.handler_failed(failure)
                self.failures += 1
                self.last_error = type(failure).__name__
                if attempt >= config.retry.max_attempts:
                    await self._dead_letter(message, "MaxAttemptsExceeded", describe_exception(failure))
                    return True
                attempt += 1
                rt.counters.retries += 1
                telemetry.retry_attempt(message, attempt, failure)
                delay = config.retry.delay(attempt - 1)
                self.retry_at = rt.now() + delay  # (the retry path only)
                if not await self._backoff(delay, slot):
                    await self._abandon(message)
                    return False
        except trio.Cancelled:
            cancelled = True  # keep `_current`: the ordered loop hands it back if stop() did this
            raise
        finally:
            if not cancelled:
                slot._current = None
            self.attempt, self.retry_at = 1, None
            if lock is not None:
                rt.renewer.untrack(lock)
                self._message_locks.pop(message.receipt, None)

    def _too_late(self, until: float, message: ReceivedMessage | None = None) -> QueueError:
        """The lock-loss error for a ``handle()`` not started because the lock (deadline
        ``until``) has less than the margin left."""
        left = until - self.runtime.now()
        what = f"message {message.message_id!r}" if message is not None else f"session {self.session_id!r}"
        text = (
            f"{what}: handle() not started, the lock has {max(left, 0.0):.2f} s left"
            f" (the safety margin is {self.runtime.lock_margin:g} s)"
        )
        return MessageLockLost(text) if message is not None else SessionLockLost(text)

    async def _backoff(self, delay: float, slot: Session | _Slot) -> bool:
        """Sleep before a retry; False when a stop request interrupted the wait."""
        scope = self._wait_scope(slot)
        if scope is None:
            return False
        with scope:
            try:
                await trio.sleep(delay)
            finally:
                self._end_wait(scope)
        return not scope.cancelled_caught and not self.runtime.stopping

    async def _renew_now(self) -> None:
        try:
            if self.session_id is None:
                for lock in list(self._message_locks.values()):
                    if lock.busy_since is not None:
                        await lock.renew()
                return
            await self.receiver.renew_lock()
        except _LOCK_ERRORS as error:
            self.lock_lost(error)
            await trio.lowlevel.checkpoint()
            raise
        self.runtime.counters.lock_renewals += 1
        self.renewals += 1
        self.runtime.renewer.track(self)

    # -- settlement --------------------------------------------------------------------------
    async def _settle(
        self,
        operation: str,
        call: Callable[[], Awaitable[None]],
        message: ReceivedMessage,
        first_error: QueueError | None = None,
    ) -> None:
        """Settle with retries and error mapping; ``first_error`` is what a first call made
        outside (see `_complete`) raised, so that call is not repeated."""
        deadline = self.receiver.locked_until or message.locked_until
        try:
            with self.runtime.telemetry.settle_span(operation, message):
                try:
                    if first_error is not None:
                        raise first_error
                    await call()  # the first call direct: no retry machinery unless needed
                except QueueError as error:
                    if not error.transient:
                        raise
                    await _retry_settle(call, error, deadline)
        except _LOCK_ERRORS as error:
            if self.session_id is None:
                # Only this message's lock is gone; it will be redelivered.
                self.runtime.telemetry.error(error, operation=operation)
                return
            raise _LockLost(error) from None
        except QueueError as error:
            raise _SessionFailed(error) from None

    async def _complete(self, message: ReceivedMessage) -> None:
        """Complete with a settle span (`_process` completes directly when there is none)."""
        rt = self.runtime
        started = perf_counter()  # a duration only, as `handled()` measures (no trio clock read)
        receiver = self.receiver
        await self._settle("complete", lambda: receiver.complete(message), message)
        rt.counters.completed += 1
        rt.telemetry.message_completed(message, seconds=perf_counter() - started)

    async def _dead_letter(self, message: ReceivedMessage, reason: str, description: str | None) -> None:
        await self._settle(
            "dead_letter", lambda: self.receiver.dead_letter(message, reason, description), message
        )
        self.runtime.counters.dead_lettered += 1
        self.runtime.telemetry.message_dead_lettered(message, reason, description)

    async def _abandon(self, message: ReceivedMessage) -> None:
        await self._settle("abandon", lambda: self.receiver.abandon(message), message)
        self.runtime.counters.abandoned += 1
        self.runtime.telemetry.message_abandoned(message)

    async def _hand_back(self) -> None:
        """Abandon every message received but not settled, in order. Errors are logged:
        anything not handed back is redelivered when its lock expires."""
        pending = list(self._mailbox)  # (a message in progress has been settled or handed back)
        self._mailbox.clear()
        for message in pending:
            try:
                await self._abandon(message)
            except (_LockLost, _SessionFailed) as error:
                self.runtime.telemetry.error(error.cause, operation="abandon")
                return


class _Phase:
    """Marks what a session's ordered loop is doing while its one scope stands in for a
    per-call scope (see `Session.stop`). Used like a cancel scope that never catches."""

    __slots__ = ("_phase", "_session")

    cancelled_caught = False

    def __init__(self, session: Session | _Slot, phase: int) -> None:
        self._session = session
        self._phase = phase

    def __enter__(self) -> _Phase:
        session = self._session
        session._phase = self._phase
        if self._phase == _WORKING and session.runtime.stopping and session._loop_scope is not None:
            session._loop_scope.deadline = session.runtime.grace_deadline
        return self

    def __exit__(self, *exc_info: object) -> None:
        session = self._session
        if session._phase == _WORKING and session.runtime.stopping and session._loop_scope is not None:
            # handle() is over: settling it must not be cut short by the grace deadline.
            session._loop_scope.deadline = math.inf
        session._phase = _BUSY


class _Slot:
    """One handler slot of `Session._concurrent_loop`: the fields the ordered loop keeps on
    the session itself (its scope, phase, markers, message in hand, ``handle()`` start)."""

    __slots__ = (
        "_busy_since",
        "_current",
        "_loop_scope",
        "_message_lost",
        "_phase",
        "_waiting",
        "_working",
        "runtime",
    )

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._loop_scope: trio.CancelScope | None = None
        self._message_lost = False  # a non-session message's lock was lost: its scope was cancelled
        self._waiting = False
        self._working = False
        self._phase = _BUSY
        self._current: ReceivedMessage | None = None
        self._busy_since: float | None = None


class _Pool:
    """What the slots of one concurrent session share."""

    __slots__ = ("busy", "error", "idle", "idle_deadline", "lot", "reason", "receiving", "slots", "waking")

    def __init__(self, slots: list[_Slot], idle: float, now: float) -> None:
        self.slots = slots
        self.idle = idle
        self.idle_deadline = now + idle
        self.reason: StopReason | None = None
        self.error: _SessionFailed | None = None
        self.busy = 0  # slots handling a message
        self.receiving = False  # a slot is receiving for all
        self.lot = trio.lowlevel.ParkingLot()  # slots waiting for that receive
        self.waking = 0  # slots unparked that have not run yet

    def end(self, reason: StopReason) -> None:
        """End the session: slots stop waiting now and take no new message."""
        if self.reason is None:
            self.reason = reason
        for slot in self.slots:
            if slot._phase == _WAITING and slot._loop_scope is not None:
                slot._loop_scope.cancel()

    def fail(self, failed: _SessionFailed) -> None:
        if self.error is None:
            self.error = failed
        self.end("error")


def _interrupt(slot: Session | _Slot) -> None:
    """`Session.stop` for one loop: cancel it while it waits; while ``handle()`` runs, give
    it the grace deadline."""
    loop_scope = slot._loop_scope
    if loop_scope is not None:
        if slot._phase == _WAITING:
            loop_scope.cancel()
        elif slot._phase == _WORKING:
            loop_scope.deadline = slot.runtime.grace_deadline


async def _retry_settle(
    call: Callable[[], Awaitable[None]], first: QueueError, deadline: float | None
) -> None:
    """The rest of ``call_with_retry(call, attempts=SETTLE_ATTEMPTS, deadline=deadline)`` after
    a first call failed with the transient ``first``: the retry machinery (a `Backoff`, its
    policy) is built only then, not on every settlement."""
    backoff = Backoff()
    delay = getattr(first, "retry_after", None) or backoff.next_delay()
    if deadline is not None and trio.current_time() + delay >= deadline:
        raise first
    await trio.sleep(delay)
    await call_with_retry(call, attempts=SETTLE_ATTEMPTS - 1, backoff=backoff, deadline=deadline)


async def _being_cancelled() -> bool:
    """True when the surrounding scope is cancelled (used inside ``finally``)."""
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
    except trio.Cancelled:
        return True
    return False
