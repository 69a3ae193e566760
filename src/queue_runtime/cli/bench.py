"""``queue-runtime bench``: run the benchmarks (the ``benchmarks`` package of a source checkout).

Same entry point as ``just bench`` / ``python -m benchmarks``, with size flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from .common import CommandError

__all__ = ["register"]

SIZES = ("tiny", "quick", "full")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="run the benchmarks (in-memory throughput, memory, latency, telemetry, scaling, SQS)",
        description=(
            "Run the benchmarks from a source checkout: print each table, write"
            " benchmarks/results/*.json and the tables of docs/benchmarks.md."
        ),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", choices=SIZES, default="full", help="problem sizes (default: full)")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    size.add_argument(
        "--quick", dest="size", action="store_const", const="quick", help="same as --size quick"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.set_defaults(handler=_bench)


def _find_checkout() -> None:
    """Make ``benchmarks`` importable: the current directory or this source tree's root (a
    console script's ``sys.path`` holds neither)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / "benchmarks" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return


def _bench(args: argparse.Namespace) -> int:
    _find_checkout()
    try:
        package = importlib.import_module("benchmarks")
        entry = importlib.import_module("benchmarks.__main__")
    except ModuleNotFoundError as error:
        raise CommandError(
            "the benchmarks package is not importable: run this from a source checkout of queue-runtime",
            exit_code=2,
        ) from error
    names = tuple(args.only or package.BENCHMARKS)
    unknown = [name for name in names if name not in package.BENCHMARKS]
    if unknown:
        raise CommandError(
            f"unknown benchmark {unknown[0]!r}: choose from {', '.join(package.BENCHMARKS)}", exit_code=2
        )
    from benchmarks._common import RESULTS_DIR

    return int(entry.run_all(args.size, names, RESULTS_DIR, docs=not args.no_docs))
