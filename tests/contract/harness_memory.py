"""Contract harness for `InMemoryProvider` (runs on MockClock)."""

from __future__ import annotations

import itertools
from typing import ClassVar

from queue_runtime.providers.memory import InMemoryProvider

_names = itertools.count(1)


class MemoryHarness:
    name: ClassVar[str] = "memory"
    real_time: ClassVar[bool] = False
    skip_reason: ClassVar[str | None] = None

    lock_duration: float = 30.0
    max_delivery_count: int = 3

    def __init__(self) -> None:
        self.provider = InMemoryProvider(lock_duration=60.0, max_delivery_count=10)

    async def setup(self) -> None:
        pass

    async def teardown(self) -> None:
        await self.provider.aclose()

    async def make_queue(self, *, requires_session: bool = True) -> str:
        # Queues differ from the provider's defaults on purpose: the suite must use the
        # queue's own settings, as created here.
        name = f"contract-{next(_names)}"
        self.provider.create_queue(
            name,
            requires_session=requires_session,
            lock_duration=self.lock_duration,
            max_delivery_count=self.max_delivery_count,
        )
        return name


HARNESS = MemoryHarness
