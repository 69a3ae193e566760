"""5. Telemetry cost: in-memory throughput with telemetry off, metrics on, tracing on.

Each mode runs in a fresh subprocess (global OpenTelemetry providers can be set only once):

* ``off``: no SDK installed (the API's no-op providers; what the runtime costs by itself);
* ``metrics``: an SDK ``MeterProvider`` with an ``InMemoryMetricReader`` (instruments record
  for real; collected once at the end);
* ``tracing``: an SDK ``TracerProvider`` with the always-on sampler and a
  ``BatchSpanProcessor`` feeding an exporter that drops the spans (span creation, attributes,
  context propagation and the processor are all paid; no I/O).

The workload is the throughput benchmark's runtime side (`benchmarks.inmemory.runtime_try`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import ROOT, check_size, median, table, write_result

NAME = "telemetry_cost"
TITLE = "Telemetry cost (in-memory runtime throughput)"
MODES = ("off", "metrics", "tracing")
PLANS = {"tiny": (20, 400, 1), "quick": (200, 10_000, 3), "full": (200, 20_000, 5)}


def _install(mode: str) -> Any:
    if mode == "metrics":
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        return reader
    if mode == "tracing":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        class DropExporter(SpanExporter):
            exported = 0

            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                DropExporter.exported += len(spans)
                return SpanExportResult.SUCCESS

        provider = TracerProvider(sampler=ALWAYS_ON)
        provider.add_span_processor(BatchSpanProcessor(DropExporter()))
        trace.set_tracer_provider(provider)
        return provider
    return None


def _child(mode: str, sessions: int, messages: int, tries: int) -> dict[str, Any]:
    handle = _install(mode)
    from .inmemory import runtime_try

    times = [runtime_try(sessions, messages) for _ in range(tries)]
    extra: dict[str, Any] = {}
    if mode == "metrics":
        data = handle.get_metrics_data()
        extra["metric_points"] = sum(
            len(metric.data.data_points)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        )
    if mode == "tracing":
        handle.force_flush()
        handle.shutdown()
    return {"mode": mode, "seconds": [round(t, 4) for t in times], **extra}


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
    rows = []
    for mode in MODES:
        row = measure(mode, sessions, messages, tries)
        row["msgs_per_s"] = round(messages / median(row["seconds"]))
        rows.append(row)
        print(f"  {mode:>8}: {row['msgs_per_s']:,} msg/s", flush=True)
    off = rows[0]["msgs_per_s"]
    for row in rows:
        row["relative_to_off"] = round(row["msgs_per_s"] / off, 3)
    result: dict[str, Any] = {
        "size": size,
        "sessions": sessions,
        "messages": messages,
        "tries": tries,
        "rows": rows,
    }
    result["table"] = table(
        f"{TITLE}, {sessions} sessions, {messages:,} messages, median of {tries}",
        ["telemetry", "msg/s", "relative to off"],
        [(r["mode"], r["msgs_per_s"], r["relative_to_off"]) for r in rows],
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
    else:
        run(sys.argv[1] if len(sys.argv) > 1 else "quick", Path("benchmarks/results"))
