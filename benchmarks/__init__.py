"""Benchmarks for queue-runtime: the runtime against hand-written loops and physical limits.

Run them all with ``just bench`` (``python -m benchmarks``) or ``queue-runtime bench``. Each
benchmark module has ``NAME``, ``TITLE`` and ``run(size, results_dir) -> dict``: it prints a
table and writes ``<results_dir>/<NAME>.json``. ``size`` is ``"tiny"`` (seconds: what
``tests/test_benchmarks.py`` runs so the benchmarks never rot), ``"quick"`` or ``"full"``
(the figures in ``docs/benchmarks.md``). Benchmarks are not tests: nothing here asserts a
timing.
"""

from __future__ import annotations

__all__ = ["BENCHMARKS"]

#: Benchmark modules in the order ``python -m benchmarks`` runs them.
BENCHMARKS = ("throughput", "memory", "latency", "telemetry_cost", "scaling", "sqs", "sqlite", "concurrency")
