"""The lock renewer: one task for every lock of a supervisor. These tests drive it directly."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import trio

from queue_runtime.counters import Counters
from queue_runtime.session import COMPACT_MIN, LockRenewer


class Holder:
    """A lock holder as the renewer sees one (a session, or a message on a non-session queue)."""

    def __init__(self, lock: float) -> None:
        self.renew_generation = 0
        self.renewals = 0
        self.lock = lock
        self.locked_until: float | None = trio.current_time() + lock
        self.busy_since: float | None = None
        self.lost: list[BaseException] = []

    async def renew(self) -> float:
        self.renewals += 1
        self.locked_until = trio.current_time() + self.lock
        return self.locked_until

    def lock_lost(self, error: BaseException) -> None:
        self.lost.append(error)


async def test_ended_holders_are_not_kept_alive_until_their_entries_come_due(autojump_clock: Any) -> None:
    """Sessions that ended (untracked) leave stale heap entries a lock duration long; the
    renewer drops them as the heap grows, so thousands of ended sessions are not kept alive,
    while the live ones stay renewed."""
    renewer = LockRenewer(max_lock_renewal=300.0, counters=Counters())
    live = [Holder(lock=60.0) for _ in range(50)]
    for holder in live:
        renewer.track(holder)
    ended = []
    for _ in range(20 * COMPACT_MIN):
        holder = Holder(lock=60.0)
        renewer.track(holder)
        renewer.untrack(holder)
        ended.append(weakref.ref(holder))
        del holder
    gc.collect()
    alive = sum(ref() is not None for ref in ended)
    assert alive <= 2 * COMPACT_MIN, f"{alive} of {len(ended)} ended holders still referenced"
    async with trio.open_nursery() as nursery:
        await nursery.start(renewer.run)
        await trio.sleep(150)  # past two lock durations: only renewals keep the live ones
        nursery.cancel_scope.cancel()
    assert all(holder.renewals >= 2 and not holder.lost for holder in live)
