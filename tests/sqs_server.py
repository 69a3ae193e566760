"""A real SQS endpoint for tests: moto's server in a subprocess on 127.0.0.1, free port
(with one fix to moto's FIFO emulation, see ``_BOOT`` in ``drills/moto.py``, where the server
class lives).

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
import threading
from collections.abc import Iterator

import pytest

from drills.moto import _BOOT as _BOOT
from drills.moto import CREDENTIALS as CREDENTIALS
from drills.moto import REGION as REGION
from drills.moto import MotoServer as MotoServer
from drills.moto import _free_port as _free_port

_lock = threading.Lock()
_server: MotoServer | None = None


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
