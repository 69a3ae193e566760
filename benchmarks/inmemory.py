"""The two in-memory pipelines every throughput figure compares.

* `runtime_try`: the full supervisor path. A producer task builds `Message` objects and sends
  them to an `InMemoryProvider` in batches of 100; the `Supervisor` accepts sessions, runs one
  `SessionActor` per session, decodes each body with msgspec, awaits the handler and completes
  the message with the broker (peek-lock, ordered per session).
* `baseline_try`: what a user would write by hand with trio alone. A producer task builds the
  same bodies and puts batches of 100 ``(session_id, body)`` pairs on a bounded memory channel;
  a router task starts one task per session on first sight and forwards each body to that
  session's bounded channel; the session task decodes with msgspec, awaits the handler and
  counts. No broker, no locks, no retries, no settlement.

Both times start before the first message is produced and stop when the last message is done
(for the runtime: completed with the broker). Each try is its own ``trio.run``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from queue_runtime import MessageContext, SessionActor, SupervisorConfig
from queue_runtime.message import Message
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.supervisor import Supervisor

from ._common import Event, body_for, session_name

QUEUE = "bench"
#: CPU seconds of the last `runtime_try`'s timed part (the process's, every thread's included).
last_cpu_seconds = 0.0
BATCH = 100


class _Sink:
    """What the shared handler does: add up amounts, count messages."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0


_sink = _Sink()


async def handler(event: Event) -> None:
    """The work per message, identical in both pipelines (no I/O: the cost is the plumbing)."""
    _sink.total += event.amount
    _sink.count += 1


class _InFlight:
    """The number of `io_handler` calls running, integrated over time (reset per try): its
    mean says whether the runtime kept its handlers busy, and by Little's law the mean time a
    call took (its 1 ms wait as trio delivers it)."""

    __slots__ = ("area", "calls", "last", "running")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.area = 0.0
        self.calls = 0
        self.running = 0
        self.last = time.perf_counter()

    def change(self, by: int) -> None:
        now = time.perf_counter()
        self.area += self.running * (now - self.last)
        self.last = now
        self.running += by


in_flight = _InFlight()


async def io_handler(event: Event) -> None:
    """A handler that waits 1 ms, as for a call to a fast service."""
    in_flight.change(1)
    try:
        await trio.sleep(0.001)
    finally:
        in_flight.change(-1)
        in_flight.calls += 1
    _sink.total += event.amount
    _sink.count += 1


HANDLERS = {"cpu": handler, "io": io_handler}


class _Progress:
    """Messages handled in the current runtime try, and an event set at the expected count
    (so the benchmark waits without a polling loop whose wake-ups would be charged to the
    runtime). The baseline counts the same way in its session tasks."""

    __slots__ = ("done", "expected", "handled")

    def __init__(self, expected: int = 0) -> None:
        self.expected = expected
        self.handled = 0
        self.done = trio.Event()


_progress = _Progress()


class BenchActor(SessionActor[Event]):
    work = staticmethod(handler)

    async def handle(self, message: Event, ctx: MessageContext) -> None:
        await self.work(message)
        progress = _progress
        progress.handled += 1
        if progress.handled == progress.expected:
            progress.done.set()


class IoBenchActor(BenchActor):
    work = staticmethod(io_handler)


def _plan(messages: int, sessions: int) -> list[list[tuple[str, int]]]:
    """Batches of (session, index): message i goes to session i mod sessions (round robin)."""
    names = [session_name(s) for s in range(sessions)]
    pairs = [(names[i % sessions], i) for i in range(messages)]
    return [pairs[i : i + BATCH] for i in range(0, messages, BATCH)]


async def _drive(
    provider: InMemoryProvider,
    supervisor: Supervisor,
    produce: Callable[[], Awaitable[None]],
    progress: _Progress,
    messages: int,
    start: float,
    cpu_start: float,
) -> float:
    """Serve ``supervisor`` while ``produce`` sends; seconds from ``start`` to the last
    completion (CPU time to `last_cpu_seconds`). Raises if any message went wrong."""
    global last_cpu_seconds
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        nursery.start_soon(produce)
        await progress.done.wait()
        # The last handle() has returned; its completion follows in the same task step (a
        # settlement does not yield), so this loop normally does not turn.
        while supervisor.stats().completed < messages:
            await trio.lowlevel.checkpoint()
        elapsed = time.perf_counter() - start
        last_cpu_seconds = time.process_time() - cpu_start
        supervisor.stop()
    stats = supervisor.stats()
    if stats.completed != messages or stats.dead_lettered or stats.failed_attempts:
        raise RuntimeError(f"runtime try went wrong: {stats}")
    await provider.aclose()
    return elapsed


async def _runtime(
    sessions: int, messages: int, per_session_concurrency: int, kind: str, config_extra: dict[str, Any]
) -> float:
    plan = _plan(messages, sessions)
    actor = BenchActor if kind == "cpu" else IoBenchActor
    start = time.perf_counter()
    cpu_start = time.process_time()
    provider = InMemoryProvider(max_queue_messages=messages + BATCH)
    config = SupervisorConfig(
        queue=QUEUE,
        max_concurrent_sessions=sessions,
        per_session_concurrency=per_session_concurrency,
        **config_extra,
    )
    global _progress
    _progress = progress = _Progress(messages)
    supervisor = Supervisor(provider, actor, config)

    async def produce() -> None:
        for batch in plan:
            await provider.send(QUEUE, [Message(body_for(i), session_id=sid) for sid, i in batch])

    return await _drive(provider, supervisor, produce, progress, messages, start, cpu_start)


async def _baseline(sessions: int, messages: int, kind: str) -> float:
    plan = _plan(messages, sessions)
    work = HANDLERS[kind]
    decode = msgspec.json.Decoder(Event).decode
    done = trio.Event()
    handled = 0
    start = time.perf_counter()

    async def session_task(channel: trio.MemoryReceiveChannel[bytes]) -> None:
        nonlocal handled
        async for body in channel:
            await work(decode(body))
            handled += 1
            if handled == messages:
                done.set()

    async def router(
        nursery: trio.Nursery, inbox: trio.MemoryReceiveChannel[list[tuple[str, bytes]]]
    ) -> None:
        channels: dict[str, trio.MemorySendChannel[bytes]] = {}
        async for batch in inbox:
            for sid, body in batch:
                channel = channels.get(sid)
                if channel is None:
                    channel, receive = trio.open_memory_channel[bytes](16)
                    channels[sid] = channel
                    nursery.start_soon(session_task, receive)
                await channel.send(body)
        for channel in channels.values():
            await channel.aclose()

    async def produce(outbox: trio.MemorySendChannel[list[tuple[str, bytes]]]) -> None:
        async with outbox:
            for batch in plan:
                await outbox.send([(sid, body_for(i)) for sid, i in batch])

    async with trio.open_nursery() as nursery:
        outbox, inbox = trio.open_memory_channel[list[tuple[str, bytes]]](16)
        nursery.start_soon(router, nursery, inbox)
        nursery.start_soon(produce, outbox)
        await done.wait()
        elapsed = time.perf_counter() - start
    return elapsed


def runtime_try(
    sessions: int,
    messages: int,
    *,
    per_session_concurrency: int = 1,
    kind: str = "cpu",
    **config_extra: Any,
) -> float:
    """Seconds for the supervisor path to produce and complete ``messages`` messages."""
    gc.collect()
    return trio.run(_runtime, sessions, messages, per_session_concurrency, kind, config_extra)


def baseline_try(sessions: int, messages: int, *, kind: str = "cpu") -> float:
    """Seconds for the hand-written trio pipeline to produce and handle ``messages`` messages."""
    gc.collect()
    return trio.run(_baseline, sessions, messages, kind)


# -- non-session queue: the runtime vs a hand-written consumer with N concurrent handlers ------

JOBS = "jobs"


async def _queue_runtime(messages: int, slots: int, kind: str) -> float:
    actor = BenchActor if kind == "cpu" else IoBenchActor
    start = time.perf_counter()
    cpu_start = time.process_time()
    provider = InMemoryProvider(max_queue_messages=messages + BATCH)
    provider.create_queue(JOBS, requires_session=False)
    global _progress
    _progress = progress = _Progress(messages)
    supervisor = Supervisor(provider, actor, SupervisorConfig(queue=JOBS, max_concurrent_sessions=slots))

    async def produce() -> None:
        for i in range(0, messages, BATCH):
            await provider.send(JOBS, [Message(body_for(j)) for j in range(i, min(i + BATCH, messages))])

    return await _drive(provider, supervisor, produce, progress, messages, start, cpu_start)


async def _queue_baseline(messages: int, slots: int, kind: str) -> float:
    """``slots`` tasks, each: receive one message, decode, await the handler, complete."""
    work = HANDLERS[kind]
    decode = msgspec.json.Decoder(Event).decode
    start = time.perf_counter()
    cpu_start = time.process_time()
    provider = InMemoryProvider(max_queue_messages=messages + BATCH)
    provider.create_queue(JOBS, requires_session=False)
    receiver = await provider.open_receiver(JOBS)
    done = trio.Event()
    handled = 0

    async def handler_task() -> None:
        nonlocal handled
        while handled < messages:
            for message in await receiver.receive(1, 1.0):
                await work(decode(message.message.body))
                await receiver.complete(message)
                handled += 1
                if handled == messages:
                    done.set()

    async def produce() -> None:
        for i in range(0, messages, BATCH):
            await provider.send(JOBS, [Message(body_for(j)) for j in range(i, min(i + BATCH, messages))])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        for _ in range(slots):
            nursery.start_soon(handler_task)
        await done.wait()
        elapsed = time.perf_counter() - start
        global last_cpu_seconds
        last_cpu_seconds = time.process_time() - cpu_start
        nursery.cancel_scope.cancel()
    await provider.aclose()
    return elapsed


def queue_runtime_try(messages: int, slots: int, *, kind: str = "io") -> float:
    """Seconds for the supervisor to handle ``messages`` of a non-session queue with
    ``max_concurrent_sessions = slots``."""
    gc.collect()
    return trio.run(_queue_runtime, messages, slots, kind)


def queue_baseline_try(messages: int, slots: int, *, kind: str = "io") -> float:
    """Seconds for ``slots`` hand-written receive/handle/complete tasks on the same broker."""
    gc.collect()
    return trio.run(_queue_baseline, messages, slots, kind)
