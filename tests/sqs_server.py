"""A real SQS endpoint for tests: moto's server in a subprocess on 127.0.0.1, free port
(with one fix to moto's FIFO emulation, see ``_BOOT``).

Use the ``moto_sqs`` session-scoped pytest fixture (it yields the endpoint URL), or
`shared_server()` from code that is not a fixture (the contract harness): both share one
server per test process, started on first use and stopped at the end of the session (and at
interpreter exit as a fallback). Nothing global is set: no environment variable is touched;
tests pass ``endpoint_url`` and the fake credentials below explicitly. Each server gets its
own free port, so concurrent or repeated runs never collide.
"""

from __future__ import annotations

import atexit
import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

REGION = "us-east-1"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}

# moto 5.2 breaks FIFO order after a visibility lapse: its receive loop un-marks a lapsed
# in-flight message only when it reaches it, so with messages 1 and 2 of a group both lapsed it
# skips 1 (2 still looks in flight) and delivers 2 first. Real SQS treats every lapsed message
# as no longer in flight. The server process drops lapsed messages from "in flight" before each
# receive, as SQS does; nothing else of moto changes.
_BOOT = """
import sys
from moto.sqs import models

_original = models.SQSBackend.receive_message

def receive_message(self, queue_name, *args, **kwargs):
    queue = self.get_queue(queue_name)
    for message in list(queue.pending_messages):
        if message.visible:
            queue.pending_messages.discard(message)
    return _original(self, queue_name, *args, **kwargs)

models.SQSBackend.receive_message = receive_message

from moto.server import main
main(sys.argv[1:])
"""

_lock = threading.Lock()
_server: MotoServer | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """One ``python -m moto.server`` subprocess."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited early with code {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.url} within {timeout} s")

    def reset(self) -> None:
        """Forget every queue (moto's reset endpoint)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)


def shared_server() -> MotoServer:
    """The process's moto server, started on first use."""
    global _server
    with _lock:
        if _server is None or _server._process.poll() is not None:
            _server = MotoServer()
        return _server


def stop_shared_server() -> None:
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None:
        server.stop()


atexit.register(stop_shared_server)


@pytest.fixture(scope="session")
def moto_sqs() -> Iterator[str]:
    """The endpoint URL of a moto SQS server, for the whole test session."""
    server = shared_server()
    try:
        yield server.url
    finally:
        with contextlib.suppress(Exception):
            stop_shared_server()
