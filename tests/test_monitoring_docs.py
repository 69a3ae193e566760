"""The shipped Grafana dashboard's queries, evaluated by Prometheus's own engine (promtool).

`tests/test_telemetry.py` checks that every dashboard query parses and runs the alert rules'
unit tests. Here the ratio and alert-threshold panels are *evaluated*: each panel's PromQL is
taken from ``docs/grafana/queue-runtime.json`` as shipped, Grafana's variables are replaced the
way Grafana would (``$queue`` = All = ``.*``), and ``promtool test rules`` evaluates it over
synthetic series with ``promql_expr_test``. So this proves what a Prometheus of promtool's
version answers for the panel's query; it does not prove how Grafana draws it (Grafana draws a
missing series or a NaN as a gap, and "No data" when every series is missing, which is what
these tests rule out).

Skipped when promtool is not installed (``apt-get install prometheus``; ``.ci/run`` installs it
where it can).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs/grafana/queue-runtime.json"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)


def panel_query(title_start: str, ref: str = "A") -> str:
    """The query ``ref`` of the panel whose title starts with ``title_start``, with Grafana's
    variables as Grafana fills them for "All queues" and a 5-minute rate interval."""
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p.get("title", "").startswith(title_start)]
    (target,) = [t for t in panel["targets"] if t["refId"] == ref]
    expr: str = target["expr"]
    return expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$queue", ".*")


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{rendered}}}", "values": values}


def sample(value: float, **labels: str) -> dict[str, Any]:
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"labels": f"{{{rendered}}}", "value": value}


def run_promtool(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    """Evaluate ``tests`` (promtool unit-test groups) and fail with promtool's own report."""
    spec = tmp_path / "dashboard.test.yml"
    spec.write_text(yaml.safe_dump({"evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    done = subprocess.run(
        ["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# Queues in every state a ratio panel meets, all at once (20 minutes of 1-minute samples):
#   idle     a worker runs, nothing received yet: only its gauges exist
#   dl_only  everything is dead-lettered; the completed counter was never created
#   c_flat   completions stopped (counter flat), dead-letters keep coming
#   no_dl    completions only; the dead-lettered counter was never created
#   quiet    both counters exist and have been flat for the whole window (0/0)
#   busy     1 dead-letter per 3 completions; 1 retry per 4 receives
#   backoff  retries continue (long backoff) while nothing new is received
INPUT = [
    series("queue_active_sessions", "0x20", queue="idle"),
    series("queue_circuit_breaker_state", "0x20", queue="idle"),
    series("queue_active_sessions", "1x20", queue="dl_only"),
    series("queue_messages_received_total", "0+1x20", queue="dl_only"),
    series("queue_messages_dead_lettered_total", "0+1x20", queue="dl_only", reason="NegativeAmount"),
    series("queue_messages_received_total", "0+1x20", queue="c_flat"),
    series("queue_messages_completed_total", "7x20", queue="c_flat"),
    series("queue_messages_dead_lettered_total", "0+1x20", queue="c_flat", reason="MaxAttemptsExceeded"),
    series("queue_messages_received_total", "0+10x20", queue="no_dl"),
    series("queue_messages_completed_total", "0+10x20", queue="no_dl"),
    series("queue_messages_received_total", "105x20", queue="quiet"),
    series("queue_retry_attempts_total", "3x20", queue="quiet"),
    series("queue_messages_completed_total", "100x20", queue="quiet"),
    series("queue_messages_dead_lettered_total", "5x20", queue="quiet", reason="Rejected"),
    series("queue_messages_received_total", "0+4x20", queue="busy"),
    series("queue_retry_attempts_total", "0+1x20", queue="busy"),
    series("queue_messages_completed_total", "0+3x20", queue="busy"),
    series("queue_messages_dead_lettered_total", "0+1x20", queue="busy", reason="Rejected"),
    series("queue_sessions_abandoned_total", "0+1x20", queue="busy", reason="lock_lost"),
    series("queue_messages_received_total", "5x20", queue="backoff"),
    series("queue_retry_attempts_total", "0+1x20", queue="backoff"),
    series("queue_sessions_abandoned_total", "0+1x20", queue="c_flat", reason="error"),
]


def test_dead_letter_rate_panel_reads_zero_not_blank(tmp_path: Path) -> None:
    """The panel behind the 5 % alert: 0 when nothing was dead-lettered, whether nothing
    completes either (idle, quiet: no 0/0 NaN) or the dead-lettered counter does not exist
    yet (no_dl); 1 when only dead-letters happen, with or without a completed counter."""
    query = panel_query("Dead-letter rate")
    expected = {"idle": 0, "dl_only": 1, "c_flat": 1, "no_dl": 0, "quiet": 0, "busy": 0.25}
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": INPUT,
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "20m",
                        "exp_samples": [sample(v, queue=q) for q, v in expected.items()],
                    }
                ],
            }
        ],
    )


def test_retry_rate_panel_reads_zero_not_blank(tmp_path: Path) -> None:
    """The panel behind the 10 % retry alert: 0 without retries (the counter is created by the
    first retry) and when nothing was received in the window; but retries without receives
    stay +Inf (what the alert sees), not masked as 0."""
    query = panel_query("Retry rate")
    expected = {"idle": 0, "dl_only": 0, "c_flat": 0, "no_dl": 0, "quiet": 0, "busy": 0.25}
    expected["backoff"] = float("inf")
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": INPUT,
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "20m",
                        "exp_samples": [sample(v, queue=q) for q, v in expected.items()],
                    }
                ],
            }
        ],
    )


def test_lock_lost_panel_shows_zero_for_every_running_queue(tmp_path: Path) -> None:
    """The "sessions abandoned by reason" panel (lock_lost alert > 3): a queue whose worker
    runs and lost no lock shows ``lock_lost`` 0 instead of nothing; real counts stay."""
    query = panel_query("Sessions abandoned by reason")
    run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": INPUT,
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "20m",
                        "exp_samples": [
                            sample(0, queue="idle", reason="lock_lost"),
                            sample(0, queue="dl_only", reason="lock_lost"),
                            sample(15, queue="busy", reason="lock_lost"),
                            sample(15, queue="c_flat", reason="error"),
                        ],
                    }
                ],
            }
        ],
    )
