"""5. SQLite end to end: runtime worker processes vs a hand-written SQLite consumer loop.

Every try gets a fresh database file (WAL, ``synchronous=NORMAL``) filled beforehand, not
timed, with ``TOTAL`` messages round robin over ``SESSIONS`` sessions (the body is the shared
small order event). Then, in child processes started and set up before the clock starts:

* runtime, 1 or 2 worker processes: `SqliteProvider` + `Supervisor` (``max_concurrent_sessions``
  = sessions; defaults otherwise: prefetch 10, one ``complete`` transaction per message), an
  actor that msgspec-decodes the body and awaits the handler;
* hand-written, one process: a trio loop that claims a batch (the oldest unclaimed session's
  next 10 messages, locked in one ``BEGIN IMMEDIATE`` transaction), decodes and awaits the
  same handler for each, in order, and deletes each message in its own transaction once
  handled (the same per-message settlement the runtime does), its SQLite calls on a worker
  thread (``trio.to_thread.run_sync``, one connection) like the provider's. Its own minimal
  table, same pragmas.

The parent sends "go" to every child, then polls (read-only, every 10 ms) until no message is
left: msg/s = messages / that time. Client CPU per message = the children's
``time.process_time()`` (every thread of the process) from "go" to the end, summed, over the
messages. Tries alternate (runtime 1, runtime 2, hand-written, ...); rates and CPU are medians,
the ratios are medians of the ratios within each round.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from ._common import ROOT, Event, body_for, check_size, machine, median, session_name, table, write_result

NAME = "sqlite"
TITLE = "SQLite end to end: runtime worker processes vs a hand-written SQLite consumer loop"
SESSIONS = 200
QUEUE = "bench"
PLANS = {"tiny": (400, 1), "quick": (4000, 2), "full": (20000, 3)}
SIDES = ("runtime, 1 worker", "runtime, 2 workers", "hand-written loop")

_decode = msgspec.json.Decoder(Event).decode


async def handler(event: Event) -> None:
    await trio.lowlevel.checkpoint()


# -- children ---------------------------------------------------------------------------------------
def _wait_for_go() -> None:
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"


def _child_runtime(path: str) -> dict[str, Any]:
    from queue_runtime import MessageContext, SessionActor, SupervisorConfig
    from queue_runtime.providers.sqlite import SqliteProvider
    from queue_runtime.supervisor import Supervisor

    class BenchActor(SessionActor[Event]):
        async def handle(self, message: Event, ctx: MessageContext) -> None:
            await handler(message)

    async def main() -> dict[str, Any]:
        async with SqliteProvider(path) as provider:
            await provider.describe(QUEUE)
            config = SupervisorConfig(queue=QUEUE, max_concurrent_sessions=SESSIONS, session_idle_timeout=1.0)
            supervisor = Supervisor(provider, BenchActor, config)
            await trio.to_thread.run_sync(_wait_for_go)
            cpu = time.process_time()
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.serve)
                await trio.to_thread.run_sync(sys.stdin.readline)  # "stop"
                supervisor.stop()
            stats = supervisor.stats()
            return {"handled": stats.completed, "cpu_seconds": time.process_time() - cpu}

    return trio.run(main)


def _child_hand_written(path: str) -> dict[str, Any]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    owner = f"p{os.getpid()}"

    def claim() -> list[tuple[int, bytes]]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT session FROM msgs WHERE owner IS NULL ORDER BY seq LIMIT 1").fetchone()
            rows: list[tuple[int, bytes]] = []
            if row is not None:
                rows = conn.execute(
                    "SELECT seq, body FROM msgs WHERE session = ? AND owner IS NULL ORDER BY seq LIMIT 10",
                    (row[0],),
                ).fetchall()
                conn.executemany("UPDATE msgs SET owner = ? WHERE seq = ?", [(owner, seq) for seq, _ in rows])
            conn.execute("COMMIT")
            return rows
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def delete(seq: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM msgs WHERE seq = ? AND owner = ?", (seq, owner))
        conn.execute("COMMIT")

    async def main() -> dict[str, Any]:
        limiter = trio.CapacityLimiter(1)
        await trio.to_thread.run_sync(_wait_for_go)
        cpu = time.process_time()
        handled = 0
        while batch := await trio.to_thread.run_sync(claim, limiter=limiter):
            for seq, body in batch:
                await handler(_decode(body))
                await trio.to_thread.run_sync(delete, seq, limiter=limiter)
                handled += 1
        return {"handled": handled, "cpu_seconds": time.process_time() - cpu}

    result = trio.run(main)
    sys.stdin.readline()  # "stop"
    return result


# -- parent -----------------------------------------------------------------------------------------
def _fill_runtime(path: Path, total: int) -> None:
    from queue_runtime.message import Message
    from queue_runtime.providers.sqlite import SqliteProvider

    async def main() -> None:
        async with SqliteProvider(path) as provider:
            batch: list[Message] = []
            for index in range(total):
                batch.append(Message(body=body_for(index), session_id=session_name(index % SESSIONS)))
                if len(batch) == 100:
                    await provider.send(QUEUE, batch)
                    batch = []
            if batch:
                await provider.send(QUEUE, batch)

    trio.run(main)


def _fill_hand_written(path: Path, total: int) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE msgs (seq INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT NOT NULL,"
            " owner TEXT, body BLOB NOT NULL)"
        )
        conn.execute("CREATE INDEX msgs_session ON msgs (session, seq)")
        conn.executemany(
            "INSERT INTO msgs (session, body) VALUES (?, ?)",
            [(session_name(i % SESSIONS), body_for(i)) for i in range(total)],
        )


def _left(path: Path, side: str) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        if side.startswith("runtime"):
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM messages WHERE queue = (SELECT id FROM queues WHERE name = ?)",
                    (QUEUE,),
                ).fetchone()[0]
            )
        return int(conn.execute("SELECT COUNT(*) FROM msgs").fetchone()[0])


def _try(side: str, total: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qr-bench-sqlite-") as directory:
        path = Path(directory) / "bench.db"
        (_fill_runtime if side.startswith("runtime") else _fill_hand_written)(path, total)
        processes = 2 if side == "runtime, 2 workers" else 1
        kind = "runtime" if side.startswith("runtime") else "hand-written"
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.sqlite", "--child", kind, str(path)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        try:
            for child in children:
                assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            started = time.perf_counter()
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            while _left(path, side):
                if time.perf_counter() - started > 600:
                    raise RuntimeError(f"{side}: not drained within 600 s")
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
            reports = []
            for child in children:
                out, _ = child.communicate("stop\n", timeout=60)
                if child.returncode != 0:
                    raise RuntimeError(f"{side}: a child exited {child.returncode}")
                reports.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
    handled = sum(r["handled"] for r in reports)
    if handled != total:
        raise RuntimeError(f"{side}: handled {handled} of {total}")
    cpu = sum(r["cpu_seconds"] for r in reports)
    return {"seconds": elapsed, "cpu_seconds": cpu, "per_process": [r["handled"] for r in reports]}


def run(size: str, results_dir: Path) -> dict[str, Any]:
    check_size(size)
    total, tries = PLANS[size]
    raw: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for _ in range(tries):
        for side in SIDES:
            raw[side].append(_try(side, total))
    hand = raw["hand-written loop"]
    rows = []
    for side in SIDES:
        results = raw[side]
        rows.append(
            {
                "consumer": side,
                "messages": total,
                "tries": tries,
                "msgs_per_s": round(median([total / r["seconds"] for r in results]), 1),
                "cpu_us_per_msg": round(median([r["cpu_seconds"] / total for r in results]) * 1e6, 1),
                "rate_ratio": round(
                    median([h["seconds"] / r["seconds"] for r, h in zip(results, hand, strict=True)]), 3
                ),
                "cpu_ratio": round(
                    median([r["cpu_seconds"] / h["cpu_seconds"] for r, h in zip(results, hand, strict=True)]),
                    3,
                ),
                "tries_raw": results,
            }
        )
    m = machine()
    where = f"{m['cpu']}, {m['nproc']} cores"
    result: dict[str, Any] = {"size": size, "sessions": SESSIONS, "machine": where, "rows": rows}
    result["table"] = table(
        f"{TITLE} ({total:,} messages, {SESSIONS} sessions, median of {tries})",
        ["consumer", "msg/s", "client CPU/msg (us)", "rate vs hand-written", "CPU vs hand-written"],
        [
            (r["consumer"], r["msgs_per_s"], r["cpu_us_per_msg"], r["rate_ratio"], r["cpu_ratio"])
            for r in rows
        ],
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        report = (_child_runtime if sys.argv[2] == "runtime" else _child_hand_written)(sys.argv[3])
        print(json.dumps(report), flush=True)
    else:
        size = sys.argv[1] if len(sys.argv) > 1 else "quick"
        run(size, Path(tempfile.mkdtemp(prefix="qr-bench-")))
