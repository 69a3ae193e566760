"""A deterministic simulation of the runtime: workers, a broker, faults and stalls, on MockClock.

One run (`run_scenario`) builds one `InMemoryProvider` and 1-3 `Supervisor`s on it (each one
stands for a worker process), sends 1-6 sessions of 1-8 scripted messages, and for a "chaos"
window of simulated time throws at it what production does: transient broker errors and lock
refusals on every operation, answers lost after the call took effect, broker stalls longer than
the lock (``renew_lock`` alone stalling is the nastiest), worker crashes (``serve()`` cancelled,
or killed so that nothing is even released) and graceful stops, each followed by a restart.
After the window the run goes on fault-free until every message is settled or a generous
deadline passes. Every step is recorded with a global sequence number, and `check` verifies
the contract (DESIGN.md, "Semantics") on the record:

(a) nothing lost: every message sent ends completed (after a ``handle()`` that returned) or
    in the dead-letter queue, once, and the queue is empty;
(b) order: no ``handle()`` of message k+1 of a session before message k was settled
    (complete or dead-letter called), and never back to an earlier message;
(c) no two ``handle()`` calls of one session overlap, whichever worker runs them;
(d) every dead letter has the reason its script calls for (``DeadLetter`` reason,
    ``MaxAttemptsExceeded``, ``DeserializationFailed``), or ``MaxDeliveryCountExceeded`` only
    once its delivery count reached a limit;
(e) delivery counts are consistent: per message never decreasing, attempts 1..n within one
    delivery, never above ``RetryPolicy.max_attempts`` or a delivery limit;
(f) one holder: a worker uses (receives, settles, starts ``handle()`` on) a newer receiver of
    a session only once its older ones are closed (rule 12), and
    ``handle()`` starts only on the receiver that holds the session at the broker;
(g) live locks only: ``handle()`` starts only while its session lock is valid;
(h) the runtime itself: ``serve()`` never raises, a graceful stop drains.

`drills.simulation.scenarios` is the hypothesis strategy; ``python -m drills.simulation``
runs many examples (see ``--help``). Everything is deterministic: one `Scenario` replays
identically (trio's scheduler and the ``random`` module are seeded per run from
``Scenario.seed``), so a failing case printed by the CLI becomes a regression test as is.

Faults are injected by `Link`, a thin `Provider` wrapper per worker incarnation, rather than
by ``InMemoryProvider.inject_fault``: the wrapper records every call and its effect (what
settled when, which receiver got which delivery), can aim a fault at one worker, can raise a
fault *after* the call took effect (an answer lost on the way back), and drops every pending
fault when the chaos window ends (``inject_fault`` has no way to take one back). A receive
whose answer is lost leaves what it took locked to a session the worker still holds: the
runtime must then give the session up rather than receive again (the next receive would hand
out the messages after those). A throttled call never takes effect. Stalls are
the broker's own (``InMemoryProvider.stall``): time runs on while calls hang or answer late.

The invariants are checked against the broker model's own state where the record cannot tell:
whether a receiver still holds its session when ``handle()`` starts (`LinkReceiver.holds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import random
import sys
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import msgspec
import trio
import trio.testing
from hypothesis import strategies as st

from queue_runtime import DeadLetter, Message, MessageContext, RetryPolicy, SessionActor, Supervisor
from queue_runtime.config import SupervisorConfig
from queue_runtime.errors import ConnectionFailed, QueueError, SessionLockLost, Throttled, Timeout
from queue_runtime.message import ReceivedMessage
from queue_runtime.providers.base import Provider, QueueInfo, QueueStats, Receiver
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.telemetry import Telemetry

__all__ = [
    "DeadLetterRecord",
    "Event",
    "Fault",
    "Msg",
    "Outage",
    "RunResult",
    "RunStats",
    "Scenario",
    "SimulationFailure",
    "Stall",
    "Trace",
    "Violation",
    "check",
    "run_scenario",
    "scenarios",
]

QUEUE = "sim"
T = TypeVar("T")

# -- the scenario -------------------------------------------------------------------------------

Kind = Literal["ok", "flaky", "always", "dead", "undecodable"]


def _short_repr(obj: Any) -> str:
    """``Class(field=value, ...)`` with the fields that differ from their defaults: short, and
    valid Python to paste into a regression test."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        parts.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class Msg:
    """What ``handle()`` does with one message, at every attempt: sleep ``duration`` seconds,
    then return (``ok``), raise for attempts <= ``fails`` (``flaky``), always raise
    (``always``), or raise ``DeadLetter("Script")`` (``dead``). ``undecodable`` messages have a
    body the actor cannot decode. Sent at ``send_at`` (after the session's earlier messages)."""

    kind: Kind = "ok"
    fails: int = 0
    duration: float = 0.0
    send_at: float = 0.0

    __repr__ = _short_repr


@dataclass(frozen=True)
class Fault:
    """From ``at`` on, the next ``times`` calls of ``op`` (by ``worker``'s incarnations, or
    anyone when None) raise ``error``: before the call (nothing changed) or, ``after``, once it
    took effect (the answer was lost)."""

    at: float
    op: str
    error: str = "ConnectionFailed"
    times: int = 1
    worker: int | None = None
    after: bool = False

    __repr__ = _short_repr


@dataclass(frozen=True)
class Stall:
    """``InMemoryProvider.stall(duration, operations=..., mode=...)`` at ``at``."""

    at: float
    duration: float
    operations: tuple[str, ...] | None = ("renew_lock",)
    mode: Literal["hang", "late"] = "hang"

    __repr__ = _short_repr


@dataclass(frozen=True)
class Outage:
    """At ``at``, worker ``worker`` crashes (``serve()`` cancelled: settles nothing, receivers
    closed), is killed (cancelled and nothing released: its locks just expire) or is stopped
    gracefully (``stop()``, then ``serve()`` returns); ``down_for`` seconds later it restarts."""

    at: float
    worker: int = 0
    kind: Literal["crash", "kill", "stop"] = "crash"
    down_for: float = 0.0

    __repr__ = _short_repr


@dataclass(frozen=True)
class Scenario:
    """Everything one run does. ``seed`` seeds trio's scheduler and ``random`` (jitter)."""

    sessions: tuple[tuple[Msg, ...], ...] = ((Msg(),),)
    workers: int = 1
    lock_duration: float = 10.0
    broker_max_delivery: int = 10
    runtime_max_delivery: int | None = None
    max_lock_renewal: float = 300.0
    max_attempts: int = 3
    backoff: float = 0.0
    jitter: float = 0.0
    prefetch: int = 0
    idle_timeout: float = 5.0
    max_sessions: int = 64
    receive_timeout: float = 5.0
    shutdown_grace: float = 30.0
    chaos: float = 40.0
    faults: tuple[Fault, ...] = ()
    stalls: tuple[Stall, ...] = ()
    outages: tuple[Outage, ...] = ()
    # Every session is asked to end once it has nothing to do (``Receiver.release_requested``),
    # as the SQS provider asks while groups it received wait for a slot.
    slot_wanted: bool = False
    seed: int = 0

    __repr__ = _short_repr

    def config(self) -> SupervisorConfig:
        return SupervisorConfig(
            queue=QUEUE,
            max_concurrent_sessions=self.max_sessions,
            session_idle_timeout=self.idle_timeout,
            prefetch=self.prefetch,
            max_lock_renewal=self.max_lock_renewal,
            retry=RetryPolicy(
                max_attempts=self.max_attempts, initial_backoff=self.backoff, jitter=self.jitter
            ),
            max_delivery_count=self.runtime_max_delivery,
            shutdown_grace=self.shutdown_grace,
            receive_timeout=self.receive_timeout,
        )

    def stuck_after(self) -> float:
        """Seconds without a delivery, ``handle()`` or settlement after which the fault-free
        phase gives up: longer than any wait of the runtime (handler, renewal limit, backoff,
        circuit breaker, idle timeout, stall)."""
        longest = max((m.duration for s in self.sessions for m in s), default=0.0)
        stalls = max((s.duration for s in self.stalls), default=0.0)
        return (
            4 * self.lock_duration + min(longest, self.max_lock_renewal) + stalls + self.idle_timeout + 200.0
        )

    def deadline(self) -> float:
        """When the fault-free phase gives up (simulated seconds): generous, it costs nothing
        unless something was lost."""
        lock = self.lock_duration
        per_delivery = min(
            max((m.duration for s in self.sessions for m in s), default=0.0), self.max_lock_renewal
        )
        per_delivery = (per_delivery + 2 * lock + 30.0) * self.max_attempts
        total = sum(len(s) for s in self.sessions) * self.broker_max_delivery * per_delivery
        stalls = sum(s.duration for s in self.stalls)
        return self.chaos + stalls + total + 600.0


def message_id(session: int, k: int) -> str:
    return f"s{session}-m{k}"


# -- the record ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    """One recorded step. ``seq`` orders events (simulated time alone does not: many happen at
    one instant). Fields not used by a kind keep their defaults."""

    seq: int
    t: float
    kind: str
    worker: str = ""
    session: str = ""
    k: int = -1
    mid: str = ""
    dc: int = 0
    attempt: int = 0
    rid: int = 0
    hid: int = 0
    op: str = ""
    outcome: str = ""
    info: str = ""
    lock_left: float = math.inf
    held: bool = True  # start: the receiver holds the session at the broker

    def __str__(self) -> str:
        parts = [f"#{self.seq:<5} t={self.t:9.3f}  {self.worker or '-':<6} {self.kind:<12}"]
        if self.op:
            parts.append(self.op)
        if self.session:
            parts.append(self.session if not self.mid else self.mid)
        if self.dc:
            parts.append(f"dc={self.dc}")
        if self.attempt:
            parts.append(f"attempt={self.attempt}")
        if self.rid:
            parts.append(f"r{self.rid}")
        if self.hid:
            parts.append(f"h{self.hid}")
        if self.outcome:
            parts.append(f"-> {self.outcome}")
        if self.kind == "start" and math.isfinite(self.lock_left):
            parts.append(f"(lock left {self.lock_left:.3f}s)")
        if self.info:
            parts.append(f"[{self.info}]")
        return " ".join(parts)


@dataclass(frozen=True)
class DeadLetterRecord:
    mid: str
    reason: str
    description: str
    dc: int


@dataclass
class Trace:
    """What `check` looks at: the events, the scripts, the end state of the broker."""

    events: list[Event]
    scripts: dict[str, tuple[str, int, Msg]]  # message id -> (session, k, script)
    sent: set[str]
    dead_letters: list[DeadLetterRecord]
    leftover: list[str]  # messages still in the queue at the end
    max_attempts: int = 3
    broker_max_delivery: int = 10
    runtime_max_delivery: int | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (invariant, text) seen live


@dataclass
class Violation:
    invariant: str  # "a".."h"
    title: str
    session: str = ""
    mid: str = ""
    seqs: tuple[int, ...] = ()
    detail: str = ""

    def render(self, trace: Trace, context: int = 12, limit: int = 60) -> str:
        head = f"({self.invariant}) {self.title}"
        if self.detail:
            head += f"\n    {self.detail}"
        if not trace.events:
            return head
        if self.seqs:
            lo, hi = min(self.seqs) - context, max(self.seqs) + 3
        else:
            lo, hi = trace.events[-1].seq - 2 * context, trace.events[-1].seq
        lines = [
            str(e)
            for e in trace.events
            if lo <= e.seq <= hi and (_relevant(e, self.session) or e.seq in self.seqs)
        ]
        if len(lines) > limit:
            lines = [*lines[: limit // 2], "   ...", *lines[-limit // 2 :]]
        marks = set(self.seqs)
        shown = [("=> " if _seq_of(line) in marks else "   ") + line for line in lines]
        return head + "\n" + "\n".join("    " + line for line in shown)


_GLOBAL_KINDS = frozenset(
    {"fault", "stall", "crash", "kill", "stop", "restart", "serve_end", "chaos_end", "deadline", "log"}
)


def _relevant(event: Event, session: str) -> bool:
    return not session or event.session == session or event.kind in _GLOBAL_KINDS


def _seq_of(line: str) -> int:
    try:
        return int(line[1:].split(None, 1)[0])
    except (ValueError, IndexError):
        return -1


class SimulationFailure(AssertionError):
    """A run broke an invariant. Subclassed per invariant (see `failure_type`) so hypothesis
    shrinks each kind of failure on its own."""

    violations: list[Violation]
    scenario: Scenario | None


_FAILURE_TYPES: dict[str, type[SimulationFailure]] = {}


def failure_type(invariant: str) -> type[SimulationFailure]:
    kind = _FAILURE_TYPES.get(invariant)
    if kind is None:
        kind = _FAILURE_TYPES[invariant] = type(
            f"Invariant{invariant.upper()}Violated", (SimulationFailure,), {"__module__": __name__}
        )
    return kind


# -- the checker ----------------------------------------------------------------------------------


def check(trace: Trace) -> list[Violation]:
    """Every invariant on one record; an empty list when the run kept the contract."""
    found: list[Violation] = []
    found += _check_runtime(trace)
    found += _check_lost(trace)
    found += _check_order(trace)
    found += _check_overlap(trace)
    found += _check_reasons(trace)
    found += _check_counts(trace)
    found += _check_holders(trace)
    found.sort(key=lambda v: v.invariant)
    return found


def _check_runtime(trace: Trace) -> list[Violation]:
    return [Violation(inv, text) for inv, text in trace.problems]


def _check_lost(trace: Trace) -> list[Violation]:
    found: list[Violation] = []
    dead: dict[str, list[DeadLetterRecord]] = defaultdict(list)
    for d in trace.dead_letters:
        dead[d.mid].append(d)
    done_by: dict[str, list[Event]] = defaultdict(list)  # returned handle() calls
    completed: dict[str, list[Event]] = defaultdict(list)  # complete() returned: it took effect
    # complete() called: it may have taken effect without returning (a "late" stall's answer
    # never arrives when the caller is cancelled meanwhile).
    complete_calls: dict[str, list[Event]] = defaultdict(list)
    for e in trace.events:
        if e.kind == "end" and e.outcome == "done":
            done_by[e.mid].append(e)
        elif e.kind == "settle" and e.op == "complete":
            complete_calls[e.mid].append(e)
            # The runtime completes a delivery only after a handle() of it returned.
            if not any(d.rid == e.rid and d.dc == e.dc for d in done_by[e.mid]):
                session = trace.scripts[e.mid][0] if e.mid in trace.scripts else e.session
                found.append(
                    Violation(
                        "a",
                        f"{e.mid} completed (delivery {e.dc} on r{e.rid}) before a handle() of it returned",
                        session,
                        e.mid,
                        (e.seq,),
                    )
                )
        elif e.kind == "settled" and e.op == "complete":
            completed[e.mid].append(e)
    leftover = set(trace.leftover)
    for mid in sorted(trace.sent, key=_mid_key):
        session = trace.scripts[mid][0]
        copies = dead.get(mid, [])
        if mid in leftover:
            found.append(
                Violation(
                    "a",
                    f"{mid} was never settled (still in the queue at the end)",
                    session,
                    mid,
                    _last_seqs(trace, mid),
                )
            )
        elif len(copies) > 1:
            found.append(
                Violation(
                    "a", f"{mid} was dead-lettered {len(copies)} times", session, mid, _last_seqs(trace, mid)
                )
            )
        elif copies and completed.get(mid):
            found.append(
                Violation(
                    "a",
                    f"{mid} was both completed and dead-lettered",
                    session,
                    mid,
                    tuple(e.seq for e in completed[mid]),
                )
            )
        elif not copies and not complete_calls.get(mid):
            found.append(
                Violation(
                    "a",
                    f"{mid} vanished: not in the queue, not completed, not dead-lettered",
                    session,
                    mid,
                    _last_seqs(trace, mid),
                )
            )
        elif not copies and not done_by.get(mid):
            found.append(
                Violation(
                    "a",
                    f"{mid} was completed but no handle() of it ever returned",
                    session,
                    mid,
                    tuple(e.seq for e in complete_calls[mid]),
                )
            )
    stray = set(trace.leftover) - trace.sent
    if stray:
        found.append(Violation("a", f"the queue holds messages never sent: {sorted(stray)}"))
    return found


def _mid_key(mid: str) -> tuple[int, int]:
    s, _, m = mid.partition("-m")
    try:
        return int(s[1:]), int(m)
    except ValueError:
        return (1 << 30, 0)


def _last_seqs(trace: Trace, mid: str, n: int = 3) -> tuple[int, ...]:
    seqs = [e.seq for e in trace.events if e.mid == mid]
    return tuple(seqs[-n:])


def _check_order(trace: Trace) -> list[Violation]:
    found: list[Violation] = []
    settle_called: dict[str, set[int]] = defaultdict(set)  # session -> k with complete/dead_letter called
    highest: dict[str, Event] = {}
    broker_dead = {
        d.mid for d in trace.dead_letters if d.reason == "MaxDeliveryCountExceeded"
    }  # the broker may have moved these without a call
    for e in trace.events:
        if e.kind == "settle" and e.op in ("complete", "dead_letter"):
            settle_called[e.session].add(e.k)
        elif e.kind == "start":
            top = highest.get(e.session)
            if top is not None and e.k < top.k:
                found.append(
                    Violation(
                        "b",
                        f"{e.session}: {e.mid} started after a later message {top.mid} had started",
                        e.session,
                        e.mid,
                        (top.seq, e.seq),
                    )
                )
            if top is None or e.k > top.k:
                highest[e.session] = e
            for j in range(e.k):
                mid = f"{e.session}-m{j}"
                if j not in settle_called[e.session] and mid not in broker_dead:
                    found.append(
                        Violation(
                            "b",
                            f"{e.session}: {e.mid} started before {mid} was settled",
                            e.session,
                            e.mid,
                            (e.seq,),
                        )
                    )
                    break
    return found


def _check_overlap(trace: Trace) -> list[Violation]:
    found: list[Violation] = []
    running: dict[str, dict[int, Event]] = defaultdict(dict)  # session -> hid -> start
    ends = {e.hid: e for e in trace.events if e.kind == "end"}
    for e in trace.events:
        if e.kind == "start":
            for other in running[e.session].values():
                end = ends.get(other.hid)
                if end is not None:
                    how_long = f"{end.t - e.t:.3f}s of simulated time, until #{end.seq} ({end.outcome})"
                else:
                    how_long = "the other never ended"
                found.append(
                    Violation(
                        "c",
                        f"{e.session}: two handle() calls at once: {other.mid} on {other.worker}"
                        f" (h{other.hid}) and {e.mid} on {e.worker} (h{e.hid})",
                        e.session,
                        e.mid,
                        (other.seq, e.seq) + ((end.seq,) if end is not None else ()),
                        f"overlap: {how_long}",
                    )
                )
            running[e.session][e.hid] = e
        elif e.kind == "end":
            running[e.session].pop(e.hid, None)
    return found


def expected_reasons(script: Msg, max_attempts: int) -> set[str]:
    """The dead-letter reasons a script calls for (MaxDeliveryCountExceeded aside)."""
    if script.kind == "always" or (script.kind == "flaky" and script.fails >= max_attempts):
        return {"MaxAttemptsExceeded"}
    if script.kind == "dead":
        return {"Script"}
    if script.kind == "undecodable":
        return {"DeserializationFailed"}
    return set()


def _check_reasons(trace: Trace) -> list[Violation]:
    found: list[Violation] = []
    for d in trace.dead_letters:
        if d.mid not in trace.scripts:
            found.append(Violation("d", f"the DLQ holds a message never sent: {d.mid} ({d.reason})"))
            continue
        session, _, script = trace.scripts[d.mid]
        seqs = _last_seqs(trace, d.mid)
        if d.reason == "MaxDeliveryCountExceeded":
            runtime_limit = trace.runtime_max_delivery
            if d.dc < trace.broker_max_delivery and (runtime_limit is None or d.dc <= runtime_limit):
                found.append(
                    Violation(
                        "d",
                        f"{d.mid} dead-lettered MaxDeliveryCountExceeded after {d.dc} deliveries",
                        session,
                        d.mid,
                        seqs,
                        f"broker limit {trace.broker_max_delivery}, runtime limit {runtime_limit}",
                    )
                )
            continue
        expected = expected_reasons(script, trace.max_attempts)
        if d.reason not in expected:
            found.append(
                Violation(
                    "d",
                    f"{d.mid} dead-lettered with reason {d.reason!r}; its script {script!r} calls for"
                    f" {sorted(expected) or 'completion'}",
                    session,
                    d.mid,
                    seqs,
                    d.description,
                )
            )
        elif d.reason == "MaxAttemptsExceeded" and not d.description.startswith("ScriptFailure: "):
            found.append(
                Violation(
                    "d",
                    f"{d.mid}: MaxAttemptsExceeded description does not name the error",
                    session,
                    d.mid,
                    seqs,
                    repr(d.description),
                )
            )
    return found


def _check_counts(trace: Trace) -> list[Violation]:
    found: list[Violation] = []
    last_dc: dict[str, Event] = {}
    attempts: dict[tuple[str, int], Event] = {}
    for e in trace.events:
        if e.kind != "start":
            continue
        prev = last_dc.get(e.mid)
        if prev is not None and e.dc < prev.dc:
            found.append(
                Violation(
                    "e",
                    f"{e.mid}: delivery count went down from {prev.dc} to {e.dc}",
                    e.session,
                    e.mid,
                    (prev.seq, e.seq),
                )
            )
        last_dc[e.mid] = e
        before = attempts.get((e.mid, e.dc))
        want = 1 if before is None else before.attempt + 1
        if e.attempt != want:
            found.append(
                Violation(
                    "e",
                    f"{e.mid}: attempt {e.attempt} of delivery {e.dc}, expected {want}",
                    e.session,
                    e.mid,
                    ((before.seq,) if before else ()) + (e.seq,),
                )
            )
        attempts[(e.mid, e.dc)] = e
        if e.attempt > trace.max_attempts:
            found.append(
                Violation(
                    "e",
                    f"{e.mid}: attempt {e.attempt} > max_attempts {trace.max_attempts}",
                    e.session,
                    e.mid,
                    (e.seq,),
                )
            )
        if not 1 <= e.dc <= trace.broker_max_delivery:
            found.append(
                Violation(
                    "e",
                    f"{e.mid}: handle() at delivery count {e.dc}, broker limit {trace.broker_max_delivery}",
                    e.session,
                    e.mid,
                    (e.seq,),
                )
            )
        if trace.runtime_max_delivery is not None and e.dc > trace.runtime_max_delivery:
            found.append(
                Violation(
                    "e",
                    f"{e.mid}: handle() at delivery count {e.dc} > max_delivery_count"
                    f" {trace.runtime_max_delivery}",
                    e.session,
                    e.mid,
                    (e.seq,),
                )
            )
    for d in trace.dead_letters:
        prev = last_dc.get(d.mid)
        if prev is not None and d.dc < prev.dc:
            found.append(
                Violation(
                    "e",
                    f"{d.mid}: dead-lettered at delivery count {d.dc} after a handle() at {prev.dc}",
                    prev.session,
                    d.mid,
                    (prev.seq,),
                )
            )
    return found


def _check_holders(trace: Trace) -> list[Violation]:
    found: list[Violation] = []
    # (worker, session) -> rid -> accept, in the order the worker got them
    open_by: dict[tuple[str, str], dict[int, Event]] = defaultdict(dict)
    reported: set[tuple[int, int]] = set()
    for e in trace.events:
        key = (e.worker, e.session)
        if e.kind == "accept":
            open_by[key][e.rid] = e
        elif e.kind == "close":
            open_by[key].pop(e.rid, None)
        elif e.kind == "serve_end":
            for held in [k for k in open_by if k[0] == e.worker]:
                open_by[held].clear()
        elif e.kind in ("deliver", "settle", "start") and e.rid:
            # Rule 12: a worker's newer receiver of a session waits until its older ones closed.
            for older in open_by[key].values():
                if older.rid == e.rid:
                    break
                if (older.rid, e.rid) not in reported:
                    reported.add((older.rid, e.rid))
                    found.append(
                        Violation(
                            "f",
                            f"{e.session}: {e.worker} used its receiver r{e.rid} ({e.kind} {e.mid or ''})"
                            f" while its older receiver r{older.rid} of the session was still open",
                            e.session,
                            e.mid,
                            (older.seq, e.seq),
                        )
                    )
        if e.kind != "start":
            continue
        if not e.held:
            found.append(
                Violation(
                    "f",
                    f"{e.session}: {e.mid} started on r{e.rid} ({e.worker}), which no longer holds the"
                    " session at the broker",
                    e.session,
                    e.mid,
                    (e.seq,),
                )
            )
        elif e.lock_left <= 0:
            found.append(
                Violation(
                    "g",
                    f"{e.session}: {e.mid} started {abs(e.lock_left):.3f}s after its session lock expired"
                    if e.lock_left < 0
                    else f"{e.session}: {e.mid} started at the very deadline of its session lock",
                    e.session,
                    e.mid,
                    (e.seq,),
                )
            )
    return found


# -- the world: broker, links, workers ------------------------------------------------------------


class ScriptFailure(Exception):
    """What a failing script raises (its name must appear in MaxAttemptsExceeded descriptions)."""


class Step(msgspec.Struct):
    session: str
    k: int


_ERRORS: dict[str, Callable[[str], QueueError]] = {
    "ConnectionFailed": lambda text: ConnectionFailed(text),
    "Throttled": lambda text: Throttled(text, retry_after=1.0),
    "Timeout": lambda text: Timeout(text),
    "SessionLockLost": lambda text: SessionLockLost(text),
}


@dataclass
class _Pending:
    fault: Fault
    left: int


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._seq = itertools.count(1)
        self.problems: list[tuple[str, str]] = []
        self.last_progress = 0.0

    def add(self, kind: str, **fields: Any) -> Event:
        now = trio.current_time()
        event = Event(next(self._seq), now, kind, **fields)
        self.events.append(event)
        if kind in _PROGRESS:
            self.last_progress = now
        return event


_PROGRESS = frozenset({"deliver", "settled", "start", "end", "send"})


class SimTelemetry(Telemetry):
    """Default telemetry, except that warnings and errors go into the record instead of the
    process's log (only ``log`` is overridden: the runtime's fast paths stay as they are)."""

    def __init__(self, world: World, worker: str) -> None:
        super().__init__(QUEUE, "memory")
        self._world = world
        self._worker = worker

    def log(
        self,
        level: int,
        text: str,
        *,
        operation: str,
        message: Any = None,
        session_id: str | None = None,
        **fields: Any,
    ) -> None:
        if level >= 30:
            mid = ""
            if isinstance(message, ReceivedMessage):
                mid = message.message.message_id
            elif isinstance(message, Message):
                mid = message.message_id
            self._world.rec.add(
                "log", worker=self._worker, session=session_id or "", mid=mid, op=operation, info=text[:160]
            )


class _WorkerState:
    def __init__(self, index: int) -> None:
        self.index = index
        self.incarnation = 0
        self.name = f"w{index}"
        self.supervisor: Supervisor | None = None
        self.link: Link | None = None
        self.scope: trio.CancelScope | None = None
        self.done = trio.Event()
        self.up = False


@dataclass
class RunStats:
    messages: int = 0
    handle_calls: int = 0
    redeliveries: int = 0
    lock_lost: int = 0
    crashes: int = 0
    stops: int = 0
    stalls: int = 0
    faults: int = 0
    sim_seconds: float = 0.0


@dataclass
class RunResult:
    scenario: Scenario
    trace: Trace
    violations: list[Violation]
    stats: RunStats

    def report(self, max_violations: int = 5) -> str:
        lines = [f"{len(self.violations)} violation(s) in {self.scenario!r}"]
        for v in self.violations[:max_violations]:
            lines.append(v.render(self.trace))
        if len(self.violations) > max_violations:
            lines.append(f"... and {len(self.violations) - max_violations} more")
        return "\n".join(lines)

    def raise_for_violations(self) -> None:
        if self.violations:
            error = failure_type(self.violations[0].invariant)(self.report())
            error.violations = self.violations
            error.scenario = self.scenario
            raise error


class World:
    """One run's broker, workers, producer and chaos, and the record of it all."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.rec = Recorder()
        self.provider = InMemoryProvider(
            lock_duration=scenario.lock_duration, max_delivery_count=scenario.broker_max_delivery
        )
        self.config = scenario.config()
        self.stats = RunStats()
        self.scripts: dict[str, tuple[str, int, Msg]] = {}
        for s, messages in enumerate(scenario.sessions):
            for k, script in enumerate(messages):
                self.scripts[message_id(s, k)] = (f"s{s}", k, script)
        self.stats.messages = len(self.scripts)
        self.sent: set[str] = set()
        self.sending_done = False
        self.chaos_over = False
        self.faults: dict[str, deque[_Pending]] = defaultdict(deque)
        self.workers = [_WorkerState(i) for i in range(scenario.workers)]
        self.finish = trio.Event()
        self.rids = itertools.count(1)
        self.hids = itertools.count(1)
        self.delivered_to: dict[tuple[str, int], LinkReceiver] = {}  # (mid, dc) -> receiver
        self.actor_classes: dict[str, type[SessionActor[Step]]] = {}

    # -- faults and stalls ----------------------------------------------------------------------
    def _take_fault(self, link: Link, op: str) -> Fault | None:
        pending = self.faults.get(op)
        if not pending:
            return None
        for entry in pending:
            if entry.fault.worker is None or entry.fault.worker == link.index:
                entry.left -= 1
                if entry.left <= 0:
                    pending.remove(entry)
                return entry.fault
        return None

    async def call(
        self,
        link: Link,
        op: str,
        fn: Callable[[], Awaitable[T]],
        on_effect: Callable[[T], None] | None = None,
        on_lost_answer: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """One broker call through ``link``: an injected fault before it, or the call (with
        ``on_effect`` when it returns) and maybe a fault after it."""
        if link.dead:
            await trio.lowlevel.checkpoint()
            raise ConnectionFailed(f"{link.name} is dead")
        fault = self._take_fault(link, op) if not self.chaos_over else None
        if fault is not None and not fault.after:
            await trio.lowlevel.checkpoint()
            self.stats.faults += 1
            self.rec.add("fault", worker=link.name, op=op, info=f"{fault.error} before the call")
            raise _ERRORS[fault.error](f"injected {fault.error} on {op}")
        result = await fn()
        if on_effect is not None:
            on_effect(result)
        if fault is not None:
            self.stats.faults += 1
            self.rec.add("fault", worker=link.name, op=op, info=f"{fault.error} after the call took effect")
            if on_lost_answer is not None:
                await on_lost_answer()
            raise _ERRORS[fault.error](f"injected {fault.error} on {op} (after it took effect)")
        return result

    def stall(self, s: Stall) -> None:
        self.stats.stalls += 1
        self.rec.add(
            "stall",
            op=",".join(s.operations) if s.operations else "*",
            info=f"{s.mode} for {s.duration}s until t={trio.current_time() + s.duration:.3f}",
        )
        self.provider.stall(s.duration, operations=s.operations, mode=s.mode)

    # -- the actor ------------------------------------------------------------------------------
    def actor_for(self, worker: str) -> type[SessionActor[Step]]:
        cls = self.actor_classes.get(worker)
        if cls is None:
            cls = self.actor_classes[worker] = type(
                f"SimActor_{worker.replace('.', '_')}", (SimActor,), {"world": self, "worker": worker}
            )
        return cls

    async def handle(self, worker: str, step: Step, ctx: MessageContext) -> None:
        mid = ctx.message_id
        session, k, script = self.scripts[mid]
        receiver = self.delivered_to.get((mid, ctx.delivery_count))
        rid = receiver.rid if receiver is not None else 0
        now = trio.current_time()
        lock_left = receiver.lock_left(now) if receiver is not None else -math.inf
        held = receiver is not None and receiver.holds()
        hid = next(self.hids)
        self.stats.handle_calls += 1
        common = {
            "worker": worker,
            "session": session,
            "k": k,
            "mid": mid,
            "dc": ctx.delivery_count,
            "attempt": ctx.attempt,
            "rid": rid,
            "hid": hid,
        }
        self.rec.add("start", lock_left=lock_left, held=held, **common)
        outcome = "cancelled"
        try:
            if script.duration:
                await trio.sleep(script.duration)
            if script.kind == "dead":
                outcome = "raised DeadLetter"
                raise DeadLetter("Script", f"{mid} asks for it")
            if script.kind == "always" or (script.kind == "flaky" and ctx.attempt <= script.fails):
                outcome = "raised"
                raise ScriptFailure(f"{mid} attempt {ctx.attempt}")
            outcome = "done"
        finally:
            self.rec.add("end", outcome=outcome, **common)

    # -- workers --------------------------------------------------------------------------------
    def _start(self, w: _WorkerState, nursery: trio.Nursery) -> None:
        """Start an incarnation of worker ``w`` (its state is set at once, not when it runs)."""
        name = w.name if w.incarnation == 0 else f"{w.name}.{w.incarnation}"
        link = Link(self, name, w.index)
        supervisor = Supervisor(link, self.actor_for(name), self.config, telemetry=SimTelemetry(self, name))
        w.link, w.supervisor, w.done, w.up, w.scope = link, supervisor, trio.Event(), True, trio.CancelScope()
        nursery.start_soon(self._serve, w, name, supervisor, w.scope, w.done)

    async def _serve(
        self, w: _WorkerState, name: str, supervisor: Supervisor, scope: trio.CancelScope, done: trio.Event
    ) -> None:
        outcome = "returned"
        try:
            with scope:
                await supervisor.serve()
            if scope.cancelled_caught:
                outcome = "cancelled"
        except Exception as error:  # serve() must not raise
            outcome = f"raised {type(error).__name__}: {error}"
            self.rec.problems.append(("h", f"serve() of {name} raised {type(error).__name__}: {error}"))
        finally:
            self.stats.lock_lost += supervisor.stats().lock_lost
            self.rec.add("serve_end", worker=name, outcome=outcome)
            if w.supervisor is supervisor:
                w.up = False
            done.set()

    async def _down(self, w: _WorkerState, kind: str) -> None:
        """Crash, kill or stop worker ``w`` and wait until its ``serve()`` is over."""
        assert w.supervisor is not None and w.link is not None and w.scope is not None
        if kind != "stop":
            self.stats.crashes += 1
            self.rec.add(kind, worker=w.link.name)
            if kind == "kill":
                w.link.dead = True
            w.scope.cancel()
            await w.done.wait()
            return
        if not self.finish.is_set():  # (the stop at the end of every run is not counted)
            self.stats.stops += 1
        self.rec.add("stop", worker=w.link.name)
        w.supervisor.stop()
        # A graceful stop drains within the grace period plus clean-up (and whatever a stalled
        # broker adds): far more than that is a hang.
        limit = self.scenario.shutdown_grace + 10 * self.scenario.lock_duration + 120.0
        with trio.move_on_after(limit):
            await w.done.wait()
        if not w.done.is_set():
            self.rec.problems.append(("h", f"{w.link.name}: stop() did not drain within {limit:.0f}s"))
            w.scope.cancel()
            await w.done.wait()

    async def worker_life(self, w: _WorkerState, nursery: trio.Nursery) -> None:
        scenario = self.scenario
        self._start(w, nursery)
        outages = sorted((o for o in scenario.outages if o.worker == w.index), key=lambda o: o.at)
        for outage in outages:
            if outage.at >= scenario.chaos or trio.current_time() >= scenario.chaos:
                break
            await trio.sleep_until(outage.at)
            if w.up:
                await self._down(w, outage.kind)
            await trio.sleep_until(min(trio.current_time() + outage.down_for, scenario.chaos))
            w.incarnation += 1
            self.rec.add("restart", worker=f"{w.name}.{w.incarnation}")
            self._start(w, nursery)
        await self.finish.wait()
        if w.up:
            await self._down(w, "stop")

    # -- producer, chaos, the run ---------------------------------------------------------------
    async def producer(self) -> None:
        link = Link(self, "prod", -1)
        plan: list[tuple[float, int, int, Message]] = []
        for s, messages in enumerate(self.scenario.sessions):
            at = 0.0
            for k, script in enumerate(messages):
                at = max(at, script.send_at)
                mid = message_id(s, k)
                if script.kind == "undecodable":
                    message = Message(
                        b"\xffnot json", session_id=f"s{s}", message_id=mid, content_type="application/json"
                    )
                else:
                    message = Message.json(Step(f"s{s}", k), session_id=f"s{s}", message_id=mid)
                plan.append((at, s, k, message))
        plan.sort(key=lambda p: (p[0], p[1], p[2]))
        # One batch per session and instant (all of a session's messages at once when up front).
        for (at, s), group in itertools.groupby(plan, key=lambda p: (p[0], p[1])):
            batch = [p[3] for p in group]
            await trio.sleep_until(at)
            while True:
                try:
                    await self.call(link, "send", functools.partial(self.provider.send, QUEUE, batch))
                    break
                except QueueError as error:
                    self.rec.add("log", worker="prod", op="send", info=f"send failed: {error}")
                    await trio.sleep(0.5)
            for message in batch:
                self.sent.add(message.message_id)
                self.rec.add(
                    "send",
                    worker="prod",
                    session=f"s{s}",
                    k=_mid_key(message.message_id)[1],
                    mid=message.message_id,
                )
        self.sending_done = True

    async def chaos(self) -> None:
        scenario = self.scenario
        timeline: list[tuple[float, int, Fault | Stall]] = [(f.at, 0, f) for f in scenario.faults]
        timeline += [(s.at, 1, s) for s in scenario.stalls]
        timeline.sort(key=lambda item: (item[0], item[1]))
        for at, _, item in timeline:
            if at >= scenario.chaos:
                break
            await trio.sleep_until(at)
            if isinstance(item, Fault):
                self.faults[item.op].append(_Pending(item, item.times))
            else:
                self.stall(item)
        await trio.sleep_until(scenario.chaos)
        self.chaos_over = True
        self.faults.clear()
        self.rec.add("chaos_end")

    async def run(self) -> bool:
        """The whole run; True when everything was settled before the deadline."""
        scenario = self.scenario
        settled = False
        async with trio.open_nursery() as workers:
            with trio.CancelScope() as helpers_scope:
                async with trio.open_nursery() as helpers:
                    helpers.start_soon(self.producer)
                    helpers.start_soon(self.chaos)
                    for w in self.workers:
                        workers.start_soon(self.worker_life, w, workers)
                    await trio.sleep_until(scenario.chaos)
                    deadline = scenario.deadline()
                    stuck_after = scenario.stuck_after()
                    poll = max(1.0, scenario.lock_duration / 4)
                    while trio.current_time() < deadline:
                        if trio.current_time() - max(self.rec.last_progress, scenario.chaos) > stuck_after:
                            self.rec.add("deadline", info=f"no progress for {stuck_after:.0f}s")
                            break
                        if self.sending_done and self.chaos_over:
                            stats = await self.provider.queue_stats(QUEUE)
                            if stats.active == 0 and stats.in_flight == 0 and stats.scheduled == 0:
                                settled = True
                                break
                        await trio.sleep(poll)
                    if not settled:
                        self.rec.add("deadline", info=f"not settled by t={deadline:.0f}")
                    helpers_scope.cancel()
            self.finish.set()
        self.stats.sim_seconds = trio.current_time()
        return settled

    async def leftovers(self) -> list[str]:
        """Messages still in the queue (after every lock expired), by receiving them all."""
        await trio.sleep(self.scenario.lock_duration + 1)
        found: list[str] = []
        while True:
            receiver = await self.provider.accept_session(QUEUE, timeout=0)
            if receiver is None:
                return found
            async with receiver:
                while batch := await receiver.receive(100, 0):
                    found += [m.message.message_id for m in batch]
                    for m in batch:
                        await receiver.dead_letter(m, "SimulationLeftover")  # keep it out of the next look

    async def dead_letters(self) -> list[DeadLetterRecord]:
        return [
            DeadLetterRecord(
                d.message.message_id,
                d.dead_letter_reason or "",
                d.dead_letter_description or "",
                d.delivery_count,
            )
            for d in await self.provider.peek_dead_letters(QUEUE, 100_000)
            if d.dead_letter_reason != "SimulationLeftover"
        ]


class SimActor(SessionActor[Step]):
    """The scripted actor; `World.actor_for` binds ``world`` and ``worker`` per incarnation."""

    world: ClassVar[World]
    worker: ClassVar[str]

    async def handle(self, step: Step, ctx: MessageContext) -> None:
        await self.world.handle(self.worker, step, ctx)


class Link(Provider):
    """One worker incarnation's connection to the broker: delegates every call, records it,
    and injects the scenario's faults."""

    def __init__(self, world: World, name: str, index: int) -> None:
        self.world = world
        self.broker = world.provider
        self.name = name
        self.index = index
        self.capabilities = self.broker.capabilities
        self.dead = False  # killed: calls fail, closing releases nothing

    async def describe(self, queue: str) -> QueueInfo:
        return await self.world.call(self, "describe", lambda: self.broker.describe(queue))

    async def send(self, queue: str, messages: Sequence[Message]) -> None:
        await self.world.call(self, "send", lambda: self.broker.send(queue, messages))

    async def accept_session(self, queue: str, *, timeout: float) -> Receiver | None:
        world = self.world
        accepted: list[LinkReceiver] = []

        def effect(receiver: Receiver | None) -> None:
            if receiver is not None:
                until = receiver.locked_until
                wrapped = LinkReceiver(self, receiver, next(world.rids))
                accepted.append(wrapped)
                world.rec.add(
                    "accept",
                    worker=self.name,
                    session=receiver.session_id or "",
                    rid=wrapped.rid,
                    info=f"locked until {until:.3f}"
                    if until is not None and until > trio.current_time()
                    else "its lock is already gone",
                )

        try:
            await world.call(
                self, "accept_session", lambda: self.broker.accept_session(queue, timeout=timeout), effect
            )
        except BaseException:
            for wrapped in accepted:  # the broker locked it, the worker never saw it: it just expires
                world.rec.add(
                    "close",
                    worker=self.name,
                    session=wrapped.session_id or "",
                    rid=wrapped.rid,
                    info="leaked: the answer never arrived",
                )
            raise
        return accepted[0] if accepted else None

    async def open_receiver(self, queue: str, *, dead_letter: bool = False) -> Receiver:
        return await self.broker.open_receiver(queue, dead_letter=dead_letter)

    async def peek_dead_letters(self, queue: str, max_messages: int = 32) -> list[ReceivedMessage]:
        return await self.broker.peek_dead_letters(queue, max_messages)

    async def queue_stats(self, queue: str) -> QueueStats:
        return await self.broker.queue_stats(queue)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # the broker is shared: a worker does not close it


class LinkReceiver(Receiver):
    def __init__(self, link: Link, inner: Receiver, rid: int) -> None:
        self.link = link
        self.inner = inner
        self.rid = rid
        self.queue = inner.queue
        self.session_id = inner.session_id
        self.release_requested = link.world.scenario.slot_wanted
        self._closed = False
        self.known_until = inner.locked_until or -math.inf  # the deadline as answers told it

    @property
    def locked_until(self) -> float | None:
        return self.inner.locked_until

    def holds(self) -> bool:
        """Whether this receiver holds its session at the broker now (the in-memory model's
        own state: the truth the invariants are checked against)."""
        session = getattr(self.inner, "_session", None)
        if session is None:
            return True  # another provider: no way to tell
        return session.holder is self.inner and not getattr(self.inner, "_lost", False)

    def lock_left(self, now: float) -> float:
        """Seconds of session lock this receiver has left, by the broker's own state, or else
        by the deadlines its answers (accept, renewals) told."""
        session = getattr(self.inner, "_session", None)
        if session is not None and self.holds():
            return float(session.lock_until) - now
        return self.known_until - now

    def _common(self, message: ReceivedMessage) -> dict[str, Any]:
        mid = message.message.message_id
        session, k, _ = self.link.world.scripts.get(mid, (self.session_id or "", -1, None))
        return {
            "worker": self.link.name,
            "session": session,
            "k": k,
            "mid": mid,
            "dc": message.delivery_count,
            "rid": self.rid,
        }

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        world = self.link.world

        def effect(batch: list[ReceivedMessage]) -> None:
            for m in batch:
                world.delivered_to[(m.message.message_id, m.delivery_count)] = self
                if m.delivery_count > 1:
                    world.stats.redeliveries += 1
                world.rec.add("deliver", **self._common(m))

        # An answer lost after the receive took effect leaves what it took locked to this
        # receiver, on a session the broker still gives it: receiving on would hand out the
        # messages after those. The runtime must give the session up (closing hands all back).
        return await world.call(
            self.link, "receive", lambda: self.inner.receive(max_messages, timeout), effect
        )

    async def _settle(
        self, op: str, message: ReceivedMessage, fn: Callable[[], Awaitable[None]], info: str = ""
    ) -> None:
        world = self.link.world
        common = self._common(message)
        world.rec.add("settle", op=op, info=info, **common)

        def effect(_: None) -> None:
            world.rec.add("settled", op=op, **common)

        try:
            await world.call(self.link, op, fn, effect)
        except QueueError as error:
            world.rec.add("settle_err", op=op, outcome=type(error).__name__, **common)
            raise
        except trio.Cancelled:
            world.rec.add("settle_err", op=op, outcome="cancelled", **common)
            raise

    async def complete(self, message: ReceivedMessage) -> None:
        await self._settle("complete", message, lambda: self.inner.complete(message))

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        await self._settle("abandon", message, lambda: self.inner.abandon(message, delay=delay))

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        await self._settle(
            "dead_letter", message, lambda: self.inner.dead_letter(message, reason, description), info=reason
        )

    async def renew_lock(self) -> float:
        world = self.link.world
        try:
            until = await world.call(self.link, "renew_lock", self.inner.renew_lock)
        except QueueError as error:
            world.rec.add(
                "renew",
                worker=self.link.name,
                session=self.session_id or "",
                rid=self.rid,
                outcome=type(error).__name__,
            )
            raise
        self.known_until = max(self.known_until, until)
        world.rec.add(
            "renew",
            worker=self.link.name,
            session=self.session_id or "",
            rid=self.rid,
            info=f"until {until:.3f}",
        )
        return until

    async def get_state(self) -> bytes | None:
        return await self.inner.get_state()

    async def set_state(self, state: bytes | None) -> None:
        await self.inner.set_state(state)

    async def aclose(self) -> None:
        world = self.link.world
        if not self._closed:
            self._closed = True
            world.rec.add(
                "close",
                worker=self.link.name,
                session=self.session_id or "",
                rid=self.rid,
                info="killed: nothing released" if self.link.dead else "",
            )
        if self.link.dead:
            await trio.lowlevel.checkpoint()
            return
        await self.inner.aclose()


# -- one run ----------------------------------------------------------------------------------------


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed trio's scheduler and ``random`` (retry jitter) for one run, then put them back.

    trio 0.35 shuffles each batch of runnable tasks with ``trio._core._run._r``; when
    ``_ALLOW_DETERMINISTIC_SCHEDULING`` is set (importing hypothesis sets it, through trio's
    hypothesis plugin) the batch is first sorted by task creation order, so the shuffle depends
    on the seed alone. We set it here too, in case hypothesis plugins are disabled.
    """
    core = trio._core._run
    saved = (random.getstate(), core._r.getstate(), core._ALLOW_DETERMINISTIC_SCHEDULING)
    core._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    random.seed(seed)
    core._r.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        core._r.setstate(saved[1])
        core._ALLOW_DETERMINISTIC_SCHEDULING = saved[2]  # type: ignore[misc]


def run_scenario(scenario: Scenario) -> RunResult:
    """Run ``scenario`` on MockClock and check it; never raises for a violation (see
    `RunResult.raise_for_violations`)."""
    world = World(scenario)
    leftover: list[str] = []
    dead: list[DeadLetterRecord] = []

    async def main() -> None:
        nonlocal leftover, dead
        settled = await world.run()
        if not settled:
            leftover = await world.leftovers()
        dead = await world.dead_letters()

    with seeded(scenario.seed):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    trace = Trace(
        events=world.rec.events,
        scripts=world.scripts,
        sent=world.sent,
        dead_letters=dead,
        leftover=leftover,
        max_attempts=scenario.max_attempts,
        broker_max_delivery=scenario.broker_max_delivery,
        runtime_max_delivery=scenario.runtime_max_delivery,
        problems=world.rec.problems,
    )
    return RunResult(scenario, trace, check(trace), world.stats)


# -- the strategy ---------------------------------------------------------------------------------

FAULT_OPS = ("renew_lock", "receive", "complete", "accept_session", "abandon", "dead_letter", "send")
STALL_CHOICES: tuple[tuple[str, ...] | None, ...] = (
    ("renew_lock",),
    None,
    ("complete", "dead_letter", "abandon"),
    ("receive",),
    ("accept_session",),
    ("renew_lock", "receive"),
)


@st.composite
def _message(draw: st.DrawFn, lock: float, chaos: float, max_attempts: int, spread: bool) -> Msg:
    kind = draw(st.sampled_from(["ok", "ok", "ok", "flaky", "always", "dead", "undecodable"]))
    fails = draw(st.integers(1, max_attempts + 1)) if kind == "flaky" else 0
    duration = lock * draw(st.sampled_from([0.0, 0.0, 0.1, 0.45, 0.9, 1.3, 2.0]))
    send_at = float(draw(st.integers(0, int(chaos)))) if spread else 0.0
    return Msg(kind, fails, duration, send_at)  # type: ignore[arg-type]


@st.composite
def _fault(draw: st.DrawFn, chaos: float, workers: int) -> Fault:
    op = draw(st.sampled_from(FAULT_OPS))
    refusal_ok = op in ("renew_lock", "receive", "complete", "abandon", "dead_letter")
    errors = ["ConnectionFailed", "Throttled", "Timeout"] + (["SessionLockLost"] * 2 if refusal_ok else [])
    error = draw(st.sampled_from(errors))
    # A refusal (a lost lock, a throttled call) means the broker did not run the call.
    after = (
        op != "send"
        and error not in ("SessionLockLost", "Throttled")
        and draw(st.sampled_from([False, False, True]))
    )
    return Fault(
        at=draw(st.integers(0, int(chaos) * 2)) / 2,
        op=op,
        error=error,
        times=draw(st.integers(1, 5)),
        worker=draw(st.none() | st.integers(0, workers - 1)),
        after=after,
    )


@st.composite
def _stall(draw: st.DrawFn, lock: float, chaos: float) -> Stall:
    return Stall(
        at=draw(st.integers(0, int(chaos) * 2)) / 2,
        duration=lock * draw(st.sampled_from([1.5, 1.1, 3.0, 0.5])),
        operations=draw(st.sampled_from(STALL_CHOICES)),
        mode=draw(st.sampled_from(["hang", "late"])),
    )


@st.composite
def _outage(draw: st.DrawFn, lock: float, chaos: float, workers: int) -> Outage:
    return Outage(
        at=draw(st.integers(0, int(chaos) * 2)) / 2,
        worker=draw(st.integers(0, workers - 1)),
        kind=draw(st.sampled_from(["crash", "stop", "kill"])),
        down_for=lock * draw(st.sampled_from([0.0, 0.5, 2.0])),
    )


@st.composite
def scenarios(
    draw: st.DrawFn, max_workers: int = 3, max_sessions: int = 6, max_messages: int = 8
) -> Scenario:
    """Random scenarios; they shrink toward one worker, one session, no chaos."""
    lock = draw(st.sampled_from([10.0, 5.0, 20.0]))
    workers = draw(st.integers(1, max_workers))
    chaos = lock * draw(st.sampled_from([4, 2, 8]))
    max_attempts = draw(st.sampled_from([3, 1, 2, 4]))
    spread = draw(st.booleans())
    sessions = draw(
        st.lists(
            st.lists(_message(lock, chaos, max_attempts, spread), min_size=1, max_size=max_messages).map(
                tuple
            ),
            min_size=1,
            max_size=max_sessions,
        ).map(tuple)
    )
    return Scenario(
        sessions=sessions,
        workers=workers,
        lock_duration=lock,
        broker_max_delivery=draw(st.sampled_from([10, 5, 3])),
        runtime_max_delivery=draw(st.none() | st.integers(2, 8)),
        max_lock_renewal=draw(st.sampled_from([300.0, 1.5 * lock, 3 * lock])),
        max_attempts=max_attempts,
        backoff=draw(st.sampled_from([0.0, 1.0, lock / 2])),
        jitter=draw(st.sampled_from([0.0, 0.2])),
        prefetch=draw(st.sampled_from([0, 1, 3, 10])),
        idle_timeout=draw(st.sampled_from([5.0, 1.0, lock / 2, 30.0])),
        max_sessions=draw(st.sampled_from([64, 1, 2, 3])),
        receive_timeout=draw(st.sampled_from([5.0, 1.0, 20.0])),
        shutdown_grace=draw(st.sampled_from([30.0, 0.0, 5.0])),
        chaos=chaos,
        faults=tuple(draw(st.lists(_fault(chaos, workers), max_size=12))),
        stalls=tuple(draw(st.lists(_stall(lock, chaos), max_size=3))),
        outages=tuple(draw(st.lists(_outage(lock, chaos, workers), max_size=4))),
        slot_wanted=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# -- the command line -------------------------------------------------------------------------------


@dataclass
class Totals:
    runs: int = 0
    messages: int = 0
    handle_calls: int = 0
    redeliveries: int = 0
    lock_lost: int = 0
    crashes: int = 0
    stops: int = 0
    stalls: int = 0
    faults: int = 0
    failing_runs: int = 0
    by_invariant: dict[str, int] = field(default_factory=dict)  # runs with a violation of each
    run_seconds: list[float] = field(default_factory=list)

    def add(self, result: RunResult, seconds: float) -> None:
        s = result.stats
        self.runs += 1
        self.messages += s.messages
        self.handle_calls += s.handle_calls
        self.redeliveries += s.redeliveries
        self.lock_lost += s.lock_lost
        self.crashes += s.crashes
        self.stops += s.stops
        self.stalls += s.stalls
        self.faults += s.faults
        self.failing_runs += bool(result.violations)
        for invariant in sorted({v.invariant for v in result.violations}):
            self.by_invariant[invariant] = self.by_invariant.get(invariant, 0) + 1
        self.run_seconds.append(seconds)

    def merge(self, other: Totals) -> None:
        for f in dataclasses.fields(self):
            if f.name == "by_invariant":
                for key, n in other.by_invariant.items():
                    self.by_invariant[key] = self.by_invariant.get(key, 0) + n
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _settings(examples: int, phases: Sequence[Any]) -> Callable[[T], T]:
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=phases,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )


def explore(examples: int, seed: int, *, shrink: bool = True) -> tuple[Totals, dict[str, str]]:
    """Run ``examples`` hypothesis examples from ``seed`` and count what happened; then, for
    each invariant that was broken, run the same examples again until the first that breaks
    it and let hypothesis shrink that one. Returns the totals and a report per invariant."""
    from hypothesis import Phase, given
    from hypothesis import seed as hypothesis_seed

    totals = Totals()

    @hypothesis_seed(seed)
    @_settings(examples, [Phase.generate])
    @given(scenario=scenarios())
    def survey(scenario: Scenario) -> None:
        started = time.perf_counter()
        result = run_scenario(scenario)
        totals.add(result, time.perf_counter() - started)

    survey()
    reports: dict[str, str] = {}
    for invariant in sorted(totals.by_invariant):
        try:
            minimise(invariant, examples, seed, shrink=shrink)
        except SimulationFailure as failure:
            reports[invariant] = str(failure)
        else:  # pragma: no cover - generation is deterministic for a seed
            reports[invariant] = f"({invariant}) broken during the survey but not found again"
    return totals, reports


def minimise(invariant: str, examples: int, seed: int, *, shrink: bool = True) -> None:
    """Raise `SimulationFailure` for the smallest scenario hypothesis finds (from ``seed``)
    that breaks ``invariant``; return when none of ``examples`` scenarios does."""
    from hypothesis import Phase, given
    from hypothesis import seed as hypothesis_seed

    @hypothesis_seed(seed)
    @_settings(examples, [Phase.generate, Phase.shrink] if shrink else [Phase.generate])
    @given(scenario=scenarios())
    def breaks(scenario: Scenario) -> None:
        result = run_scenario(scenario)
        if any(v.invariant == invariant for v in result.violations):
            raise SimulationFailure(result.report())  # hypothesis raises the smallest one's

    breaks()


def _job(args: tuple[int, int, bool]) -> tuple[Totals, dict[str, str]]:
    return explore(args[0], args[1], shrink=args[2])


_TOTALS = (
    "runs", "messages", "handle_calls", "redeliveries", "lock_lost", "crashes", "stops", "stalls",
    "faults", "failing_runs", "by_invariant",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drills.simulation",
        description="Run the deterministic simulation of the runtime on random scenarios (hypothesis);"
        " report every broken invariant with its shrunk, reproducible scenario.",
    )
    parser.add_argument("--examples", type=int, default=200, help="scenarios in all (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (process i uses seed + i)")
    parser.add_argument("--workers", type=int, default=1, help="processes to split the examples over")
    parser.add_argument("--no-shrink", action="store_true", help="report failing scenarios unshrunk")
    parser.add_argument("--json", type=Path, default=None, help="also write the totals to this JSON file")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    workers = max(1, min(args.workers, args.examples))
    shares = [args.examples // workers + (i < args.examples % workers) for i in range(workers)]
    jobs = [(n, seed + i, not args.no_shrink) for i, n in enumerate(shares)]
    started = time.perf_counter()
    if workers == 1:
        results = [_job(jobs[0])]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_job, jobs))
    totals = Totals()
    reports: dict[str, str] = {}
    for part, found in results:
        totals.merge(part)
        for invariant, report in found.items():
            if invariant not in reports or len(report) < len(reports[invariant]):
                reports[invariant] = report
    elapsed = time.perf_counter() - started
    times = sorted(totals.run_seconds) or [0.0]
    broken = ", ".join(f"({k}) {n}" for k, n in sorted(totals.by_invariant.items())) or "none"
    print(
        f"seed {seed}, {workers} process(es), {elapsed:.1f}s: {totals.runs} runs"
        f" (median {1000 * times[len(times) // 2]:.0f} ms, slowest {1000 * times[-1]:.0f} ms),"
        f" {totals.messages} messages, {totals.handle_calls} handle() calls,"
        f" {totals.redeliveries} redeliveries, {totals.lock_lost} lock losses, {totals.crashes} crashes,"
        f" {totals.stops} graceful stops, {totals.stalls} stalls, {totals.faults} faults"
    )
    print(f"runs with violations: {totals.failing_runs}; by invariant: {broken}")
    if args.json is not None:
        summary = {
            "command": "python -m drills.simulation " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": seed,
            "processes": workers,
            "seconds": round(elapsed, 1),
            "median_run_ms": round(1000 * times[len(times) // 2], 1),
            **{name: getattr(totals, name) for name in _TOTALS},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    for invariant, report in sorted(reports.items()):
        print(
            f"\n=== ({invariant}) shrunk failing scenario; reproduce with drills.simulation.run_scenario(...)"
        )
        print(report)
    if reports:
        print(
            f"\nFAILED: rerun with --seed {seed} --examples {args.examples} --workers {workers}"
            " (the same seed, count and workers replay the same scenarios)"
        )
        return 1
    print("no violations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
