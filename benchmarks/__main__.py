"""``python -m benchmarks [--size tiny|quick|full] [--only NAME ...] [--no-docs]``.

Runs the benchmarks in order, prints each table, writes ``benchmarks/results/<name>.json``
and (unless ``--no-docs``) regenerates the result tables of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import BENCHMARKS
from ._common import RESULTS_DIR, SIZES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full", help="problem sizes (default: full)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help="run only these")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_all(args.size, args.only or BENCHMARKS, args.results, docs=not args.no_docs)


def run_all(size: str, names: Sequence[str], results: Path, *, docs: bool = True) -> int:
    """Run ``names`` at ``size``; returns 0, or 1 if any benchmark failed."""
    failed = []
    for name in names:
        module = importlib.import_module(f".{name}", __package__)
        print(f"\n== {name}: {module.TITLE} (size {size})", flush=True)
        started = time.perf_counter()
        try:
            module.run(size, results)
        except Exception as error:  # one failing benchmark must not hide the others' figures
            print(f"!! {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            failed.append(name)
        print(f"== {name} done in {time.perf_counter() - started:.1f} s", flush=True)
    if docs:
        from .report import write_report

        print(f"\nwrote {write_report(results)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
