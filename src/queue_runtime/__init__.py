"""queue-runtime: ordered per-session message processing on trio.

A supervisor accepts sessions (Azure Service Bus sessions, SQS FIFO message groups, or the
in-memory broker's sessions) and runs one `SessionActor` per active session::

    import msgspec
    from queue_runtime import SessionActor, MessageContext, DeadLetter, run

    class OrderEvent(msgspec.Struct):
        order_id: str
        kind: str
        amount: int = 0

    class OrderActor(SessionActor[OrderEvent]):
        async def on_start(self) -> None:
            self.total = 0

        async def handle(self, event: OrderEvent, ctx: MessageContext) -> None:
            if event.amount < 0:
                raise DeadLetter("NegativeAmount", "amount must be >= 0")
            self.total += event.amount

    if __name__ == "__main__":
        run(OrderActor, queue="orders")

Where a message goes: `providers` (broker adapters) → `supervisor` (accepts sessions) →
`session` (one actor's ordered loop: decode with `codec`, ``handle()``, retry with `retry`,
settle) → back to the provider. `client` sends and manages dead letters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .actor import DeadLetter, MessageContext, SessionActor, SessionHandle
from .config import SupervisorConfig
from .errors import QueueError
from .message import Message, ReceivedMessage
from .retry import RetryPolicy
from .supervisor import Supervisor, SupervisorStats

if TYPE_CHECKING:
    from .client import QueueClient, ReplayResult, open_client
    from .entrypoint import run

__all__ = [
    "DeadLetter",
    "Message",
    "MessageContext",
    "QueueClient",
    "QueueError",
    "ReceivedMessage",
    "ReplayResult",
    "RetryPolicy",
    "SessionActor",
    "SessionHandle",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorStats",
    "open_client",
    "run",
]

__version__ = "0.1.0"

# Imported on first use: they pull in configuration loading and provider factories.
_LAZY = {
    "QueueClient": "client",
    "ReplayResult": "client",
    "open_client": "client",
    "run": "entrypoint",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'queue_runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value
