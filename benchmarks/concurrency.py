"""8. Concurrent handling: ``per_session_concurrency`` and non-session queues (issue 18).

In memory, tries interleaved in one process, medians, CPU time per message
(``time.process_time``) beside every rate:

* 2 sessions, CPU-only handler: ``per_session_concurrency`` c = 1, 2, 4, 16 (each rate
  against c = 1's).
* 2 sessions, handler awaiting 1 ms: c = 1, 16, 32, against the ideal 2 x c / 1 ms and against
  bare trio: 2 x c tasks that do nothing but ``await trio.sleep(0.001)`` in a loop (the most
  trio itself gets out of that many 1 ms waits on this machine).
* Non-session queue, 1 ms handler, ``max_concurrent_sessions`` = 64, against a hand-written
  consumer on the same in-memory broker: 64 tasks that each receive one message, decode it,
  await the handler and complete it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from . import inmemory
from ._common import check_size, median, table, write_result

NAME = "concurrency"
TITLE = "Concurrent handling (in-memory)"

PLANS: dict[str, dict[str, Any]] = {
    "tiny": {"cpu": (1, 2), "io": (1, 4), "messages": 400, "queue_messages": 400, "slots": 8, "tries": 1},
    "quick": {
        "cpu": (1, 2, 4, 16),
        "io": (1, 16, 32),
        "messages": 10_000,
        "queue_messages": 10_000,
        "slots": 64,
        "tries": 3,
    },
    "full": {
        "cpu": (1, 2, 4, 16),
        "io": (1, 16, 32),
        "messages": 20_000,
        "queue_messages": 20_000,
        "slots": 64,
        "tries": 5,
    },
}
SESSIONS = 2


async def _sleepers(tasks: int, messages: int) -> float:
    done = 0

    async def sleeper() -> None:
        nonlocal done
        while done < messages:
            await trio.sleep(0.001)
            done += 1

    start = time.perf_counter()
    cpu_start = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(sleeper)
    inmemory.last_cpu_seconds = time.process_time() - cpu_start
    return time.perf_counter() - start


def _measure(call: Any, messages: int) -> tuple[float, float]:
    """(msg/s, CPU us per message) of one try."""
    seconds = call()
    return messages / seconds, inmemory.last_cpu_seconds / messages * 1e6


def run(size: str, results_dir: Path) -> dict[str, Any]:
    check_size(size)
    plan = PLANS[size]
    n, qn, slots, tries = plan["messages"], plan["queue_messages"], plan["slots"], plan["tries"]
    cases: dict[str, Any] = {}
    for c in plan["cpu"]:
        cases[f"cpu c={c}"] = lambda c=c: inmemory.runtime_try(
            SESSIONS, n, per_session_concurrency=c, kind="cpu"
        )
    in_flight: dict[int, list[tuple[float, float]]] = {c: [] for c in plan["io"]}

    def io_try(c: int) -> float:
        gauge = inmemory.in_flight
        gauge.reset()
        seconds = inmemory.runtime_try(SESSIONS, n, per_session_concurrency=c, kind="io")
        # Mean handlers running over the try, and mean ms per call (Little's law).
        in_flight[c].append((gauge.area / seconds, gauge.area / max(gauge.calls, 1) * 1e3))
        return seconds

    for c in plan["io"]:
        cases[f"io c={c}"] = lambda c=c: io_try(c)
        cases[f"trio sleepers {SESSIONS * c}"] = lambda c=c: trio.run(_sleepers, SESSIONS * c, n)
    cases["queue runtime"] = lambda: inmemory.queue_runtime_try(qn, slots)
    cases["queue hand-written"] = lambda: inmemory.queue_baseline_try(qn, slots)
    counts = {name: (qn if name.startswith("queue") else n) for name in cases}
    inmemory.runtime_try(SESSIONS, 400)  # warm up imports and caches
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(tries):  # interleaved: every case once per round
        for name, call in cases.items():
            samples[name].append(_measure(call, counts[name]))

    def rate(name: str) -> float:
        return median([r for r, _ in samples[name]])

    def cpu(name: str) -> float:
        return median([u for _, u in samples[name]])

    queue_pairs = [
        r / b for (r, _), (b, _) in zip(samples["queue runtime"], samples["queue hand-written"], strict=True)
    ]
    cpu_rows = [
        {"c": c, "msgs_per_s": round(rate(f"cpu c={c}")), "cpu_us_per_msg": round(cpu(f"cpu c={c}"), 1)}
        for c in plan["cpu"]
    ]
    for row in cpu_rows:
        row["vs_c1"] = round(row["msgs_per_s"] / cpu_rows[0]["msgs_per_s"], 3)
    io_rows = []
    for c in plan["io"]:
        name = f"io c={c}"
        ideal = SESSIONS * c / 0.001
        io_rows.append(
            {
                "c": c,
                "msgs_per_s": round(rate(name)),
                "cpu_us_per_msg": round(cpu(name), 1),
                "ideal_msgs_per_s": round(ideal),
                "vs_ideal": round(rate(name) / ideal, 3),
                "cpu_busy": round(rate(name) * cpu(name) / 1e6, 2),
                "sleepers_msgs_per_s": round(rate(f"trio sleepers {SESSIONS * c}")),
                "sleepers_cpu_us": round(cpu(f"trio sleepers {SESSIONS * c}"), 1),
                "handlers_running": round(median([r for r, _ in in_flight[c]]), 1),
                "ms_per_call": round(median([m for _, m in in_flight[c]]), 2),
                "sleepers_ms_per_call": round(SESSIONS * c / rate(f"trio sleepers {SESSIONS * c}") * 1e3, 2),
                "vs_sleepers": round(rate(name) / rate(f"trio sleepers {SESSIONS * c}"), 3),
            }
        )
    queue = {
        "slots": slots,
        "messages": qn,
        "runtime_msgs_per_s": round(rate("queue runtime")),
        "runtime_cpu_us": round(cpu("queue runtime"), 1),
        "baseline_msgs_per_s": round(rate("queue hand-written")),
        "baseline_cpu_us": round(cpu("queue hand-written"), 1),
        "ratio": round(median(queue_pairs), 3),
        "pair_ratio_min": round(min(queue_pairs), 3),
        "pair_ratio_max": round(max(queue_pairs), 3),
    }
    result: dict[str, Any] = {
        "size": size,
        "tries": tries,
        "sessions": SESSIONS,
        "messages": n,
        "cpu": cpu_rows,
        "io": io_rows,
        "queue": queue,
    }
    result["table"] = "\n\n".join(
        [
            table(
                f"CPU-only handler, {SESSIONS} sessions, {n:,} messages, median of {tries}",
                ["per_session_concurrency", "msg/s", "CPU/msg (us)", "vs c = 1"],
                [(r["c"], r["msgs_per_s"], r["cpu_us_per_msg"], r["vs_c1"]) for r in cpu_rows],
            ),
            table(
                f"1 ms handler, {SESSIONS} sessions, {n:,} messages, median of {tries}",
                [
                    "per_session_concurrency",
                    "msg/s",
                    "CPU/msg (us)",
                    "CPU busy",
                    "2 x c / 1 ms",
                    "vs ideal",
                    "handlers running (mean)",
                    "ms per 1 ms call",
                    "bare trio, 2 x c sleepers msg/s",
                    "bare trio ms per call",
                    "vs bare trio",
                ],
                [
                    (
                        r["c"],
                        r["msgs_per_s"],
                        r["cpu_us_per_msg"],
                        r["cpu_busy"],
                        r["ideal_msgs_per_s"],
                        r["vs_ideal"],
                        r["handlers_running"],
                        r["ms_per_call"],
                        r["sleepers_msgs_per_s"],
                        r["sleepers_ms_per_call"],
                        r["vs_sleepers"],
                    )
                    for r in io_rows
                ],
            ),
            table(
                f"Non-session queue, 1 ms handler, {slots} handlers, {qn:,} messages, median of {tries}",
                ["consumer", "msg/s", "CPU/msg (us)", "ratio (median pair)", "pair ratios"],
                [
                    (
                        f"runtime, max_concurrent_sessions={slots}",
                        queue["runtime_msgs_per_s"],
                        queue["runtime_cpu_us"],
                        queue["ratio"],
                        f"{queue['pair_ratio_min']:.2f}-{queue['pair_ratio_max']:.2f}",
                    ),
                    (
                        f"hand-written, {slots} tasks",
                        queue["baseline_msgs_per_s"],
                        queue["baseline_cpu_us"],
                        1.0,
                        "",
                    ),
                ],
            ),
        ]
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result
