"""A real SQS endpoint on 127.0.0.1: moto's server in a subprocess, on a free port, with fixes to
moto's FIFO emulation (see ``_BOOT`` and ``_STRICT_BOOT``).

`MotoServer` is what the tests share (``tests/sqs_server.py`` re-exports it with its fixtures);
`StrictMotoServer` is the one for several consumers on one FIFO queue: the multi-worker tests
and the fault drills run against it, never against plain moto. Nothing global is set: callers
pass the endpoint and the fake credentials below explicitly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

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

# moto 5.2's FIFO receive is not safe under concurrent consumers: it computes the set of groups
# with in-flight messages once per call (before its long-poll wait), and recomputes it in the
# middle of a pass when it meets a lapsed message. A delete from another consumer in between
# lets it skip message k of a group (stale set) and then hand out k+1 (fresh set), which real
# SQS never does. Seen here as "seq 6 delivered, then seq 5 (receive count 1)". This server
# adds, on top of the shared fixture's lapse fix: one lock around receive, delete and
# visibility changes, and the long poll done outside moto's loop (each pass a fresh,
# zero-wait receive), so every pass sees one consistent state.
# Receipt handles, which matter once a visibility lapsed and another consumer received the
# message again (the fault drills do that all the time), behave as SQS's do here, not as
# moto's: moto accepts any handle a message ever had, so a late delete from the consumer that
# lost the message deleted it under the new holder (and let FIFO hand out the group's next
# message while the new holder was still handling this one), and a late visibility change moved
# the new holder's lease. Here, as on SQS: on a FIFO queue DeleteMessage with an older handle,
# or after the message's visibility ran out, fails ("The receipt handle has expired", seen as
# ReceiptHandleIsInvalid); on a standard queue a delete with an older handle succeeds and
# deletes nothing (SQS's documented behaviour); ChangeMessageVisibility with an older handle,
# or (FIFO) on a message no longer in flight, fails with ReceiptHandleIsInvalid. And moto let a
# visibility change make a lapsed message invisible again without putting it back in flight, so
# its group was not blocked and FIFO handed out message k+1 while k was hidden: a message made
# invisible is in flight again here. Each of these calls sees one instant (see ``_one_instant``).
_STRICT_PATCHES = """
import os
import threading
import time

from moto.sqs import models

_lock = threading.RLock()
_receive = models.SQSBackend.receive_message
_delete = models.SQSBackend.delete_message
_change = models.SQSBackend.change_message_visibility

# A steady clock: moto times visibility with the host's wall clock, and this machine's wall
# clock has been seen to step (3.4 s forward in one drill run): every lock in flight then
# lapsed 3.4 s early on the server while the workers, timing on the monotonic clock as they
# should, still held it. SQS's clock is not the consumer host's. Wall time at start-up, then
# monotonic.
_anchor_ms = time.time() * 1000 - time.monotonic() * 1000


def _clock():
    return time.monotonic() * 1000 + _anchor_ms


# One instant per call: moto reads the clock afresh for every message it looks at, so a message
# lapsing in the middle of a receive was seen as in flight by one step and as visible by the
# next (the group counted as blocked when message k was considered, free again by the time it
# reached k+1, which it then delivered first). SQS decides a receive at one instant.
_call = threading.local()


def _now_ms():
    frozen = getattr(_call, "now", None)
    return _clock() if frozen is None else frozen


models.unix_time_millis = _now_ms

# What the server decided, a line per message (``QUEUE_DRILL_SERVER_LOG``: a file; the drills
# keep it with a failed run's logs): the ground truth a finding is read against.
_trail_path = os.environ.get("QUEUE_DRILL_SERVER_LOG")
_trail = open(_trail_path, "a", buffering=1) if _trail_path else None


def _note(what, message, extra=""):
    if _trail is not None:
        _trail.write(
            f"{_now_ms():.0f} {what} {message.group_id} {message.body[:60]!r}"
            f" rc={message.approximate_receive_count} rh=..{str(message.receipt_handle)[-10:]}"
            f" visible_at={message.visible_at:.0f} {extra}\\n"
        )


def _message_of(queue, receipt_handle):
    for message in queue._messages:
        if message.had_receipt_handle(receipt_handle):
            return message
    return None


class _one_instant:
    def __enter__(self):
        _lock.acquire()
        _call.now = _clock()

    def __exit__(self, *exc_info):
        _call.now = None
        _lock.release()


def receive_message(self, queue_name, count, wait_seconds_timeout, visibility_timeout, *args, **kwargs):
    deadline = time.monotonic() + float(wait_seconds_timeout or 0)
    while True:
        with _one_instant():
            queue = self.get_queue(queue_name)
            for message in list(queue.pending_messages):
                if message.visible:
                    queue.pending_messages.discard(message)
            result = _receive(self, queue_name, count, 0, visibility_timeout, *args, **kwargs)
            if _trail is not None:
                for copy in result:
                    _note("receive", _message_of(queue, copy.receipt_handle) or copy)
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(0.02)


def _expired(self, queue_name, receipt_handle):
    # (stale, lapsed, fifo): the handle is an older one of a message received again since; the
    # message's visibility ran out (it is visible again); the queue is FIFO.
    queue = self.get_queue(queue_name)
    for message in queue._messages:
        if message.had_receipt_handle(receipt_handle):
            return message.receipt_handle != receipt_handle, message.visible, queue.fifo_queue
    return False, False, queue.fifo_queue


def delete_message(self, queue_name, receipt_handle):
    with _one_instant():
        stale, lapsed, fifo = _expired(self, queue_name, receipt_handle)
        if _trail is not None:
            message = _message_of(self.get_queue(queue_name), receipt_handle)
            if message is not None:
                verdict = "refused-stale" if stale and fifo else "refused-lapsed" if lapsed and fifo else "ok"
                _note("delete", message, f"handle=..{receipt_handle[-10:]} {verdict}")
        if fifo and (stale or lapsed):
            raise models.ReceiptHandleIsInvalid()  # FIFO: "The receipt handle has expired"
        if stale:
            return None  # standard queues: the call succeeds, the message is not deleted
        return _delete(self, queue_name, receipt_handle)


def change_message_visibility(self, queue_name, receipt_handle, visibility_timeout):
    with _one_instant():
        stale, lapsed, fifo = _expired(self, queue_name, receipt_handle)
        if stale or (fifo and lapsed):
            if _trail is not None:
                message = _message_of(self.get_queue(queue_name), receipt_handle)
                if message is not None:
                    verdict = "refused-stale" if stale else "refused-lapsed"
                    extra = f"to={visibility_timeout} handle=..{receipt_handle[-10:]} {verdict}"
                    _note("change", message, extra)
            raise models.ReceiptHandleIsInvalid()  # SQS: stale handle / MessageNotInflight
        result = _change(self, queue_name, receipt_handle, visibility_timeout)
        queue = self.get_queue(queue_name)
        for message in queue._messages:
            if message.had_receipt_handle(receipt_handle) and not message.visible:
                queue.pending_messages.add(message)  # invisible again: in flight again
        if _trail is not None:
            message = _message_of(queue, receipt_handle)
            if message is not None:
                _note("change", message, f"to={visibility_timeout} ok")
        return result


models.SQSBackend.receive_message = receive_message
models.SQSBackend.delete_message = delete_message
models.SQSBackend.change_message_visibility = change_message_visibility
"""

_STRICT_BOOT = (
    "import sys\n"
    + _STRICT_PATCHES
    + """
from moto.server import main
main(sys.argv[1:])
"""
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """One moto server subprocess (``BOOT`` run with ``python -c``) on its own free port."""

    BOOT = _BOOT

    def __init__(self, *, trail: str | os.PathLike[str] | None = None) -> None:
        """``trail``: a file where `StrictMotoServer` writes a line per receive, visibility
        change and delete of each message (what it decided, and when)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if trail is not None:
            env["QUEUE_DRILL_SERVER_LOG"] = str(trail)
        self._process = subprocess.Popen(
            [sys.executable, "-c", self.BOOT, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self._process.pid

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

    def freeze(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel, nothing answers."""
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def client(self, **config: Any) -> Any:
        """A boto3 SQS client for this server (``config``: botocore ``Config`` arguments)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "sqs",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["access_key_id"],
            aws_secret_access_key=CREDENTIALS["secret_access_key"],
            config=Config(**config) if config else None,
        )

    def stop(self) -> None:
        if self._process.poll() is None:
            self.thaw()  # a stopped process would not act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)


class StrictMotoServer(MotoServer):
    """`MotoServer` with `_STRICT_BOOT`: FIFO receive safe under concurrent consumers."""

    BOOT = _STRICT_BOOT


__all__ = ["CREDENTIALS", "REGION", "MotoServer", "StrictMotoServer"]
