"""Order processing: every event of one order, in order, with the running total as state.

Run a worker (the SQLite broker in ./queue-runtime.db by default, shared with the other commands
of this host; set QUEUE_PROVIDER=aws or azure for a cloud one)::

    queue-runtime worker examples.orders:OrderActor --queue orders

Send events from Python with `queue_runtime.open_client`, or with the CLI::

    queue-runtime send --queue orders --session-id order-1 --body '{"order_id": "order-1", "kind": "created"}'
"""

from __future__ import annotations

import logging

import msgspec

from queue_runtime import DeadLetter, MessageContext, SessionActor, run

log = logging.getLogger(__name__)


class OrderEvent(msgspec.Struct):
    order_id: str
    kind: str  # "created" | "item_added" | "paid" | "shipped" | "cancelled"
    amount: int = 0


#: Which event kinds may follow which: an order's events only make sense in order.
NEXT = {
    None: {"created"},
    "created": {"item_added", "cancelled"},
    "item_added": {"item_added", "paid", "cancelled"},
    "paid": {"shipped"},
    "shipped": set(),
    "cancelled": set(),
}


class OrderActor(SessionActor[OrderEvent]):
    """One actor per order (session id = order id)."""

    async def on_start(self) -> None:
        self.total = 0
        self.status: str | None = None
        self.history: list[str] = []

    async def handle(self, event: OrderEvent, ctx: MessageContext) -> None:
        if event.order_id != ctx.session_id:
            raise DeadLetter("WrongSession", f"event for {event.order_id!r} in session {ctx.session_id!r}")
        if event.amount < 0:
            raise DeadLetter("NegativeAmount", "amount must be >= 0")
        if event.kind not in NEXT.get(self.status, set()):
            raise DeadLetter("InvalidTransition", f"{self.status} -> {event.kind}")
        self.total += event.amount
        self.status = event.kind
        self.history.append(event.kind)

    async def on_stop(self, reason: str) -> None:
        log.info("order %s: %s, total %d (%s)", self.session_id, self.status, self.total, reason)


if __name__ == "__main__":
    run(OrderActor, queue="orders")
