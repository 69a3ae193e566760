"""Progress and Ctrl-C for the long operator commands (``send --count``, ``dlq export``,
``dlq replay``, ``dlq purge``).

* **Progress.** `progress` shows a rich bar on stderr when stderr is a terminal (count, total
  where known, rate, elapsed time); otherwise it prints a plain line on stderr every
  `plain_interval` seconds (``QUEUE_PROGRESS_INTERVAL``, default 2 s) while the step runs, and
  nothing for a step that ends sooner, so scripts and short runs stay quiet. stdout (ids, JSON,
  summaries) never gets a progress character.
* **Ctrl-C.** While a command runs with a `StopRequest` (see ``operator._run``), the first
  SIGINT does not raise ``KeyboardInterrupt`` wherever the code happens to be: it asks the
  command to stop at its next safe point (`StopRequest.check`, between two messages), so what
  was done stays done and nothing is half-done; a step that changes nothing (reading,
  peeking) registered with `StopRequest.cancellable` is cancelled at once. A second SIGINT
  cancels everything at once (`Interrupted` with ``at_once``).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from rich.progress import Progress, Task
    from rich.text import Text

__all__ = [
    "DEFAULT_PLAIN_INTERVAL",
    "Interrupted",
    "Meter",
    "StopRequest",
    "plain_interval",
    "progress",
    "watch_interrupts",
]

#: Seconds between two plain progress lines (no terminal), unless ``QUEUE_PROGRESS_INTERVAL``.
DEFAULT_PLAIN_INTERVAL: Final = 2.0


def plain_interval() -> float:
    """``QUEUE_PROGRESS_INTERVAL`` (seconds, ``0`` = a line at every update) or the default; an
    unusable value is ignored."""
    text = os.environ.get("QUEUE_PROGRESS_INTERVAL", "")
    try:
        value = float(text) if text else DEFAULT_PLAIN_INTERVAL
    except ValueError:
        return DEFAULT_PLAIN_INTERVAL
    return value if math.isfinite(value) and value >= 0 else DEFAULT_PLAIN_INTERVAL


def stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


class Meter:
    """Counts one long step; `advance` after each unit of work is done."""

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        unit: str = "messages",
        bar: tuple[Progress, object] | None = None,
        every: float = DEFAULT_PLAIN_INTERVAL,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.count = 0
        self.started = time.monotonic()
        self._bar = bar
        self._every = every
        self._last_line = self.started
        self._printed = -1  # the count the last plain line showed
        self.lines = 0

    def advance(self, count: int = 1) -> None:
        self.count += count
        if self._bar is not None:
            progress, task = self._bar
            progress.advance(task, count)  # type: ignore[arg-type]
            return
        now = time.monotonic()
        if now - self._last_line >= self._every:
            self._last_line = now
            self._print()

    def line(self) -> str:
        """``description: count/total unit (rate/s, elapsed)``."""
        elapsed = time.monotonic() - self.started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.description}: {self.count}{total} {self.unit} ({rate:.0f}/s, {elapsed:.1f} s)"

    def _print(self) -> None:
        self.lines += 1
        self._printed = self.count
        print(f"queue-runtime: {self.line()}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        """The last plain line, when plain lines were printed (a quick step stays quiet)."""
        if self._bar is None and self.lines and self._printed != self.count:
            self._print()


def _rate_column() -> object:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second over the whole step so far."""

        def render(self, task: Task) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.completed / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate:,.0f}/s", style="progress.data.speed")

    return RateColumn()


@contextlib.contextmanager
def progress(description: str, total: int | None, *, unit: str = "messages") -> Iterator[Meter]:
    """A `Meter` for one step: a rich bar on a terminal (stderr), plain periodic lines
    otherwise (see the module docstring). The bar stays on screen when the step ends, showing
    how far it got."""
    if not stderr_is_tty():
        meter = Meter(description, total, unit=unit, every=plain_interval())
        try:
            yield meter
        finally:
            meter.finish()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [
        SpinnerColumn(finished_text="✓"),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit, markup=False),
        _rate_column(),
        TimeElapsedColumn(),
    ]
    bar = Progress(*columns, console=Console(stderr=True), transient=False)  # type: ignore[arg-type]
    with bar:
        task = bar.add_task(description, total=total)
        meter = Meter(description, total, unit=unit, bar=(bar, task))
        try:
            yield meter
        except BaseException:
            bar.stop_task(task)  # interrupted or failed: the bar stays where it got to
            raise
        if total is None:
            bar.update(task, total=meter.count)  # done: the bar shows full, "N/N"
        bar.stop_task(task)


class Interrupted(Exception):
    """The command stopped on Ctrl-C: at a safe point (the first), or ``at_once`` (the second)."""

    def __init__(self, *, at_once: bool = False) -> None:
        super().__init__("interrupted")
        self.at_once = at_once


class StopRequest:
    """Ctrl-C as a request: see the module docstring."""

    def __init__(self) -> None:
        self.requested = False
        self.everything = trio.CancelScope()
        self._cancellable: set[trio.CancelScope] = set()

    def check(self) -> None:
        """Raise `Interrupted` when a stop was requested: call it between units of work."""
        if self.requested:
            raise Interrupted

    @contextlib.contextmanager
    def cancellable(self) -> Iterator[trio.CancelScope]:
        """A step that changes nothing: a stop request cancels it at once (and `check` after
        it raises `Interrupted`)."""
        scope = trio.CancelScope()
        if self.requested:
            scope.cancel()
        self._cancellable.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._cancellable.discard(scope)
        self.check()

    def request(self) -> None:
        """What the first Ctrl-C does; a second one cancels `everything`."""
        if self.requested:
            self.everything.cancel()
            return
        self.requested = True
        for scope in self._cancellable:
            scope.cancel()


def can_watch_signals() -> bool:
    return threading.current_thread() is threading.main_thread()


async def watch_interrupts(
    stop: StopRequest, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Turn SIGINT into `StopRequest.request` until cancelled (main thread only)."""
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            stop.request()
            if not stop.everything.cancel_called:
                print(
                    "queue-runtime: stopping at the next safe point (Ctrl-C again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )
