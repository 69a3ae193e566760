"""The worker's HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz`` and ``/sessions`` on trio.

A deliberately tiny HTTP/1.1 server (no dependency beyond trio): one request per connection
(``Connection: close``), ``GET`` and ``HEAD`` only, a bounded request head, a per-connection
deadline and a bounded number of connections served at once. It is what Prometheus and
Kubernetes probes need, not a general web server.

* ``GET /metrics`` — Prometheus text exposition (``text/plain; version=0.0.4``) from
  `queue_runtime.telemetry.render_metrics` (call `queue_runtime.telemetry.setup_prometheus`
  first so our instruments reach it).
* ``GET /healthz`` — ``200 ok`` while the process (its trio loop) runs: liveness.
* ``GET /readyz`` — ``200 ready`` when ``ready()`` is true, ``503 not ready`` otherwise (or when
  ``ready()`` raises). The worker's ``ready`` says: provider reachable, supervisor accepting, not
  draining, circuit not open.
* ``GET /sessions?limit=N`` — what the worker's sessions are doing, as JSON
  (`queue_runtime.introspection`, schema in ``docs/worker.md``), when a ``sessions`` callable
  is given (else ``404``). ``limit`` defaults to 100, at most 1000; a bad one is ``400`` with
  one line naming the problem.
* anything else ``404``; other methods ``405``; a malformed request ``400``; a head over the
  limit ``431``; too many connections at once ``503``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

import trio

from .introspection import parse_limit
from .telemetry import logger, redact, render_metrics

__all__ = ["MAX_CONNECTIONS", "MAX_REQUEST_BYTES", "REQUEST_TIMEOUT", "serve_endpoints"]

#: Largest request head accepted (request line plus headers).
MAX_REQUEST_BYTES: Final = 8192
#: Seconds a connection may take, from accept to the last byte of the answer.
REQUEST_TIMEOUT: Final = 10.0
#: Connections served at once; more are answered 503 and closed at once.
MAX_CONNECTIONS: Final = 32

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _response(status: int, body: bytes, content_type: str = _TEXT, *, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head else body)


class _TooLarge(Exception):
    pass


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes:
    """The request head up to the blank line (what arrived, if the peer closed early).
    Raises `_TooLarge` beyond `MAX_REQUEST_BYTES`."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_REQUEST_BYTES:
            raise _TooLarge
        chunk = await stream.receive_some(4096)
        if not chunk:
            return bytes(data)
        data += chunk
    head = bytes(data).split(b"\r\n\r\n", 1)[0]
    if len(head) > MAX_REQUEST_BYTES:
        raise _TooLarge
    return head


def _answer(
    head: bytes,
    ready: Callable[[], bool],
    metrics: Callable[[], bytes],
    sessions: Callable[[int], bytes] | None = None,
) -> bytes:
    request_line = head.split(b"\r\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, b"bad request\n")
    path, _, query = parts[1].partition(b"?")
    method, target = parts[0], path
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"method not allowed\n")
    head_only = method == b"HEAD"
    if target == b"/metrics":
        try:
            body = metrics()
        except Exception as exc:
            logger.error("rendering /metrics failed: %s", redact(f"{type(exc).__name__}: {exc}"))
            return _response(500, b"metrics unavailable\n", head=head_only)
        return _response(200, body, METRICS_CONTENT_TYPE, head=head_only)
    if target == b"/sessions" and sessions is not None:
        try:
            limit = parse_limit(query.decode("latin-1"))
        except ValueError as exc:
            return _response(400, f"bad request: {exc}\n".encode(), head=head_only)
        try:
            body = sessions(limit)
        except Exception as exc:
            logger.error("rendering /sessions failed: %s", redact(f"{type(exc).__name__}: {exc}"))
            return _response(500, b"sessions unavailable\n", head=head_only)
        return _response(200, body, JSON_CONTENT_TYPE, head=head_only)
    if target == b"/healthz":
        return _response(200, b"ok\n", head=head_only)
    if target == b"/readyz":
        try:
            is_ready = bool(ready())
        except Exception as exc:
            logger.warning("readiness check failed: %s", redact(f"{type(exc).__name__}: {exc}"))
            is_ready = False
        return (
            _response(200, b"ready\n", head=head_only)
            if is_ready
            else _response(503, b"not ready\n", head=head_only)
        )
    return _response(404, b"not found\n", head=head_only)


async def _finish(stream: trio.SocketStream, answer: bytes, linger: float) -> None:
    """Send ``answer``, shut our side down and read what the peer still sends (up to
    ``linger`` seconds, at most 64 KiB) so closing with unread input does not reset the
    connection before the peer read the answer."""
    try:
        await stream.send_all(answer)
        await stream.send_eof()
        with trio.move_on_after(linger):
            drained = 0
            while drained < 65536 and (chunk := await stream.receive_some(4096)):
                drained += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away: nothing more to do


async def _handle(
    stream: trio.SocketStream,
    *,
    ready: Callable[[], bool],
    metrics: Callable[[], bytes],
    sessions: Callable[[int], bytes] | None,
    slots: trio.Semaphore,
    timeout: float,
) -> None:
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        # Over the limit: answer at once without reading the request, and linger only briefly.
        with trio.move_on_after(min(timeout, 1.0)):
            await _finish(stream, _response(503, b"busy\n"), 0.25)
        await trio.aclose_forcefully(stream)
        return
    try:
        with trio.move_on_after(timeout):
            try:
                head = await _read_head(stream)
            except _TooLarge:
                answer = _response(431, b"request too large\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            else:
                if not head:
                    return  # connected and closed without a request
                answer = _answer(head, ready, metrics, sessions)
            await _finish(stream, answer, 1.0)
    finally:
        slots.release()
        await trio.aclose_forcefully(stream)


async def serve_endpoints(
    port: int,
    *,
    host: str = "127.0.0.1",
    ready: Callable[[], bool],
    metrics: Callable[[], bytes] = render_metrics,
    sessions: Callable[[int], bytes] | None = None,
    timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz``, ``/readyz`` (and ``/sessions`` when ``sessions`` is
    given: called with the request's ``limit``, it returns the JSON body) on ``host:port``
    until cancelled.

    ``host`` is 127.0.0.1 by default: the endpoints are unauthenticated, so they answer this
    host only unless asked (``"0.0.0.0"`` in a container; ``docs/security.md``).

    Use with ``port = await nursery.start(partial(serve_endpoints, 9464, ready=...))``:
    ``port`` 0 picks a free port, and the port actually bound is what ``task_status.started``
    reports (with a host name that resolves to several addresses, the first listener's).
    ``ready``, ``metrics`` and ``sessions`` are called in trio's thread, once per request; ``metrics``
    defaults to `render_metrics`. Every connection task lives in this function's nursery, so
    cancelling it closes the listener and every open connection; it never returns otherwise.
    Binding errors (port in use, bad host) raise ``OSError`` before ``started``."""
    slots = trio.Semaphore(max_connections)
    handler = partial(_handle, ready=ready, metrics=metrics, sessions=sessions, slots=slots, timeout=timeout)
    # Bind first (outside any nursery), so a bind error is a plain OSError before `started`.
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        actual: int = listeners[0].socket.getsockname()[1]
        logger.info(
            "serving /metrics /healthz /readyz on %s:%d%s",
            host,
            actual,
            " (and /sessions)" if sessions else "",
        )
        task_status.started(actual)
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    # serve_listeners owns one task per connection in its nursery and closes the listeners.
    await trio.serve_listeners(handler, listeners)
