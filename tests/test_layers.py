"""The runtime's modules import downward only: shared state (counters, tallies) lives below
the modules that use it, so the session loop never imports the supervisor that runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "queue_runtime"

#: module -> the modules above it that it must not import (not even for type checking).
ABOVE = {
    "counters": {"session", "supervisor", "telemetry", "entrypoint"},
    "tally": {"session", "supervisor", "entrypoint"},
    "telemetry": {"session", "supervisor", "entrypoint"},
    "session": {"supervisor", "entrypoint"},
    "supervisor": {"entrypoint"},
}


def _imported(module: str) -> set[str]:
    tree = ast.parse((SRC / f"{module}.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 1:
                names.add(node.module.split(".")[0])
            elif node.module.startswith("queue_runtime."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("queue_runtime."))
    return names


@pytest.mark.parametrize("module", sorted(ABOVE))
def test_a_module_does_not_import_the_modules_above_it(module: str) -> None:
    assert not (_imported(module) & ABOVE[module]), f"{module} imports {_imported(module) & ABOVE[module]}"
