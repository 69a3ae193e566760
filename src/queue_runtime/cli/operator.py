"""Operator commands: ``send``, ``dlq peek|export|replay|summary|purge``, ``stats``, ``config show|validate``.

Every command is configured like the worker (defaults < config file < environment < flags, see
``docs/configuration.md``), opens the provider the configuration names, does one job inside
one ``trio.run`` and closes the provider again. Output meant for people is a rich table;
``--json`` gives scripts the same data. Errors are one line on stderr (exit 2 for usage and
configuration, 1 for operational failures), never a traceback unless ``--debug``.

Guarantees:

* ``dlq peek`` and ``dlq export`` leave the dead-letter queue as it was (they peek).
* ``dlq export`` writes a temporary file next to ``--out`` and renames it into place, so an
  interrupted export (error, Ctrl-C) leaves no partial file behind.
* ``dlq replay`` sends each copy before it removes the dead-lettered original
  (`QueueClient.replay_dead_letters`), so a message is never lost; a failed send leaves the
  message dead-lettered and makes the command exit 1.
* Message bodies are never printed except by ``dlq export`` (into its file).
* Text from a broker or a user is shown literally (never as rich markup), and everything
  printed passes through `queue_runtime.redaction.redact` (configured secrets, credential
  patterns); dead-letter reasons and descriptions are redacted in exports too.
* Every command that talks to the broker has a deadline (``--timeout``): a broker that never
  answers ends the command with one line, exit 1.

Testing hook: the in-memory broker lives inside one process, and each command runs its own
``trio.run``. `use_provider` makes every command in its ``with`` block use one given provider
(not closed by the commands) and, optionally, one trio clock for every run, so a test can
chain ``main([...])`` calls against one in-memory broker on one consistent clock.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..client import QueueClient, ReplayOutcome, ReplayResult
from ..errors import ConfigurationError, QueueError
from ..message import Message, ReceivedMessage
from ..redaction import redact
from .common import CommandError, Parser, add_config_flags, command_logging, load_cli_settings
from .progress import Interrupted, StopRequest, can_watch_signals, watch_interrupts
from .progress import progress as _progress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from ..config import Settings
    from ..providers.base import Provider, QueueStats, Receiver
    from .progress import Meter

__all__ = [
    "EXIT_BROKEN_PIPE",
    "MAX_COUNT",
    "MAX_READ_BYTES",
    "export_record",
    "parse_property",
    "record_body",
    "register",
    "use_provider",
]

T = TypeVar("T")

#: Most copies ``send --count`` sends in one command (the ids are printed as chunks are sent).
MAX_COUNT = 100_000
#: Most bytes read for one body from ``--file`` or stdin; every provider's limit is lower.
MAX_READ_BYTES = 16 * 1024 * 1024
#: ``send --count`` sends in chunks of this many messages (QueueClient re-chunks to the
#: provider's batch limits); bounds memory and lets ids be printed as they are sent.
_SEND_CHUNK = 500
#: ``dlq export`` default ``--max``: large enough for a day's dead letters, bounded because
#: a peek holds every message in memory at once.
EXPORT_DEFAULT_MAX = 10_000
#: Largest ``--max`` of ``dlq peek`` (a table longer than this helps nobody; use export),
#: ``dlq export`` (held in memory at once) and ``dlq replay`` (streamed).
MAX_PEEK = 10_000
MAX_EXPORT = 100_000
MAX_REPLAY = 1_000_000
#: Default ``--timeout`` of the quick commands (stats, peek, purge) and of the long ones
#: (send, export, replay): seconds for the whole command, broker calls and retries included.
QUICK_TIMEOUT = 60.0
LONG_TIMEOUT = 600.0
MAX_TIMEOUT = 86_400.0

# --------------------------------------------------------------------------------------------
# test hook and running


class _Override:
    __slots__ = ("clock", "provider")

    def __init__(self, provider: Provider, clock: trio.abc.Clock | None) -> None:
        self.provider = provider
        self.clock = clock


_override: _Override | None = None


@contextlib.contextmanager
def use_provider(provider: Provider, *, clock: trio.abc.Clock | None = None) -> Iterator[Provider]:
    """Test-only: inside the block, every operator command uses ``provider`` instead of the one
    the configuration names, and never closes it; with ``clock``, every command's
    ``trio.run`` runs on that clock (the in-memory broker keeps its times on trio's clock, so
    chained commands need one clock to agree on lock deadlines and enqueue times).

    Not thread-safe and not reentrant: one block at a time.
    """
    global _override
    if _override is not None:
        raise RuntimeError("use_provider() blocks do not nest")
    _override = _Override(provider, clock)
    try:
        yield provider
    finally:
        _override = None


def _run(
    fn: Callable[[], Awaitable[T]],
    args: argparse.Namespace,
    *,
    timeout: float | None = None,
    stop: StopRequest | None = None,
) -> T:
    """Run ``fn`` in a fresh ``trio.run`` (on the test clock when one is set), within the
    command's deadline (``--timeout``, or ``timeout``): past it, everything is cancelled
    (the provider closes, shielded and bounded) and `CommandError` is raised, exit 1.

    With ``stop`` (in the main thread), Ctrl-C is a request to stop at a safe point, not a
    ``KeyboardInterrupt`` (see `queue_runtime.cli.progress`): ``fn`` raises `Interrupted` at
    such a point, which passes through; a second Ctrl-C cancels ``fn`` and raises
    ``Interrupted(at_once=True)``."""
    seconds = timeout if timeout is not None else getattr(args, "timeout", None)

    async def body() -> T:
        if seconds is None:
            return await fn()
        with trio.move_on_after(seconds) as scope:
            return await fn()
        assert scope.cancelled_caught
        command = getattr(args, "command", "the command")
        raise CommandError(
            f"{command} did not finish within {seconds:g} s (--timeout): the broker did not answer in"
            " time; check the endpoint and the network, or give a longer --timeout",
            1,
        )

    async def main() -> T:
        if stop is None or not can_watch_signals():
            return await body()
        results: list[T] = []
        failure: Exception | KeyboardInterrupt | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_interrupts, stop)
            try:
                with stop.everything:
                    results.append(await body())
            except (Exception, KeyboardInterrupt) as error:  # re-raised below, outside the nursery
                failure = error  # (so it is not wrapped in an exception group)
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if not results:
            raise Interrupted(at_once=True)
        return results[0]

    clock = _override.clock if _override is not None else None
    return trio.run(main, clock=clock)


@contextlib.asynccontextmanager
async def _open_provider(settings: Settings) -> AsyncIterator[Provider]:
    """The configured provider, its secret references read first, closed on exit (the test
    override is used as is, not closed)."""
    if _override is not None:
        yield _override.provider
        return
    from ..providers import open_provider

    async with open_provider(settings) as provider:
        yield provider


def _settings(args: argparse.Namespace, *, need_queue: bool = True) -> tuple[Settings, str]:
    settings: Settings = load_cli_settings(args)
    queue = settings.queue
    if need_queue and queue is None:
        raise CommandError("no queue given: pass --queue NAME or set QUEUE_NAME", 2)
    return settings, queue or ""


# --------------------------------------------------------------------------------------------
# argument types


def _int_type(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        shown = _shown_arg(text)
        try:
            value = int(text.strip()) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {shown}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {shown}")
        return value

    parse.__name__ = "integer"
    return parse


def _seconds(text: str) -> float:
    """``--timeout``: seconds, more than 0 and at most a day."""
    try:
        value = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds > 0 and <= {MAX_TIMEOUT:g}, got {_shown_arg(text)}"
        )
    return value


_seconds.__name__ = "seconds"


def _shown_arg(text: str) -> str:
    """A bad argument for an error line: bounded, non-printables escaped."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _utf8(text: str | None, flag: str) -> str | None:
    """``text`` if it is valid Unicode text; a command-line argument holding bytes that are not
    UTF-8 (Python hands them over as surrogates) is a usage error."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandError(f"{flag} is not valid UTF-8 text", 2) from None
    return text


def parse_property(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` → ``(KEY, VALUE)``; the value may contain ``=`` and be empty."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {_shown_arg(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{_shown_arg(key)}: not valid UTF-8 text") from None
    return key.strip(), value


parse_property.__name__ = "property"


# --------------------------------------------------------------------------------------------
# output helpers


def _console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    # Off a terminal rich would wrap at 80 columns: give tables room, keep colours off.
    return Console(stderr=stderr, soft_wrap=False, width=None if _is_tty(stderr) else 200)


def _is_tty(stderr: bool = True) -> bool:
    stream = sys.stderr if stderr else sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def export_record(dead: ReceivedMessage, *, body: bool = True) -> dict[str, Any]:
    """One dead-lettered message as JSON-able data (what ``dlq export`` writes per line).

    The body is text when it is valid UTF-8 (``"body_encoding": "utf-8"``), else base64
    (``"body_encoding": "base64"``). With ``body=False`` only its size is given
    (``dlq peek --json``).
    """
    message = dead.message
    record: dict[str, Any] = {
        "message_id": message.message_id,
        "session_id": message.session_id,
        "correlation_id": message.correlation_id,
        # Reasons and descriptions are the runtime's (or an older version's) words: redacted,
        # in case a handler's exception text echoed a credential before it was masked.
        "reason": redact(dead.dead_letter_reason) if dead.dead_letter_reason else dead.dead_letter_reason,
        "description": (
            redact(dead.dead_letter_description)
            if dead.dead_letter_description
            else dead.dead_letter_description
        ),
        "delivery_count": dead.delivery_count,
        "enqueued_at": _iso(dead.enqueued_at),
        # As a string: SQS sequence numbers (20 digits) do not survive JSON readers that use
        # doubles (jq, JavaScript).
        "sequence_number": str(dead.sequence_number) if dead.sequence_number is not None else None,
        "content_type": message.content_type,
        "properties": dict(message.properties),
        "body_size": len(message.body),
    }
    if body:
        try:
            record["body"] = message.body.decode("utf-8")
            record["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            record["body"] = base64.b64encode(message.body).decode("ascii")
            record["body_encoding"] = "base64"
    return record


def record_body(record: dict[str, Any]) -> bytes:
    """The body bytes of an `export_record` (the inverse of its body encoding)."""
    text = record["body"]
    if record.get("body_encoding") == "base64":
        return base64.b64decode(text, validate=True)
    return str(text).encode("utf-8")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _count(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def _literal(value: object) -> Text:
    """``value`` as rich text shown exactly as it is: broker and user text is never markup
    (``[/x]``), never an emoji code (``:smile:``), and redacted."""
    from rich.text import Text

    return Text(redact(str(value)))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _epilog(*lines: str) -> str:
    return "Example:\n" + "\n".join(f"  {line}" for line in lines)


def _subparser(subparsers: Any, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


#: Exit code when stdout's reader went away (``... | head``): what a process killed by SIGPIPE
#: reports to the shell.
EXIT_BROKEN_PIPE = 141


def _command(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler so a closed stdout (``queue-runtime dlq peek --json | head``) ends the
    command quietly with `EXIT_BROKEN_PIPE` instead of an error about the pipe."""

    def run(args: argparse.Namespace) -> int:
        try:
            with command_logging(bool(getattr(args, "debug", False))):
                return handler(args)
        except BrokenPipeError:
            # Python would complain again when it flushes stdout at exit: point it at devnull.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE

    run.__doc__ = handler.__doc__
    return run


# --------------------------------------------------------------------------------------------
# send


def _read_body(args: argparse.Namespace) -> bytes:
    if args.body is not None:
        # Bytes on the command line that are not UTF-8 reach Python as surrogates:
        # "surrogateescape" gives back exactly the bytes that were typed.
        return str(args.body).encode("utf-8", "surrogateescape")
    if args.file is not None and args.file != "-":
        path = Path(args.file)
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_READ_BYTES + 1)
        except OSError as error:
            raise CommandError(f"cannot read --file {str(path)!r}: {error.strerror or error}", 2) from None
    else:
        stdin = sys.stdin
        if stdin is None or (args.file is None and _stdin_is_tty(stdin)):
            raise CommandError("no message body: give --body TEXT, --file PATH, or pipe it on stdin", 2)
        buffer = getattr(stdin, "buffer", None)
        data = buffer.read(MAX_READ_BYTES + 1) if buffer is not None else stdin.read().encode("utf-8")
    if len(data) > MAX_READ_BYTES:
        raise CommandError(f"the message body is over {MAX_READ_BYTES} bytes", 2)
    return bytes(data)


def _stdin_is_tty(stdin: Any) -> bool:
    try:
        return bool(stdin.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _cmd_send(args: argparse.Namespace) -> int:
    settings, queue = _settings(args)
    properties: dict[str, str] = {}
    for key, value in args.property:
        if key in properties:
            raise CommandError(f"--property {key!r} is given more than once", 2)
        properties[key] = value
    body = _read_body(args)
    # Build (and so validate) every message before anything is sent.
    template = Message(
        body=body,
        session_id=args.session_id,
        correlation_id=_utf8(args.correlation_id, "--correlation-id"),
        properties=properties,
        content_type=_utf8(args.content_type, "--content-type"),
    )

    def copies(count: int) -> list[Message]:
        return [
            Message(
                body=body,
                session_id=template.session_id,
                correlation_id=template.correlation_id,
                properties=dict(properties),
                content_type=template.content_type,
            )
            for _ in range(count)
        ]

    stop = StopRequest()
    sent_count = 0
    meter: Meter | None = None

    def sent(chunk: Sequence[Message]) -> None:
        # Printed as each provider batch is sent, and only then: the ids on stdout are exactly
        # the messages sent, also when the command is interrupted or a later batch fails.
        nonlocal sent_count
        print("\n".join(message.message_id for message in chunk), flush=True)
        sent_count += len(chunk)
        if meter is not None:
            meter.advance(len(chunk))
        stop.check()  # Ctrl-C: stop here, between two sent batches

    async def send() -> None:
        async with _open_provider(settings) as provider:
            client = QueueClient(provider)
            remaining = args.count
            first = True
            while remaining:
                chunk = [template] if first else []
                chunk += copies(min(remaining, _SEND_CHUNK) - len(chunk))
                first = False
                await client.send_batch(queue, chunk, on_sent=sent)
                remaining -= len(chunk)

    try:
        with (
            _progress(f"sending to {queue}", args.count) if args.count > 1 else contextlib.nullcontext()
        ) as meter:
            _run(send, args, stop=stop)
    except Interrupted as interrupted:
        at_once = (
            "; stopped at once: the batch being sent then may or may not have gone"
            if interrupted.at_once
            else ""
        )
        print(
            f"queue-runtime: interrupted: sent {sent_count} of {args.count} messages (their ids are"
            f" printed){at_once}",
            file=sys.stderr,
        )
        return 130
    if settings.provider == "memory" and _override is None:
        print(
            "queue-runtime: note: the memory provider keeps messages inside this process only;"
            " leave QUEUE_PROVIDER unset (sqlite, a file shared by the processes of this host) or set it"
            " to aws or azure to send to a broker",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------
# dlq peek / export / replay / purge


def _cmd_dlq_peek(args: argparse.Namespace) -> int:
    settings, queue = _settings(args)

    async def peek() -> list[ReceivedMessage]:
        async with _open_provider(settings) as provider:
            return await QueueClient(provider).peek_dead_letters(queue, args.max)

    messages = _run(peek, args)
    if args.json:
        _print_json([export_record(dead, body=False) for dead in messages])
        return 0
    if not messages:
        print(f"no dead-lettered messages in {queue!r}")
        return 0
    from rich.table import Table

    table = Table(title=_literal(f"dead letters of {queue!r} (oldest first, {len(messages)} shown)"))
    for column in ("message id", "session id", "reason", "description", "deliveries", "enqueued"):
        table.add_column(column, overflow="fold")
    for dead in messages:
        table.add_row(
            _literal(dead.message_id),
            _literal(dead.session_id or ""),
            _literal(dead.dead_letter_reason or ""),
            _literal(dead.dead_letter_description or ""),
            str(dead.delivery_count),
            _iso(dead.enqueued_at) or "",
        )
    _console().print(table)
    return 0


def _export_target(out: Path) -> tuple[Path, bool]:
    """Where ``dlq export`` writes, and whether in place: a regular file (or a new one) is
    replaced atomically, through a symlink its target (the link stays); anything else that
    exists (a FIFO, a character device such as ``/dev/stdout``) is written in place, never
    replaced. A directory or a dangling symlink is refused (exit 2)."""
    try:
        info = os.stat(out)  # follows symlinks
    except FileNotFoundError:
        if out.is_symlink():
            raise CommandError(
                f"--out {str(out)!r} is a symlink to {os.readlink(out)!r}, which does not exist", 2
            ) from None
        info = None
    except OSError as error:
        raise CommandError(f"--out {str(out)!r}: {error.strerror or error}", 2) from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise CommandError(f"--out {str(out)!r} is a directory: give a file name", 2)
    if info is not None and not stat.S_ISREG(info.st_mode):
        return out, True
    target = Path(os.path.realpath(out)) if out.is_symlink() else out
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise CommandError(f"--out {str(out)!r}: the directory {str(parent)!r} does not exist", 2)
    return target, False


def _cmd_dlq_export(args: argparse.Namespace) -> int:
    settings, queue = _settings(args)
    out = Path(args.out)
    target, in_place = _export_target(out)

    stop = StopRequest()

    async def peek() -> list[ReceivedMessage]:
        async with _open_provider(settings) as provider:
            with stop.cancellable():  # a peek changes nothing: Ctrl-C cancels it at once
                return await QueueClient(provider).peek_dead_letters(queue, args.max)
        raise Interrupted

    try:
        with _progress(f"reading dead letters of {queue}", None) as reading:
            messages = _run(peek, args, stop=stop)
            reading.advance(len(messages))
        with _progress(f"exporting to {out.name}", len(messages)) as writing:
            if in_place:
                _write_in_place(out, messages, writing.advance)
            else:
                _write_atomically(target, messages, writing.advance)
    except (Interrupted, KeyboardInterrupt):
        kept = "" if in_place else f"; {str(out)!r} is untouched"
        print(f"queue-runtime: interrupted: nothing exported{kept}", file=sys.stderr)
        return 130
    more = " (the --max limit: there may be more)" if len(messages) >= args.max else ""
    # Written into a stream (/dev/stdout, a pipe): the summary goes to stderr, not into the data.
    print(
        f"exported {len(messages)} dead-lettered messages of {queue!r} to {str(out)!r}{more}",
        file=sys.stderr if in_place else sys.stdout,
    )
    return 0


def _export_lines(messages: Sequence[ReceivedMessage], advance: Callable[[int], None]) -> Iterator[bytes]:
    for index, dead in enumerate(messages):
        line = json.dumps(export_record(dead), ensure_ascii=False, separators=(",", ":"))
        yield line.encode("utf-8") + b"\n"
        if index % 100 == 99 or index == len(messages) - 1:
            advance(index % 100 + 1)


def _write_in_place(out: Path, messages: Sequence[ReceivedMessage], advance: Callable[[int], None]) -> None:
    """Write the export into an existing special file (FIFO, character device) as it is."""
    try:
        with open(out, "wb") as handle:
            for line in _export_lines(messages, advance):
                handle.write(line)
    except OSError as error:
        raise CommandError(f"cannot write {str(out)!r}: {error.strerror or error}", 1) from None


def _write_atomically(out: Path, messages: Sequence[ReceivedMessage], advance: Callable[[int], None]) -> None:
    """Write one JSON line per message to a temporary file beside ``out``, then rename it into
    place; on any failure (Ctrl-C included) the temporary file is removed and ``out`` is
    untouched. The file is created readable by its owner only: it holds message bodies."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=parent)
    except OSError as error:
        raise CommandError(f"cannot write to {str(parent)!r}: {error.strerror or error}", 1) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            for line in _export_lines(messages, advance):
                handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, out)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError):
            raise CommandError(f"cannot write {str(out)!r}: {error.strerror or error}", 1) from None
        raise


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    settings, queue = _settings(args)
    failed_ids: list[str] = []
    outcomes = {"replayed": 0, "failed": 0, "skipped": 0}
    stop = StopRequest()

    async def replay(meter: Meter) -> Any:
        async with _open_provider(settings) as provider:
            client = QueueClient(provider)

            def on_message(dead: ReceivedMessage, outcome: ReplayOutcome) -> None:
                # Called once the message's outcome is final (sent and removed, or left): the
                # safe point where Ctrl-C stops the pass (the client hands the held ones back).
                outcomes[outcome] += 1
                if outcome == "failed":
                    failed_ids.append(dead.message_id)
                if args.dry_run and outcome == "replayed":
                    print(
                        f"would replay {dead.message_id} session={dead.session_id or '-'}"
                        f" reason={dead.dead_letter_reason or '-'}",
                        flush=True,
                    )
                if outcome != "skipped":
                    meter.advance(1)
                stop.check()

            return await client.replay_dead_letters(
                queue,
                max_messages=args.max,
                session_id=args.session_id,
                dry_run=args.dry_run,
                on_message=on_message,
            )

    total = _dead_letter_depth(settings, queue, args) if _is_tty() else None
    verb = "checking" if args.dry_run else "replaying"
    interrupted: Interrupted | None = None
    try:
        with _progress(f"{verb} dead letters of {queue}", total) as meter:
            result = _run(lambda: replay(meter), args, stop=stop)
    except Interrupted as stopped:
        interrupted = stopped
        result = ReplayResult(**outcomes)
    for message_id in failed_ids:
        print(f"failed {message_id} (it stays dead-lettered)")
    label = "would replay" if args.dry_run else "replayed"
    print(f"{label} {result.replayed}, failed {result.failed}, skipped {result.skipped}")
    if interrupted is not None:
        at_once = (
            "; stopped at once: the message being replayed then may have been sent and also stay"
            " dead-lettered (a duplicate, never a loss)"
            if interrupted.at_once
            else ""
        )
        done = "nothing changed" if args.dry_run else "each sent and removed from the dead-letter queue"
        print(
            f"queue-runtime: interrupted: {label} {result.replayed} ({done}); the rest stay"
            f" dead-lettered{at_once}",
            file=sys.stderr,
        )
        return 130
    if result.failed:
        raise CommandError(
            f"{result.failed} dead-lettered message(s) of {queue!r} could not be sent back and stay"
            " dead-lettered; fix the cause and run dlq replay again",
            1,
        )
    return 0


def _dead_letter_depth(settings: Settings, queue: str, args: argparse.Namespace) -> int | None:
    """The DLQ depth for the progress bar's total, where the provider knows it cheaply."""
    limit: int | None = getattr(args, "max", None)

    async def depth() -> int | None:
        async with _open_provider(settings) as provider:
            return (await provider.queue_stats(queue)).dead_letter

    try:
        known = _run(depth, args, timeout=min(10.0, args.timeout))
    except (QueueError, CommandError):
        return None  # only for the bar: the replay itself reports real problems
    if known is None:
        return None
    return min(known, limit) if limit is not None else known


def _cmd_dlq_summary(args: argparse.Namespace) -> int:
    from .dlq_summary import GROUPINGS, summarize

    settings, queue = _settings(args)
    stop = StopRequest()

    async def peek() -> list[ReceivedMessage]:
        async with _open_provider(settings) as provider:
            with stop.cancellable():  # a peek changes nothing: Ctrl-C cancels it at once
                return await QueueClient(provider).peek_dead_letters(queue, args.max)
        raise Interrupted

    try:
        with _progress(f"reading dead letters of {queue}", None) as reading:
            messages = _run(peek, args, stop=stop)
            reading.advance(len(messages))
    except Interrupted:
        print("queue-runtime: interrupted: nothing summarized", file=sys.stderr)
        return 130
    summary = summarize(queue, messages, limit=args.max)
    if args.json:
        _print_json(summary)
        return 0
    if not messages:
        print(f"no dead-lettered messages in {queue!r}")
        return 0
    from rich.table import Table

    console = _console()
    more = "" if summary["complete"] else f", the first {len(messages)} (--max): there may be more"
    console.print(_literal(f"{len(messages)} dead letters of {queue!r}{more} (times in UTC)"))
    for name, title, _ in GROUPINGS:
        table = Table(title=_literal(f"by {title}"), title_justify="left")
        table.add_column(title, overflow="fold")
        table.add_column("count", justify="right")
        table.add_column("share", justify="right")
        table.add_column("first enqueued", overflow="fold")
        table.add_column("last enqueued", overflow="fold")
        if name != "by_reason":
            table.add_column("reasons", overflow="fold")
        for row in summary[name]:
            cells: list[Text | str] = [
                _literal(row["key"] if row["key"] is not None else "(none)"),
                str(row["count"]),
                f"{row['count'] / len(messages):.0%}",
                _short_time(row["first_enqueued"]),
                _short_time(row["last_enqueued"]),
            ]
            if name != "by_reason":
                cells.append(_literal(", ".join(f"{k or '(none)'} {v}" for k, v in row["reasons"].items())))
            table.add_row(*cells)
        console.print(table)
    return 0


def _short_time(iso: str | None) -> str:
    """``2026-12-03 07:48:45`` (UTC) from an ISO timestamp, for tables."""
    if not iso:
        return ""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _cmd_dlq_purge(args: argparse.Namespace) -> int:
    if not args.yes:
        raise CommandError("dlq purge deletes every dead-lettered message for good: add --yes to confirm", 2)
    settings, queue = _settings(args)
    stop = StopRequest()

    async def purge(meter: Meter) -> None:
        # The dead-letter queue's messages are received and completed one by one (what
        # `Provider.purge_dead_letters` does by default), so the count moves and Ctrl-C stops
        # between two messages; the rest of a received batch is handed back at once.
        async with _open_provider(settings) as provider:
            provider.validate_queue_name(queue)
            batch_size = provider.capabilities.max_batch_count
            async with await provider.open_receiver(queue, dead_letter=True) as receiver:
                while batch := await receiver.receive(batch_size, 0.0):
                    for index, message in enumerate(batch):
                        if stop.requested:
                            with trio.CancelScope(shield=True):
                                await _abandon_quietly(receiver, batch[index:])
                            stop.check()
                        await receiver.complete(message)
                        meter.advance(1)

    total = _dead_letter_depth(settings, queue, args) if _is_tty() else None
    try:
        with _progress(f"purging dead letters of {queue}", total) as meter:
            _run(lambda: purge(meter), args, stop=stop)
    except Interrupted as interrupted:
        at_once = (
            "; stopped at once: the message being removed then may or may not be gone"
            if interrupted.at_once
            else ""
        )
        print(f"purged {meter.count} dead-lettered messages of {queue!r}")
        print(f"queue-runtime: interrupted: the rest stay dead-lettered{at_once}", file=sys.stderr)
        return 130
    print(f"purged {meter.count} dead-lettered messages of {queue!r}")
    return 0


async def _abandon_quietly(receiver: Receiver, messages: Sequence[ReceivedMessage]) -> None:
    """Hand ``messages`` back at once; one whose lock is gone comes back by itself."""
    for message in messages:
        with contextlib.suppress(QueueError):
            await receiver.abandon(message)


def _needs_subcommand(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise CommandError(f"choose a subcommand (see: {parser.prog} --help)", 2)

    return handler


# --------------------------------------------------------------------------------------------
# stats


def stats_record(stats: QueueStats) -> dict[str, Any]:
    """`QueueStats` as the JSON ``stats --json`` prints (None where the provider cannot tell)."""
    return {
        "queue": stats.queue,
        "depth": stats.active,
        "in_flight": stats.in_flight,
        "scheduled": stats.scheduled,
        "dead_letter": stats.dead_letter,
        "oldest_message_age_seconds": stats.oldest_message_age,
    }


def _cmd_stats(args: argparse.Namespace) -> int:
    settings, queue = _settings(args)

    async def stats() -> QueueStats:
        async with _open_provider(settings) as provider:
            provider.validate_queue_name(queue)
            return await provider.queue_stats(queue)

    result = _run(stats, args)
    if args.json:
        _print_json(stats_record(result))
        return 0
    from rich.table import Table

    table = Table(title=_literal(f"queue {result.queue!r} ({settings.provider})"), show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("depth (waiting)", _count(result.active))
    table.add_row("in flight (locked)", _count(result.in_flight))
    table.add_row("scheduled", _count(result.scheduled))
    table.add_row("dead-letter depth", _count(result.dead_letter))
    table.add_row("oldest message age", _age(result.oldest_message_age))
    _console().print(table)
    return 0


# --------------------------------------------------------------------------------------------
# config show / validate


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _source_label(source: str) -> str:
    # The loader calls keyword arguments "argument": on the command line those are flags.
    return "flag" if source == "argument" else source


def config_rows(settings: Settings) -> list[tuple[str, Any, str]]:
    """``(dotted key, value, source)`` for every setting; secrets as ``"**********"``."""
    values = _flatten(settings.redacted())
    sources = settings.sources
    return [(key, values.get(key), _source_label(sources[key])) for key in sorted(sources)]


def _cmd_config_show(args: argparse.Namespace) -> int:
    settings, _ = _settings(args, need_queue=False)
    rows = config_rows(settings)
    if args.json:
        _print_json({key: {"value": value, "source": source} for key, value, source in rows})
        return 0
    from rich.table import Table

    table = Table(title="effective configuration (secrets masked)")
    table.add_column("key", overflow="fold")
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for key, value, source in rows:
        shown = "(not set)" if value is None else value if isinstance(value, str) else json.dumps(value)
        table.add_row(_literal(key), _literal(shown), _literal(source))
    _console().print(table)
    return 0


def standard_queue_note(settings: Settings) -> str | None:
    """The note `config validate` prints (and the worker logs at start-up) for an SQS queue
    that is not FIFO: a worker handles it as a queue without sessions."""
    queue = settings.queue
    if settings.provider != "aws" or queue is None or queue.rstrip("/").endswith(".fifo"):
        return None
    return (
        f"queue {queue!r} is a standard SQS queue: it has no sessions, so the worker handles its"
        " messages concurrently, in no order (use a .fifo queue for per-session order)"
    )


def config_problems(args: argparse.Namespace) -> tuple[Settings | None, list[str]]:
    """Everything that stops this configuration from running a worker, one line each."""
    try:
        settings: Settings = load_cli_settings(args)
    except ConfigurationError as error:
        return None, [error.message]
    problems: list[str] = []
    if settings.queue is None:
        problems.append("queue is not set: pass --queue, set QUEUE_NAME, or set 'queue' in the config file")
    else:
        try:
            settings.supervisor_config()
        except ConfigurationError as error:
            problems.append(error.message)
    if _override is None:
        problems.extend(_provider_problems(settings))
    return settings, problems


# Stand-ins for secret references when checking that a provider can be built from the
# configuration (the references are read only when a command talks to the broker).
_PLACEHOLDERS = {
    "azure.connection_string": "Endpoint=sb://reference.invalid/;SharedAccessKeyName=r;SharedAccessKey=r",
    "aws.secret_access_key": "reference",
    "aws.session_token": "reference",
}


def _reference_problems(settings: Settings) -> list[str]:
    """Missing extras for the secret references in ``settings``."""
    import importlib.util

    needs = {"keyvault": ("azure.keyvault.secrets", "azure"), "secretsmanager": ("aiobotocore", "aws")}
    problems: list[str] = []
    for key, secret in settings.secret_settings().items():
        if not secret.is_reference:
            continue
        scheme = secret.get_secret_value().partition("://")[0].lower()
        module, extra = needs[scheme]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            problems.append(
                f"{key} is a {scheme}:// reference, which needs the {extra} extra:"
                f" pip install 'queue-runtime[{extra}]'"
            )
    return problems


def _provider_problems(settings: Settings) -> list[str]:
    from ..providers import create_provider

    problems = _reference_problems(settings)
    placeholders = {
        key: _PLACEHOLDERS[key] for key, secret in settings.secret_settings().items() if secret.is_reference
    }
    try:
        provider = create_provider(settings.with_secrets(placeholders) if placeholders else settings)
    except ConfigurationError as error:
        return [*problems, error.message]
    if problems:
        return problems
    # Built, never connected: closing releases whatever the constructor set up.
    with contextlib.suppress(QueueError):
        trio.run(provider.aclose)
    if settings.provider == "aws" and settings.aws.region is None:
        region = _botocore_region(settings.aws.profile)
        if isinstance(region, str) and region.startswith("!"):
            return [region[1:]]
        if region is None:
            return ["aws.region is not set: set AWS_REGION or aws.region in the config file"]
    return []


def _botocore_region(profile: str | None) -> str | None:
    """The region of the profile in the shared AWS config file, read locally (no instance
    metadata lookup), or ``!problem`` for a missing profile."""
    try:
        import botocore.exceptions
        import botocore.session
    except ImportError:
        return "unknown"  # create_provider has already reported the missing extra
    try:
        scoped = botocore.session.Session(profile=profile).get_scoped_config()
    except botocore.exceptions.ProfileNotFound:
        return f"!AWS profile {profile!r} is not found in the shared AWS config files"
    except Exception:
        return "unknown"  # let the worker's own start-up report it
    region = scoped.get("region")
    return str(region) if region else None


def _cmd_config_validate(args: argparse.Namespace) -> int:
    settings, problems = config_problems(args)
    if problems:
        for problem in problems:
            print(f"queue-runtime: problem: {redact(' '.join(problem.split()))}", file=sys.stderr)
        return 1
    assert settings is not None
    note = standard_queue_note(settings)
    if note is not None:
        print(f"queue-runtime: note: {note}", file=sys.stderr)
    print(f"configuration is valid: provider {settings.provider!r}, queue {settings.queue!r}")
    return 0


# --------------------------------------------------------------------------------------------
# registration


def register(subparsers: Any) -> None:
    """Add ``send``, ``dlq``, ``stats`` and ``config`` to the ``queue-runtime`` parser."""
    _register_send(subparsers)
    _register_dlq(subparsers)
    _register_stats(subparsers)
    _register_config(subparsers)


def _add_timeout(parser: argparse.ArgumentParser, command: str, default: float) -> None:
    """``--timeout SECONDS``: the deadline of the whole command (see `_run`)."""
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=default,
        metavar="SECONDS",
        help=f"give up after this long, broker calls and retries included (default {default:g})",
    )
    parser.set_defaults(command=command)


def _register_send(subparsers: Any) -> None:
    send = _subparser(
        subparsers,
        "send",
        "send a message (or --count copies) and print each message id",
        _epilog(
            "queue-runtime send --queue orders --session-id order-1 \\",
            '    --body \'{"order_id": "order-1", "kind": "created"}\' --content-type application/json',
            "echo -n hello | queue-runtime send -q orders --session-id s1 --property tenant=acme",
        ),
    )
    add_config_flags(send)
    send.add_argument(
        "--session-id", "-s", help="session id (SQS: message group id); required on session queues"
    )
    body = send.add_mutually_exclusive_group()
    body.add_argument("--body", "-b", help="the body as text (UTF-8)")
    body.add_argument("--file", "-f", metavar="PATH", help="read the body from a file ('-' = stdin)")
    send.add_argument(
        "--property",
        "-p",
        type=parse_property,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an application property (repeatable)",
    )
    send.add_argument("--correlation-id", help="correlation id")
    send.add_argument("--content-type", help="content type, e.g. application/json")
    send.add_argument(
        "--count",
        "-n",
        type=_int_type(1, MAX_COUNT),
        default=1,
        help=f"send N copies, each with its own message id (1-{MAX_COUNT})",
    )
    _add_timeout(send, "send", LONG_TIMEOUT)
    send.set_defaults(handler=_command(_cmd_send))


def _register_dlq(subparsers: Any) -> None:
    dlq = _subparser(
        subparsers,
        "dlq",
        "inspect, export, replay or purge a queue's dead-letter queue",
        _epilog(
            "queue-runtime dlq peek --queue orders",
            "queue-runtime dlq export --queue orders --out orders-dlq.jsonl",
            "queue-runtime dlq replay --queue orders --dry-run",
        ),
    )
    dlq.set_defaults(handler=_needs_subcommand(dlq))
    commands = dlq.add_subparsers(title="dlq commands", metavar="COMMAND", parser_class=Parser)

    peek = _subparser(
        commands,
        "peek",
        "show dead-lettered messages (oldest first) without removing them",
        _epilog(
            "queue-runtime dlq peek --queue orders --max 50", "queue-runtime dlq peek -q orders --json | jq ."
        ),
    )
    add_config_flags(peek)
    peek.add_argument(
        "--max",
        type=_int_type(1, MAX_PEEK),
        default=32,
        help=f"show at most N messages (default 32, at most {MAX_PEEK})",
    )
    peek.add_argument("--json", action="store_true", help="a JSON array for scripts (no bodies)")
    _add_timeout(peek, "dlq peek", QUICK_TIMEOUT)
    peek.set_defaults(handler=_command(_cmd_dlq_peek))

    export = _subparser(
        commands,
        "export",
        "write dead-lettered messages to a JSON-lines file, leaving the dead-letter queue intact",
        _epilog("queue-runtime dlq export --queue orders --out orders-dlq-$(date +%F).jsonl"),
    )
    add_config_flags(export)
    export.add_argument("--out", "-o", required=True, metavar="FILE.jsonl", help="the file to write")
    export.add_argument(
        "--max",
        type=_int_type(1, MAX_EXPORT),
        default=EXPORT_DEFAULT_MAX,
        help=f"export at most N messages (default {EXPORT_DEFAULT_MAX}, at most {MAX_EXPORT})",
    )
    _add_timeout(export, "dlq export", LONG_TIMEOUT)
    export.set_defaults(handler=_command(_cmd_dlq_export))

    replay = _subparser(
        commands,
        "replay",
        "send dead-lettered messages back to their queue, then remove them from the dead-letter queue",
        _epilog(
            "queue-runtime dlq replay --queue orders --dry-run",
            "queue-runtime dlq replay --queue orders --session-id order-42",
            "queue-runtime dlq replay --queue orders --max 100",
        ),
    )
    add_config_flags(replay)
    replay.add_argument(
        "--max",
        type=_int_type(1, MAX_REPLAY),
        default=None,
        help=f"replay at most N messages (at most {MAX_REPLAY})",
    )
    replay.add_argument("--session-id", "-s", help="replay only this session's messages")
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    _add_timeout(replay, "dlq replay", LONG_TIMEOUT)
    replay.set_defaults(handler=_command(_cmd_dlq_replay))

    summary = _subparser(
        commands,
        "summary",
        "count dead letters by reason, error type and session prefix, with first and last enqueue times",
        _epilog(
            "queue-runtime dlq summary --queue orders", "queue-runtime dlq summary -q orders --json | jq ."
        ),
    )
    add_config_flags(summary)
    summary.add_argument(
        "--max",
        type=_int_type(1, MAX_EXPORT),
        default=EXPORT_DEFAULT_MAX,
        help=f"look at most at N messages, oldest first (default {EXPORT_DEFAULT_MAX}, at most {MAX_EXPORT})",
    )
    summary.add_argument("--json", action="store_true", help="JSON for scripts")
    _add_timeout(summary, "dlq summary", LONG_TIMEOUT)
    summary.set_defaults(handler=_command(_cmd_dlq_summary))

    purge = _subparser(
        commands,
        "purge",
        "delete every dead-lettered message of a queue for good (needs --yes)",
        _epilog("queue-runtime dlq purge --queue orders --yes"),
    )
    add_config_flags(purge)
    purge.add_argument("--yes", action="store_true", help="confirm: the messages cannot be recovered")
    _add_timeout(purge, "dlq purge", QUICK_TIMEOUT)
    purge.set_defaults(handler=_command(_cmd_dlq_purge))


def _register_stats(subparsers: Any) -> None:
    stats = _subparser(
        subparsers,
        "stats",
        "show a queue's depth, in-flight, scheduled and dead-letter counts and oldest message age",
        _epilog("queue-runtime stats --queue orders", "queue-runtime stats -q orders --json"),
    )
    add_config_flags(stats)
    stats.add_argument("--json", action="store_true", help="JSON for scripts (null where unknown)")
    _add_timeout(stats, "stats", QUICK_TIMEOUT)
    stats.set_defaults(handler=_command(_cmd_stats))


def _register_config(subparsers: Any) -> None:
    config = _subparser(
        subparsers,
        "config",
        "show or validate the effective configuration",
        _epilog("queue-runtime config show", "queue-runtime config validate --config config.toml"),
    )
    config.set_defaults(handler=_needs_subcommand(config))
    commands = config.add_subparsers(title="config commands", metavar="COMMAND", parser_class=Parser)

    show = _subparser(
        commands,
        "show",
        "print every effective setting and where it came from (default, file, env, flag); secrets masked",
        _epilog(
            "QUEUE_PROVIDER=aws queue-runtime config show --queue orders.fifo",
            "queue-runtime config show --json",
        ),
    )
    add_config_flags(show)
    show.add_argument("--json", action="store_true", help="JSON: {key: {value, source}}")
    show.set_defaults(handler=_command(_cmd_config_show))

    validate = _subparser(
        commands,
        "validate",
        "check that the configuration loads and is complete for a worker (exit 0), else list the"
        " problems (exit 1)",
        _epilog("queue-runtime config validate --config config.toml --queue orders"),
    )
    add_config_flags(validate)
    validate.set_defaults(handler=_command(_cmd_config_validate))
