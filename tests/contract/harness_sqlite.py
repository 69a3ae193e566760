"""Contract harness for `SqliteProvider` (runs on MockClock: the broker takes trio's clock).

Each harness instance gets its own database file in a fresh temporary directory, removed at
teardown. With ``clock=trio.current_time`` the provider runs its transactions on the trio
thread (see the provider's "Time" notes); the threaded path on the wall clock is covered by
``tests/test_sqlite.py`` and the multi-process test.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import trio

from queue_runtime.providers.sqlite import SqliteProvider

_names = itertools.count(1)


class SqliteHarness:
    name: ClassVar[str] = "sqlite"
    real_time: ClassVar[bool] = False
    skip_reason: ClassVar[str | None] = None

    lock_duration: float = 30.0
    max_delivery_count: int = 3

    def __init__(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="qr-contract-sqlite-"))
        self.provider = SqliteProvider(
            self._directory / "contract.db",
            lock_duration=60.0,
            max_delivery_count=10,
            clock=trio.current_time,
        )

    async def setup(self) -> None:
        pass

    async def teardown(self) -> None:
        try:
            await self.provider.aclose()
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)

    async def make_queue(self, *, requires_session: bool = True) -> str:
        # Not the provider's defaults, on purpose: the suite must use the queue's own settings.
        name = f"contract-{next(_names)}"
        await self.provider.create_queue(
            name,
            requires_session=requires_session,
            lock_duration=self.lock_duration,
            max_delivery_count=self.max_delivery_count,
        )
        return name


HARNESS = SqliteHarness
