"""Deterministic counts behind the in-memory notes in ``docs/benchmarks.md``.

Timings on a shared machine drift; these counts do not, so they locate costs::

    # trio task steps per message, runtime and hand-written side
    uv run --all-extras python -m benchmarks.counts steps 200 20000

    # instructions per message: valgrind, marginal between two sizes (start-up cancels out);
    # (second count - first count) / 8000. Use ``bl`` for the hand-written side.
    for n in 6000 14000; do
      PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m benchmarks.counts run rt 200 $n 2>&1 | grep Collected
    done

    # Python bytecode instructions per message by function, marginal between N and 2N
    # messages (a sys.settrace opcode tracer: slow, ~100x; start with N = 10000 for the steady
    # state, where nearly every message wakes a parked session)
    uv run --all-extras python -m benchmarks.counts opcodes rt 200 10000

valgrind emulates a clock read as a system call, so code that reads the clock (the runtime's
waits) looks dearer there than on the CPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from types import FrameType
from typing import Any

import trio

from . import inmemory


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = Counter[str]()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


def task_steps(side: str, sessions: int, messages: int) -> float:
    """trio task steps per message for one try of ``side`` ("rt" or "bl")."""
    steps = _Steps()
    if side == "rt":
        trio.run(inmemory._runtime, sessions, messages, 1, "cpu", {}, instruments=[steps])
    else:
        trio.run(inmemory._baseline, sessions, messages, "cpu", instruments=[steps])
    return sum(steps.steps.values()) / messages


def opcodes(side: str, sessions: int, messages: int) -> Counter[str]:
    """Python bytecode instructions per message, by ``file:function``, for ``side`` ("rt" or
    "bl"): the difference between a try of ``2 * messages`` and one of ``messages``, divided
    by ``messages`` (start-up cancels out)."""
    try_ = inmemory.runtime_try if side == "rt" else inmemory.baseline_try
    counts = Counter[str]()

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_qualname}"] += 1
        return trace

    def count(n: int) -> Counter[str]:
        counts.clear()
        sys.settrace(trace)
        try:
            try_(sessions, n)
        finally:
            sys.settrace(None)
        return Counter(counts)

    try_(sessions, 400)  # warm up imports and caches
    small, large = count(messages), count(2 * messages)
    return Counter({name: (large[name] - small[name]) / messages for name in large})


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "steps":
        sessions, messages = int(argv[1]), int(argv[2])
        for side, label in (("rt", "runtime"), ("bl", "hand-written")):
            print(f"{label}: {task_steps(side, sessions, messages):.2f} task steps per message")
        return 0
    if len(argv) == 4 and argv[0] == "run" and argv[1] in ("rt", "bl"):
        try_ = inmemory.runtime_try if argv[1] == "rt" else inmemory.baseline_try
        try_(int(argv[2]), 400)  # warm up imports and caches; the marginal cancels it anyway
        try_(int(argv[2]), int(argv[3]))
        return 0
    if len(argv) == 4 and argv[0] == "opcodes" and argv[1] in ("rt", "bl"):
        per_function = opcodes(argv[1], int(argv[2]), int(argv[3]))
        print(f"{sum(per_function.values()):,.0f} opcodes per message")
        for name, count in per_function.most_common(25):
            print(f"{count:8.1f}  {name}")
        return 0
    print(
        "usage: python -m benchmarks.counts steps SESSIONS MESSAGES"
        " | run rt|bl SESSIONS MESSAGES | opcodes rt|bl SESSIONS MESSAGES"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
