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
        (processor,) = provider._active_span_processor._span_processors
        extra["spans_exported"] = type(processor.span_exporter).exported
        if mode == "tracing":
            extra["sdk_span_cpu_us"] = _sdk_span_cpu_us(provider)
        provider.shutdown()
    return {
        "mode": mode,
        "seconds": [round(t, 4) for t in times],
        "cpu_seconds": [round(t, 4) for t in cpu],
        **extra,
    }


def _sdk_span_cpu_us(provider: Any, spans: int = 20_000) -> float:
    """CPU microseconds the SDK alone spends on one span with the guide's attributes (start,
    end, the batch processor's queue), measured in the tracing child: the floor under always-on
    tracing that no runtime change can lower."""
    import time

    tracer = provider.get_tracer("benchmarks.telemetry_cost")
    attributes = {
        "messaging.system": "memory",
        "messaging.destination": "bench",
        "messaging.destination.name": "bench",
        "messaging.message_id": "00000000-0000-4000-8000-000000000000",
        "messaging.message.id": "00000000-0000-4000-8000-000000000000",
        "messaging.conversation_id": "s-1",
        "messaging.operation": "process",
    }
    started = time.process_time()
    for _ in range(spans):
        tracer.start_span("process bench", attributes=attributes).end()
    provider.force_flush()
    return (time.process_time() - started) / spans * 1e6


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
        if mode == "tracing":
            row["sdk_span_cpu_us"] = round(median([child["sdk_span_cpu_us"] for child in runs[mode]]), 2)
        row["msgs_per_s"] = round(messages / median(seconds))
        row["msgs_per_cpu_s"] = round(messages / median(cpu))
        rows.append(row)
        print(f"  {mode:>10}: {row['msgs_per_s']:,} msg/s, {row['msgs_per_cpu_s']:,} msg/CPU-s", flush=True)
    off, off_cpu = rows[0]["msgs_per_s"], rows[0]["msgs_per_cpu_s"]
    for row in rows:
        row["relative_to_off"] = round(row["msgs_per_s"] / off, 3)
        row["cpu_relative_to_off"] = round(row["msgs_per_cpu_s"] / off_cpu, 3)
    # The ceiling SDK spans alone leave always-on tracing: the no-SDK CPU per message plus, per
    # message, as many bare SDK spans as the tracing mode exported.
    tracing = rows[-1]
    off_us = median(rows[0]["cpu_seconds"]) / messages * 1e6
    warm_up = max(messages // 5, sessions)  # one child: its warm-up and one try
    spans_per_message = tracing["spans_exported"] / (messages + warm_up)
    sdk_us = spans_per_message * tracing["sdk_span_cpu_us"]
    ceiling = {
        "off_cpu_us_per_message": round(off_us, 2),
        "spans_per_message": round(spans_per_message, 2),
        "sdk_cpu_us_per_message": round(sdk_us, 2),
        "ratio": round(off_us / (off_us + sdk_us), 3),
    }
    print(f"  always-on ceiling with SDK spans alone: {ceiling}", flush=True)
    result: dict[str, Any] = {
        "size": size,
        "tracing_ceiling": ceiling,
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
