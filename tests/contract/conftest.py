"""The provider contract suite: one set of tests every provider must pass unchanged.

Adding a provider (README)
==========================

Drop a module ``tests/contract/harness_<name>.py`` into this folder; it is found by globbing,
so no other file changes. It defines ``HARNESS``, a class (instantiated with no arguments,
once per test) with:

* ``name: ClassVar[str]`` — the test-id part (``"memory"``, ``"sqs"``, ``"servicebus"``).
* ``real_time: ClassVar[bool]`` — False: the test runs on ``MockClock(autojump_threshold=0)``
  (in-process brokers); True: on the real clock (networked brokers).
* ``skip_reason: ClassVar[str | None]`` (optional, default None) — set it (e.g. when a
  server or credentials are missing) to skip every test of this harness with that reason.
* ``skip_behaviours: ClassVar[Mapping[str, str]]`` (optional, default empty) — behaviour
  name (the test name without ``test_contract_``) → reason, for a behaviour the broker
  cannot have at all (e.g. SQS has no per-message time to live). Use sparingly: optional
  features are otherwise gated on `Capabilities`.
* ``lock_duration: float`` and ``max_delivery_count: int`` — what queues from ``make_queue``
  are set up with (lock/visibility timeout in seconds; broker-side delivery limit). Keep
  ``lock_duration`` small for real-time harnesses: the suite's waits derive from it.
* ``async def setup(self) -> None`` / ``async def teardown(self) -> None`` — start and stop
  whatever the provider needs (a server, a connection). ``teardown`` runs even if the test
  failed, and also when ``setup`` raised.
* ``provider: Provider`` — usable between ``setup`` and ``teardown``.
* ``async def make_queue(self, *, requires_session: bool = True) -> str`` — a fresh, empty
  queue with a unique name (and its dead-letter queue), set up with ``lock_duration`` and
  ``max_delivery_count``.

A harness module that fails to import (say its SDK is missing) is reported as a skipped
harness with the import error as the reason, never as a collection error.

Fixtures: ``harness_name`` (parametrised over the harnesses, sync), ``contract_clock`` (sync:
the MockClock for non-real-time harnesses, else None — pytest-trio picks the clock only from a
test's direct arguments, so every contract test takes it), ``harness`` (async: set up, yielded,
torn down) and ``harness_class``. Tests marked ``model`` (hypothesis, many short runs) run only
for non-real-time harnesses; each example builds its own harness in its own ``trio.run``.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio.testing

HERE = Path(__file__).parent


def _broken_harness(name: str, reason: str) -> type:
    class Broken:
        skip_reason: ClassVar[str | None] = reason
        real_time: ClassVar[bool] = True

    Broken.name = name  # type: ignore[attr-defined]
    return Broken


def _load_harnesses() -> dict[str, type]:
    found: dict[str, type] = {}
    for path in sorted(HERE.glob("harness_*.py")):
        stem = path.stem
        module_name = f"_contract_{stem}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            harness = module.HARNESS
            name = str(harness.name)
        except Exception as error:  # a missing SDK must not break the other harnesses
            name = stem.removeprefix("harness_")
            last = traceback.format_exception_only(error)[-1].strip()
            harness = _broken_harness(name, f"{path.name} failed to import: {last}")
        found[name] = harness
    return found


HARNESSES: dict[str, type] = _load_harnesses()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "model: hypothesis model-based contract tests; only for non-real-time harnesses"
    )


def skip_behaviours(harness_cls: type) -> Mapping[str, str]:
    value: Mapping[str, str] = getattr(harness_cls, "skip_behaviours", {}) or {}
    return value


@pytest.fixture(params=sorted(HARNESSES))
def harness_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    harness_cls = HARNESSES[name]
    reason = getattr(harness_cls, "skip_reason", None)
    if reason:
        pytest.skip(f"{name} harness: {reason}")
    test_name = request.node.originalname or request.node.name
    behaviour = test_name.removeprefix("test_contract_")
    if behaviour in skip_behaviours(harness_cls):
        pytest.skip(f"{name} harness: {skip_behaviours(harness_cls)[behaviour]}")
    if request.node.get_closest_marker("model") is not None and harness_cls.real_time:
        pytest.skip(f"{name} harness runs in real time; model-based tests need MockClock")
    return name


@pytest.fixture
def harness_class(harness_name: str) -> type:
    return HARNESSES[harness_name]


@pytest.fixture
def contract_clock(harness_name: str) -> trio.testing.MockClock | None:
    if HARNESSES[harness_name].real_time:
        return None
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
async def harness(harness_name: str, contract_clock: trio.testing.MockClock | None) -> AsyncIterator[Any]:
    instance = HARNESSES[harness_name]()
    try:
        await instance.setup()
        yield instance
    finally:
        await instance.teardown()
