"""Worker processes with sessions in every state, for ``/sessions`` and ``queue-runtime top``.

`ATTENTION_ACTOR` is written into a directory and served with ``queue-runtime worker
attention_actor:Attention`` on the in-memory provider. The broker lives inside the worker, so
the provider's first ``accept_session`` seeds it with one message per session named in
``SEED_SESSIONS`` (comma-separated); a session's behaviour comes from its name's prefix:

* ``stuck-``: ``handle()`` always raises ``RuntimeError`` (retried in place, backing off);
* ``slow-``: ``handle()`` never returns (running, lock renewed);
* ``idle-``: handled at once, then the session waits for more (keep ``--idle-timeout`` long);
* ``stall-``: handled at once, but renewing its lock hangs: the lock runs toward its deadline.

Bodies carry `BODY_MARKER`, which must never show in ``/sessions`` or ``top``.
"""

from __future__ import annotations

import socket
from pathlib import Path

from worker_process import WorkerProcess

BODY_MARKER = "BODY-MUST-NOT-LEAK"

ATTENTION_ACTOR = """
import os

import trio

from queue_runtime import Message, SessionActor
from queue_runtime.providers import memory
from queue_runtime.providers.memory import InMemoryProvider

_accept_session = InMemoryProvider.accept_session
_renew_lock = memory._SessionReceiver.renew_lock


async def _seeded_accept_session(self, queue, *, timeout):
    if not getattr(self, "_seeded", False):
        self._seeded = True
        for name in filter(None, os.environ.get("SEED_SESSIONS", "").split(",")):
            await self.send(queue, [Message(b"BODY-MUST-NOT-LEAK " + name.encode(), session_id=name)])
    return await _accept_session(self, queue, timeout=timeout)


async def _renew_lock_or_hang(self):
    if self.session_id.startswith("stall-"):
        await trio.sleep_forever()
    return await _renew_lock(self)


InMemoryProvider.accept_session = _seeded_accept_session
memory._SessionReceiver.renew_lock = _renew_lock_or_hang


class Attention(SessionActor[bytes]):
    async def handle(self, body, ctx):
        if ctx.session_id.startswith("stuck-"):
            raise RuntimeError("still failing")
        if ctx.session_id.startswith("slow-"):
            await trio.sleep_forever()
"""
assert BODY_MARKER in ATTENTION_ACTOR


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_attention_worker(
    directory: Path, sessions: list[str], *, port: int, lock_duration: float = 60.0
) -> WorkerProcess:
    """A worker serving `ATTENTION_ACTOR` with ``sessions`` seeded, ``/sessions`` on ``port``:
    retries back off from 0.3 s, up to 1000 attempts; sessions stay until stopped."""
    (directory / "attention_actor.py").write_text(ATTENTION_ACTOR)
    config = directory / f"worker-{port}.toml"
    # The in-memory provider explicitly: the broker lives in the worker (the default is sqlite).
    config.write_text(f'provider = "memory"\n\n[memory]\nlock_duration = {lock_duration}\n')
    return WorkerProcess(
        [
            "attention_actor:Attention",
            "-q",
            "attention",
            "--config",
            str(config),
            "--metrics-port",
            str(port),
            "--max-attempts",
            "1000",
            "--idle-timeout",
            "600",
            "--shutdown-grace",
            "1",
        ],
        env={"SEED_SESSIONS": ",".join(sessions), "QUEUE_RETRY_BACKOFF_MS": "300"},
        cwd=directory,
    )
