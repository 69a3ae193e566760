"""run(): the script entrypoint drains on SIGTERM and exits 0, exits 128 + the signal when a
second signal stops it at once; bad config is one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker_process import BLOCKING_ACTOR

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
def test_run_drains_on_signal_and_exits_zero(tmp_path: Path, signum: int) -> None:
    # No provider configured: the default, SQLite, in a file of this test's own.
    proc = subprocess.Popen(
        [sys.executable, "examples/orders.py"],
        cwd=ROOT,
        env=_env(QUEUE_LOG_LEVEL="INFO", QUEUE_SQLITE_PATH=str(tmp_path / "queue.db")),
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


# (signals sent, expected exit code): after one signal the drain ends (the grace cancels the
# blocked handle()) with 0; a second signal stops at once with 128 + the second signal's number.
SIGNALS = [
    ((signal.SIGTERM,), 0),
    ((signal.SIGTERM, signal.SIGTERM), 143),
    ((signal.SIGINT, signal.SIGINT), 130),
    ((signal.SIGINT, signal.SIGTERM), 143),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signals", "code"), SIGNALS, ids=["+".join(s.name for s in sent) for sent, _ in SIGNALS]
)
def test_run_exit_code_after_signals_while_handle_blocks(
    tmp_path: Path, signals: tuple[signal.Signals, ...], code: int
) -> None:
    (tmp_path / "blocking_actor.py").write_text(BLOCKING_ACTOR)
    grace = "1" if len(signals) == 1 else "60"  # two signals: the drain must not end by itself
    proc = subprocess.Popen(
        [sys.executable, "blocking_actor.py"],
        cwd=tmp_path,
        # The in-memory broker, seeded in-process by the script (BLOCKING_ACTOR).
        env=_env(QUEUE_SHUTDOWN_GRACE_SECONDS=grace, QUEUE_PROVIDER="memory"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = _wait_for(proc, "handling ")
        proc.send_signal(signals[0])
        lines += _wait_for(proc, f"received {signals[0].name}: draining")
        started = time.monotonic()
        for signum in signals[1:]:
            assert proc.poll() is None  # handle() blocks: still draining
            proc.send_signal(signum)
        assert proc.wait(timeout=20) == code
        assert time.monotonic() - started < 10  # not the 60 s grace
        assert proc.stderr is not None
        log = "".join(lines) + proc.stderr.read()
        assert "Traceback" not in log
        if code:
            assert f"stopped at once on a second {signals[-1].name}: exit code {code}" in log, log
            assert "drained:" not in log
        else:
            assert "drained:" in log and "stopped at once" not in log, log
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
