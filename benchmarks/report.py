"""Writes ``docs/benchmarks.md`` from ``benchmarks/results/*.json`` (run by ``python -m benchmarks``).

The tables are the ones the benchmarks printed; the prose around them is here, and the few
figures it quotes are read from the same JSON, so the page never disagrees with the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._common import DOCS_DIR, RESULTS_DIR, machine, versions

ORDER = ("throughput", "memory", "latency", "sqs", "telemetry_cost", "scaling")


def _load(results: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ORDER:
        path = results / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _row(rows: list[dict[str, Any]], key: str, value: Any) -> dict[str, Any] | None:
    return next((r for r in rows if r.get(key) == value), None)


def render(results: Path = RESULTS_DIR) -> str:
    data = _load(results)
    m = machine()
    v = versions()
    sizes = sorted({d.get("size", "?") for d in data.values()})
    lines = [
        "# Benchmarks",
        "",
        "What the runtime costs compared with the loop you would write yourself, and where the limits",
        "are. Every figure below was measured in one run of `just bench` on the machine described",
        "here; regenerate this page with the same command (tables and plot are rewritten from",
        "`benchmarks/results/*.json`). Benchmarks are not tests: `just test` only runs each one once",
        "at a tiny size (`tests/test_benchmarks.py`) so they never rot.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {m['cpu']}, {m['nproc']} cores (`nproc`); RAM {m['ram_gib']} GiB; {m['platform']}",
        f"- Python {v['python']}, trio {v['trio']}, msgspec {v['msgspec']}, aiobotocore {v['aiobotocore']},"
        f" moto {v['moto']}, opentelemetry-sdk {v['opentelemetry-sdk']}",
        f"- Sizes in this page: {', '.join(sizes)}. The machine was shared with other jobs while",
        "  measuring, so absolute rates are noisy; ratios come from interleaved tries in one process",
        "  and are the figures to read.",
        "",
        "## Commands",
        "",
        "```",
        "just bench                                  # everything, full sizes; rewrites this page",
        "uv run --all-extras python -m benchmarks --size quick --only throughput memory",
        "uv run --all-extras queue-runtime bench --tiny --no-docs   # smoke run, same entry point",
        "uv run --all-extras python -m benchmarks.memory --child 100000   # one memory size, JSON out",
        "```",
        "",
    ]
    sections = {
        "throughput": _throughput,
        "memory": _memory,
        "latency": _latency,
        "sqs": _sqs,
        "telemetry_cost": _telemetry,
        "scaling": _scaling,
    }
    for name in ORDER:
        if name in data:
            lines.extend(sections[name](data[name]))
            lines.append("")
    lines.extend(NOTES)
    return "\n".join(lines).rstrip() + "\n"


def _throughput(d: dict[str, Any]) -> list[str]:
    at200 = _row(d["rows"], "sessions", 200)
    quote = (
        f"At 200 sessions the runtime reaches **{at200['ratio']:.2f}x** the hand-written pipeline's rate."
        if at200
        else ""
    )
    return [
        "## 1. In-memory throughput: runtime vs hand-written trio pipeline",
        "",
        "`benchmarks/throughput.py`, `benchmarks/inmemory.py`. Runtime: a producer task sends batches",
        "of 100 `Message`s (uuid4 ids, round robin over the sessions) to an `InMemoryProvider`; the",
        "`Supervisor` (`max_concurrent_sessions` = sessions, defaults otherwise) accepts each session,",
        "runs one actor per session, msgspec-decodes the body, awaits the handler and completes the",
        "message with the broker. Hand-written: a producer task puts batches of 100",
        "`(session, body)` pairs on a bounded trio channel, a router starts one task per session and",
        "forwards each body over that session's bounded channel, the task decodes with msgspec,",
        "awaits the same handler and counts. Both clocks start before the first message is produced",
        "and stop at the last message done; each try is its own `trio.run`; tries alternate",
        "(runtime, hand-written, ...) and the median is shown.",
        "",
        d["table"],
        "",
        quote,
    ]


def _memory(d: dict[str, Any]) -> list[str]:
    return [
        "## 2. Memory per active session",
        "",
        "`benchmarks/memory.py`: one fresh subprocess per size. N messages for N sessions are stored",
        "first; then a supervisor with `max_concurrent_sessions = N` starts, RSS is read once it is",
        "idle and again once all N handlers block on one shared event at the same time. The",
        "difference over N is what one active session costs: actor, session task, receiver,",
        "delivered message, context, runtime bookkeeping (the stored messages are not counted).",
        "",
        d["table"],
    ]


def _latency(d: dict[str, Any]) -> list[str]:
    return [
        "## 3. Latency at low load",
        "",
        "`benchmarks/latency.py`: one message every "
        f"{d['send_interval_s'] * 1000:g} ms over {d['sessions']} active sessions (in memory).",
        '"completed" is when the runtime reports the completion, right after the broker\'s `complete`',
        "returned.",
        "",
        d["table"],
    ]


def _sqs(d: dict[str, Any]) -> list[str]:
    cpu = d["cpu_ratio_runtime_over_hand_written"]
    calls = d["calls_ratio_runtime_over_hand_written"]
    return [
        "## 4. SQS end to end (moto server)",
        "",
        "`benchmarks/sqs.py`: one moto server process; a fresh FIFO queue per try; a boto3 producer",
        f"thread keeps at most {d['backlog']} messages waiting over {d['groups']} groups; long poll",
        f"{d['long_poll_s']} s on both sides. Client CPU is `time.thread_time()` of the consumer's trio",
        "thread (producer thread and moto excluded); API calls are counted by the provider's own",
        "counter and by an aiobotocore `before-call` hook for the hand-written loop; start-up and",
        "shutdown are included for both.",
        "",
        d["table"],
        "",
        f"Client CPU per message, runtime / hand-written: **{cpu:.2f}**;"
        f" API calls per message, runtime / hand-written: **{calls:.2f}**.",
    ]


def _telemetry(d: dict[str, Any]) -> list[str]:
    return [
        "## 5. Telemetry cost",
        "",
        "`benchmarks/telemetry_cost.py`: the throughput benchmark's runtime side, each mode in a fresh",
        "subprocess: no SDK; SDK `MeterProvider` with an `InMemoryMetricReader`; SDK `TracerProvider`",
        "(always-on sampler, `BatchSpanProcessor`, an exporter that drops spans).",
        "",
        d["table"],
    ]


def _scaling(d: dict[str, Any]) -> list[str]:
    plot = Path(d.get("plot", "")).name or "benchmarks-scaling.png"
    return [
        "## 6. Scaling curve",
        "",
        "`benchmarks/scaling.py`: the runtime side of the throughput benchmark, with a handler that",
        "does no I/O and one that awaits a 1 ms sleep.",
        "",
        f"![throughput vs sessions and per_session_concurrency]({plot})",
        "",
        d["table"],
    ]


NOTES: list[str] = []


def write_report(results: Path = RESULTS_DIR, path: Path = DOCS_DIR / "benchmarks.md") -> Path:
    path.write_text(render(results))
    return path
