"""1. In-memory throughput: the supervisor path vs a hand-written trio pipeline.

Same process, same run, tries interleaved (runtime, baseline, runtime, baseline, ...), each
try its own ``trio.run``. The rates are the median tries; the ratio is the median of the
ratios of adjacent pairs (a runtime try and the baseline try right after it), which cancels
the slow drifts in speed of a shared machine that a ratio of medians keeps (on the 2-core box
these tables were made on, the same try varies by up to 1.5x over a minute). The lowest and
highest pair ratios are reported with it. See `benchmarks.inmemory` for exactly what each
side does.
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
    "full": ((10, 100, 200, 1_000, 10_000), 7, lambda s: max(20_000, 4 * s)),
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
        pair_ratios = [b / r for r, b in zip(runtime_times, baseline_times, strict=True)]
        ratio = median(pair_ratios)
        rows.append(
            {
                "sessions": sessions,
                "messages": messages,
                "tries": tries,
                "runtime_msgs_per_s": round(runtime_rate),
                "baseline_msgs_per_s": round(baseline_rate),
                "ratio": round(ratio, 3),
                "pair_ratio_min": round(min(pair_ratios), 3),
                "pair_ratio_max": round(max(pair_ratios), 3),
                "runtime_seconds": [round(t, 4) for t in runtime_times],
                "baseline_seconds": [round(t, 4) for t in baseline_times],
            }
        )
        print(
            f"  {sessions:>6} sessions: runtime {runtime_rate:,.0f} msg/s, "
            f"baseline {baseline_rate:,.0f} msg/s, ratio {ratio:.2f}"
            f" (pairs {min(pair_ratios):.2f}-{max(pair_ratios):.2f})",
            flush=True,
        )
    result = {"size": size, "rows": rows}
    result["table"] = table(
        TITLE,
        ["sessions", "messages", "runtime msg/s", "hand-written msg/s", "ratio", "pair ratios"],
        [
            (
                r["sessions"],
                r["messages"],
                r["runtime_msgs_per_s"],
                r["baseline_msgs_per_s"],
                r["ratio"],
                f"{r['pair_ratio_min']:.2f}-{r['pair_ratio_max']:.2f}",
            )
            for r in rows
        ],
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result
