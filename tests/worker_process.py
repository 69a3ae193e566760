"""A ``queue-runtime worker`` subprocess for tests: started from the repository root (so
``examples.*`` imports), its stderr collected line by line by a thread, waitable by text.

Nothing global is touched: the environment is a copy of ours without any ``QUEUE_*``,
``AWS_*``, ``AZURE_*`` or ``OTEL_*`` variable (an ``OTEL_EXPORTER_OTLP_ENDPOINT`` of the
machine must not make every worker export), plus what the test passes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUEUE_RUNTIME = str(Path(sys.executable).with_name("queue-runtime"))


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "AWS_", "AZURE_", "OTEL_"))}
    env.update(extra or {})
    return env


class WorkerProcess:
    """``queue-runtime worker ARGS...`` in a subprocess."""

    def __init__(
        self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        self.args = list(args)
        self.process = subprocess.Popen(
            [QUEUE_RUNTIME, "worker", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(env),
            cwd=cwd,
        )
        self.lines: list[str] = []
        self.stdout = ""
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self.stdout = self.process.stdout.read()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """The first stderr line containing ``text``; fails (showing the log) after ``timeout``
        or when the process exits without it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self.process.poll() is not None and not self._readers[0].is_alive():
                    raise AssertionError(
                        f"worker exited ({self.process.returncode}) before {text!r}:\n{self.log_unlocked()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {text!r} within {timeout} s:\n{self.log_unlocked()}")
                self._changed.wait(min(left, 0.2))

    def log_unlocked(self) -> str:
        return "\n".join(self.lines)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """Clean-up: kill if still running (only this process, by its pid)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=5)


#: A module for signal tests on the in-memory broker (write it into a directory and run it with
#: ``python blocking_actor.py``, or ``queue-runtime worker blocking_actor:Blocking`` from there).
#: The broker lives inside the worker process, so the provider's first ``accept_session`` sends
#: it one message; ``handle()`` prints ``handling`` on stderr and then blocks until cancelled,
#: so a drain cannot finish before the shutdown grace runs out.
BLOCKING_ACTOR = """
import sys

import trio

from queue_runtime import Message, SessionActor, run
from queue_runtime.providers.memory import InMemoryProvider

_accept_session = InMemoryProvider.accept_session


async def _seeded_accept_session(self, queue, *, timeout):
    if not getattr(self, "_seeded", False):
        self._seeded = True
        await self.send(queue, [Message(b"{}", session_id="s1")])
    return await _accept_session(self, queue, timeout=timeout)


InMemoryProvider.accept_session = _seeded_accept_session


class Blocking(SessionActor[bytes]):
    async def handle(self, body, ctx):
        print("handling", ctx.message_id, file=sys.stderr, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    run(Blocking, queue="blocking")
"""
