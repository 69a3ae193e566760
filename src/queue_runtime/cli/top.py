"""``queue-runtime top --url http://HOST:PORT [--url ...]``: a live view of running workers.

Every ``--interval`` (1 s) it fetches each worker's ``/sessions`` (`queue_runtime.introspection`)
concurrently, each fetch bounded by ``--timeout`` (0.8 s), and shows:

* per worker: reachable or not (and why), queue, active sessions, the rates (received,
  completed, dead-lettered, retries per second, from the supervisor's counters between two
  fetches), a sparkline of the completions per second over the last minute, and the circuit;
* one table of the sessions of every worker, the ones needing attention first (a lock close to
  its deadline, a message being retried, a ``handle()`` running long).

Keys: ``s`` changes the order (attention, age, session id, worker), ``q`` (or Ctrl-C) quits.

Without a terminal on stdout (or with ``--json``) it fetches once and prints one JSON document
(``{"schema": 1, "workers": [{"url", "reachable", "error", "sessions"}]}``, ``sessions`` being
the worker's ``/sessions`` document) and exits: 0 when every worker answered, 1 otherwise.

A worker that does not answer never holds the view up: it shows as unreachable from the next
refresh on, and its sessions leave the table. Nothing of a message body is shown (the endpoint
never has one), and every text from a worker is shown literally, never as rich markup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import trio

from .common import CommandError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

__all__ = ["MAX_RESPONSE_BYTES", "SORT_ORDERS", "Target", "fetch_sessions", "parse_target", "register"]

#: Largest ``/sessions`` answer read (1000 sessions take about 500 KiB).
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
#: Points of history kept per worker: one a refresh, a minute at the default interval.
HISTORY: Final = 60
#: Sessions fetched per worker (the worker sends the most urgent ones first).
DEFAULT_LIMIT: Final = 100
#: The orders ``s`` cycles through.
SORT_ORDERS: Final = ("attention", "age", "session", "worker")
_SPARKS: Final = "▁▂▃▄▅▆▇█"
_RATES: Final = (
    ("received", "recv/s"),
    ("completed", "done/s"),
    ("dead_lettered", "dlq/s"),
    ("retries", "retry/s"),
)


@dataclass(frozen=True)
class Target:
    """One worker endpoint: the URL as given, and where to connect."""

    url: str
    host: str
    port: int


def parse_target(text: str) -> Target:
    """``http://HOST:PORT`` (a path, if any, is ignored: ``/sessions`` is asked for) or
    ``HOST:PORT``. Raises `CommandError` (exit 2) naming the problem."""
    shown = repr(text if len(text) <= 80 else text[:80] + "...")
    candidate = text if "://" in text else f"http://{text}"
    try:
        parts = urlsplit(candidate)
        port = parts.port
    except ValueError:
        raise CommandError(f"--url {shown}: not a URL (expected http://HOST:PORT)", 2) from None
    if parts.scheme != "http":
        raise CommandError(
            f"--url {shown}: only http:// is served by a worker's endpoint (expected http://HOST:PORT)", 2
        )
    if not parts.hostname or port is None:
        raise CommandError(f"--url {shown}: give a host and a port, e.g. http://127.0.0.1:9464", 2)
    return Target(url=text, host=parts.hostname, port=port)


class FetchError(Exception):
    """Why a worker's ``/sessions`` could not be read (one line)."""


async def fetch_sessions(target: Target, *, limit: int, timeout: float) -> dict[str, Any]:
    """GET ``/sessions?limit=N`` of ``target`` within ``timeout`` seconds (connecting
    included) and return the document. Raises `FetchError` naming the problem: refused,
    timed out, not a worker's endpoint, a bad answer. Cancellation passes through."""
    request = (
        f"GET /sessions?limit={limit} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        "Accept: application/json\r\nConnection: close\r\nUser-Agent: queue-runtime-top\r\n\r\n"
    ).encode("ascii", "replace")
    data = bytearray()
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(target.host, target.port)
            async with stream:
                await stream.send_all(request)
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise FetchError(f"answer over {MAX_RESPONSE_BYTES} bytes")
    except trio.TooSlowError:
        raise FetchError(f"no answer within {timeout:g} s") from None
    except OSError as error:
        raise FetchError(_connect_error(error)) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise FetchError("connection closed") from None
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise FetchError("not an HTTP answer")
    if parts[1] != "200":
        text = " ".join(body.decode("utf-8", "replace").split())[:120]
        hint = " (a worker without /sessions?)" if parts[1] == "404" else ""
        raise FetchError(f"HTTP {parts[1]}: {text}{hint}")
    try:
        document = json.loads(body)
    except ValueError:
        raise FetchError("the answer is not JSON") from None
    if not isinstance(document, dict) or document.get("schema") != 1:
        raise FetchError("not a /sessions document of schema 1")
    return document


def _connect_error(error: OSError) -> str:
    """A short reason for a failed connection: trio reports every address it tried in an
    exception group; the first one's reason (``connection refused``) says it best."""
    causes = getattr(error.__cause__, "exceptions", None) or [error]
    first = causes[0]
    errno = getattr(first, "errno", None)
    reason = os.strerror(errno) if isinstance(errno, int) else str(first)
    return f"cannot connect: {str(reason).lower()}"


@dataclass
class Worker:
    """What ``top`` knows about one worker."""

    target: Target
    label: str
    document: dict[str, Any] | None = None
    error: str | None = None
    checked: bool = False
    last_ok: float | None = None
    previous: tuple[float, dict[str, Any]] | None = None
    rates: dict[str, float] = field(default_factory=dict)
    history: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def update(self, result: dict[str, Any] | FetchError, at: float) -> None:
        """Record one fetch's outcome (at monotonic time ``at``)."""
        self.checked = True
        if isinstance(result, FetchError):
            self.error, self.document = str(result), None
            self.previous, self.rates = None, {}
            return
        self.error, self.document, self.last_ok = None, result, at
        stats = result.get("stats") or {}
        if self.previous is not None:
            then, before = self.previous
            elapsed = at - then
            rates: dict[str, float] = {}
            for key, _ in _RATES:
                delta = _number(stats.get(key)) - _number(before.get(key))
                rates[key] = delta / elapsed if elapsed > 0 and delta >= 0 else 0.0
            self.rates = rates
            self.history.append(rates["completed"])
        self.previous = (at, stats)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def sparkline(values: Sequence[float], width: int = 20) -> str:
    """The last ``width`` values as block characters, scaled to their maximum."""
    shown = list(values)[-width:]
    if not shown:
        return ""
    top = max(shown)
    if top <= 0:
        return _SPARKS[0] * len(shown)
    return "".join(
        _SPARKS[min(int(value / top * (len(_SPARKS) - 1) + 0.5), len(_SPARKS) - 1)] for value in shown
    )


def attention_key(session: dict[str, Any]) -> tuple[int, float]:
    """The order of the "attention" sort (larger first), as the worker ranks its own list."""
    reasons = session.get("attention") or []
    message = session.get("message") or {}
    lock = session.get("lock") or {}
    if "lock_at_risk" in reasons:
        return (3, -_number(lock.get("expires_in_seconds")))
    if "retrying" in reasons:
        return (2, _number(message.get("attempt")))
    if "running_long" in reasons:
        return (1, _number(message.get("running_seconds")))
    return (0, _number(message.get("running_seconds")) / 1e6)


def ordered_sessions(workers: Sequence[Worker], order: str) -> list[tuple[Worker, dict[str, Any]]]:
    """Every reachable worker's sessions in ``order`` (one of `SORT_ORDERS`)."""
    rows = [
        (worker, session)
        for worker in workers
        if worker.document is not None
        for session in worker.document.get("sessions") or []
        if isinstance(session, dict)
    ]
    if order == "age":
        rows.sort(key=lambda row: -_number(row[1].get("age_seconds")))
    elif order == "session":
        rows.sort(key=lambda row: str(row[1].get("session_id")))
    elif order == "worker":
        rows.sort(key=lambda row: (row[0].label, [-x for x in attention_key(row[1])]))
    else:
        rows.sort(key=lambda row: attention_key(row[1]), reverse=True)
    return rows


# --------------------------------------------------------------------------------------------
# rendering


def _literal(value: object, style: str = "") -> Text:
    from rich.text import Text

    from ..redaction import redact

    return Text(redact(str(value)), style=style)


def _secs(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def render(workers: Sequence[Worker], order: str, *, height: int, now: float) -> RenderableType:
    """The whole screen: the workers table, then the sessions table cut to ``height`` lines."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    clock = datetime.now(UTC).strftime("%H:%M:%S")
    title = Text.assemble(
        ("queue-runtime top", "bold"),
        f"  {len(workers)} worker{'s' if len(workers) != 1 else ''}  sorted by {order}  {clock} UTC",
        ("   s: sort  q: quit", "dim"),
    )
    table = Table(expand=False, box=None, pad_edge=False, header_style="bold")
    for name in ("worker", "url", "status", "queue", "sessions"):
        table.add_column(name, no_wrap=True)
    for _, label in _RATES:
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("done/s, last minute", no_wrap=True)
    table.add_column("circuit", no_wrap=True)
    notes: list[Text] = []
    for worker in workers:
        document = worker.document
        if document is None:
            if not worker.checked:
                status = Text("connecting", style="dim")
            else:
                status = Text("UNREACHABLE", style="bold red")
                since = f", last seen {_secs(now - worker.last_ok)} ago" if worker.last_ok is not None else ""
                notes.append(_literal(f"{worker.label} {worker.target.url}: {worker.error}{since}", "red"))
            table.add_row(worker.label, _literal(worker.target.url), status)
            continue
        stats = document.get("stats") or {}
        circuit = str((document.get("circuit") or {}).get("state", "?"))
        draining = " draining" if stats.get("draining") else ""
        rates = [f"{worker.rates[key]:.1f}" if key in worker.rates else "-" for key, _ in _RATES]
        table.add_row(
            worker.label,
            _literal(worker.target.url),
            Text("up" + draining, style="green" if not draining else "yellow"),
            _literal((document.get("worker") or {}).get("queue", "")),
            f"{stats.get('active_sessions', '?')}/{document.get('max_sessions', '?')}",
            *rates,
            sparkline(worker.history),
            Text(circuit, style="green" if circuit == "closed" else "bold red"),
        )
    rows = ordered_sessions(workers, order)
    room = max(height - len(workers) - len(notes) - 7, 3)
    sessions = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    for name, justify in (
        ("worker", "left"),
        ("session", "left"),
        ("state", "left"),
        ("attention", "left"),
        ("attempt", "right"),
        ("last error", "left"),
        ("in handle", "right"),
        ("retry in", "right"),
        ("lock left", "right"),
        ("renewals", "right"),
        ("handled", "right"),
        ("age", "right"),
    ):
        sessions.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]
    for worker, session in rows[:room]:
        message = session.get("message") or {}
        lock = session.get("lock") or {}
        reasons = session.get("attention") or []
        state = str(session.get("state", ""))
        style = "bold red" if "lock_at_risk" in reasons else "yellow" if reasons else ""
        sessions.add_row(
            worker.label,
            _literal(session.get("session_id") or "-", style),
            _literal(state, style),
            _literal(",".join(str(r) for r in reasons), style),
            str(message.get("attempt", "")),
            _literal(session.get("last_error") or ""),
            _secs(message.get("running_seconds")),
            _secs(message.get("retry_in_seconds")),
            _secs(lock.get("expires_in_seconds")),
            str(lock.get("renewals", "")),
            str(session.get("handled", "")),
            _secs(session.get("age_seconds")),
        )
    hidden = len(rows) - min(len(rows), room)
    total = sum(int(_number((w.document or {}).get("sessions_total"))) for w in workers)
    footer = Text(
        f"{len(rows)} sessions shown of {total} active" + (f" ({hidden} below the screen)" if hidden else ""),
        style="dim",
    )
    return Group(title, Text(""), table, *notes, Text(""), sessions, footer)


# --------------------------------------------------------------------------------------------
# running


async def _refresh(workers: Sequence[Worker], limit: int, timeout: float) -> None:
    """Fetch every worker at once; returns within ``timeout`` (plus a scheduling step)."""

    async def one(worker: Worker) -> None:
        try:
            result: dict[str, Any] | FetchError = await fetch_sessions(
                worker.target, limit=limit, timeout=timeout
            )
        except FetchError as error:
            result = error
        worker.update(result, time.monotonic())

    async with trio.open_nursery() as nursery:
        for worker in workers:
            nursery.start_soon(one, worker)


@contextlib.contextmanager
def _keys_mode(fd: int) -> Iterator[bool]:
    """The terminal on ``fd`` in cbreak mode (keys arrive one at a time, not echoed), restored
    on exit; yields False when ``fd`` is not a terminal (no keys then)."""
    try:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):
        yield False
        return
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _live(workers: list[Worker], args: argparse.Namespace, console: Console) -> None:
    from rich.live import Live

    state = {"order": 0}
    changed = trio.Event()
    started = time.monotonic()

    def screen() -> RenderableType:
        return render(workers, SORT_ORDERS[state["order"]], height=console.height, now=time.monotonic())

    stdin = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    with (
        _keys_mode(stdin) if stdin is not None else contextlib.nullcontext(False) as keys,
        Live(
            screen(),
            console=console,
            screen=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        ) as live,
    ):
        async with trio.open_nursery() as nursery:

            async def read_keys() -> None:
                nonlocal changed
                assert stdin is not None
                while True:
                    await trio.lowlevel.wait_readable(stdin)
                    data = os.read(stdin, 64)
                    if not data:
                        return  # the terminal went away: keep showing, no more keys
                    for key in data.decode("utf-8", "ignore").lower():
                        if key == "q":
                            nursery.cancel_scope.cancel()
                            return
                        if key == "s":
                            state["order"] = (state["order"] + 1) % len(SORT_ORDERS)
                            changed.set()

            if keys:
                nursery.start_soon(read_keys)
            tick = started
            while True:
                await _refresh(workers, args.limit, args.timeout)
                live.update(screen(), refresh=True)
                tick += args.interval
                if tick < time.monotonic():
                    tick = time.monotonic()  # fell behind (a slow machine): do not race to catch up
                with trio.move_on_at(trio.current_time() + (tick - time.monotonic())):
                    while True:
                        await changed.wait()
                        changed = trio.Event()
                        live.update(screen(), refresh=True)


def _snapshot_json(workers: Sequence[Worker]) -> dict[str, Any]:
    return {
        "schema": 1,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "workers": [
            {
                "url": worker.target.url,
                "reachable": worker.document is not None,
                "error": worker.error,
                "sessions": worker.document,
            }
            for worker in workers
        ],
    }


def _cmd_top(args: argparse.Namespace) -> int:
    targets = [parse_target(text) for text in args.url]
    workers = [Worker(target, f"w{index}") for index, target in enumerate(targets, 1)]
    interactive = not args.json and _stdout_is_tty()
    if not interactive:
        trio.run(_refresh, workers, args.limit, args.timeout)
        print(json.dumps(_snapshot_json(workers), indent=2, ensure_ascii=False))
        return 0 if all(worker.document is not None for worker in workers) else 1
    from rich.console import Console

    console = Console()
    try:
        trio.run(_live, workers, args, console)
    except KeyboardInterrupt:
        pass  # Ctrl-C: as q
    return 0


def _stdout_is_tty() -> bool:
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):
        return False


def _bounded(kind: type, low: float, high: float, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text) if len(text) <= 20 else None
        except ValueError:
            value = None
        if value is None or not (low <= value <= high):
            raise argparse.ArgumentTypeError(f"expected {what} from {low:g} to {high:g}, got {text[:20]!r}")
        return value

    parse.__name__ = what
    return parse


def register(subparsers: Any) -> None:
    """Add ``top`` to the ``queue-runtime`` parser."""
    parser = subparsers.add_parser(
        "top",
        help="live view of running workers: rates, circuit, sessions needing attention first",
        description=(
            "Show what running workers are doing, refreshed every second, from their /sessions"
            " endpoint (the worker's --metrics-port). Keys: s changes the order, q quits. Without a"
            " terminal (or with --json) print one JSON snapshot and exit (1 if a worker did not answer)."
        ),
        epilog=(
            "Example:\n  queue-runtime top --url http://127.0.0.1:9464 --url http://10.0.0.7:9464\n"
            "  queue-runtime top --url 127.0.0.1:9464 --json | jq '.workers[].sessions.stats'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        action="append",
        required=True,
        metavar="http://HOST:PORT",
        help="a worker's endpoint (repeat for several workers)",
    )
    parser.add_argument(
        "--interval",
        type=_bounded(float, 0.2, 60, "seconds"),
        default=1.0,
        metavar="SECONDS",
        help="refresh period (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=_bounded(float, 0.05, 10, "seconds"),
        default=0.8,
        metavar="SECONDS",
        help="how long one worker may take to answer before it shows as unreachable (default 0.8)",
    )
    parser.add_argument(
        "--limit",
        type=_bounded(int, 1, 1000, "an integer"),
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"sessions asked of each worker, most urgent first (default {DEFAULT_LIMIT})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON snapshot and exit")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.set_defaults(handler=_cmd_top)
