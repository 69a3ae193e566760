"""5. Telemetry cost: in-memory throughput with telemetry off, metrics on, tracing sampled and on.

Each try of each mode runs in a fresh subprocess (global OpenTelemetry providers can be set
only once), and the tries are interleaved (off, metrics, ..., off, metrics, ...) so a machine
that slows down part-way hurts every mode alike:

* ``off``: no SDK installed (the API's no-op providers; what the runtime costs by itself);
* ``metrics``: an SDK ``MeterProvider`` with an ``InMemoryMetricReader`` (collected once at
  the end, as a scrape would);
* ``sampled``: an SDK ``TracerProvider`` with a parent-based 1 % ratio sampler (what
  ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.01`` sets up)
  and a ``BatchSpanProcessor`` feeding an exporter that drops the spans;
* ``production``: ``metrics`` and ``sampled`` together (what a production worker runs);
* ``tracing``: the always-on sampler, every span recorded and exported (to the dropping
  exporter: span creation, attributes, context propagation and the processor are all paid; no
  I/O).

The workload is the throughput benchmark's runtime side (`benchmarks.inmemory.runtime_try`),
after one smaller warm-up try in the same process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import ROOT, check_size, median, table, write_result

NAME = "telemetry_cost"
TITLE = "Telemetry cost (in-memory runtime throughput)"
MODES = ("off", "metrics", "sampled", "production", "tracing")
#: The ratio of the ``sampled`` and ``production`` modes.
SAMPLE_RATIO = 0.01
PLANS = {"tiny": (20, 400, 1), "quick": (200, 10_000, 3), "full": (200, 20_000, 5)}


def _install(mode: str) -> tuple[Any, Any]:
    """Set up the SDK for ``mode``; returns (metric reader or None, tracer provider or None)."""
    reader = provider = None
    if mode in ("metrics", "production"):
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    if mode in ("sampled", "production", "tracing"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

        class DropExporter(SpanExporter):
            exported = 0

            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                DropExporter.exported += len(spans)
                return SpanExportResult.SUCCESS

        ratio = float(os.environ.get("QUEUE_BENCH_SAMPLE_RATIO", SAMPLE_RATIO))
        sampler = ALWAYS_ON if mode == "tracing" else ParentBased(TraceIdRatioBased(ratio))
        provider = TracerProvider(sampler=sampler)
        provider.add_span_processor(BatchSpanProcessor(DropExporter()))
        trace.set_tracer_provider(provider)
    return reader, provider


def _child(mode: str, sessions: int, messages: int, tries: int) -> dict[str, Any]:
    reader, provider = _install(mode)
    from . import inmemory
    from .inmemory import runtime_try

    runtime_try(sessions, max(messages // 5, sessions))  # warm-up
    times, cpu = [], []
    for _ in range(tries):
        times.append(runtime_try(sessions, messages))
        cpu.append(inmemory.last_cpu_seconds)  # this process's CPU, the exporter thread's included
    extra: dict[str, Any] = {}
    if reader is not None:
        data = reader.get_metrics_data()
        extra["metric_points"] = sum(
            len(metric.data.data_points)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        )
    if provider is not None:
        provider.force_flush()
        provider.shutdown()
        (processor,) = provider._active_span_processor._span_processors
        extra["spans_exported"] = type(processor.span_exporter).exported
    return {
        "mode": mode,
        "seconds": [round(t, 4) for t in times],
        "cpu_seconds": [round(t, 4) for t in cpu],
        **extra,
    }


def measure(mode: str, sessions: int, messages: int, tries: int) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.telemetry_cost",
            "--child",
            mode,
            str(sessions),
            str(messages),
            str(tries),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"telemetry child ({mode}) failed:\n{completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def run(size: str, results_dir: Path) -> dict[str, Any]:
    check_size(size)
    sessions, messages, tries = PLANS[size]
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for attempt in range(tries):  # interleaved: one try of each mode per round
        for mode in MODES:
            runs[mode].append(measure(mode, sessions, messages, 1))
        print(f"  round {attempt + 1}/{tries} done", flush=True)
    rows = []
    for mode in MODES:
        seconds = [t for child in runs[mode] for t in child["seconds"]]
        cpu = [t for child in runs[mode] for t in child["cpu_seconds"]]
        row: dict[str, Any] = {"mode": mode, "seconds": seconds, "cpu_seconds": cpu}
        for key in ("metric_points", "spans_exported"):
            if key in runs[mode][0]:
                row[key] = runs[mode][0][key]
        row["msgs_per_s"] = round(messages / median(seconds))
        row["msgs_per_cpu_s"] = round(messages / median(cpu))
        rows.append(row)
        print(f"  {mode:>10}: {row['msgs_per_s']:,} msg/s, {row['msgs_per_cpu_s']:,} msg/CPU-s", flush=True)
    off, off_cpu = rows[0]["msgs_per_s"], rows[0]["msgs_per_cpu_s"]
    for row in rows:
        row["relative_to_off"] = round(row["msgs_per_s"] / off, 3)
        row["cpu_relative_to_off"] = round(row["msgs_per_cpu_s"] / off_cpu, 3)
    result: dict[str, Any] = {
        "size": size,
        "sessions": sessions,
        "messages": messages,
        "tries": tries,
        "sample_ratio": SAMPLE_RATIO,
        "rows": rows,
    }
    labels = {
        "off": "off (no SDK)",
        "metrics": "metrics",
        "sampled": f"tracing, parent-based {SAMPLE_RATIO:.0%} ratio",
        "production": f"metrics + tracing {SAMPLE_RATIO:.0%}",
        "tracing": "tracing, always on",
    }
    result["table"] = table(
        f"{TITLE}, {sessions} sessions, {messages:,} messages, median of {tries} interleaved tries",
        ["telemetry", "msg/s", "relative to off", "msg per CPU-second", "relative to off (CPU)"],
        [
            (
                labels[r["mode"]],
                r["msgs_per_s"],
                r["relative_to_off"],
                r["msgs_per_cpu_s"],
                r["cpu_relative_to_off"],
            )
            for r in rows
        ],
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
    else:
        run(sys.argv[1] if len(sys.argv) > 1 else "quick", Path("benchmarks/results"))
