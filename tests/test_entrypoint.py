"""run(): the script entrypoint drains on SIGTERM and exits 0; bad config is one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "AWS_", "AZURE_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float = 30.0) -> list[str]:
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen; stderr so far: {''.join(seen)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_drains_on_signal_and_exits_zero(signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "examples/orders.py"],
        cwd=ROOT,
        env=_env(QUEUE_LOG_LEVEL="INFO"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_for(proc, "accepting sessions on orders")
        proc.send_signal(signum)
        lines = _wait_for(proc, "draining")
        assert proc.wait(timeout=30) == 0
        assert not any("Traceback" in line for line in lines)
    finally:
        proc.kill()
        proc.wait()


def test_run_with_bad_configuration_prints_one_line_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "examples/orders.py"],
        cwd=ROOT,
        env=_env(QUEUE_MAX_CONCURRENT_SESSIONS="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "max_concurrent_sessions" in lines[0] and "lots" in lines[0]
    assert "Traceback" not in result.stderr
