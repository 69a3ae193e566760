"""The README's walkthrough (worker in the background, send, dlq peek/replay, stats) runs as
written on a fresh checkout with no provider configured: the default SQLite broker, in
``./queue-runtime.db`` of a fresh directory holding only what a clone has (``examples/``).

Each line of the block runs in bash as written, in that directory, with an environment that has
no ``QUEUE_*``/``AWS_*``/``AZURE_*`` variable. Three lines are interpreted rather than typed:
the ``... &`` line starts the worker as a background process (its log is collected), ``sleep N``
waits instead until the worker has dead-lettered what the block expects (at most 60 s: the
machine may be loaded; a person's terminal waits the N seconds), and ``kill %1; wait`` sends
SIGTERM to that worker and waits for it to exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from worker_process import REPO, WorkerProcess, clean_env

README = REPO / "README.md"


def walkthrough() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no walkthrough block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def shell(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written_on_sqlite(tmp_path: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    scripts = Path(shutil.which("queue-runtime") or "queue-runtime").parent
    env = clean_env({"PATH": f"{scripts}:{os.environ['PATH']}"})
    env["COLUMNS"] = "200"  # rich tables: one row per line
    env["PYTHONPATH"] = str(tmp_path)  # `examples.orders` from the checkout, as in a clone
    lines = walkthrough()
    assert lines[0].endswith("&") and lines[0].startswith("queue-runtime worker ")
    assert lines[-1] == "kill %1; wait"
    worker: WorkerProcess | None = None
    outputs: dict[str, str] = {}
    try:
        for line in lines:
            if line.endswith("&"):
                args = line.removesuffix("&").split()
                assert args[:2] == ["queue-runtime", "worker"]
                worker = WorkerProcess(args[2:], env=env, cwd=tmp_path)
                worker.wait_for("accepting sessions on orders (sqlite)", timeout=60)
            elif line.startswith("sleep "):
                deadline = time.monotonic() + 60
                while True:
                    peek = shell("queue-runtime dlq peek --queue orders --json", tmp_path, env)
                    assert peek.returncode == 0, peek.stderr
                    if json.loads(peek.stdout):
                        break
                    assert time.monotonic() < deadline, "nothing was dead-lettered within 60 s"
                    time.sleep(0.2)
            elif line == "kill %1; wait":
                assert worker is not None
                worker.terminate()
                assert worker.wait(timeout=30) == 0, worker.log
            else:
                result = shell(line, tmp_path, env)
                assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
                assert "Traceback" not in result.stderr
                outputs[line] = result.stdout
    finally:
        if worker is not None:
            worker.kill()
    assert (tmp_path / "queue-runtime.db").is_file()  # the documented default path
    sends = [out for line, out in outputs.items() if line.startswith("queue-runtime send")]
    assert len(sends) == 2 and all(len(out.split()) == 1 for out in sends)  # one message id each
    peek = next(out for line, out in outputs.items() if line.startswith("queue-runtime dlq peek"))
    assert "NegativeAmount" in peek and "amount must be >= 0" in peek and sends[1].strip() in peek
    replay = next(out for line, out in outputs.items() if line.startswith("queue-runtime dlq replay"))
    assert "replayed 1, failed 0" in replay, replay
    stats = next(out for line, out in outputs.items() if line.startswith("queue-runtime stats"))
    assert "queue 'orders' (sqlite)" in stats and "dead-letter depth" in stats
    assert worker is not None
    log = worker.log
    assert "Traceback" not in log
    assert "drained:" in log
    # The first event was completed; the negative one dead-lettered, and again after the replay
    # (or, if the worker was stopped first, it waits in the queue: nothing is lost either way).
    final = shell("queue-runtime stats --queue orders --json", tmp_path, env)
    figures = json.loads(final.stdout)
    assert figures["in_flight"] == 0
    assert figures["depth"] + figures["dead_letter"] == 1, figures
