"""The ``queue-runtime`` command.

Each subcommand lives in its own module with a ``register(subparsers)`` function; this module
assembles them and turns errors into one line on stderr:

* exit 2: usage errors (bad flags, bad values, bad configuration, a bad ``MODULE:Class``);
* exit 1: operational failures (the broker refused, a queue is missing, a send failed);
* no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .common import CommandError, ParserError, build_parser, redacted_output, report_error

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by the console script).

    Everything written to stdout and stderr meanwhile passes through
    `queue_runtime.redaction.redact` (see `common.RedactingStream`)."""
    with redacted_output():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    try:
        args = parser.parse_args(args_list)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            return 2
        code = handler(args)
        return int(code or 0)
    except ParserError as error:
        return report_error(error, debug=debug, code=2)
    except CommandError as error:
        return report_error(error, debug=debug, code=error.exit_code)
    except KeyboardInterrupt:
        print("queue-runtime: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        return report_error(error, debug=debug, code=None)


def _entry() -> None:  # pragma: no cover - console script shim
    raise SystemExit(main())
