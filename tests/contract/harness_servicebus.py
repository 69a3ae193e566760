"""Contract harness for `ServiceBusProvider` against the SDK-shaped fake (real time).

The fake runs on the provider's private asyncio loop thread, exactly where the real SDK would,
so every call crosses the trio <-> asyncio bridge; the suite therefore runs on the real clock.

``lock_duration`` is 6 s, not 2 s: on Service Bus a session lock runs out while a receive
waits unless it is renewed (the broker then fails the receive with a lost session lock), and
the suite holds sessions across 5 s empty-receive waits without renewing. Service Bus's own
minimum lock duration is 5 s, so 6 s is also a setting a real queue can have.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fakes package

from fakes.servicebus import FakeAdministrationClient, FakeNamespace
from queue_runtime.providers.servicebus import ServiceBusProvider

_names = itertools.count(1)


class ServiceBusHarness:
    name: ClassVar[str] = "servicebus"
    real_time: ClassVar[bool] = True
    skip_reason: ClassVar[str | None] = None

    lock_duration: float = 6.0
    max_delivery_count: int = 3

    def __init__(self) -> None:
        self.namespace = FakeNamespace()
        self.provider = ServiceBusProvider(
            client_factory=self.namespace.client,
            admin_client_factory=lambda: FakeAdministrationClient(self.namespace),
            operation_timeout=10.0,
            cancel_grace=2.0,
        )

    async def setup(self) -> None:
        pass

    async def teardown(self) -> None:
        await self.provider.aclose()

    async def make_queue(self, *, requires_session: bool = True) -> str:
        name = f"contract-sb-{next(_names)}"
        self.namespace.create_queue(
            name,
            requires_session=requires_session,
            lock_duration=self.lock_duration,
            max_delivery_count=self.max_delivery_count,
        )
        return name


HARNESS = ServiceBusHarness
