"""The drills' actor: records every ``handle()`` call, and reads the records back.

A worker runs ``queue-runtime worker drills.recorder:Recorder`` (from the repository root) with
``DRILL_RECORD_DIR`` (where each process appends ``<pid>.log``, line-buffered) and
``DRILL_HANDLE_MS`` (``LOW:HIGH``: each call sleeps a uniform draw, in milliseconds), and
optionally ``DRILL_HANDLE_TAIL`` (``SHARE:LOW:HIGH``: that share of calls sleeps LOW-HIGH ms
instead, the slow tail real handlers have, which keeps a group's messages in flight long
enough for lock renewals to matter). Per call it writes a start line when ``handle()``
begins and an end line in ``finally``::

    S <monotonic ns> <pid> <call> <group> <seq> <message id> <delivery count> <attempt>
    E <monotonic ns> <pid> <call> <group> <seq> <message id> <delivery count> <attempt> <outcome>

``<call>`` numbers the process's calls; ``<outcome>`` is ``done`` (returned), ``cancelled``
or ``error``. ``time.monotonic_ns()`` is CLOCK_MONOTONIC, one clock for every process on the
host, so intervals of different processes compare.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec
import trio

from queue_runtime import MessageContext, SessionActor

RECORD_DIR_ENV = "DRILL_RECORD_DIR"
HANDLE_MS_ENV = "DRILL_HANDLE_MS"
HANDLE_TAIL_ENV = "DRILL_HANDLE_TAIL"


class Step(msgspec.Struct):
    """A drill message: ``seq`` counts from 0 within ``group`` (its message group)."""

    group: str
    seq: int


_out: IO[str] | None = None
_calls = itertools.count(1)


def _record(line: str) -> None:
    global _out
    if _out is None:
        path = Path(os.environ[RECORD_DIR_ENV]) / f"{os.getpid()}.log"
        _out = path.open("a", buffering=1, encoding="utf-8")
    _out.write(line + "\n")


def _handle_seconds() -> float:
    tail = os.environ.get(HANDLE_TAIL_ENV)
    if tail:
        share, low, high = tail.split(":")
        if random.random() < float(share):
            return random.uniform(float(low), float(high)) / 1000
    low, _, high = os.environ.get(HANDLE_MS_ENV, "30:200").partition(":")
    return random.uniform(float(low), float(high or low)) / 1000


class Recorder(SessionActor[Step]):
    async def handle(self, step: Step, ctx: MessageContext) -> None:
        call = next(_calls)
        where = f"{os.getpid()} {call} {step.group} {step.seq}"
        fields = f"{where} {ctx.message_id} {ctx.delivery_count} {ctx.attempt}"
        _record(f"S {time.monotonic_ns()} {fields}")
        outcome = "error"
        try:
            await trio.sleep(_handle_seconds())
            outcome = "done"
        except trio.Cancelled:
            outcome = "cancelled"
            raise
        finally:
            _record(f"E {time.monotonic_ns()} {fields} {outcome}")


@dataclass
class Call:
    """One ``handle()`` call as recorded; ``end``/``outcome`` are None when no end line was
    written (the process was killed in the call)."""

    pid: int
    call: int
    group: str
    seq: int
    message_id: str
    delivery_count: int
    attempt: int
    start: int
    end: int | None = None
    outcome: str | None = None


def read_calls(directory: Path) -> list[Call]:
    """Every call recorded in ``directory`` (a partial last line, from a killed process, is
    skipped), in start order."""
    calls: dict[tuple[int, int], Call] = {}
    for path in sorted(directory.glob("*.log")):
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            parts = line.split()
            if len(parts) < 9:
                continue
            kind, stamp, pid, call, group, seq, message_id, delivery_count, attempt = parts[:9]
            key = (int(pid), int(call))
            if kind == "S":
                calls[key] = Call(
                    int(pid),
                    int(call),
                    group,
                    int(seq),
                    message_id,
                    int(delivery_count),
                    int(attempt),
                    int(stamp),
                )
            elif kind == "E" and key in calls and len(parts) == 10:
                calls[key].end = int(stamp)
                calls[key].outcome = parts[9]
    return sorted(calls.values(), key=lambda c: (c.start, c.pid, c.call))


def handled(calls: list[Call]) -> set[tuple[str, int]]:
    """The (group, seq) pairs with a call that returned."""
    return {(c.group, c.seq) for c in calls if c.outcome == "done"}
