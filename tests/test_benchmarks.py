"""Each benchmark once at its tiny size, so the benchmarks never rot.

No timing assertions: these check that every benchmark runs end to end, measures what it
says (counts, sessions, both sides of each comparison), prints its table and writes its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import (
    BENCHMARKS,
    concurrency,
    latency,
    memory,
    scaling,
    sqlite,
    sqs,
    telemetry_cost,
    throughput,
)
from benchmarks.__main__ import build_parser
from benchmarks._common import percentile, table
from benchmarks.inmemory import baseline_try, runtime_try
from benchmarks.report import render
from queue_runtime.cli import main as cli_main
from sqs_server import moto_sqs  # noqa: F401  (a fixture, used by name)

pytestmark = pytest.mark.slow


def _json(results: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert data["size"] == "tiny"
    return data


def test_both_inmemory_pipelines_handle_every_message() -> None:
    # runtime_try raises unless the supervisor completed exactly this many, with no failures.
    assert runtime_try(7, 50) > 0
    assert runtime_try(3, 40, per_session_concurrency=4, kind="io") > 0
    assert baseline_try(7, 50) > 0


def test_throughput_compares_runtime_and_hand_written(tmp_path: Path, capsys: Any) -> None:
    result = throughput.run("tiny", tmp_path)
    data = _json(tmp_path, "throughput")
    assert [row["sessions"] for row in data["rows"]] == [10, 200]
    for row in data["rows"]:
        assert row["runtime_msgs_per_s"] > 0 and row["baseline_msgs_per_s"] > 0
        assert len(row["runtime_seconds"]) == len(row["baseline_seconds"]) == row["tries"]
        pairs = sorted(b / r for r, b in zip(row["runtime_seconds"], row["baseline_seconds"], strict=True))
        # The ratio is the median pair's (runtime try, baseline try right after), within its range.
        assert row["ratio"] == pytest.approx(pairs[len(pairs) // 2], rel=0.03)  # (times are rounded)
        assert row["pair_ratio_min"] <= row["ratio"] <= row["pair_ratio_max"]
    assert result["table"] in capsys.readouterr().out


def test_memory_has_every_session_active_at_once(tmp_path: Path) -> None:
    memory.run("tiny", tmp_path)
    rows = _json(tmp_path, "memory")["rows"]
    assert [row["sessions"] for row in rows] == list(memory.PLANS["tiny"])
    for row in rows:
        assert row["active_sessions"] == row["sessions"]
        assert row["handlers_running"] >= row["sessions"]
        assert row["lock_lost"] == 0
        assert row["rss_after_kib"] >= row["rss_before_kib"]


def test_latency_measures_each_message(tmp_path: Path) -> None:
    latency.run("tiny", tmp_path)
    data = _json(tmp_path, "latency")
    assert data["messages"] == latency.PLANS["tiny"]
    assert len(latency._completed) == len(latency._sent) == data["messages"]
    for row in data["rows"]:
        assert 0 < row["p50_us"] <= row["p99_us"] <= row["max_us"]


def test_telemetry_cost_runs_each_mode_in_its_own_process(tmp_path: Path) -> None:
    telemetry_cost.run("tiny", tmp_path)
    rows = _json(tmp_path, "telemetry_cost")["rows"]
    assert [row["mode"] for row in rows] == ["off", "metrics", "sampled", "production", "tracing"]
    assert rows[0]["relative_to_off"] == 1.0
    by_mode = {row["mode"]: row for row in rows}
    # The metrics children really had an SDK: their readers collected data points.
    assert by_mode["metrics"]["metric_points"] > 0 and by_mode["production"]["metric_points"] > 0
    # Always-on tracing exported spans (receive, process, complete per message at least).
    assert by_mode["tracing"]["spans_exported"] >= 2 * _json(tmp_path, "telemetry_cost")["messages"]


def test_scaling_writes_the_plot(tmp_path: Path) -> None:
    scaling.run("tiny", tmp_path, tmp_path)
    data = _json(tmp_path, "scaling")
    assert [row["sessions"] for row in data["by_sessions"]] == list(scaling.PLANS["tiny"]["sessions"])
    assert [row["per_session_concurrency"] for row in data["by_concurrency"]] == list(
        scaling.PLANS["tiny"]["concurrency"]
    )
    png = tmp_path / scaling.PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_concurrency_measures_every_case_and_both_queue_consumers(tmp_path: Path) -> None:
    # runtime_try / queue_runtime_try raise unless every message was completed, none failed.
    concurrency.run("tiny", tmp_path)
    data = _json(tmp_path, "concurrency")
    assert [row["c"] for row in data["cpu"]] == list(concurrency.PLANS["tiny"]["cpu"])
    assert [row["c"] for row in data["io"]] == list(concurrency.PLANS["tiny"]["io"])
    queue = data["queue"]
    assert queue["runtime_msgs_per_s"] > 0 and queue["baseline_msgs_per_s"] > 0
    assert "## 8. Concurrent handling" in render(tmp_path)


def test_sqs_runtime_and_hand_written_consume_the_same_work(tmp_path: Path, request: Any) -> None:
    sqs.run("tiny", tmp_path, endpoint=request.getfixturevalue("moto_sqs"))
    rows = _json(tmp_path, "sqs")["rows"]
    assert [row["consumer"] for row in rows] == ["runtime", "hand-written"]
    for row in rows:
        calls = row["calls_by_operation_per_try"]
        assert calls["ReceiveMessage"] >= 1 and calls["DeleteMessageBatch"] >= 1
        assert row["api_calls_per_msg"] > 0 and row["cpu_us_per_msg"] > 0


def test_sqlite_runtime_workers_and_hand_written_loop_drain_the_same_work(tmp_path: Path) -> None:
    # run() raises unless every side handled exactly the messages sent.
    sqlite.run("tiny", tmp_path)
    data = _json(tmp_path, "sqlite")
    rows = data["rows"]
    assert [row["consumer"] for row in rows] == list(sqlite.SIDES)
    for row in rows:
        assert row["msgs_per_s"] > 0 and row["cpu_us_per_msg"] > 0
        assert sum(row["tries_raw"][0]["per_process"]) == row["messages"]
    assert len(rows[1]["tries_raw"][0]["per_process"]) == 2  # two worker processes
    assert rows[2]["rate_ratio"] == 1.0
    assert "## 7. SQLite end to end" in render(tmp_path)


def test_report_renders_every_result(tmp_path: Path) -> None:
    throughput.run("tiny", tmp_path)
    latency.run("tiny", tmp_path)
    page = render(tmp_path)
    assert "## 1. In-memory throughput" in page and "## 3. Latency" in page
    assert "## 2. Memory" not in page  # only what was measured
    assert _json(tmp_path, "throughput")["table"] in page


def test_helpers() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    text = table("T", ["a", "b"], [("x", 1234), ("yy", 0.5)])
    assert "| x  | 1,234 |" in text and "| yy |   0.5 |" in text


def test_entry_points_parse_sizes_and_names(capsys: Any) -> None:
    args = build_parser().parse_args(["--size", "tiny", "--only", "latency", "--no-docs"])
    assert (args.size, args.only, args.no_docs) == ("tiny", ["latency"], True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--only", "nope"])
    assert cli_main(["bench", "--tiny", "--only", "nope", "--no-docs"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert set(BENCHMARKS) == {
        "throughput",
        "memory",
        "latency",
        "telemetry_cost",
        "scaling",
        "sqs",
        "sqlite",
        "concurrency",
    }


def test_cli_bench_runs_the_same_entry_point(monkeypatch: Any, tmp_path: Path) -> None:
    import benchmarks._common

    monkeypatch.setattr(benchmarks._common, "RESULTS_DIR", tmp_path)
    assert cli_main(["bench", "--tiny", "--only", "latency", "--no-docs"]) == 0
    assert _json(tmp_path, "latency")["messages"] == latency.PLANS["tiny"]


def test_task_step_counts_show_the_hand_written_router_yielding_per_message() -> None:
    from benchmarks import counts

    # The hand-written router yields at every send: about two task steps per message.
    assert counts.task_steps("bl", 20, 400) >= 1.9
    # The runtime's sessions are woken at most once per message (plus the producer's steps).
    assert 0 < counts.task_steps("rt", 20, 400) < 1.5
    assert counts.main(["run", "rt", "5", "50"]) == 0
    assert counts.main(["nonsense"]) == 2


def _opcodes(side: str) -> dict[str, float]:
    """``python -m benchmarks.counts opcodes`` in a fresh interpreter: the counts are for a
    process with no OpenTelemetry SDK (tests before this one may have installed global
    providers, which send every message down the traced path)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.counts", "opcodes", side, "20", "200"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0].endswith("opcodes per message"), out
    return {name: float(count) for count, name in (line.split(maxsplit=1) for line in lines[1:])}


def test_opcode_counts_see_the_runtime_s_own_code_per_message() -> None:
    runtime = _opcodes("rt")
    # Each message goes through _process and complete once (~100 and ~90 opcodes per message).
    assert 50 < runtime["session.py:Session._process"] < 400
    assert 50 < runtime["memory.py:_SessionReceiver.complete"] < 400
    baseline = _opcodes("bl")
    assert "session.py:Session._process" not in baseline
    assert sum(baseline.values()) > 100
