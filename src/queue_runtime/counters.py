"""What a supervisor's sessions count as they run (read by `Supervisor.stats`).

It lives below both `queue_runtime.session` (which adds to it) and `queue_runtime.supervisor`
(which owns and reads it), so neither imports the other for it.
"""

from __future__ import annotations

__all__ = ["Counters"]


class Counters:
    """Mutable counters shared by the supervisor's sessions (one trio thread: no locks)."""

    __slots__ = (
        "abandoned",
        "completed",
        "dead_lettered",
        "failed_attempts",
        "lock_lost",
        "lock_renewals",
        "received",
        "retries",
        "sessions_started",
    )

    def __init__(self) -> None:
        self.sessions_started = 0
        self.received = 0
        self.completed = 0
        self.dead_lettered = 0
        self.failed_attempts = 0
        self.retries = 0
        self.abandoned = 0
        self.lock_renewals = 0
        self.lock_lost = 0
