"""Shared pieces of the command line: the parser, configuration flags, error reporting."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO

from ..errors import ConfigurationError, QueueError, ValidationError
from ..redaction import redact

__all__ = [
    "CommandError",
    "ParserError",
    "RedactingStream",
    "add_config_flags",
    "build_parser",
    "command_logging",
    "load_cli_settings",
    "redacted_output",
    "report_error",
]

#: Subcommand modules, each with ``register(subparsers)``. Missing ones are skipped, so the
#: command keeps working while a subcommand is being written.
COMMAND_MODULES = ("worker", "demo", "operator", "top", "bench")


class ParserError(Exception):
    """A usage error found by argparse (exit 2)."""


class CommandError(Exception):
    """A failure a command reports as one line, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised, so ``main`` decides the exit code)."""

    def error(self, message: str) -> NoReturn:
        raise ParserError(f"{visible(message)} (see: {self.prog} --help)")


def visible(text: str) -> str:
    """``text`` with control and other unprintable characters as escapes (``\\n``,
    ``\\x1b``, ``\\udcff``): argparse quotes arguments as given, and an error line must
    stay one line that shows them literally."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="queue-runtime",
        description="Ordered per-session message processing on trio: workers and operator tools.",
        epilog="Example: queue-runtime worker examples.orders:OrderActor --queue orders",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as error:
            if error.name == f"{__package__}.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, *, queue_required: bool = False) -> None:
    """``--config``, ``--provider``, ``--queue``: the flags every command shares."""
    parser.add_argument("--config", metavar="FILE", help="config.toml / config.yaml (default: ./config.*)")
    parser.add_argument(
        "--provider",
        choices=["sqlite", "memory", "aws", "azure"],
        help="broker (default: QUEUE_PROVIDER, else sqlite at ./queue-runtime.db)",
    )
    parser.add_argument("--queue", "-q", required=queue_required, help="queue name (default: QUEUE_NAME)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def load_cli_settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """Settings from defaults < file < env < these flags (flags not given do not override)."""
    from ..config import load_settings

    return load_settings(
        getattr(args, "config", None),
        provider=getattr(args, "provider", None),
        queue=getattr(args, "queue", None),
        **overrides,
    )


def report_error(error: BaseException, *, debug: bool, code: int | None) -> int:
    """Print ``error`` as one line (a traceback too with ``--debug``); return the exit code.

    Both go through `queue_runtime.redaction.redact`: configured secret values and credential
    patterns are masked in the traceback's messages and source lines too."""
    if debug:
        sys.stderr.write(redact("".join(traceback.format_exception(error))))
    if code is None:
        if isinstance(error, (ConfigurationError, ValidationError)):
            code = 2
        elif isinstance(error, QueueError):
            code = 1
        else:
            code = 1
            error = RuntimeError(f"unexpected {type(error).__name__}: {error} (run with --debug for details)")
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"queue-runtime: error: {redact(text)}", file=sys.stderr)
    return code


class RedactingStream:
    """A text stream that passes everything written through `redact` on its way to
    ``stream`` (every other attribute is the wrapped stream's). The command line wraps stdout
    and stderr in it, so nothing it prints (tables, JSON, error lines, tracebacks) can show a
    configured secret, whatever code path produced the text."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        shown = redact(text) if isinstance(text, str) else text
        if isinstance(shown, str) and not shown.isascii():
            try:
                shown.encode("utf-8")
            except UnicodeEncodeError:
                # Arguments that were not UTF-8 reach Python as lone surrogates: show them as
                # escapes (\udcff) rather than fail to print the line that names them.
                shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
        self._stream.write(shown)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """Inside the block, ``sys.stdout`` and ``sys.stderr`` are `RedactingStream` wrappers."""
    stdout, stderr = sys.stdout, sys.stderr
    if stdout is not None and not isinstance(stdout, RedactingStream):
        sys.stdout = RedactingStream(stdout)
    if stderr is not None and not isinstance(stderr, RedactingStream):
        sys.stderr = RedactingStream(stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr


@contextlib.contextmanager
def command_logging(debug: bool) -> Iterator[None]:
    """Logging for an operator command. A command reports a failure as one error line, so the
    library's own log records (a failed send is logged too) are not printed: without a handler
    Python's last-resort handler would print WARNING ones raw, before that line. With
    ``--debug`` they are printed, at DEBUG, formatted and redacted like a worker's."""
    from ..telemetry import _NOISY, configure_logging

    root = logging.getLogger()
    names = ["queue_runtime", *_NOISY]
    saved = root.level, {name: logging.getLogger(name).level for name in names}
    handler: logging.Handler = configure_logging("debug", "text") if debug else logging.NullHandler()
    if not debug:
        root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
