"""Progress of the long operator commands, in a real terminal (tmux) and through pipes, and
Ctrl-C: ``dlq export`` of 5,000 dead letters shows a bar on a terminal and plain lines on a
pipe; Ctrl-C stops an export (no file) and a replay (each message either replayed and gone
from the dead-letter queue, or still dead-lettered: never both, never neither)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dlq_harness import seed
from queue_runtime.cli import main
from queue_runtime.cli import operator as op
from queue_runtime.providers.memory import InMemoryProvider
from terminal import Terminal, need_tmux
from worker_process import REPO, clean_env

HARNESS = [sys.executable, str(REPO / "tests" / "dlq_harness.py")]


def squeezed(text: str) -> str:
    """``text`` without whitespace: a line the pane wrapped at its width compares whole."""
    return "".join(text.split())


def result(path: Path) -> dict[str, int]:
    data: dict[str, int] = json.loads(path.read_text())
    return data


@pytest.mark.slow
def test_export_of_5000_shows_a_progress_bar_in_a_terminal(tmp_path: Path) -> None:
    need_tmux()
    out = tmp_path / "dlq.jsonl"
    terminal = Terminal(
        [*HARNESS, "--", "dlq", "export", "-q", "orders", "--out", str(out)],
        width=120,
        height=12,
        env={"HARNESS_RESULT": str(tmp_path / "result.json")},
    )
    try:
        screen = terminal.wait_for(lambda s: "[exit " in s, 30, "the export to end")
    finally:
        terminal.close()
    assert "[exit 0]" in screen, screen
    bars = [line for line in screen.splitlines() if "exporting to dlq.jsonl" in line]
    assert len(bars) == 1, screen
    assert "━" in bars[0] and "5000/5000 messages" in bars[0] and "/s" in bars[0], screen
    assert re.search(r"\d+:\d\d:\d\d", bars[0]), bars[0]  # elapsed
    assert any(
        "reading dead letters of orders" in line and "5000/5000" in line for line in screen.splitlines()
    )
    assert squeezed(f"exported 5000 dead-lettered messages of 'orders' to '{out}'") in squeezed(screen)
    assert len(out.read_text().splitlines()) == 5000
    assert result(tmp_path / "result.json")["dead_letter"] == 5000  # export leaves the DLQ as it was


@pytest.mark.slow
def test_export_without_a_terminal_prints_plain_lines_on_stderr(tmp_path: Path) -> None:
    out = tmp_path / "dlq.jsonl"
    done = subprocess.run(
        [*HARNESS, "--", "dlq", "export", "-q", "orders", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"QUEUE_PROGRESS_INTERVAL": "0"}),
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"exported 5000 dead-lettered messages of 'orders' to '{out}'\n"
    assert "\x1b" not in done.stdout + done.stderr  # no terminal: no control characters
    pattern = re.compile(
        r"^queue-runtime: exporting to dlq\.jsonl: (\d+)/5000 messages \(\d+/s, \d+\.\d s\)$"
    )
    counts = [int(m.group(1)) for line in done.stderr.splitlines() if (m := pattern.match(line))]
    assert counts == list(range(100, 5001, 100)), done.stderr
    assert len(out.read_text().splitlines()) == 5000


@pytest.mark.slow
def test_ctrl_c_stops_an_export_cleanly(tmp_path: Path) -> None:
    need_tmux()
    out = tmp_path / "dlq.jsonl"
    terminal = Terminal(
        [*HARNESS, "--peek-delay", "60", "--", "dlq", "export", "-q", "orders", "--out", str(out)],
        width=120,
        height=12,
    )
    try:
        terminal.wait_for(lambda s: "reading dead letters of orders" in s, 20, "the read to start")
        terminal.send("C-c")
        screen = terminal.wait_for(lambda s: "[exit " in s, 5, "the export to stop")
    finally:
        terminal.close()
    assert "[exit 130]" in screen, screen
    expected = f"queue-runtime: interrupted: nothing exported; '{out}' is untouched"
    assert squeezed(expected) in squeezed(screen), screen
    assert "Traceback" not in screen
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


@pytest.mark.slow
def test_ctrl_c_stops_a_replay_between_two_messages(tmp_path: Path) -> None:
    need_tmux()
    outcome = tmp_path / "result.json"
    terminal = Terminal(
        [*HARNESS, "--dead", "3000", "--send-delay", "0.003", "--", "dlq", "replay", "-q", "orders"],
        width=120,
        height=12,
        env={"HARNESS_RESULT": str(outcome)},
    )
    try:
        terminal.wait_for(
            lambda s: bool(re.search(r"replaying dead letters of orders.* ([3-9]\d\d|\d{4})/3000", s)),
            30,
            "some hundreds replayed",
        )
        terminal.send("C-c")
        screen = terminal.wait_for(lambda s: "[exit " in s, 10, "the replay to stop")
    finally:
        terminal.close()
    assert "[exit 130]" in screen, screen
    match = re.search(r"^replayed (\d+), failed 0, skipped 0$", screen, re.M)
    assert match, screen
    replayed = int(match.group(1))
    assert 300 <= replayed < 3000
    assert "interrupted: replayed" in screen and "Traceback" not in screen
    counts = result(outcome)
    # Every message is in exactly one place: replayed ones back in the queue, the rest still
    # dead-lettered (and none left locked by the interrupted pass).
    assert (counts["active"], counts["dead_letter"], counts["in_flight"]) == (replayed, 3000 - replayed, 0)


def _interrupt_after(calls: int, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``method``, but once it has been called ``calls`` times this process gets a real SIGINT
    (as from Ctrl-C) right after the call."""
    count = 0

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        result = await method(*args, **kwargs)
        count += 1
        if count == calls:
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep(0.05)  # let the signal arrive
        return result

    return wrapper


def test_ctrl_c_stops_send_count_after_a_sent_batch(capsys: pytest.CaptureFixture[str]) -> None:
    provider = InMemoryProvider()
    clock = trio.testing.MockClock(rate=1.0)
    provider.send = _interrupt_after(3, provider.send)  # type: ignore[method-assign]
    with op.use_provider(provider, clock=clock):
        code = main(["send", "-q", "orders", "-s", "s1", "--body", "x", "--count", "5000"])
    out, err = capsys.readouterr()
    ids = out.split()
    stats = trio.run(provider.queue_stats, "orders", clock=clock)
    assert code == 130, err
    assert 3 <= len(ids) < 5000 and stats.active == len(ids)  # the ids printed are exactly what went
    assert f"interrupted: sent {len(ids)} of 5000 messages" in err and "Traceback" not in err


def test_ctrl_c_stops_a_purge_between_two_messages(capsys: pytest.CaptureFixture[str]) -> None:
    provider = InMemoryProvider()
    clock = trio.testing.MockClock(rate=1.0)
    trio.run(seed, provider, 40, clock=clock)
    with op.use_provider(provider, clock=clock):
        real = provider.open_receiver

        async def open_receiver(queue: str, *, dead_letter: bool = False) -> Any:
            receiver = await real(queue, dead_letter=dead_letter)
            receiver.complete = _interrupt_after(5, receiver.complete)  # type: ignore[method-assign]
            return receiver

        provider.open_receiver = open_receiver  # type: ignore[method-assign]
        code = main(["dlq", "purge", "-q", "orders", "--yes"])
    out, err = capsys.readouterr()
    stats = trio.run(provider.queue_stats, "orders", clock=clock)
    assert code == 130, err
    assert out == "purged 5 dead-lettered messages of 'orders'\n"
    assert (stats.dead_letter, stats.in_flight) == (35, 0)  # the rest handed back at once
    assert "interrupted: the rest stay dead-lettered" in err
