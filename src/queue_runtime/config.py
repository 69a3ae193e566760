"""Configuration: the supervisor's knobs and the layered settings loader.

`SupervisorConfig` holds what the runtime needs; each default is chosen for a production
worker and its reason is stated beside it.
"""

from __future__ import annotations

import math

import msgspec

from .errors import ConfigurationError
from .retry import RetryPolicy

__all__ = ["RetryPolicy", "SupervisorConfig"]


def _check_number(
    name: str, value: object, *, minimum: float, integer: bool = False, allow_equal: bool = True
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value) or value < minimum or (not allow_equal and value == minimum):
        op = ">=" if allow_equal else ">"
        raise ConfigurationError(f"{name} must be {op} {minimum}, got {value!r}")


class SupervisorConfig(msgspec.Struct, kw_only=True):
    """What one `Supervisor` does and its bounds.

    * ``max_concurrent_sessions`` = 64: actors alive at once. Each idle actor holds a session
      (and on Service Bus its lock), so this bounds what one worker can starve others of;
      64 keeps a 2-core worker busy on I/O-bound handlers without hoarding sessions.
    * ``per_session_concurrency`` = 1: strict order. Above 1, up to N ``handle()`` calls of
      one session run at once and ordering within the session is relaxed.
    * ``session_idle_timeout`` = 5 s: an actor with no message for this long stops and frees
      its slot (and the lock) so another worker may take the session. Short, because an idle
      actor blocks a slot; long enough to ride out a producer's small gaps.
    * ``prefetch`` = 10: messages of a session received ahead of the one being handled (one
      SQS batch). Prefetched messages are handed back at shutdown, and brokers count that as
      a delivery, so keep it small.
    * ``max_lock_renewal`` = 300 s: how long a single message's lock is renewed while its
      ``handle()`` runs (the SDKs' default). A handler stuck longer loses the lock.
    * ``retry``: in-place retries of ``handle()`` (see `RetryPolicy`).
    * ``max_delivery_count`` = None: use the queue's own broker-side limit. When set, a message
      delivered more often is dead-lettered before ``handle()`` is called.
    * ``shutdown_grace`` = 30 s: how long running ``handle()`` calls may finish after a stop
      request (Kubernetes' default termination grace is 30 s).
    * ``receive_timeout`` = 20 s: the long-poll wait when accepting a session
      (``QUEUE_RECEIVE_TIMEOUT_SECONDS``); SQS caps a long poll at 20 s.
    """

    queue: str
    max_concurrent_sessions: int = 64
    per_session_concurrency: int = 1
    session_idle_timeout: float = 5.0
    prefetch: int = 10
    max_lock_renewal: float = 300.0
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    max_delivery_count: int | None = None
    shutdown_grace: float = 30.0
    receive_timeout: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not self.queue:
            raise ConfigurationError(f"queue must be a non-empty string, got {self.queue!r}")
        _check_number("max_concurrent_sessions", self.max_concurrent_sessions, minimum=1, integer=True)
        _check_number("per_session_concurrency", self.per_session_concurrency, minimum=1, integer=True)
        _check_number("session_idle_timeout", self.session_idle_timeout, minimum=0, allow_equal=False)
        _check_number("prefetch", self.prefetch, minimum=0, integer=True)
        _check_number("max_lock_renewal", self.max_lock_renewal, minimum=0)
        _check_number("shutdown_grace", self.shutdown_grace, minimum=0)
        _check_number("receive_timeout", self.receive_timeout, minimum=0)
        if self.max_delivery_count is not None:
            _check_number("max_delivery_count", self.max_delivery_count, minimum=1, integer=True)
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {type(self.retry).__name__}")
