"""A loopback HTTP/1.1 fault proxy on trio, between SQS clients and an SQS server.

The proxy is an HTTP/1.1 intermediary, not a byte pipe: it reads each request and each
response whole, at message boundaries (``Content-Length``, ``chunked`` or, for responses,
close-delimited), and so can act per request:

* **delay**: forward the request ``d`` seconds after it arrived, and the response ``d``
  seconds after it arrived: a fixed ``delay`` for every request, each way (a pure latency
  proxy), plus, for a ``delay_share`` of requests, a delay drawn uniformly from
  ``delay_range``, each way, drawn for each way;
* **drop before**: close the client's connection without forwarding (the call never reached
  the server);
* **drop after**: forward, read the server's answer, then close the client's connection
  without it (the call took effect, the answer was lost);
* **throttle**: answer at once with SQS's throttling error in the JSON protocol, which
  botocore parses as ``RequestThrottled`` (see `throttle_response`).

Connections are persistent on both sides and managed hop by hop: the client keeps its
connection (unless it asks to close) even when the server closes after every answer, as moto's
server does; a close-delimited response is forwarded with a ``Content-Length``. Each client
connection has at most one upstream connection. Buffers are bounded (`HEAD_LIMIT`,
``max_message_bytes``, ``max_connections``), every task runs in the proxy's nursery and every
connection is closed when `FaultProxy.serve` returns or is cancelled.

In process: ``await nursery.start(proxy.serve)`` returns the port. As a subprocess::

    python -m drills.proxy --listen-port 0 --upstream http://127.0.0.1:4566 \\
        --delay-range 0.5:3 --delay-share 0.3 --drop-before 0.03 --seed 7

prints the port on stdout when ready, runs until SIGTERM or SIGINT, then prints its counters
as one JSON line on stderr. SIGUSR2 pauses the faults (pure forwarding), SIGUSR1 resumes them;
``--paused`` starts paused. `ProxyProcess` runs it from Python.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import IO, Final
from urllib.parse import urlsplit

import trio

#: Most bytes of a request or response head (request/status line and headers).
HEAD_LIMIT: Final = 64 * 1024
#: Default cap on one message's body (SQS's largest calls are a few MiB).
BODY_LIMIT: Final = 16 * 1024 * 1024
READ_SIZE: Final = 64 * 1024
#: Headers that belong to one connection, never forwarded (plus those named in ``Connection``).
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"expect", b"proxy-authorization"}
)

THROTTLE_CODE: Final = "RequestThrottled"
THROTTLE_MESSAGE: Final = "Request is throttled."


class ProtocolError(Exception):
    """A malformed or oversized HTTP message."""


class _UpstreamFailed(Exception):
    """The server could not be reached or closed the connection without an answer."""


@dataclass
class Faults:
    """What the proxy does to each request. Shares are probabilities in [0, 1]; the three
    actions (throttle, drop before, drop after) exclude each other and sum to at most 1."""

    delay: float = 0.0
    delay_range: tuple[float, float] | None = None
    delay_share: float = 1.0
    drop_before: float = 0.0
    drop_after: float = 0.0
    throttle: float = 0.0

    def __post_init__(self) -> None:
        for name in ("delay_share", "drop_before", "drop_after", "throttle"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        if self.drop_before + self.drop_after + self.throttle > 1.0 + 1e-9:
            raise ValueError("drop_before + drop_after + throttle must be at most 1")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay!r}")
        if self.delay_range is not None:
            low, high = self.delay_range
            if not 0 <= low <= high:
                raise ValueError(
                    f"delay_range must be LOW:HIGH with 0 <= LOW <= HIGH, got {self.delay_range!r}"
                )


# -- HTTP/1.1 messages ---------------------------------------------------------------------------


@dataclass
class _Head:
    """A request or status line and its header fields, as received."""

    first: bytes
    headers: list[tuple[bytes, bytes]]

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated tokens of every ``name`` field, lower-cased."""
        return {t.strip().lower() for value in self.values(name) for t in value.split(b",") if t.strip()}

    def forwarded(self, first: bytes, *, extra: Sequence[tuple[bytes, bytes]] = ()) -> bytearray:
        """The head to send on: ``first`` line, the end-to-end fields, then ``extra``."""
        drop = HOP_BY_HOP | self.tokens(b"connection")
        out = bytearray(first + b"\r\n")
        for key, value in self.headers:
            if key.lower() not in drop:
                out += key + b": " + value + b"\r\n"
        for key, value in extra:
            out += key + b": " + value + b"\r\n"
        out += b"\r\n"
        return out


def _parse_head(raw: bytes) -> _Head:
    lines = raw[:-4].split(b"\r\n")
    if not lines[0]:
        raise ProtocolError("empty start line")
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError("obsolete header line folding")
        key, sep, value = line.partition(b":")
        if not sep or not key or key != key.strip():
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((key, value.strip()))
    return _Head(lines[0], headers)


class _Reader:
    """Buffered reads of HTTP framing from one stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> bool:
        data = await self._stream.receive_some(READ_SIZE)
        if not data:
            return False
        self._buffer += data
        return True

    async def head(self) -> bytes | None:
        """The next head, through its blank line; None on EOF before any byte of it."""
        searched = 0
        while True:
            while self._buffer.startswith(b"\r\n"):  # stray empty lines between messages
                del self._buffer[:2]
            end = self._buffer.find(b"\r\n\r\n", max(0, searched - 3))
            if end >= 0:
                raw = bytes(self._buffer[: end + 4])
                del self._buffer[: end + 4]
                return raw
            if len(self._buffer) > HEAD_LIMIT:
                raise ProtocolError(f"head longer than {HEAD_LIMIT} bytes")
            searched = len(self._buffer)
            if not await self._fill():
                if self._buffer:
                    raise ProtocolError("connection closed inside a message head")
                return None

    async def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not await self._fill():
                raise ProtocolError("connection closed inside a message body")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def line(self, limit: int = 4096) -> bytes:
        """One line through its CRLF."""
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                data = bytes(self._buffer[: end + 2])
                del self._buffer[: end + 2]
                return data
            if len(self._buffer) > limit:
                raise ProtocolError("chunk line too long")
            if not await self._fill():
                raise ProtocolError("connection closed inside a chunked body")

    async def to_eof(self, limit: int) -> bytes:
        while await self._fill():
            if len(self._buffer) > limit:
                raise ProtocolError(f"body longer than {limit} bytes")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def chunked(self, limit: int) -> bytes:
        """A whole chunked body, raw (sizes, extensions and trailers as received)."""
        out = bytearray()
        while True:
            line = await self.line()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
            out += line
            if size == 0:
                while True:  # trailer fields, then the blank line
                    trailer = await self.line()
                    out += trailer
                    if trailer == b"\r\n":
                        return bytes(out)
                    if len(out) > limit:
                        raise ProtocolError(f"body longer than {limit} bytes")
            if size < 0 or len(out) + size > limit:
                raise ProtocolError(f"body longer than {limit} bytes")
            data = await self.exactly(size + 2)
            if not data.endswith(b"\r\n"):
                raise ProtocolError("chunk not followed by CRLF")
            out += data


def _content_length(head: _Head) -> int | None:
    values = {v.strip() for value in head.values(b"content-length") for v in value.split(b",")}
    if not values:
        return None
    if len(values) > 1:
        raise ProtocolError("conflicting Content-Length values")
    value = values.pop()
    if not value.isdigit():
        raise ProtocolError(f"bad Content-Length {value[:20]!r}")
    return int(value)


def _is_chunked(head: _Head) -> bool | None:
    """True for chunked framing, False for another transfer coding, None for none."""
    codings = [
        t.strip().lower() for v in head.values(b"transfer-encoding") for t in v.split(b",") if t.strip()
    ]
    if not codings:
        return None
    return codings[-1] == b"chunked"


def _version(token: bytes) -> tuple[int, int]:
    if not token.startswith(b"HTTP/") or len(token) != 8 or token[6:7] != b".":
        raise ProtocolError(f"bad HTTP version {token[:20]!r}")
    try:
        return int(token[5:6]), int(token[7:8])
    except ValueError:
        raise ProtocolError(f"bad HTTP version {token[:20]!r}") from None


def _persistent(version: tuple[int, int], head: _Head) -> bool:
    tokens = head.tokens(b"connection")
    if b"close" in tokens:
        return False
    return version >= (1, 1) or b"keep-alive" in tokens


def throttle_response(*, close: bool = False) -> bytes:
    """SQS's throttling error as its JSON protocol sends it.

    botocore's JSON parser takes the error code from the body's ``__type`` (the part after
    ``#``) and, because SQS is "awsQueryCompatible", replaces it with the first part of the
    ``x-amzn-query-error`` header (``CODE;Sender``), keeping the JSON one as ``QueryErrorCode``.
    Both are ``RequestThrottled``: botocore's standard retry mode counts it as throttling (and
    retries it, with throttling backoff) and ``queue_runtime``'s SQS provider maps it to
    `queue_runtime.errors.Throttled`. The status (400) matters only in that it is below 500,
    where botocore would try a generic HTML error page parse.
    """
    body = json.dumps({"__type": f"com.amazonaws.sqs#{THROTTLE_CODE}", "message": THROTTLE_MESSAGE}).encode()
    head = [
        b"HTTP/1.1 400 Bad Request",
        b"x-amzn-RequestId: " + str(uuid.uuid4()).encode(),
        b"x-amzn-query-error: " + THROTTLE_CODE.encode() + b";Sender",
        b"Content-Type: application/x-amz-json-1.0",
        b"Date: " + formatdate(usegmt=True).encode(),
        b"Content-Length: " + str(len(body)).encode(),
    ]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _error_response(status: bytes, *, close: bool = True) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
    return head + (b"Connection: close\r\n" if close else b"") + b"\r\n"


# -- the proxy ---------------------------------------------------------------------------------


class _Upstream:
    """One connection to the server, for one client connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = _Reader(stream)
        self.exchanges = 0


@dataclass
class _Response:
    data: bytes
    status: int
    arrived: float
    upstream_persistent: bool


class FaultProxy:
    """The proxy (see the module docstring). ``faults`` may be replaced while it runs;
    ``paused`` (true = forward everything untouched) may be flipped while it runs."""

    def __init__(
        self,
        upstream: str,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
        paused: bool = False,
        max_message_bytes: int = BODY_LIMIT,
        max_connections: int = 256,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST[:PORT], got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.faults = faults or Faults()
        self.paused = paused
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._connections = trio.CapacityLimiter(max_connections)
        self._random = random.Random(seed)
        #: Counters: connections, requests, forwarded, delayed, dropped_before, dropped_after,
        #: throttled, upstream_failed, bad_requests; and ``<action>:<operation>`` per SQS operation.
        self.stats: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and proxy until cancelled; ``task_status.started(port)`` once listening."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host, backlog=128)
        async with trio.open_nursery() as nursery:
            try:
                self.port = listeners[0].socket.getsockname()[1]
                task_status.started(self.port)
                await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    # -- decisions ---------------------------------------------------------------------------
    def _action(self) -> str:
        faults = self.faults
        if self.paused:
            return "forward"
        draw = self._random.random()
        if draw < faults.throttle:
            return "throttled"
        draw -= faults.throttle
        if draw < faults.drop_before:
            return "dropped_before"
        draw -= faults.drop_before
        if draw < faults.drop_after:
            return "dropped_after"
        return "forward"

    def _delays(self) -> tuple[float, float]:
        faults = self.faults
        if self.paused:
            return 0.0, 0.0
        there = back = faults.delay
        if faults.delay_range is not None and self._random.random() < faults.delay_share:
            low, high = faults.delay_range
            there += self._random.uniform(low, high)
            back += self._random.uniform(low, high)
        return there, back

    # -- one client connection ---------------------------------------------------------------
    async def _connection(self, client: trio.SocketStream) -> None:
        async with self._connections, client:
            self.stats["connections"] += 1
            upstream: _Upstream | None = None
            try:
                upstream = await self._exchanges(client)
            except ProtocolError:
                self.stats["bad_requests"] += 1
                try:
                    await client.send_all(_error_response(b"400 Bad Request"))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            finally:
                if upstream is not None:
                    await trio.aclose_forcefully(upstream.stream)

    async def _exchanges(self, client: trio.SocketStream) -> _Upstream | None:
        """Serve requests on ``client`` until either side closes; returns the open upstream."""
        reader = _Reader(client)
        upstream: _Upstream | None = None
        try:
            while True:
                raw = await reader.head()
                if raw is None:
                    return upstream
                head = _parse_head(raw)
                method, _, rest = head.first.partition(b" ")
                target, _, version_token = rest.rpartition(b" ")
                if not method or not target:
                    raise ProtocolError(f"bad request line {head.first[:80]!r}")
                version = _version(version_token)
                keep = _persistent(version, head)
                if b"100-continue" in head.tokens(b"expect"):
                    await client.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                chunked = _is_chunked(head)
                if chunked is False:
                    raise ProtocolError("request with a transfer coding other than chunked")
                if chunked:
                    body = await reader.chunked(self.max_message_bytes)
                else:
                    length = _content_length(head) or 0
                    if length > self.max_message_bytes:
                        raise ProtocolError(f"request body longer than {self.max_message_bytes} bytes")
                    body = await reader.exactly(length)
                arrived = trio.current_time()
                operation = self._operation(head)
                action = self._action()
                self.stats["requests"] += 1
                self.stats[f"{action}:{operation}"] += 1
                if action != "forward":
                    self.stats[action] += 1
                if action == "throttled":
                    await client.send_all(throttle_response(close=not keep))
                    if not keep:
                        return upstream
                    continue
                if action == "dropped_before":
                    return upstream
                there, back = self._delays()
                if there or back:
                    self.stats["delayed"] += 1
                if there:
                    await trio.sleep_until(arrived + there)
                request = head.forwarded(b"%s %s HTTP/1.1" % (method, target)) + body
                try:
                    upstream, response = await self._forward(
                        upstream, bytes(request), head_only=method == b"HEAD"
                    )
                except _UpstreamFailed:
                    self.stats["upstream_failed"] += 1
                    await client.send_all(_error_response(b"502 Bad Gateway"))
                    return upstream
                self.stats["forwarded"] += 1
                if action == "dropped_after":
                    return upstream
                if back:
                    await trio.sleep_until(response.arrived + back)
                data = response.data
                if not keep:
                    data = data.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
                await client.send_all(data)
                if not keep:
                    return upstream
        except BaseException:
            if upstream is not None:
                await trio.aclose_forcefully(upstream.stream)
            raise

    @staticmethod
    def _operation(head: _Head) -> str:
        target = head.values(b"x-amz-target")
        if target:
            return target[0].decode("latin-1").rpartition(".")[2] or "unknown"
        return "other"

    async def _forward(
        self, upstream: _Upstream | None, request: bytes, *, head_only: bool
    ) -> tuple[_Upstream | None, _Response]:
        """Send ``request`` and read the whole final response, opening (or, when a reused
        connection turns out closed before any answer, reopening once) the upstream."""
        for _ in range(2):
            if upstream is None:
                try:
                    stream = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
                except OSError as error:
                    raise _UpstreamFailed(str(error)) from None
                upstream = _Upstream(stream)
            reused = upstream.exchanges > 0
            try:
                await upstream.stream.send_all(request)
                response = await self._response(upstream, head_only=head_only)
            except (trio.BrokenResourceError, _UpstreamFailed, ProtocolError) as error:
                await trio.aclose_forcefully(upstream.stream)
                upstream = None
                if reused and not isinstance(error, ProtocolError):
                    continue  # a kept-alive connection the server had closed: once more, fresh
                raise _UpstreamFailed(str(error)) from None
            upstream.exchanges += 1
            if not response.upstream_persistent:
                await trio.aclose_forcefully(upstream.stream)
                upstream = None
            return upstream, response
        raise _UpstreamFailed("the server closed the connection without an answer")

    async def _response(self, upstream: _Upstream, *, head_only: bool) -> _Response:
        """The next final response from ``upstream``, re-framed for the client: interim (1xx)
        responses are skipped, a close-delimited body gets a ``Content-Length``."""
        while True:
            raw = await upstream.reader.head()
            if raw is None:
                raise _UpstreamFailed("the server closed the connection without an answer")
            head = _parse_head(raw)
            version_token, _, rest = head.first.partition(b" ")
            version = _version(version_token)
            code_token, _, reason = rest.partition(b" ")
            if len(code_token) != 3 or not code_token.isdigit():
                raise ProtocolError(f"bad status line {head.first[:80]!r}")
            status = int(code_token)
            if 100 <= status < 200:
                if status == 101:
                    raise ProtocolError("protocol upgrades are not supported")
                continue
            break
        first = b"HTTP/1.1 " + code_token + (b" " + reason if reason else b"")
        persistent = _persistent(version, head)
        extra: list[tuple[bytes, bytes]] = []
        if head_only or status in (204, 304):
            body = b""
        else:
            chunked = _is_chunked(head)
            length = _content_length(head)
            if chunked:
                body = await upstream.reader.chunked(self.max_message_bytes)
            elif chunked is None and length is not None:
                if length > self.max_message_bytes:
                    raise ProtocolError(f"response body longer than {self.max_message_bytes} bytes")
                body = await upstream.reader.exactly(length)
            else:  # close-delimited: read to EOF, hand on with a length
                body = await upstream.reader.to_eof(self.max_message_bytes)
                persistent = False
                head.headers = [
                    (k, v)
                    for k, v in head.headers
                    if k.lower() not in (b"transfer-encoding", b"content-length")
                ]
                extra.append((b"Content-Length", str(len(body)).encode()))
        data = bytes(head.forwarded(first, extra=extra)) + body
        return _Response(data, status, trio.current_time(), persistent)


# -- as a subprocess ---------------------------------------------------------------------------


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, got {text}")
    return value


def _range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        bounds = (float(low), float(high)) if sep else (float(low), float(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"LOW:HIGH seconds, got {text!r}") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"LOW:HIGH with 0 <= LOW <= HIGH, got {text!r}")
    return bounds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m drills.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen-port", type=int, default=0, help="port on 127.0.0.1 (0 = a free one)")
    parser.add_argument("--upstream", required=True, help="the server, http://HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added each way to every request")
    parser.add_argument(
        "--delay-range", type=_range, metavar="LOW:HIGH", help="extra seconds each way, uniform"
    )
    parser.add_argument(
        "--delay-share", type=_share, default=1.0, help="share of requests --delay-range hits"
    )
    parser.add_argument("--drop-before", type=_share, default=0.0, help="share dropped before forwarding")
    parser.add_argument("--drop-after", type=_share, default=0.0, help="share dropped after forwarding")
    parser.add_argument("--throttle", type=_share, default=0.0, help="share answered with RequestThrottled")
    parser.add_argument("--seed", type=int, help="random seed for the fault decisions")
    parser.add_argument("--paused", action="store_true", help="start with faults paused (SIGUSR1 resumes)")
    parser.add_argument("--max-message-bytes", type=int, default=BODY_LIMIT, help="cap on one body")
    return parser


async def _serve(proxy: FaultProxy) -> None:
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            print(port, flush=True)
            async for signum in received:
                if signum == signal.SIGUSR1:
                    proxy.paused = False
                elif signum == signal.SIGUSR2:
                    proxy.paused = True
                else:
                    nursery.cancel_scope.cancel()
                    break


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        faults = Faults(
            delay=args.delay,
            delay_range=args.delay_range,
            delay_share=args.delay_share,
            drop_before=args.drop_before,
            drop_after=args.drop_after,
            throttle=args.throttle,
        )
        proxy = FaultProxy(
            args.upstream,
            faults,
            port=args.listen_port,
            seed=args.seed,
            paused=args.paused,
            max_message_bytes=args.max_message_bytes,
        )
    except ValueError as error:
        parser.error(str(error))
    trio.run(_serve, proxy)
    print(json.dumps(dict(sorted(proxy.stats.items()))), file=sys.stderr, flush=True)
    return 0


class ProxyProcess:
    """``python -m drills.proxy`` in a subprocess (from the repository root), stderr to ``log``."""

    def __init__(self, upstream: str, args: Sequence[str] = (), *, log: Path) -> None:
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "drills.proxy", "--upstream", upstream, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the port, or EOF if it failed
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the proxy did not start: {log.read_text(errors='replace')[-2000:]}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def resume_faults(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def pause_faults(self) -> None:
        self.process.send_signal(signal.SIGUSR2)

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGTERM, wait, and return its counters ({} if it printed none)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    stats: dict[str, int] = json.loads(line)
                except ValueError:
                    break
                return stats
        return {}


if __name__ == "__main__":
    raise SystemExit(main())
