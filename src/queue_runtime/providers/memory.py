"""The in-memory broker: a faithful model of a peek-lock broker with sessions.

`InMemoryProvider` is the demo's and the benchmarks' broker, and the test double users run
their actors against (the default provider when none is configured is its durable twin,
`providers.sqlite.SqliteProvider`). It behaves like Service Bus (and, through the
runtime, like SQS FIFO groups): peek-lock with lock expiry, delivery counts, a broker-side
dead-letter queue after ``max_delivery_count`` deliveries, time-to-live, scheduled messages,
session locks and session state, and fault injection: calls that fail (`inject_fault`) and
a broker that stops answering while time passes (`stall`).

Model, in short:

* Queues are created on first use as session-enabled queues; `InMemoryProvider.create_queue`
  declares one explicitly (also non-session ones). Each queue has a dead-letter queue, itself
  a non-session queue, opened with ``open_receiver(queue, dead_letter=True)``.
* Every message gets a sequence number when it becomes available (at send, or when a
  scheduled message comes due). Within a session, messages are delivered in sequence order;
  an abandoned or expired message goes back to its place, before any later one.
* Locks (message and session) last ``lock_duration`` seconds on ``trio.current_time()``, so
  tests run the broker on ``MockClock``. Lock expiry, TTL and scheduled messages are
  evaluated lazily whenever a queue is touched, from a per-queue heap of timed events, and a
  waiting ``receive`` / ``accept_session`` also wakes at the next timed event, so a lock that
  expires while everyone waits is noticed on time. The only task is an alarm (a trio system
  task, one per provider and run) that wakes timed waits: a cancel scope per wait would cost
  more than the rest of a receive.
* Scheduling: ``complete``, ``abandon`` and ``dead_letter`` never wait, so they are
  cancellation points but not scheduling points (like ``trio.MemorySendChannel.send_nowait``
  after a cancel check); ``receive`` passes through the scheduler once per call, by waiting
  or by a shielded checkpoint, as ``trio.MemoryReceiveChannel.receive`` does. A send to a
  session whose holder waits in ``receive`` hands that receive the new messages directly
  (locked, in order, up to what it asked for, once per session and send), as a trio channel
  hands a value to a waiting receiver.
* Delivery counting: the first delivery has ``delivery_count`` 1; every later one (after
  abandon, lock expiry, or release of a session that held it) is one more. A message whose
  next delivery would exceed the queue's ``max_delivery_count`` is moved to the dead-letter
  queue instead, reason ``MaxDeliveryCountExceeded``.
* Wall-clock times (``scheduled_enqueue_time``, ``enqueued_at``) map onto trio's clock
  through an offset captured when the provider is created inside a trio run (or at its first
  use inside one): ``trio_time = trio_at_start + (utc - utc_at_start)``. Use one provider per
  ``trio.run``.
* Memory is bounded: a queue holds at most ``max_queue_messages`` messages, counting its
  dead-letter queue (as a Service Bus quota does); a send beyond that raises `QueueFull`.
* Cost: sends, receives and settlements are O(log n); accepting a session is O(log s) using a
  heap of ready sessions. Nothing scans all messages or all sessions.

Not thread-safe: use one provider from one trio run (every call runs on the trio thread).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import msgspec
import outcome
import trio

from ..errors import (
    InvalidReceipt,
    MessageLockLost,
    MessageTooLarge,
    NotSupported,
    QueueError,
    QueueFull,
    SessionLockLost,
    ValidationError,
)
from ..message import Message, ReceivedMessage, message_size, validate_session_id
from .base import Capabilities, Provider, QueueInfo, QueueStats, Receiver

__all__ = ["FAULT_OPERATIONS", "InMemoryProvider", "StallMode"]

_WALLS_MAX: Final = 1024  # enqueue times `_to_wall` keeps converted (one per send call)
FAULT_OPERATIONS: Final = (
    "send",
    "receive",
    "accept_session",
    "complete",
    "abandon",
    "dead_letter",
    "renew_lock",
)
"""Operations `InMemoryProvider.inject_fault` can make fail and `InMemoryProvider.stall` can stall."""

StallMode = Literal["hang", "late"]
"""How a stalled call behaves: ``"hang"`` waits for the stall to end, then runs; ``"late"`` runs
at once and answers when the stall ends (the broker did the work, the answer was held up)."""

_State = Literal["scheduled", "pending", "delayed", "locked", "gone"]


# msgspec's own shallow copy (its type stubs do not declare it): no re-validation, and no
# dispatch through the copy module.
_shallow_copy: Callable[[Message], Message] = Message.__copy__  # type: ignore[attr-defined]


def _copy(message: Message) -> Message:
    """A copy with its own properties dict (a shallow copy skips re-validation: it is fast)."""
    duplicate = _shallow_copy(message)
    duplicate.properties = dict(message.properties)
    return duplicate


class _Rec(msgspec.Struct, eq=False, gc=False):
    """One stored message and its broker-side bookkeeping. (A struct: one is made per message
    sent, and msgspec builds it with its defaults in C, a fraction of an ``__init__``.)

    It names its session by id (`InMemoryProvider._session_of`) rather than refer to it: with
    no reference back, a record can be in no reference cycle, so it is not tracked by the
    garbage collector, whose full collections would otherwise walk every stored message."""

    message: Message
    session_id: str | None
    seq: int = 0
    state: _State = "pending"
    delivery_count: int = 0
    enqueued_at: float = 0.0
    due: float = 0.0
    visible_at: float = 0.0
    expires_at: float | None = None
    lock_token: str | None = None
    locked_until: float | None = None
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    dead_letter_source: str | None = None


class _Wait(msgspec.Struct, eq=False):
    """One parked task: woken by a notification, by its deadline (through the alarm), or
    cancelled. ``receiver`` is set for a session receive waiting for messages: a sender hands
    them over directly (up to ``max_messages``). (A struct, built in C: one per wait.)"""

    owner: _Waiters
    until: float
    task: trio.lowlevel.Task
    receiver: _SessionReceiver | None
    max_messages: int
    parked: bool = True
    alarm: _Alarm | None = None

    def leave(self) -> None:
        """No longer parked (woken or aborted): its alarm entry, if any, is stale now."""
        self.parked = False
        if self.alarm is not None:
            self.alarm.live -= 1

    def wake(self, value: list[ReceivedMessage] | None = None) -> None:
        self.leave()
        trio.lowlevel.reschedule(self.task, outcome.Value(value))

    def __call__(self, _: object) -> trio.lowlevel.Abort:
        """Cancelled while parked: the wait is its own abort function (a bound method or a
        closure would be one more object per wait for the garbage collector to look at)."""
        self.leave()
        self.owner.discard(self)
        return trio.lowlevel.Abort.SUCCEEDED


class _Alarm:
    """Wakes the timed waits of one provider from one task.

    trio's only timer is a cancel scope's deadline, and a cancel scope per wait cost about as
    much as the rest of a receive (measured: a wait inside ``move_on_at`` is ~18 us dearer than
    a plain park). So waits park without one, and this alarm — one trio system task per
    provider and run, started at the provider's first clock read in the run — sleeps until the
    earliest deadline and wakes whoever is due. Most waits end early (a message arrives), so a
    wait due no earlier than the alarm's next wake-up is only listed, not ordered: the alarm
    looks at the list when it wakes, wakes whoever is due and orders the rest into its heap (a
    heap push per wait was a tenth of a receive). A wait that ends early leaves a stale entry
    behind; the heap and the list are compacted when stale entries outnumber live ones
    (amortised O(1) per wait), so they stay bounded by the number of waiting tasks. The task
    ends with the run or at `InMemoryProvider.aclose`, and never raises.
    """

    __slots__ = (
        "_closed",
        "_count",
        "_heap",
        "_later",
        "_on_end",
        "_running",
        "_scope",
        "_sleep",
        "_wake_at",
        "live",
    )

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Wait]] = []
        self._later: list[_Wait] = []  # due at or after `_wake_at`, in no order
        self._count = itertools.count()
        self.live = 0  # parked waits in the heap
        self._scope: trio.CancelScope | None = None  # the task's own: cancelled by close()
        self._sleep: trio.CancelScope | None = None  # its current sleep, until the earliest deadline
        self._running = False  # whether the task runs (it ends with its run: see `_run`)
        self._wake_at = math.inf  # its sleep's deadline (read per wait: a plain attribute)
        self._closed = False
        self._on_end: Callable[[], None] | None = None

    def start(self, on_end: Callable[[], None] | None = None) -> bool:
        """Start the task in the current run unless it runs; ``on_end`` is called when it ends.
        False when it cannot run (closed, or the run is shutting down)."""
        if self._running:
            return True
        if self._closed:
            return False
        scope = trio.CancelScope()
        try:
            trio.lowlevel.spawn_system_task(self._run, scope, name="queue_runtime.memory.alarm")
        except RuntimeError:
            return False
        self._running = True
        self._scope = scope
        self._sleep = None
        self._on_end = on_end
        return True

    def add(self, wait: _Wait) -> None:
        wait.alarm = self
        self.live += 1
        if wait.until >= self._wake_at and self._running:
            later = self._later
            if len(later) > 2 * self.live + 64:
                later[:] = [entry for entry in later if entry.parked]
            later.append(wait)  # the alarm wakes before this is due, and looks then
            return
        heap = self._heap
        if len(heap) > 2 * self.live + 64:
            heap[:] = [entry for entry in heap if entry[2].parked]
            heapq.heapify(heap)
        heapq.heappush(heap, (wait.until, next(self._count), wait))
        if not self._running:
            self.start()  # normally started by the provider's first clock read in this run
        elif wait.until < self._wake_at and self._sleep is not None:
            self._sleep.deadline = self._wake_at = wait.until

    def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, scope: trio.CancelScope) -> None:
        try:
            await self._loop(scope)
        finally:
            # Cancelled by close(), or by trio when the run ends: the next run starts its own.
            self._running = False
            self._sleep = None
            self._wake_at = math.inf
            if self._on_end is not None:
                self._on_end()

    async def _loop(self, scope: trio.CancelScope) -> None:
        heap = self._heap
        later = self._later
        with scope:
            while True:
                now = trio.current_time()
                if later:
                    for wait in later:
                        if wait.parked:
                            heapq.heappush(heap, (wait.until, next(self._count), wait))
                    later.clear()
                while heap and (heap[0][0] <= now or not heap[0][2].parked):
                    wait = heapq.heappop(heap)[2]
                    if wait.parked:
                        wait.owner.discard(wait)
                        wait.wake()
                self._wake_at = heap[0][0] if heap else math.inf
                with trio.CancelScope(deadline=self._wake_at) as sleep:
                    self._sleep = sleep
                    await trio.sleep_forever()


class _Waiters:
    """Tasks waiting for something to become available, woken one at a time (no herd), in
    the order they began waiting.

    A woken waiter always returns normally (a cancellation arriving afterwards is seen at its
    next checkpoint), so a notification is never lost to a cancelled waiter.
    """

    __slots__ = ("_parked", "_queue")

    def __init__(self) -> None:
        # In arrival order. A wait that ended otherwise (timeout, cancellation) stays until a
        # notification or a compaction drops it: a list is the cheapest FIFO for the usual
        # zero or one waiter (an OrderedDict cost three times as much per wait).
        self._queue: list[_Wait] = []
        self._parked = 0

    async def wait(self, until: float, alarm: _Alarm) -> None:
        """Return when notified or at ``until`` (trio clock). Cancellable."""
        await trio.lowlevel.wait_task_rescheduled(self.park(until, alarm, None, 0))

    def park(
        self, until: float, alarm: _Alarm, receiver: _SessionReceiver | None, max_messages: int
    ) -> _Wait:
        """`wait`'s registration; the caller then parks in ``wait_task_rescheduled(w)``.
        A session receive parks itself (saving a coroutine per wait) and passes ``receiver``:
        a sender may then hand it up to ``max_messages`` messages, already locked (see
        `InMemoryProvider.send` and `_session_changed`), which ``wait_task_rescheduled``
        returns."""
        wait = _Wait(self, until, trio.lowlevel.current_task(), receiver, max_messages)
        queue = self._queue
        if len(queue) > 2 * self._parked + 4:
            queue[:] = [entry for entry in queue if entry.parked]
        queue.append(wait)
        self._parked += 1
        if until != math.inf:
            if until >= alarm._wake_at and alarm._running and len(alarm._later) <= 2 * alarm.live + 64:
                # `alarm.add`'s common case, inlined (once per wait).
                wait.alarm = alarm
                alarm.live += 1
                alarm._later.append(wait)
            else:
                alarm.add(wait)
        return wait

    def discard(self, wait: _Wait) -> None:
        """``wait`` left without a notification (its entry is skipped later)."""
        self._parked -= 1

    def hand(self, wait: _Wait, delivered: list[ReceivedMessage]) -> None:
        """Wake ``wait``, the first parked waiter, with ``delivered`` (messages already locked
        for its receive), which its ``wait_task_rescheduled`` returns."""
        queue = self._queue
        if queue[0] is wait:
            queue.pop(0)
        else:
            queue.remove(wait)
        self._parked -= 1
        wait.wake(delivered)

    def notify(self, count: int = 1) -> None:
        queue = self._queue
        while count > 0 and queue:
            wait = queue.pop(0)
            if wait.parked:
                self._parked -= 1
                wait.wake()
                count -= 1

    def notify_all(self) -> None:
        self.notify(self._parked)


class _HandOver(msgspec.Struct):
    """A send locking messages for the receive a session's holder waits in (see `send`)."""

    wait: _Wait
    receiver: _SessionReceiver
    room: int  # how many more its receive takes
    messages: list[ReceivedMessage]


_UNSEEN: Any = object()  # `send`: a session not met yet in this batch


def _hand_over(session: _Session) -> _HandOver | None:
    """A hand-over to the receive the session's holder waits in, if a message sent now may be
    locked for it at once: the holder waits in `receive`, and nothing is pending before the
    message (not even a delayed one). None otherwise: the message is queued as usual."""
    holder = session.holder
    if holder is None or holder._closed:
        return None
    pending = session.pending  # `_head`, inlined
    while pending and pending[0][1].state != "pending":
        heapq.heappop(pending)
    if pending:
        return None
    parked = session.waiters._queue  # the first waiter still parked, if any
    while parked and not parked[0].parked:
        parked.pop(0)
    if not parked or parked[0].receiver is not holder:
        return None
    wait = parked[0]
    return _HandOver(wait, holder, wait.max_messages, [])


class _Session:
    __slots__ = (
        "epoch",
        "holder",
        "id",
        "in_flight",
        "lock_until",
        "pending",
        "ready_seq",
        "scheduled",
        "state",
        "waiters",
    )

    def __init__(self, session_id: str) -> None:
        self.id = session_id
        # (seq, rec) of messages waiting for delivery, in sequence order. Entries of messages
        # that left (TTL) are dropped lazily when they reach the top.
        self.pending: list[tuple[int, _Rec]] = []
        self.in_flight: dict[str, _Rec] = {}
        self.holder: _SessionReceiver | None = None
        self.lock_until = 0.0
        self.epoch = 0  # bumped at every accept/release, to tell stale lock timers apart
        self.ready_seq: int | None = None  # head seq of this session's live entry in the ready heap
        self.scheduled = 0
        self.state: bytes | None = None
        self.waiters = _Waiters()


class _Queue:
    def __init__(
        self,
        name: str,
        *,
        requires_session: bool,
        lock_duration: float,
        max_delivery_count: int | None,
        dead_letter_on_expiration: bool,
        dead_letter_of: _Queue | None = None,
    ) -> None:
        self.name = name
        self.requires_session = requires_session
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self.dead_letter_on_expiration = dead_letter_on_expiration
        self.parent = dead_letter_of
        # Every message not yet removed, keyed by sequence number (insertion = sequence order).
        self.live: dict[int, _Rec] = {}
        self.n_scheduled = 0
        self.n_locked = 0
        self.n_delayed = 0
        # Timed events: (when, tiebreak, kind, payload). Stale entries are skipped lazily.
        self.timers: list[tuple[float, int, str, Any]] = []
        self.waiters = _Waiters()
        # Session queues: sessions by id and the heap of sessions ready to be accepted,
        # keyed by the sequence number of their first pending message (oldest first).
        self.sessions: dict[str, _Session] = {}
        self.ready: list[tuple[int, str]] = []
        # Non-session queues: pending (seq, rec) heap and locked messages by token.
        self.pending: list[tuple[int, _Rec]] = []
        self.locked: dict[str, _Rec] = {}
        self.dlq: _Queue | None = None

    @property
    def held(self) -> int:
        """Messages counted against the bound (this queue plus its dead-letter queue)."""
        total = len(self.live) + self.n_scheduled
        if self.dlq is not None:
            total += len(self.dlq.live)
        return total


class InMemoryProvider(Provider):
    """A peek-lock broker with sessions, in memory. See the module docstring for the model.

    ``lock_duration`` (60 s, as Service Bus's default) and ``max_delivery_count`` (10, as
    Service Bus's default) apply to queues created on first use; ``max_queue_messages`` bounds
    each queue (with its dead-letter queue); ``max_message_size`` (256 KiB, the smaller of the
    clouds' limits) bounds each message as `Provider.message_size` counts it.
    """

    def __init__(
        self,
        *,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        max_queue_messages: int = 100_000,
        max_message_size: int = 256 * 1024,
    ) -> None:
        if not (
            isinstance(lock_duration, (int, float)) and math.isfinite(lock_duration) and lock_duration > 0
        ):
            raise ValidationError(f"lock_duration must be a number > 0, got {lock_duration!r}")
        if not isinstance(max_delivery_count, int) or max_delivery_count < 1:
            raise ValidationError(f"max_delivery_count must be an integer >= 1, got {max_delivery_count!r}")
        if not isinstance(max_queue_messages, int) or max_queue_messages < 1:
            raise ValidationError(f"max_queue_messages must be an integer >= 1, got {max_queue_messages!r}")
        if not isinstance(max_message_size, int) or max_message_size < 1:
            raise ValidationError(f"max_message_size must be an integer >= 1, got {max_message_size!r}")
        self.lock_duration = float(lock_duration)
        self.max_delivery_count = max_delivery_count
        self.max_queue_messages = max_queue_messages
        self.capabilities = Capabilities(
            system="memory",
            native_sessions=True,
            session_state=True,
            max_batch_count=100,
            max_batch_bytes=max_message_size,
            max_message_size=max_message_size,
            scheduled_messages=True,
            abandon_delay=True,
        )
        self._queues: dict[str, _Queue] = {}
        self._faults: dict[str, list[tuple[BaseException, int]]] = {}
        self._stalls: dict[str, tuple[float, StallMode]] = {}  # operation -> (until, mode)
        #: True once the provider was closed, a fault injected or a stall begun: the calls
        #: then take the slow path through `_gate` (one attribute test per call otherwise).
        self._gated = False
        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._tiebreak = itertools.count()
        self._closed = False
        self._alarm = _Alarm()
        #: The current run's clock, bound at the first read in each run (see `_first_now`).
        self._now: Callable[[], float] = self._first_now
        self._wall_epoch: datetime | None = None
        self._trio_epoch = 0.0
        self._wall_memo: tuple[float, datetime] = (math.nan, datetime.min)
        self._walls: dict[float, datetime] = {}  # `_to_wall`'s recent conversions
        try:
            self._capture_epoch()
        except RuntimeError:
            pass  # created outside a trio run: captured at first use instead

    # -- clock -----------------------------------------------------------------------------
    def _capture_epoch(self) -> None:
        now = trio.current_time()
        self._wall_epoch = datetime.now(UTC)
        self._trio_epoch = now
        self._wall_memo = (math.nan, datetime.min)
        self._walls = {}

    def _first_now(self) -> float:
        """The first clock read of a run: capture the wall-clock epoch if not yet done, start
        this run's alarm, and from then on read the run's clock directly (``_now`` is bound to
        it: one call instead of ``trio.current_time()``'s chain of four, several times per
        message) until the alarm task ends with the run and unbinds it."""
        if self._wall_epoch is None:
            self._capture_epoch()
        clock = trio.lowlevel.current_clock()
        if self._alarm.start(self._unbind_clock):
            self._now = clock.current_time
        return clock.current_time()

    def _unbind_clock(self) -> None:
        self._now = self._first_now

    def _to_trio(self, when: datetime) -> float:
        assert self._wall_epoch is not None
        return self._trio_epoch + (when - self._wall_epoch).total_seconds()

    def _to_wall(self, at: float) -> datetime:
        # Messages sent in one call share their enqueue time: convert it once. Recent times
        # are kept (bounded), not only the last: receives across many sessions take messages
        # from many sends in turn.
        if at == self._wall_memo[0]:
            return self._wall_memo[1]
        walls = self._walls
        wall = walls.get(at)
        if wall is None:
            assert self._wall_epoch is not None
            wall = self._wall_epoch + timedelta(seconds=at - self._trio_epoch)
            if len(walls) >= _WALLS_MAX:
                walls.clear()
            walls[at] = wall
        self._wall_memo = (at, wall)
        return wall

    # -- administration --------------------------------------------------------------------
    def create_queue(
        self,
        name: str,
        *,
        requires_session: bool = True,
        lock_duration: float | None = None,
        max_delivery_count: int | None = None,
        dead_letter_on_expiration: bool = False,
    ) -> QueueInfo:
        """Declare ``name`` (idempotent when the settings match; `ValidationError` otherwise).

        ``lock_duration`` and ``max_delivery_count`` default to the provider's.
        ``dead_letter_on_expiration`` moves expired (TTL) messages to the dead-letter queue with
        reason ``TTLExpiredException`` instead of dropping them (Service Bus's option).
        """
        self.validate_queue_name(name)
        lock = self.lock_duration if lock_duration is None else float(lock_duration)
        if not (math.isfinite(lock) and lock > 0):
            raise ValidationError(f"lock_duration must be > 0, got {lock_duration!r}")
        mdc = self.max_delivery_count if max_delivery_count is None else max_delivery_count
        if not isinstance(mdc, int) or mdc < 1:
            raise ValidationError(f"max_delivery_count must be an integer >= 1, got {max_delivery_count!r}")
        existing = self._queues.get(name)
        if existing is not None:
            if (
                existing.requires_session != requires_session
                or existing.lock_duration != lock
                or existing.max_delivery_count != mdc
                or existing.dead_letter_on_expiration != dead_letter_on_expiration
            ):
                raise ValidationError(f"queue {name!r} already exists with different settings")
            return self._info(existing)
        queue = _Queue(
            name,
            requires_session=requires_session,
            lock_duration=lock,
            max_delivery_count=mdc,
            dead_letter_on_expiration=dead_letter_on_expiration,
        )
        queue.dlq = _Queue(
            f"{name}/$deadletterqueue",
            requires_session=False,
            lock_duration=lock,
            max_delivery_count=None,
            dead_letter_on_expiration=False,
            dead_letter_of=queue,
        )
        self._queues[name] = queue
        return self._info(queue)

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            self.create_queue(name)
            queue = self._queues[name]
        return queue

    @staticmethod
    def _info(queue: _Queue) -> QueueInfo:
        return QueueInfo(
            name=queue.name,
            requires_session=queue.requires_session,
            lock_duration=queue.lock_duration,
            max_delivery_count=queue.max_delivery_count,
            dead_letter_queue=queue.dlq.name if queue.dlq is not None else None,
        )

    def inject_fault(self, operation: str, error: BaseException, times: int = 1) -> None:
        """Make the next ``times`` calls of ``operation`` raise ``error`` before doing anything.

        ``operation`` is one of `FAULT_OPERATIONS`; ``"renew_lock"`` covers session and message
        lock renewal, ``"receive"`` covers every receiver's ``receive``. Faults queue up in
        order when injected repeatedly.
        """
        if operation not in FAULT_OPERATIONS:
            raise ValidationError(
                f"unknown fault operation {operation!r}; use one of {', '.join(FAULT_OPERATIONS)}"
            )
        if not isinstance(error, BaseException):
            raise ValidationError(f"error must be an exception instance, got {type(error).__name__}")
        if not isinstance(times, int) or times < 1:
            raise ValidationError(f"times must be an integer >= 1, got {times!r}")
        self._faults.setdefault(operation, []).append((error, times))
        self._gated = True

    def stall(
        self, duration: float, *, operations: Iterable[str] | None = None, mode: StallMode = "hang"
    ) -> None:
        """Freeze the broker for ``duration`` seconds of trio time, from now, for ``operations``
        (default: every operation of `FAULT_OPERATIONS`), as a broker that stops answering
        does: time passes (locks expire, scheduled messages come due) while calls hang.

        ``mode="hang"``: a call made during the stall waits until it ends, then runs against
        the broker as it is then. ``mode="late"``: the call takes effect at once and its answer
        comes when the stall ends (a slow response). A receive or accept already waiting hands
        out nothing until the stall ends. Cancelling a hanging call changes nothing; cancelling
        a late call may leave its effect (a completed message stays completed, a received one
        stays locked until its lock expires). Must be called inside a trio run. A stall of an
        operation that is already stalled lasts until the later of the two ends.
        """
        if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration >= 0):
            raise ValidationError(f"stall duration must be a number >= 0, got {duration!r}")
        if mode not in ("hang", "late"):
            raise ValidationError(f"stall mode must be 'hang' or 'late', got {mode!r}")
        names = FAULT_OPERATIONS if operations is None else tuple(operations)
        for name in names:
            if name not in FAULT_OPERATIONS:
                raise ValidationError(
                    f"unknown stall operation {name!r}; use some of {', '.join(FAULT_OPERATIONS)}"
                )
        until = self._now() + duration
        for name in names:
            current = self._stalls.get(name)
            self._stalls[name] = (max(until, current[0]) if current else until, mode)
        self._gated = True

    def stalled_until(self, operation: str) -> float | None:
        """When the stall of ``operation`` ends (trio clock), or None when it is not stalled."""
        current = self._stalls.get(operation)
        if current is None or current[0] <= self._now():
            return None
        return current[0]

    async def _enter(self, operation: str) -> float:
        """Checkpoint first (cancellation changes nothing), then wait out a stall and raise an
        injected fault. Returns when a late answer is due (0.0: answer at once)."""
        await trio.lowlevel.checkpoint()
        if self._gated:
            return await self._gate(operation)
        return 0.0

    async def _enter_nowait(self, operation: str) -> float:
        """A cancellation point without a scheduling point, for calls that never wait.

        Raises ``trio.Cancelled`` when the caller is cancelled (before anything changed), then
        a closed provider's error or an injected fault. It does not yield to the scheduler: a
        trip through trio's run loop costs about as much as a settlement itself, and the
        consumer's ``receive`` yields anyway (as ``trio.MemoryReceiveChannel.receive`` does).
        Returns as `_enter`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._gated:
            return await self._gate(operation)
        return 0.0

    async def _gate(self, operation: str) -> float:
        """The slow path of a call once faults, stalls or a close happened: wait out a "hang"
        stall, then raise a closed provider's error or an injected fault. Returns when a "late"
        stall's answer is due, else 0.0."""
        stall = self._stalls.get(operation)
        late = 0.0
        if stall is not None:
            until, mode = stall
            if until <= self._now():
                del self._stalls[operation]
            elif mode == "hang":
                await trio.sleep_until(until)
            else:
                late = until
        self._admit(operation)
        return late

    async def _hold(self, operation: str) -> float:
        """For a call that waited and woke up: wait while ``operation`` is stalled in "hang"
        mode (a frozen broker hands nothing out). Returns a "late" stall's end, else 0.0."""
        stall = self._stalls.get(operation)
        if stall is None:
            return 0.0
        until, mode = stall
        if until <= self._now():
            return 0.0
        if mode == "hang":
            await trio.sleep_until(until)
            return 0.0
        return until

    @staticmethod
    async def _answer_late(until: float) -> None:
        """Hold a "late" call's answer until its stall ends (shielded from nothing: a cancelled
        caller loses the answer, not the effect)."""
        await trio.sleep_until(until)

    def _admit(self, operation: str) -> None:
        if self._closed:
            raise QueueError("the in-memory provider is closed")
        faults = self._faults.get(operation)
        if faults:
            error, remaining = faults[0]
            if remaining <= 1:
                faults.pop(0)
            else:
                faults[0] = (error, remaining - 1)
            raise error

    # -- timed events ----------------------------------------------------------------------
    def _timer(self, queue: _Queue, when: float, kind: str, payload: Any) -> None:
        heapq.heappush(queue.timers, (when, next(self._tiebreak), kind, payload))

    def _timer_live(self, kind: str, payload: Any) -> bool:
        """Whether a timed event still matters (cheap; lets waiters skip stale deadlines)."""
        if kind == "activate":
            rec: _Rec = payload
            return rec.state == "scheduled"
        if kind == "visible":
            rec = payload
            return rec.state == "delayed"
        if kind == "mlock":
            rec, token, until = payload
            return rec.state == "locked" and rec.lock_token == token and rec.locked_until == until
        if kind == "slock":
            session, epoch, until = payload
            return session.holder is not None and session.epoch == epoch and session.lock_until == until
        if kind == "ttl":
            rec = payload
            return rec.state in ("pending", "delayed")
        # "shead": an abandon delay ends; always live so it also wakes the session's holder.
        return kind == "shead"

    def _next_event(self, queue: _Queue) -> float:
        timers = queue.timers
        while timers and not self._timer_live(timers[0][2], timers[0][3]):
            heapq.heappop(timers)
        return timers[0][0] if timers else math.inf

    def _advance(self, queue: _Queue, now: float | None = None) -> None:
        """Apply every timed event that is due: activations, visibility, expiries.

        A dead-letter queue first advances its parent, whose expiries may move messages in.
        ``now`` saves a clock read when the caller has just made one.
        """
        if queue.parent is not None:
            self._advance(queue.parent)
        if now is None:
            now = self._now()
        timers = queue.timers
        while timers and timers[0][0] <= now:
            _when, _, kind, payload = heapq.heappop(timers)
            if not self._timer_live(kind, payload):
                continue
            if kind == "activate":
                rec = payload
                queue.n_scheduled -= 1
                if rec.session_id is not None:
                    queue.sessions[rec.session_id].scheduled -= 1
                self._make_available(queue, rec, now, enqueued_at=rec.due)
            elif kind == "visible":
                rec = payload
                queue.n_delayed -= 1
                rec.state = "pending"
                heapq.heappush(queue.pending, (rec.seq, rec))
                queue.waiters.notify()
            elif kind == "mlock":
                rec = payload[0]
                self._unlock(queue, rec)
                self._return(queue, rec, now, delay=None)
            elif kind == "slock":
                session = payload[0]
                self._release_session(queue, session, now)
            elif kind == "ttl":
                rec = payload
                session = self._session_of(queue, rec)
                self._expire(queue, rec)
                if session is not None:
                    self._session_changed(queue, session, now)
            elif kind == "shead":
                self._session_changed(queue, payload, now)

    # -- message movement ------------------------------------------------------------------
    def _make_available(
        self, queue: _Queue, rec: _Rec, now: float, *, enqueued_at: float, notify: bool = True
    ) -> None:
        """Give ``rec`` its sequence number and make it deliverable. ``notify=False`` leaves
        re-evaluating its session to the caller (`send` does it once per session and batch)."""
        rec.seq = next(self._seq)
        rec.enqueued_at = enqueued_at
        rec.state = "pending"
        rec.visible_at = now
        queue.live[rec.seq] = rec
        if rec.message.time_to_live is not None:
            # As on Service Bus, a scheduled message's time to live starts when it is enqueued.
            rec.expires_at = enqueued_at + rec.message.time_to_live
            self._timer(queue, rec.expires_at, "ttl", rec)
        session = self._session_of(queue, rec)
        if session is None:
            heapq.heappush(queue.pending, (rec.seq, rec))
            queue.waiters.notify()
        else:
            heapq.heappush(session.pending, (rec.seq, rec))
            if notify:
                self._session_changed(queue, session, now)

    def _unlock(self, queue: _Queue, rec: _Rec) -> None:
        if rec.lock_token is not None:
            if rec.session_id is None:
                queue.locked.pop(rec.lock_token, None)
            else:
                queue.sessions[rec.session_id].in_flight.pop(rec.lock_token, None)
        rec.lock_token = None
        rec.locked_until = None
        rec.state = "pending"  # in transit: the caller returns, removes or dead-letters it
        queue.n_locked -= 1

    def _return(self, queue: _Queue, rec: _Rec, now: float, *, delay: float | None) -> None:
        """Put a message that was delivered (and is now unlocked) back, or dead-letter it."""
        session = self._session_of(queue, rec)
        if queue.max_delivery_count is not None and rec.delivery_count >= queue.max_delivery_count:
            self._to_dead_letter(
                queue,
                rec,
                "MaxDeliveryCountExceeded",
                f"delivered {rec.delivery_count} times; the queue's max_delivery_count is"
                f" {queue.max_delivery_count}",
            )
            if session is not None:
                self._session_changed(queue, session, now)
            return
        if rec.expires_at is not None and rec.expires_at <= now:
            self._expire(queue, rec)
            if session is not None:
                self._session_changed(queue, session, now)
            return
        visible_at = now + delay if delay else now
        rec.visible_at = visible_at
        if session is None:
            if delay:
                rec.state = "delayed"
                queue.n_delayed += 1
                self._timer(queue, visible_at, "visible", rec)
            else:
                rec.state = "pending"
                heapq.heappush(queue.pending, (rec.seq, rec))
                queue.waiters.notify()
        else:
            # The message keeps its place: nothing later in the session is delivered first.
            rec.state = "pending"
            heapq.heappush(session.pending, (rec.seq, rec))
            if delay:
                self._timer(queue, visible_at, "shead", session)
            self._session_changed(queue, session, now)
        if rec.expires_at is not None:
            self._timer(queue, rec.expires_at, "ttl", rec)

    def _remove(self, queue: _Queue, rec: _Rec) -> None:
        if rec.state == "locked":
            self._unlock(queue, rec)
        elif rec.state == "delayed":
            queue.n_delayed -= 1
        rec.state = "gone"
        queue.live.pop(rec.seq, None)

    def _expire(self, queue: _Queue, rec: _Rec) -> None:
        """TTL passed: drop the message, or dead-letter it if the queue says so."""
        if queue.dead_letter_on_expiration:
            self._to_dead_letter(queue, rec, "TTLExpiredException", "the message's time to live passed")
        else:
            self._remove(queue, rec)

    def _to_dead_letter(self, queue: _Queue, rec: _Rec, reason: str, description: str | None) -> None:
        """Copy into the DLQ, then remove the original (the copy exists first)."""
        dlq = queue.dlq
        assert dlq is not None
        copy = _Rec(rec.message, None)
        copy.delivery_count = rec.delivery_count
        copy.dead_letter_reason = reason
        copy.dead_letter_description = description
        copy.dead_letter_source = queue.name
        copy.seq = next(self._seq)
        copy.enqueued_at = rec.enqueued_at
        copy.visible_at = self._now()
        dlq.live[copy.seq] = copy
        heapq.heappush(dlq.pending, (copy.seq, copy))
        dlq.waiters.notify()
        self._remove(queue, rec)

    # -- sessions --------------------------------------------------------------------------
    @staticmethod
    def _session_of(queue: _Queue, rec: _Rec) -> _Session | None:
        """``rec``'s session (a session is forgotten only once no message refers to it)."""
        return queue.sessions[rec.session_id] if rec.session_id is not None else None

    def _head(self, session: _Session) -> _Rec | None:
        pending = session.pending
        while pending and pending[0][1].state != "pending":
            heapq.heappop(pending)
        return pending[0][1] if pending else None

    def _session_changed(self, queue: _Queue, session: _Session, now: float) -> None:
        """Re-evaluate a session after its pending messages or holder changed."""
        pending = session.pending  # `_head`, inlined (once per session and send)
        while pending and pending[0][1].state != "pending":
            heapq.heappop(pending)
        head = pending[0][1] if pending else None
        holder = session.holder
        if holder is not None:
            if head is not None and head.visible_at <= now:
                # The holder's receive is parked: deliver to it here, as trio's channels hand a
                # value to a waiting receiver, rather than waking it to look (which cost as
                # much again per message). Same order and locking as `receive` itself.
                waiters = session.waiters
                parked = waiters._queue  # the first waiter still parked, if any
                while parked and not parked[0].parked:
                    parked.pop(0)
                waiter = parked[0] if parked else None
                if waiter is not None and waiter.receiver is holder and not holder._closed:
                    delivered = holder._take(session, waiter.max_messages, now)
                    if delivered:
                        waiters.hand(waiter, delivered)
                        return
                waiters.notify()
            return
        if head is None:
            if not session.in_flight and session.scheduled == 0 and session.state is None:
                queue.sessions.pop(session.id, None)  # forget empty sessions: bounded memory
            return
        if head.visible_at <= now and session.ready_seq != head.seq:
            # One live entry per ready session (keyed by its head), so sends to a session that
            # is already waiting cost nothing here.
            session.ready_seq = head.seq
            heapq.heappush(queue.ready, (head.seq, session.id))
            queue.waiters.notify()

    def _release_session(self, queue: _Queue, session: _Session, now: float) -> None:
        """The holder is gone (closed or lock expired): hand its messages back."""
        holder = session.holder
        if holder is None:
            return
        holder._lost = True
        session.holder = None
        session.epoch += 1
        for rec in list(session.in_flight.values()):
            self._unlock(queue, rec)
            self._return(queue, rec, now, delay=None)
        session.waiters.notify_all()
        self._session_changed(queue, session, now)

    def _pop_ready_session(self, queue: _Queue, now: float) -> _Session | None:
        ready = queue.ready
        while ready:
            seq, session_id = heapq.heappop(ready)
            session = queue.sessions.get(session_id)
            if session is None or session.holder is not None or session.ready_seq != seq:
                continue  # a stale entry
            session.ready_seq = None
            head = self._head(session)
            if head is None or head.visible_at > now:
                continue  # re-entered by _session_changed when it has something again
            if head.seq != seq:
                # Its head changed (an earlier message came back): queue it by the new head.
                session.ready_seq = head.seq
                heapq.heappush(ready, (head.seq, session_id))
                continue
            return session
        return None

    def _deliver(
        self, queue: _Queue, rec: _Rec, now: float, locked_until: float, token: str
    ) -> ReceivedMessage:
        rec.state = "locked"
        rec.delivery_count += 1
        rec.lock_token = token
        rec.locked_until = locked_until
        queue.n_locked += 1
        return self._received(rec, receipt=token)

    def _received(self, rec: _Rec, *, receipt: str) -> ReceivedMessage:
        # Hand out a copy so a consumer mutating properties cannot change the stored message.
        message = _shallow_copy(rec.message)
        message.properties = dict(message.properties)
        return ReceivedMessage(
            message=message,
            receipt=receipt,
            delivery_count=rec.delivery_count,
            enqueued_at=self._to_wall(rec.enqueued_at),
            sequence_number=rec.seq,
            locked_until=rec.locked_until,
            dead_letter_reason=rec.dead_letter_reason,
            dead_letter_description=rec.dead_letter_description,
            dead_letter_source=rec.dead_letter_source,
        )

    def _new_token(self) -> str:
        return f"lock-{next(self._tokens)}"

    # -- Provider API ----------------------------------------------------------------------
    async def describe(self, queue: str) -> QueueInfo:
        """How ``queue`` is set up (creating it, as a session queue, on first use)."""
        await trio.lowlevel.checkpoint()
        self.validate_queue_name(queue)
        return self._info(self._queue(queue))

    async def send(self, queue: str, messages: Sequence[Message]) -> None:
        """Enqueue ``messages`` atomically: all are validated first, then all are stored.

        Raises `ValidationError` (bad queue name, not a `Message`, no session id on a session
        queue, more than ``max_batch_count`` messages or ``max_batch_bytes`` bytes),
        `MessageTooLarge`, or `QueueFull` (nothing is stored then).
        """
        late = await self._enter("send")
        self.validate_queue_name(queue)
        q = self._queue(queue)
        caps = self.capabilities
        if len(messages) > caps.max_batch_count:
            raise ValidationError(
                f"a batch holds at most {caps.max_batch_count} messages, got {len(messages)}"
            )
        total = 0
        for message in messages:
            if not isinstance(message, Message):
                raise ValidationError(f"expected a Message, got {type(message).__name__}")
            if message.properties or message.correlation_id or message.content_type:
                size = message_size(message)
            else:  # `message_size` without the parts it lacks (ids are ASCII: checked)
                size = len(message.body) + len(message.message_id) + len(message.session_id or "")
            if size > caps.max_message_size:
                raise MessageTooLarge(size, caps.max_message_size)
            total += size
            if message.session_id is None:
                if q.requires_session:
                    raise ValidationError(
                        f"queue {queue!r} requires sessions: message {message.message_id!r} has no session id"
                    )
            elif message.session_id not in q.sessions:  # a known session's id was checked already
                validate_session_id(message.session_id)  # the rules `Message` checked: changed since?
        if total > caps.max_batch_bytes:
            raise MessageTooLarge(total, caps.max_batch_bytes, what="batch")
        now = self._now()
        self._advance(q)
        if q.held + len(messages) > self.max_queue_messages:
            raise QueueFull(
                f"queue {queue!r} holds {q.held} messages (dead-letter queue included); the bound is"
                f" {self.max_queue_messages}: receive or purge before sending more"
            )
        # Sessions that got messages, in order of first: each maps to the hand-over to its
        # holder's waiting receive being filled by this batch, or None (see `_hand_over`).
        touched: dict[_Session, _HandOver | None] = {}
        sessions = q.sessions
        wall: datetime | None = None
        for message in messages:
            stored = _shallow_copy(message)  # the producer may reuse or change its object
            stored.properties = dict(message.properties)  # (`_copy`, inlined)
            session: _Session | None = None
            if q.requires_session and message.session_id is not None:
                session = sessions.get(message.session_id)
                if session is None:
                    session = sessions[message.session_id] = _Session(message.session_id)
            if (
                session is not None
                and message.scheduled_enqueue_time is None
                and message.time_to_live is None
            ):
                # `_make_available` for the common case, inlined (once per message sent).
                rec = _Rec(stored, session.id, next(self._seq), "pending", 0, now, 0.0, now)
                q.live[rec.seq] = rec
                hand_over = touched.get(session, _UNSEEN)
                if hand_over is _UNSEEN:
                    hand_over = touched[session] = _hand_over(session)
                if hand_over is not None and hand_over.room > 0:
                    # Its holder waits and nothing comes before this message: lock it for that
                    # receive now rather than queue it and take it off the queue again.
                    if wall is None:
                        wall = self._to_wall(now)
                    hand_over.messages.append(hand_over.receiver._lock(session, rec, wall))
                    hand_over.room -= 1
                else:
                    heapq.heappush(session.pending, (rec.seq, rec))
                continue
            rec = _Rec(stored, session.id if session is not None else None)
            due = (
                self._to_trio(message.scheduled_enqueue_time)
                if message.scheduled_enqueue_time is not None
                else now
            )
            if due > now:
                rec.state = "scheduled"
                rec.due = due
                q.n_scheduled += 1
                if session is not None:
                    session.scheduled += 1
                self._timer(q, due, "activate", rec)
            elif session is None:
                self._make_available(q, rec, now, enqueued_at=now)
            else:
                self._make_available(q, rec, now, enqueued_at=now, notify=False)
                hand_over = touched.get(session)
                if hand_over is not None:
                    hand_over.room = 0  # queued now: nothing after it may be handed over first
                else:
                    touched[session] = None
        # Once per session, after the whole batch: a waiting holder is handed all of its new
        # messages at once (up to what its receive asked for), as a fresh receive would take.
        for session, hand_over in touched.items():
            if hand_over is not None and hand_over.messages:
                session.waiters.hand(hand_over.wait, hand_over.messages)
            else:
                self._session_changed(q, session, now)
        if late:
            await self._answer_late(late)

    async def accept_session(self, queue: str, *, timeout: float) -> Receiver | None:
        """The session whose first available message is oldest among sessions nobody holds,
        locked for the queue's ``lock_duration``; None after ``timeout`` seconds.

        Cancellable: a cancelled call accepts nothing.
        """
        late = await self._enter("accept_session")
        self.validate_queue_name(queue)
        q = self._queue(queue)
        if not q.requires_session:
            raise NotSupported(f"queue {queue!r} has no sessions: use open_receiver")
        deadline = self._now() + max(timeout, 0.0)
        while True:
            self._advance(q)
            now = self._now()
            session = self._pop_ready_session(q, now)
            if session is not None:
                receiver = _SessionReceiver(self, q, session)
                session.holder = receiver
                session.epoch += 1
                session.lock_until = now + q.lock_duration
                self._timer(q, session.lock_until, "slock", (session, session.epoch, session.lock_until))
                if q.ready:
                    q.waiters.notify()  # maybe more ready: pass the turn on
                if late:
                    await self._answer_late(late)
                return receiver
            if now >= deadline:
                if q.ready:
                    q.waiters.notify()  # a wake-up may have raced our timeout: pass it on
                if late:
                    await self._answer_late(late)
                return None
            await q.waiters.wait(min(deadline, self._next_event(q)), self._alarm)
            if self._gated:
                late = max(late, await self._hold("accept_session"))

    async def open_receiver(self, queue: str, *, dead_letter: bool = False) -> Receiver:
        """A receiver for a non-session queue, or for ``queue``'s dead-letter queue."""
        await trio.lowlevel.checkpoint()
        self.validate_queue_name(queue)
        q = self._queue(queue)
        if dead_letter:
            assert q.dlq is not None
            return _QueueReceiver(self, q.dlq)
        if q.requires_session:
            raise NotSupported(f"queue {queue!r} requires sessions: use accept_session")
        return _QueueReceiver(self, q)

    async def peek_dead_letters(self, queue: str, max_messages: int = 32) -> list[ReceivedMessage]:
        """Up to ``max_messages`` dead-lettered messages, oldest first, unlocked copies."""
        await trio.lowlevel.checkpoint()
        self.validate_queue_name(queue)
        q = self._queue(queue)
        assert q.dlq is not None
        self._advance(q.dlq)
        return [
            self._received(rec, receipt="") for rec in itertools.islice(q.dlq.live.values(), max_messages)
        ]

    async def queue_stats(self, queue: str) -> QueueStats:
        """Exact depth figures: ``active`` (waiting for delivery, abandon-delayed included),
        ``in_flight`` (locked), ``scheduled``, ``dead_letter``, ``oldest_message_age`` (seconds
        since the oldest stored message was enqueued; None when empty)."""
        await trio.lowlevel.checkpoint()
        self.validate_queue_name(queue)
        q = self._queue(queue)
        assert q.dlq is not None
        self._advance(q)
        self._advance(q.dlq)
        now = self._now()
        oldest = next(iter(q.live.values()), None)
        return QueueStats(
            queue=queue,
            active=len(q.live) - q.n_locked,
            in_flight=q.n_locked,
            scheduled=q.n_scheduled,
            dead_letter=len(q.dlq.live),
            oldest_message_age=(now - oldest.enqueued_at) if oldest is not None else None,
        )

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead-lettered message of ``queue`` (locked ones too); returns how many."""
        await trio.lowlevel.checkpoint()
        self.validate_queue_name(queue)
        q = self._queue(queue)
        dlq = q.dlq
        assert dlq is not None
        removed = 0
        for rec in list(dlq.live.values()):
            self._remove(dlq, rec)
            removed += 1
        dlq.pending.clear()
        return removed

    async def aclose(self) -> None:
        """Close: every later call raises `QueueError`. Idempotent. Stored messages are kept."""
        await trio.lowlevel.checkpoint()
        self._closed = True
        self._gated = True
        for q in self._queues.values():
            q.waiters.notify_all()
        self._alarm.close()


class _SessionReceiver(Receiver):
    """The holder of one session's lock."""

    def __init__(self, provider: InMemoryProvider, queue: _Queue, session: _Session) -> None:
        self._provider = provider
        self._queue = queue
        self._session = session
        self.queue = queue.name
        self.session_id = session.id
        self._lost = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<memory session receiver queue={self.queue!r} session={self.session_id!r}>"

    @property
    def locked_until(self) -> float | None:
        session = self._session
        # Released or taken over (`_release_session` clears the holder): no lock left.
        return session.lock_until if session.holder is self else -math.inf

    def _check(self, now: float | None = None) -> _Session:
        """Apply due events, then raise `SessionLockLost` unless this receiver holds the lock."""
        if self._closed:
            raise SessionLockLost(f"session {self.session_id!r}: the receiver was closed")
        timers = self._queue.timers
        if timers and (now is None or timers[0][0] <= now):
            self._provider._advance(self._queue, now)
        session = self._session
        if self._lost or session.holder is not self:
            raise SessionLockLost(
                f"session {self.session_id!r} on queue {self.queue!r}:"
                " the session lock expired or was released"
            )
        return session

    def _in_flight(self, session: _Session, message: ReceivedMessage) -> _Rec:
        rec = session.in_flight.get(message.receipt) if message.receipt else None
        if rec is None:
            raise InvalidReceipt(
                f"message {message.message_id!r}: receipt is no longer valid (already settled or redelivered)"
            )
        return rec

    def _take(self, session: _Session, max_messages: int, now: float) -> list[ReceivedMessage]:
        """Lock and hand out up to ``max_messages`` deliverable messages from the session's
        head, in sequence order (expired ones are dropped on the way)."""
        provider = self._provider
        queue = self._queue
        out: list[ReceivedMessage] = []
        pending = session.pending
        wall_at, wall = provider._wall_memo  # `_to_wall`'s memo, read once
        while len(out) < max_messages:
            while pending and pending[0][1].state != "pending":
                heapq.heappop(pending)  # `_head`, inlined
            if not pending:
                break
            head = pending[0][1]
            if head.visible_at > now:
                break
            heapq.heappop(pending)
            if head.expires_at is not None and head.expires_at <= now:
                provider._expire(queue, head)
                continue
            enqueued_at = wall if head.enqueued_at == wall_at else provider._to_wall(head.enqueued_at)
            out.append(self._lock(session, head, enqueued_at))
        return out

    def _lock(self, session: _Session, rec: _Rec, enqueued_at: datetime) -> ReceivedMessage:
        """Lock ``rec`` (the session's next message, taken off its pending heap) for this
        holder and return the consumer's delivery (`_deliver` and `_received` in one: this
        runs once per message)."""
        token = f"lock-{next(self._provider._tokens)}"
        session.in_flight[token] = rec
        rec.state = "locked"
        rec.delivery_count += 1
        rec.lock_token = token
        rec.locked_until = until = session.lock_until
        self._queue.n_locked += 1
        message = _shallow_copy(rec.message)  # the consumer's own copy
        message.properties = dict(message.properties)
        # (No dead-letter fields: a session's messages are never dead-letter copies.)
        return ReceivedMessage(
            message=message,
            receipt=token,
            delivery_count=rec.delivery_count,
            enqueued_at=enqueued_at,
            sequence_number=rec.seq,
            locked_until=until,
        )

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        """Up to ``max_messages`` of this session's messages, in sequence order, waiting at most
        ``timeout`` seconds for the first. Cancellable: a cancelled call takes nothing."""
        provider = self._provider
        # One trip through the scheduler per call, as trio's channels make: either the wait
        # for a message, or a shielded checkpoint before returning without having waited.
        await trio.lowlevel.checkpoint_if_cancelled()  # `_enter_nowait`, inlined (per message)
        late = await provider._gate("receive") if provider._gated else 0.0
        if max_messages < 1:
            raise ValidationError(f"max_messages must be >= 1, got {max_messages!r}")
        now = provider._now()
        deadline = now + max(timeout, 0.0)
        waited = False
        queue = self._queue
        session = self._session
        while True:
            if (
                self._closed
                or self._lost
                or session.holder is not self
                or (queue.timers and queue.timers[0][0] <= now)
            ):
                session = self._check(now)  # due events to apply, or the lock is gone (raises)
            if session.pending:
                out = self._take(session, max_messages, now)
                if out:
                    if not waited:
                        # Shielded: what was taken is returned even if cancelled meanwhile.
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    if late:
                        await provider._answer_late(late)
                    return out
            if now >= deadline:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                if late:
                    await provider._answer_late(late)
                return []
            timers = queue.timers
            # Wake at the next timed event of the queue too (a lock may expire meanwhile); look
            # for the next live one only when the earliest entry comes before the deadline.
            until = (
                deadline
                if not timers or timers[0][0] >= deadline
                else min(deadline, provider._next_event(queue))
            )
            # `session.waiters.wait`, without its coroutine: this runs once per message.
            parked = session.waiters.park(until, provider._alarm, self, max_messages)
            delivered: list[ReceivedMessage] | None = await trio.lowlevel.wait_task_rescheduled(parked)
            if provider._gated:
                late = max(late, await provider._hold("receive"))  # frozen: nothing handed out yet
            if delivered:
                # Handed over by a sender, already locked. Its lock may have been lost since
                # (the messages were then handed back): raise as a fresh look would.
                if self._lost or session.holder is not self:
                    self._check()
                if late:
                    await provider._answer_late(late)
                return delivered
            waited = True
            now = provider._now()

    async def complete(self, message: ReceivedMessage) -> None:
        provider = self._provider
        await trio.lowlevel.checkpoint_if_cancelled()  # `_enter_nowait`, inlined (per message)
        late = await provider._gate("complete") if provider._gated else 0.0
        session = self._session
        timers = self._queue.timers
        if (
            self._closed
            or self._lost
            or session.holder is not self
            or (timers and timers[0][0] <= provider._now())
        ):
            session = self._check()  # due events to apply, or the lock is gone (raises)
        # `_in_flight` and `_remove`, inlined: this runs once per message.
        rec = session.in_flight.pop(message.receipt, None) if message.receipt else None
        if rec is None:
            self._in_flight(session, message)  # raises InvalidReceipt
            return
        queue = self._queue
        rec.lock_token = None
        rec.locked_until = None
        rec.state = "gone"
        queue.n_locked -= 1
        queue.live.pop(rec.seq, None)
        # No `_session_changed`: the session stays held by this receiver, and removing a
        # message in flight makes nothing deliverable that was not already (a waiting
        # receive was woken when its message arrived).
        if late:
            await provider._answer_late(late)

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        """Hand the message back; it is this session's next message again (after ``delay``)."""
        late = await self._provider._enter_nowait("abandon")
        session = self._check()
        rec = self._in_flight(session, message)
        if delay is not None and not (math.isfinite(delay) and delay >= 0):
            raise ValidationError(f"abandon delay must be a number >= 0, got {delay!r}")
        provider = self._provider
        provider._unlock(self._queue, rec)
        provider._return(self._queue, rec, provider._now(), delay=delay)
        if late:
            await provider._answer_late(late)

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        late = await self._provider._enter_nowait("dead_letter")
        session = self._check()
        rec = self._in_flight(session, message)
        self._provider._to_dead_letter(self._queue, rec, reason, description)
        self._provider._session_changed(self._queue, session, self._provider._now())
        if late:
            await self._provider._answer_late(late)

    async def renew_lock(self) -> float:
        """Extend the session lock by the queue's ``lock_duration``; returns the new deadline."""
        provider = self._provider
        late = await provider._enter("renew_lock")
        session = self._check()
        session.lock_until = until = provider._now() + self._queue.lock_duration
        for rec in session.in_flight.values():
            rec.locked_until = until
        provider._timer(self._queue, until, "slock", (session, session.epoch, until))
        if late:
            await provider._answer_late(late)
        return until

    async def get_state(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self._check().state

    async def set_state(self, state: bytes | None) -> None:
        await trio.lowlevel.checkpoint()
        if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
            raise ValidationError(f"session state must be bytes or None, got {type(state).__name__}")
        self._check().state = bytes(state) if state is not None else None

    async def aclose(self) -> None:
        """Release the session; unsettled messages become deliverable again at once (their
        delivery was counted). Idempotent; never raises for a lost lock."""
        # Release before the checkpoint: even a cancelled close must hand the session back.
        if not self._closed:
            self._closed = True
            provider = self._provider
            if not provider._closed:
                provider._advance(self._queue)
                if self._session.holder is self:
                    provider._release_session(self._queue, self._session, provider._now())
        await trio.lowlevel.checkpoint()


class _QueueReceiver(Receiver):
    """A receiver on a non-session queue or a dead-letter queue: one lock per message."""

    def __init__(self, provider: InMemoryProvider, queue: _Queue) -> None:
        self._provider = provider
        self._queue = queue
        self.queue = queue.parent.name if queue.parent is not None else queue.name
        self.session_id = None
        self._closed = False

    def __repr__(self) -> str:
        kind = "dead-letter" if self._queue.parent is not None else "queue"
        return f"<memory {kind} receiver queue={self.queue!r}>"

    @property
    def locked_until(self) -> float | None:
        return None

    def _check(self) -> None:
        if self._closed:
            raise QueueError(f"the receiver on queue {self.queue!r} is closed")
        self._provider._advance(self._queue)

    def _locked(self, message: ReceivedMessage) -> _Rec:
        rec = self._queue.locked.get(message.receipt) if message.receipt else None
        if rec is None:
            raise InvalidReceipt(
                f"message {message.message_id!r}: receipt is no longer valid"
                " (already settled, or its lock expired)"
            )
        return rec

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        """Up to ``max_messages`` available messages, oldest first, each locked for the queue's
        ``lock_duration``. Cancellable: a cancelled call takes nothing."""
        provider = self._provider
        late = await provider._enter("receive")
        if max_messages < 1:
            raise ValidationError(f"max_messages must be >= 1, got {max_messages!r}")
        q = self._queue
        deadline = provider._now() + max(timeout, 0.0)
        while True:
            self._check()
            now = provider._now()
            out: list[ReceivedMessage] = []
            while len(out) < max_messages and q.pending:
                _, rec = heapq.heappop(q.pending)
                if rec.state != "pending":
                    continue
                if rec.expires_at is not None and rec.expires_at <= now and q.parent is None:
                    provider._expire(q, rec)
                    continue
                token = provider._new_token()
                q.locked[token] = rec
                locked_until = now + q.lock_duration
                out.append(provider._deliver(q, rec, now, locked_until, token))
                provider._timer(q, locked_until, "mlock", (rec, token, locked_until))
            if out:
                if q.pending:
                    q.waiters.notify()  # more left: let another waiting receiver have it
                if late:
                    await provider._answer_late(late)
                return out
            if now >= deadline:
                if late:
                    await provider._answer_late(late)
                return []
            await q.waiters.wait(min(deadline, provider._next_event(q)), provider._alarm)
            if provider._gated:
                late = max(late, await provider._hold("receive"))

    async def complete(self, message: ReceivedMessage) -> None:
        late = await self._provider._enter_nowait("complete")
        self._check()
        self._provider._remove(self._queue, self._locked(message))
        if late:
            await self._provider._answer_late(late)

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        late = await self._provider._enter_nowait("abandon")
        self._check()
        rec = self._locked(message)
        if delay is not None and not (math.isfinite(delay) and delay >= 0):
            raise ValidationError(f"abandon delay must be a number >= 0, got {delay!r}")
        provider = self._provider
        provider._unlock(self._queue, rec)
        provider._return(self._queue, rec, provider._now(), delay=delay)
        if late:
            await provider._answer_late(late)

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        late = await self._provider._enter_nowait("dead_letter")
        if self._queue.parent is not None:
            raise NotSupported("a dead-lettered message cannot be dead-lettered again")
        self._check()
        self._provider._to_dead_letter(self._queue, self._locked(message), reason, description)
        if late:
            await self._provider._answer_late(late)

    async def renew_lock(self) -> float:
        await self._provider._enter("renew_lock")
        raise NotSupported("this receiver holds no session: use renew_message_lock")

    async def renew_message_lock(self, message: ReceivedMessage) -> float:
        """Extend one message's lock by the queue's ``lock_duration``; `MessageLockLost` if it
        expired (or the message was settled)."""
        provider = self._provider
        late = await provider._enter("renew_lock")
        self._check()
        rec = self._queue.locked.get(message.receipt) if message.receipt else None
        if rec is None:
            raise MessageLockLost(f"message {message.message_id!r}: its lock expired or it was settled")
        assert rec.lock_token is not None
        rec.locked_until = until = provider._now() + self._queue.lock_duration
        provider._timer(self._queue, until, "mlock", (rec, rec.lock_token, until))
        if late:
            await provider._answer_late(late)
        return until

    async def aclose(self) -> None:
        """Close the receiver. Messages it holds stay locked until their lock expires (as the
        base contract says); settle or abandon them first. Idempotent."""
        self._closed = True
        await trio.lowlevel.checkpoint()
