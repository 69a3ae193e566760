"""6. Scaling curve: runtime throughput vs sessions and vs ``per_session_concurrency``.

In memory, the runtime side of the throughput benchmark (`benchmarks.inmemory.runtime_try`),
with two handlers: ``cpu`` (no await: the runtime's own cost) and ``io`` (awaits a 1 ms
sleep, like a call to a fast service). Sessions sweep at ``per_session_concurrency=1``;
concurrency sweeps at a fixed session count. Writes ``docs/benchmarks-scaling.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import DOCS_DIR, check_size, median, table, write_result
from .inmemory import runtime_try

NAME = "scaling"
TITLE = "Scaling: runtime throughput (in-memory)"
PLOT = "benchmarks-scaling.png"

PLANS: dict[str, dict[str, Any]] = {
    "tiny": {"sessions": (10, 50), "concurrency": (1, 2), "fixed_sessions": 10, "messages": 300, "tries": 1},
    "quick": {
        "sessions": (1, 10, 100, 1_000, 10_000),
        "concurrency": (1, 2, 4, 8, 16),
        "fixed_sessions": 2,
        "messages": 8_000,
        "tries": 1,
    },
    "full": {
        "sessions": (1, 10, 30, 100, 300, 1_000, 3_000, 10_000),
        "concurrency": (1, 2, 4, 8, 16, 32),
        "fixed_sessions": 2,
        "messages": 10_000,
        "tries": 1,
    },
}


def _rate(sessions: int, messages: int, tries: int, concurrency: int, kind: str) -> float:
    times = [
        runtime_try(sessions, messages, per_session_concurrency=concurrency, kind=kind) for _ in range(tries)
    ]
    return messages / median(times)


def run(size: str, results_dir: Path, docs_dir: Path = DOCS_DIR) -> dict[str, Any]:
    check_size(size)
    plan = PLANS[size]
    messages, tries = plan["messages"], plan["tries"]
    by_sessions = []
    for sessions in plan["sessions"]:
        n = max(messages, 2 * sessions)
        row = {"sessions": sessions, "messages": n}
        for kind in ("cpu", "io"):
            row[f"{kind}_msgs_per_s"] = round(_rate(sessions, n, tries, 1, kind))
        by_sessions.append(row)
        print(
            f"  sessions={sessions}: cpu {row['cpu_msgs_per_s']:,} io {row['io_msgs_per_s']:,} msg/s",
            flush=True,
        )
    by_concurrency = []
    fixed = plan["fixed_sessions"]
    for concurrency in plan["concurrency"]:
        row = {"per_session_concurrency": concurrency, "sessions": fixed, "messages": messages}
        for kind in ("cpu", "io"):
            row[f"{kind}_msgs_per_s"] = round(_rate(fixed, messages, tries, concurrency, kind))
        by_concurrency.append(row)
        print(
            f"  per_session_concurrency={concurrency}: cpu {row['cpu_msgs_per_s']:,}"
            f" io {row['io_msgs_per_s']:,} msg/s",
            flush=True,
        )
    result: dict[str, Any] = {
        "size": size,
        "tries": tries,
        "by_sessions": by_sessions,
        "by_concurrency": by_concurrency,
    }
    result["table"] = (
        table(
            f"{TITLE} vs sessions (per_session_concurrency=1)",
            ["sessions", "messages", "cpu handler msg/s", "1 ms io handler msg/s"],
            [(r["sessions"], r["messages"], r["cpu_msgs_per_s"], r["io_msgs_per_s"]) for r in by_sessions],
        )
        + "\n\n"
        + table(
            f"{TITLE} vs per_session_concurrency ({fixed} sessions)",
            ["per_session_concurrency", "messages", "cpu handler msg/s", "1 ms io handler msg/s"],
            [
                (r["per_session_concurrency"], r["messages"], r["cpu_msgs_per_s"], r["io_msgs_per_s"])
                for r in by_concurrency
            ],
        )
    )
    print(result["table"])
    result["plot"] = str(plot(result, docs_dir / PLOT))
    write_result(results_dir, NAME, result)
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    """Two log-x panels: throughput vs sessions, and vs per_session_concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sessions = [r["sessions"] for r in result["by_sessions"]]
    for kind, label in (("cpu", "handler without I/O"), ("io", "handler awaiting 1 ms")):
        left.plot(sessions, [r[f"{kind}_msgs_per_s"] for r in result["by_sessions"]], marker="o", label=label)
    left.set_xscale("log")
    left.set_xlabel("active sessions (per_session_concurrency=1)")
    left.set_ylabel("messages / s")
    left.set_title("Throughput vs sessions")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    concurrency = [r["per_session_concurrency"] for r in result["by_concurrency"]]
    fixed = result["by_concurrency"][0]["sessions"] if result["by_concurrency"] else 0
    for kind, label in (("cpu", "handler without I/O"), ("io", "handler awaiting 1 ms")):
        right.plot(
            concurrency, [r[f"{kind}_msgs_per_s"] for r in result["by_concurrency"]], marker="o", label=label
        )
    right.set_xscale("log", base=2)
    right.set_xlabel(f"per_session_concurrency ({fixed} sessions)")
    right.set_ylabel("messages / s")
    right.set_title("Throughput vs per-session concurrency")
    right.grid(True, which="both", alpha=0.3)
    right.legend()
    figure.suptitle("queue-runtime, in-memory provider")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
