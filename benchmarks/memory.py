"""2. Memory per active session: RSS growth per concurrently active session.

Each size runs in a fresh subprocess (``python -m benchmarks.memory --child N``) so earlier
allocations do not hide later ones. The child sends N messages to N sessions of an
`InMemoryProvider`, starts a `Supervisor` with ``max_concurrent_sessions = N`` whose handler
blocks on one shared `trio.Event`, measures RSS (``/proc/self/statm``) after the messages
are stored and the supervisor is idle, and again once all N handlers are running at once;
the difference divided by N is the cost of one active session: the actor, its session task,
its receiver, the delivered message, its context and everything the runtime keeps for it.
The stored messages are allocated before the first measurement, so they are not counted.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from queue_runtime import MessageContext, SessionActor, SupervisorConfig
from queue_runtime.message import Message
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.supervisor import Supervisor

from ._common import ROOT, check_size, rss_kib, session_name, table, write_result

NAME = "memory"
TITLE = "Memory per active session (RSS delta, fresh process per size)"

PLANS = {"tiny": (200, 1_000), "quick": (1_000, 5_000, 10_000), "full": (1_000, 5_000, 10_000, 100_000)}
QUEUE = "memory-bench"


class _Gate:
    release = trio.Event()
    running = 0


class BlockingActor(SessionActor[bytes]):
    """Counts itself running, then waits until released: N of them are active at once."""

    async def handle(self, message: bytes, ctx: MessageContext) -> None:
        _Gate.running += 1
        await _Gate.release.wait()


async def _child(sessions: int) -> dict[str, Any]:
    _Gate.release = trio.Event()
    _Gate.running = 0
    # A lock long enough that no lock expires while 100k sessions ramp up on a busy machine:
    # this measures memory, not renewal throughput (the shared renewer runs all the same).
    provider = InMemoryProvider(max_queue_messages=sessions + 10, lock_duration=3600.0)
    body = b'{"order_id":"o1","kind":"created","amount":1}'
    for start in range(0, sessions, 100):
        await provider.send(
            QUEUE,
            [Message(body, session_id=session_name(i)) for i in range(start, min(start + 100, sessions))],
        )
    config = SupervisorConfig(
        queue=QUEUE, max_concurrent_sessions=sessions, session_idle_timeout=600.0, receive_timeout=5.0
    )
    supervisor = Supervisor(provider, BlockingActor, config)
    gc.collect()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        await trio.sleep(0.05)  # acceptors parked, renewer running: the empty supervisor's cost
        gc.collect()
        before = rss_kib()
        started = time.perf_counter()
        counters = supervisor._counters
        while _Gate.running < sessions or len(supervisor._runtime.sessions) < sessions:
            await trio.sleep(0.01)
        ramp = time.perf_counter() - started
        gc.collect()
        after = rss_kib()
        stats = supervisor.stats()
        active = stats.active_sessions
        lost = counters.lock_lost
        _Gate.release.set()
        supervisor.stop()
    await provider.aclose()
    return {
        "sessions": sessions,
        "active_sessions": active,
        "handlers_running": _Gate.running,
        "lock_lost": lost,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_session": round((after - before) / sessions, 2),
        "seconds_to_all_active": round(ramp, 3),
    }


def measure(sessions: int) -> dict[str, Any]:
    """Run one size in a fresh interpreter; returns its figures."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", str(sessions)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory child for {sessions} sessions failed:\n{completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def run(size: str, results_dir: Path) -> dict[str, Any]:
    check_size(size)
    rows = []
    for sessions in PLANS[size]:
        row = measure(sessions)
        rows.append(row)
        print(
            f"  {sessions:>7} active sessions: {row['kib_per_session']:.2f} KiB each"
            f" (RSS {row['rss_before_kib']:,} -> {row['rss_after_kib']:,} KiB)",
            flush=True,
        )
    result: dict[str, Any] = {"size": size, "rows": rows}
    result["table"] = table(
        TITLE,
        ["active sessions", "RSS before (KiB)", "RSS all active (KiB)", "KiB per session", "ramp-up (s)"],
        [
            (
                r["sessions"],
                r["rss_before_kib"],
                r["rss_after_kib"],
                r["kib_per_session"],
                r["seconds_to_all_active"],
            )
            for r in rows
        ],
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(trio.run(_child, int(sys.argv[2]))))
    else:
        run(sys.argv[1] if len(sys.argv) > 1 else "quick", Path("benchmarks/results"))
