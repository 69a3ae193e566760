"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from queue_runtime.redaction import forget_secrets


@pytest.fixture(autouse=True)
def _forget_registered_secrets() -> Iterator[None]:
    """Every `Secret` registers its value for redaction, process-wide: forget them after each
    test, so one test's fake secrets never mask another test's output."""
    yield
    forget_secrets()
