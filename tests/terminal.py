"""A command in a real terminal for tests: a private tmux server (its own socket), a detached
session of a fixed size, the screen read with ``capture-pane``, keys sent with ``send-keys``
(``C-c`` is a real SIGINT from the terminal). The command's exit status is printed as
``[exit N]`` and the pane kept, so the last screen can still be read."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from worker_process import REPO, clean_env


def need_tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.skip("tmux is not installed: the terminal tests drive the commands in tmux")
    return path


class Terminal:
    """``command`` running in a ``width`` x ``height`` tmux pane."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        width: int = 160,
        height: int = 40,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.tmux = need_tmux()
        self.socket = f"qr-test-{uuid.uuid4().hex[:8]}"
        # The shell traps SIGINT (with a command, so the command still gets the default
        # disposition): Ctrl-C sent to the pane reaches the command, and the shell lives on to
        # print the exit status.
        line = f'trap "true" INT; {shlex.join(command)}; echo "[exit $?]"; sleep 3600'
        subprocess.run(
            [self.tmux, "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-s", "t",
             "-x", str(width), "-y", str(height), "sh", "-c", line],
            check=True,
            env=clean_env({"TERM": "xterm-256color", **(env or {})}),
            cwd=cwd,
        )  # fmt: skip

    def screen(self) -> str:
        result = subprocess.run(
            [self.tmux, "-L", self.socket, "capture-pane", "-p", "-t", "t"],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def wait_for(self, check: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first screen for which ``check`` holds; fails showing the last one."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; the screen:\n{screen}")
            time.sleep(0.1)

    def send(self, *keys: str) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "send-keys", "-t", "t", *keys], check=True)

    def close(self) -> None:
        """Stop this test's tmux server only (its own socket), and the command with it."""
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True)
