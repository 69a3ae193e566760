"""1. In-memory throughput: the supervisor path vs a hand-written trio pipeline.

Same process, same run, tries interleaved (runtime, baseline, runtime, baseline, ...), each
try its own ``trio.run``; the figure is the median try. See `benchmarks.inmemory` for exactly
what each side does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import check_size, median, table, write_result
from .inmemory import baseline_try, runtime_try

NAME = "throughput"
TITLE = "In-memory throughput: runtime vs hand-written trio pipeline"

PLANS = {
    # size: (session counts, tries per side, messages for a session count)
    "tiny": ((10, 200), 1, lambda s: 400),
    "quick": ((10, 100, 200, 1_000, 10_000), 3, lambda s: max(10_000, 2 * s)),
    "full": ((10, 100, 200, 1_000, 10_000), 3, lambda s: max(20_000, 4 * s)),
}


def run(size: str, results_dir: Path) -> dict[str, Any]:
    check_size(size)
    session_counts, tries, messages_for = PLANS[size]
    rows: list[dict[str, Any]] = []
    for sessions in session_counts:
        messages = messages_for(sessions)
        runtime_times: list[float] = []
        baseline_times: list[float] = []
        for _ in range(tries):
            runtime_times.append(runtime_try(sessions, messages))
            baseline_times.append(baseline_try(sessions, messages))
        runtime_rate = messages / median(runtime_times)
        baseline_rate = messages / median(baseline_times)
        rows.append(
            {
                "sessions": sessions,
                "messages": messages,
                "tries": tries,
                "runtime_msgs_per_s": round(runtime_rate),
                "baseline_msgs_per_s": round(baseline_rate),
                "ratio": round(runtime_rate / baseline_rate, 3),
                "runtime_seconds": [round(t, 4) for t in runtime_times],
                "baseline_seconds": [round(t, 4) for t in baseline_times],
            }
        )
        print(
            f"  {sessions:>6} sessions: runtime {runtime_rate:,.0f} msg/s, "
            f"baseline {baseline_rate:,.0f} msg/s, ratio {runtime_rate / baseline_rate:.2f}",
            flush=True,
        )
    result = {"size": size, "rows": rows}
    result["table"] = table(
        TITLE,
        ["sessions", "messages", "runtime msg/s", "hand-written msg/s", "ratio"],
        [
            (r["sessions"], r["messages"], r["runtime_msgs_per_s"], r["baseline_msgs_per_s"], r["ratio"])
            for r in rows
        ],
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result
