"""``queue-runtime worker MODULE:ActorClass``: serve one actor class on one queue.

Configuration is layered as everywhere (defaults < config file < environment < flags); a flag
that is not given overrides nothing. The current directory is put first on ``sys.path`` (as
uvicorn does), so ``examples.orders:OrderActor`` imports from a project root.

Exit codes: 0 after a clean drain (SIGTERM/SIGINT); 128 + the signal's number when a second
signal stops at once, settling nothing (130 for SIGINT, 143 for SIGTERM); 2 for usage errors (a
bad ``MODULE:Class``, a module that does not import, a class that is not a `SessionActor`, an
unknown provider, bad values); 1 for permanent provider errors at start-up (queue missing,
credentials refused). Every error is one line on stderr, a traceback only with ``--debug``.

Telemetry: with the ``otel`` extra, the standard ``OTEL_*`` variables choose where spans and
metrics are exported over OTLP (`queue_runtime.exporting`); ``--metrics-port`` serves
``/metrics`` either way.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from typing import Any, Final

from ..errors import ConfigurationError, QueueError
from .common import CommandError, add_config_flags, load_cli_settings

__all__ = ["load_actor", "register"]

log = logging.getLogger("queue_runtime.worker")

_IDENTIFIER: Final = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_RE: Final = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*$")
_ATTRIBUTE_RE: Final = _MODULE_RE


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="serve a SessionActor class on a queue",
        description=(
            "Accept sessions from a queue and run one actor per active session until SIGTERM or "
            "SIGINT (graceful drain, exit 0; a second signal stops at once, exit 130 for SIGINT or "
            "143 for SIGTERM). Flags override the environment, which overrides the config file."
        ),
        epilog="Example: queue-runtime worker examples.orders:OrderActor --queue orders --metrics-port 9464",
    )
    parser.add_argument("target", metavar="MODULE:ActorClass", help="e.g. examples.orders:OrderActor")
    add_config_flags(parser)
    parser.add_argument(
        "--max-sessions",
        type=_integer(),
        metavar="N",
        help="actors (sessions) alive at once (default 64)",
    )
    parser.add_argument(
        "--per-session-concurrency",
        type=_integer(),
        metavar="N",
        help="handle() calls of one session at once; above 1 relaxes ordering (default 1)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_number(),
        metavar="SECONDS",
        help="release a session after this long without a message (default 5)",
    )
    parser.add_argument(
        "--prefetch",
        type=_integer(),
        metavar="N",
        help="messages of a session received ahead (default 10)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=_number(),
        metavar="SECONDS",
        help="how long running handle() calls may finish after SIGTERM (default 30)",
    )
    parser.add_argument(
        "--max-attempts",
        type=_integer(),
        metavar="N",
        help="handle() calls per message including the first, then dead-letter (default 3)",
    )
    parser.add_argument(
        "--max-delivery-count",
        type=_integer(),
        metavar="N",
        help="dead-letter a message delivered more often than this (default: the queue's own limit)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_integer(),
        metavar="N",
        help="serve /metrics, /healthz, /readyz on this port (0 = a free one; default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address for --metrics-port (default QUEUE_METRICS_HOST, else 127.0.0.1: this host only;"
        " 0.0.0.0 for every interface, e.g. in a container)",
    )
    parser.add_argument("--log-format", choices=["json", "text"], help="log line format (default text)")
    parser.add_argument(
        "--log-level",
        type=_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)",
    )
    parser.set_defaults(handler=run_worker)


def _level(text: str) -> str:
    upper = text.strip().upper()
    return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(upper, upper)


def _integer() -> Any:
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}") from None

    parse.__name__ = "integer"
    return parse


def _number() -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text[:40]!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text[:40]!r}")
        return value

    parse.__name__ = "number"
    return parse


def load_actor(target: str) -> type[Any]:
    """Import ``MODULE:ActorClass`` and return the class.

    Raises `CommandError` (exit 2) with one line naming the problem: a malformed target, a
    module that does not import (and why), a missing attribute, or something that is not a
    `SessionActor` subclass implementing ``handle()``.
    """
    from ..actor import SessionActor

    module_name, sep, attribute = target.partition(":")
    if not sep or not _MODULE_RE.match(module_name) or not _ATTRIBUTE_RE.match(attribute):
        raise CommandError(
            f"actor must be MODULE:ActorClass (e.g. examples.orders:OrderActor), got {target[:80]!r}",
            2,
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        # Like uvicorn: a module of the project the worker is started from imports.
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            why = f"No module named {error.name!r}"
            raise CommandError(f"cannot import module {module_name!r}: {why}", 2) from error
        raise CommandError(f"cannot import module {module_name!r}: {_one_line(error)}", 2) from error
    except (Exception, SystemExit) as error:
        # SystemExit too: a module that calls sys.exit() on import is a bad target (exit 2),
        # not a reason to leave with whatever code it chose.
        raise CommandError(f"cannot import module {module_name!r}: {_one_line(error)}", 2) from error
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise CommandError(f"module {module_name!r} has no attribute {attribute!r}", 2) from None
    if not (isinstance(value, type) and issubclass(value, SessionActor)):
        what = "a class" if isinstance(value, type) else _a(type(value).__name__)
        raise CommandError(f"{target} is {what}, not a SessionActor subclass", 2)
    if value.handle is SessionActor.handle:
        raise CommandError(f"{target} does not implement handle()", 2)
    return value


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a str"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_worker(args: argparse.Namespace) -> int:
    """The ``worker`` command: returns 0 after a clean drain, 128 + the signal's number (130 or
    143) when a second signal stopped it at once."""
    import trio

    from ..entrypoint import StoppedAtOnce, serve_worker
    from ..exporting import export_telemetry
    from ..telemetry import configure_logging

    overrides: dict[str, Any] = {
        "max_concurrent_sessions": args.max_sessions,
        "per_session_concurrency": args.per_session_concurrency,
        "session_idle_timeout": args.idle_timeout,
        "prefetch": args.prefetch,
        "shutdown_grace": args.shutdown_grace,
        "max_delivery_count": args.max_delivery_count,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "worker.retry.max_attempts": args.max_attempts,
        "telemetry.metrics_port": args.metrics_port,
        "telemetry.metrics_host": args.metrics_host,
    }
    # Settings first: they register the configured secrets, so that any error line from here
    # on (an actor module failing on import included) is redacted with them.
    settings = load_cli_settings(args, **overrides)
    actor = load_actor(args.target)
    if settings.queue is None:
        raise CommandError(
            "queue is not set: pass --queue NAME, set QUEUE_NAME, or set 'queue' in the config file", 2
        )
    settings.supervisor_config()  # a missing queue or a bad value: exit 2 before anything starts
    configure_logging(settings.log_level, settings.log_format)

    async def main() -> Any:
        # serve_worker builds the provider (an unknown provider or a missing extra is a
        # ConfigurationError: exit 2), resolving secret references first, and closes it.
        return await serve_worker(actor, settings)

    stopped: StoppedAtOnce | None = None
    # The OTEL_* exporters (a bad variable: exit 2 before anything starts); flushed on the way
    # out, for at most exporting.SHUTDOWN_TIMEOUT seconds.
    with export_telemetry(prometheus=settings.telemetry.metrics_port is not None):
        try:
            stats = trio.run(main)
        except StoppedAtOnce as stop:
            stopped, stats = stop, stop.stats
        except ConfigurationError:
            raise  # exit 2, one line (main reports it)
        except QueueError as error:
            raise CommandError(f"{type(error).__name__}: {error}", 1) from error
    log.log(
        logging.INFO if stopped is None else logging.WARNING,
        "exiting: %d completed, %d dead-lettered, %d handed back%s",
        stats.completed,
        stats.dead_lettered,
        stats.abandoned,
        "" if stopped is None else f"; {stopped}",
        extra={"queue_name": settings.queue, "operation": "shutdown"},
    )
    return 0 if stopped is None else stopped.exit_code
