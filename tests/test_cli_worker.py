"""``queue-runtime worker``: the error catalogue (in-process, through ``main``) and a real worker
process that drains on SIGTERM and exits 0, with text and JSON logs, or exits 128 + the signal
when a second signal stops it at once."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from queue_runtime.cli import main
from worker_process import BLOCKING_ACTOR, WorkerProcess


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory as cwd with a few modules; sys.path/sys.modules restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    for name in [k for k in os.environ if k.startswith(("QUEUE_", "AWS_"))]:
        monkeypatch.delenv(name)
    (tmp_path / "good_actors.py").write_text(
        "from queue_runtime import SessionActor\n"
        "class Echo(SessionActor[bytes]):\n"
        "    async def handle(self, body, ctx):\n"
        "        pass\n"
        "class NoHandle(SessionActor[bytes]):\n"
        "    pass\n"
        "class NotAnActor:\n"
        "    pass\n"
        "VALUE = 3\n"
    )
    (tmp_path / "broken_import.py").write_text("import does_not_exist_anywhere\n")
    (tmp_path / "raises_at_import.py").write_text(
        "raise RuntimeError('database password=hunter2 unreachable')\n"
    )
    (tmp_path / "bad_syntax.py").write_text("def oops(:\n")
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["worker", *args])
    captured = capsys.readouterr()
    return code, captured.err


ERRORS = [
    # (arguments, expected exit code, text the one line must contain)
    (["nocolon"], 2, "must be MODULE:ActorClass"),
    (["good_actors:"], 2, "must be MODULE:ActorClass"),
    ([":Echo"], 2, "must be MODULE:ActorClass"),
    (["good_actors:Echo:More"], 2, "must be MODULE:ActorClass"),
    (["good actors:Echo"], 2, "must be MODULE:ActorClass"),
    (
        ["missing_module_xyz:Echo"],
        2,
        "cannot import module 'missing_module_xyz': No module named 'missing_module_xyz'",
    ),
    (["broken_import:X"], 2, "cannot import module 'broken_import': ModuleNotFoundError: No module named"),
    (["raises_at_import:X"], 2, "cannot import module 'raises_at_import': RuntimeError"),
    (["bad_syntax:X"], 2, "cannot import module 'bad_syntax': SyntaxError"),
    (["good_actors:Missing"], 2, "module 'good_actors' has no attribute 'Missing'"),
    (["good_actors:NotAnActor"], 2, "good_actors:NotAnActor is a class, not a SessionActor subclass"),
    (["good_actors:VALUE"], 2, "good_actors:VALUE is an int, not a SessionActor subclass"),
    (["good_actors:NoHandle"], 2, "does not implement handle()"),
    (["good_actors:Echo"], 2, "queue is not set: pass --queue NAME"),
    (["good_actors:Echo", "-q", "q", "--provider", "gcp"], 2, "invalid choice: 'gcp'"),
    (
        ["good_actors:Echo", "-q", "q", "--max-sessions", "many"],
        2,
        "--max-sessions: must be an integer, got 'many'",
    ),
    (["good_actors:Echo", "-q", "q", "--max-sessions", "0"], 2, "max_concurrent_sessions"),
    (["good_actors:Echo", "-q", "q", "--per-session-concurrency", "-2"], 2, "per_session_concurrency"),
    (["good_actors:Echo", "-q", "q", "--idle-timeout", "0"], 2, "session_idle_timeout"),
    (["good_actors:Echo", "-q", "q", "--idle-timeout", "nan"], 2, "--idle-timeout: must be a finite number"),
    (["good_actors:Echo", "-q", "q", "--shutdown-grace", "soon"], 2, "--shutdown-grace: must be a number"),
    (["good_actors:Echo", "-q", "q", "--prefetch", "-1"], 2, "prefetch"),
    (["good_actors:Echo", "-q", "q", "--max-attempts", "0"], 2, "max_attempts"),
    (["good_actors:Echo", "-q", "q", "--metrics-port", "70000"], 2, "metrics_port"),
    (["good_actors:Echo", "-q", "q", "--log-format", "xml"], 2, "invalid choice: 'xml'"),
    (["good_actors:Echo", "-q", "q", "--log-level", "loud"], 2, "invalid choice: 'LOUD'"),
    (["good_actors:Echo", "-q", "bad queue!"], 2, "is not a valid queue name"),
    (["good_actors:Echo", "-q", "q", "--config", "nowhere.toml"], 2, "nowhere.toml"),
]


@pytest.mark.parametrize(("args", "code", "text"), ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_worker_usage_errors_are_one_line_exit_2(
    project: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, text: str
) -> None:
    exit_code, err = run_cli(capsys, *args)
    assert exit_code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("queue-runtime: error: ")
    assert text in lines[0], lines[0]
    assert "Traceback" not in err
    assert "hunter2" not in err  # an import error's text is redacted like any other


def test_unknown_provider_from_environment(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUEUE_PROVIDER", "gcp")
    exit_code, err = run_cli(capsys, "good_actors:Echo", "-q", "q")
    assert exit_code == 2
    assert err.count("\n") == 1 and "QUEUE_PROVIDER" in err and "gcp" in err, err


def test_flags_not_given_do_not_override_environment(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment's bad value shows through when no flag is given, and a flag wins over it.
    monkeypatch.setenv("QUEUE_MAX_CONCURRENT_SESSIONS", "0")
    exit_code, err = run_cli(capsys, "good_actors:Echo", "-q", "q")
    assert exit_code == 2 and "QUEUE_MAX_CONCURRENT_SESSIONS" in err, err
    monkeypatch.setenv("QUEUE_NAME", "bad queue!")
    exit_code, err = run_cli(capsys, "good_actors:Echo", "-q", "q", "--max-sessions", "0")
    assert exit_code == 2 and "from argument" in err and "QUEUE_NAME" not in err, err


def test_debug_shows_the_traceback(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--debug", "worker", "raises_at_import:X"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and "RuntimeError" in err
    assert err.strip().splitlines()[-1].startswith("queue-runtime: error: cannot import module")


# ---- a real worker process ---------------------------------------------------------------------


@pytest.mark.slow
def test_worker_process_drains_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    queue = f"orders-{uuid.uuid4().hex[:6]}"
    # No provider configured: the default, SQLite (in this test's own file).
    worker = WorkerProcess(
        ["examples.orders:OrderActor", "--queue", queue, "--idle-timeout", "1"],
        env={"QUEUE_SQLITE_PATH": str(tmp_path / "queue.db")},
    )
    try:
        worker.wait_for(f"accepting sessions on {queue} (sqlite)")
        worker.terminate()
        assert worker.wait(timeout=20) == 0, worker.log
        log = worker.log
        assert "received SIGTERM: draining" in log
        assert "drained: running work settled" in log
        assert "exiting: 0 completed, 0 dead-lettered, 0 handed back" in log
        assert "Traceback" not in log
        # Text format: timestamp, level, logger, message, fields.
        exiting = worker.wait_for("exiting:")
        assert " INFO queue_runtime.worker: exiting:" in exiting and f"queue_name={queue}" in exiting
    finally:
        worker.kill()


@pytest.mark.slow
def test_worker_process_json_logs_and_sigint(tmp_path: Path) -> None:
    worker = WorkerProcess(
        ["examples.orders:OrderActor", "-q", "orders", "--log-format", "json", "--log-level", "debug"],
        env={"QUEUE_SQLITE_PATH": str(tmp_path / "queue.db")},
    )
    try:
        worker.wait_for("accepting sessions")
        worker.process.send_signal(signal.SIGINT)
        assert worker.wait(timeout=20) == 0, worker.log
        records = [json.loads(line) for line in worker.lines]  # every line is one JSON object
        assert records, "no log lines"
        for record in records:
            assert {"timestamp", "level", "logger", "message"} <= record.keys()
        messages = [r["message"] for r in records]
        assert any(m.startswith("received SIGINT: draining") for m in messages), messages
        assert any(m.startswith("drained:") for m in messages), messages
        drained = [r for r in records if r["message"].startswith("exiting:")]
        assert len(drained) == 1
        assert drained[0]["queue_name"] == "orders" and drained[0]["operation"] == "shutdown"
        assert drained[0]["level"] == "INFO"
    finally:
        worker.kill()


# (signals sent, expected exit code): after one signal the drain ends (the grace cancels the
# blocked handle()) with 0; a second signal stops at once with 128 + the second signal's number.
SIGNALS = [
    ((signal.SIGTERM,), 0),
    ((signal.SIGTERM, signal.SIGTERM), 143),
    ((signal.SIGINT, signal.SIGINT), 130),
    ((signal.SIGTERM, signal.SIGINT), 130),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signals", "code"), SIGNALS, ids=["+".join(s.name for s in sent) for sent, _ in SIGNALS]
)
def test_worker_process_exit_code_after_signals_while_handle_blocks(
    tmp_path: Path, signals: tuple[signal.Signals, ...], code: int
) -> None:
    (tmp_path / "blocking_actor.py").write_text(BLOCKING_ACTOR)
    grace = "1" if len(signals) == 1 else "60"  # two signals: the drain must not end by itself
    worker = WorkerProcess(
        ["blocking_actor:Blocking", "-q", "blocking", "--shutdown-grace", grace, "--provider", "memory"],
        cwd=tmp_path,
    )
    try:
        worker.wait_for("handling ")
        worker.process.send_signal(signals[0])
        worker.wait_for(f"received {signals[0].name}: draining")
        started = time.monotonic()
        for signum in signals[1:]:
            assert worker.process.poll() is None  # handle() blocks: still draining
            worker.process.send_signal(signum)
        assert worker.wait(timeout=20) == code, worker.log
        assert time.monotonic() - started < 10  # not the 60 s grace
        log = worker.log
        assert "Traceback" not in log and "queue-runtime: error" not in log, log
        exiting = worker.wait_for("exiting:")
        if code:
            assert f"stopped at once on a second {signals[-1].name}: exit code {code}" in exiting, log
            assert " WARNING " in exiting and "drained:" not in log, log
        else:
            assert "drained:" in log and "stopped at once" not in log, log
    finally:
        worker.kill()


@pytest.mark.slow
def test_worker_process_usage_error_exits_2_without_traceback() -> None:
    worker = WorkerProcess(["examples.orders:Nope", "-q", "orders"])
    try:
        assert worker.wait(timeout=20) == 2
        assert worker.lines == ["queue-runtime: error: module 'examples.orders' has no attribute 'Nope'"]
    finally:
        worker.kill()
