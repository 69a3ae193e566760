"""Shared pieces of the command line: the parser, configuration flags, error reporting."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Any, NoReturn

from ..errors import ConfigurationError, QueueError, ValidationError

__all__ = [
    "CommandError",
    "ParserError",
    "add_config_flags",
    "build_parser",
    "load_cli_settings",
    "report_error",
]

#: Subcommand modules, each with ``register(subparsers)``. Missing ones are skipped, so the
#: command keeps working while a subcommand is being written.
COMMAND_MODULES = ("worker", "demo", "operator", "bench")


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
        raise ParserError(f"{message} (see: {self.prog} --help)")


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
        "--provider", choices=["memory", "aws", "azure"], help="broker (default: QUEUE_PROVIDER or memory)"
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
    """Print ``error`` as one line (a traceback too with ``--debug``); return the exit code."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    if code is None:
        if isinstance(error, (ConfigurationError, ValidationError)):
            code = 2
        elif isinstance(error, QueueError):
            code = 1
        else:
            code = 1
            error = RuntimeError(f"unexpected {type(error).__name__}: {error} (run with --debug for details)")
    text = " ".join(str(error).split()) or type(error).__name__
    from ..telemetry import redact

    print(f"queue-runtime: error: {redact(text)}", file=sys.stderr)
    return code
