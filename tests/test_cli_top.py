"""``queue-runtime top`` against two real worker processes: in a terminal (tmux) the session
stuck in retry comes first, a killed worker shows as unreachable within 2 s, keys sort and quit;
without a terminal one JSON snapshot."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from session_workers import BODY_MARKER, free_port, start_attention_worker
from terminal import Terminal, need_tmux
from worker_process import QUEUE_RUNTIME, REPO, clean_env


def session_rows(screen: str) -> list[list[str]]:
    """The rows of the sessions table (below its header line), split into columns."""
    lines = screen.splitlines()
    for index, line in enumerate(lines):
        if line.split()[:3] == ["worker", "session", "state"]:
            rows = []
            for row in lines[index + 1 :]:
                if not row.strip() or "sessions shown of" in row:
                    break
                rows.append(row.split())
            return rows
    return []


def worker_row(screen: str, label: str) -> list[str]:
    for line in screen.splitlines():
        if line.split()[:1] == [label]:
            return line.split()
    return []


def run_top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QUEUE_RUNTIME, "top", *args], capture_output=True, text=True, timeout=20, env=clean_env(), cwd=REPO
    )


@pytest.mark.slow
def test_top_shows_two_workers_stuck_session_first_and_a_dead_one(tmp_path: Path) -> None:
    need_tmux()
    port_a, port_b, dead = free_port(), free_port(), free_port()
    worker_a = start_attention_worker(tmp_path, ["idle-a1", "slow-a2"], port=port_a)
    worker_b = start_attention_worker(tmp_path, ["idle-b2", "stuck-b1"], port=port_b)
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    terminal: Terminal | None = None
    try:
        worker_a.wait_for("accepting sessions")
        worker_b.wait_for("accepting sessions")

        # No terminal: one JSON snapshot, the dead worker named, exit 1 because of it.
        started = time.monotonic()
        result = run_top("--url", url_a, "--url", f"127.0.0.1:{port_b}", "--url", f"http://127.0.0.1:{dead}")
        assert time.monotonic() - started < 10
        assert result.returncode == 1, result.stderr
        snapshot = json.loads(result.stdout)
        reachable = [(w["reachable"], w["error"]) for w in snapshot["workers"]]
        assert reachable[:2] == [(True, None), (True, None)]
        assert reachable[2] == (False, "cannot connect: connection refused")
        assert snapshot["workers"][1]["sessions"]["schema"] == 1
        assert BODY_MARKER not in result.stdout

        terminal = Terminal([QUEUE_RUNTIME, "top", "--url", url_a, "--url", url_b], width=150, height=30)

        def stuck_first(screen: str) -> bool:
            rows = session_rows(screen)
            return len(rows) == 4 and rows[0][:4] == ["w2", "stuck-b1", "retrying", "retrying"]

        screen = terminal.wait_for(stuck_first, 15, "stuck-b1 first")
        rows = session_rows(screen)
        assert {row[1] for row in rows} == {"stuck-b1", "slow-a2", "idle-a1", "idle-b2"}
        assert "RuntimeError" in rows[0]
        assert worker_row(screen, "w1")[2:4] == ["up", "attention"]
        assert worker_row(screen, "w2")[2:4] == ["up", "attention"]
        assert "closed" in worker_row(screen, "w2")
        assert BODY_MARKER not in screen

        # Rates come from two fetches: the stuck session's retries show per second.
        def retrying_per_second(screen: str) -> bool:
            row = worker_row(screen, "w2")  # w2 url status queue sessions recv/s done/s dlq/s retry/s
            return len(row) > 8 and row[8] not in ("-", "0.0")

        terminal.wait_for(retrying_per_second, 10, "a retry rate on w2")

        worker_b.process.kill()  # SIGKILL: no drain, the port just goes away
        killed = time.monotonic()
        screen = terminal.wait_for(lambda s: worker_row(s, "w2")[2:3] == ["UNREACHABLE"], 5, "w2 unreachable")
        took = time.monotonic() - killed
        assert took < 2.0, f"unreachable shown after {took:.2f} s"
        assert "cannot connect: connection refused" in screen
        assert worker_row(screen, "w1")[2] == "up"
        assert [row[1] for row in session_rows(screen)] == ["slow-a2", "idle-a1"]  # w2's are gone

        terminal.send("s")
        terminal.wait_for(lambda s: "sorted by age" in s, 3, "the age order")
        terminal.send("q")
        terminal.wait_for(lambda s: "[exit 0]" in s, 5, "top to quit on q")
    finally:
        if terminal is not None:
            terminal.close()
        worker_a.kill()
        worker_b.kill()


def test_top_bad_urls_are_one_line() -> None:
    for url, problem in (
        ("https://127.0.0.1:9464", "only http://"),
        ("http://127.0.0.1", "give a host and a port"),
        ("http://[::1", "not a URL"),
    ):
        result = run_top("--url", url)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and problem in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
