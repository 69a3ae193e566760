"""The error taxonomy every provider maps its SDK's exceptions into.

Every error carries ``transient``: ``True`` when retrying the same call later may succeed
(network faults, throttling, timeouts), ``False`` when it cannot (bad credentials, a missing
queue, invalid input). The runtime's retry loop and circuit breaker decide on that flag alone,
so a provider must never leak an SDK exception past its boundary.

Messages are one line, name the problem and never contain secrets or message bodies.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ConfigurationError",
    "ConnectionFailed",
    "InvalidReceipt",
    "MessageLockLost",
    "MessageTooLarge",
    "NotSupported",
    "QueueError",
    "QueueFull",
    "QueueNotFound",
    "SessionLockLost",
    "Throttled",
    "Timeout",
    "ValidationError",
]


class QueueError(Exception):
    """Base of every error raised by queue-runtime.

    ``transient`` tells whether the same operation may succeed if retried later.
    """

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def error_type(self) -> str:
        """A stable, low-cardinality name for metrics labels (``queue_errors_total``)."""
        return type(self).__name__


class ConfigurationError(QueueError):
    """Invalid or missing configuration. Permanent: fix the configuration and restart."""


class ValidationError(QueueError, ValueError):
    """An argument (queue name, session id, message id, property...) breaks a limit."""


class MessageTooLarge(ValidationError):
    """The encoded message exceeds the provider's size limit. Raised before any I/O."""

    def __init__(self, size: int, limit: int, *, what: str = "message") -> None:
        super().__init__(f"{what} is {size} bytes, over the provider limit of {limit} bytes")
        self.size = size
        self.limit = limit


class QueueNotFound(QueueError):
    """The queue (or its dead-letter queue) does not exist."""


class AuthenticationFailed(QueueError):
    """Credentials were rejected or lack a permission."""


class NotSupported(QueueError):
    """The provider cannot do this (for example session state on SQS)."""


class QueueFull(QueueError):
    """The broker refuses more messages (quota or, in memory, the configured bound)."""

    transient = True


class ConnectionFailed(QueueError):
    """The broker could not be reached. Transient."""

    transient = True


class Throttled(QueueError):
    """The broker asked us to slow down. Transient; ``retry_after`` is a hint in seconds."""

    transient = True

    def __init__(
        self, message: str, *, retry_after: float | None = None, transient: bool | None = None
    ) -> None:
        super().__init__(message, transient=transient)
        self.retry_after = retry_after


class Timeout(QueueError):
    """An operation did not finish in time. Transient."""

    transient = True


class InvalidReceipt(QueueError):
    """A settlement used a receipt (lock token, receipt handle) that is no longer valid:
    the message was already settled, or its lock expired and it was redelivered."""


class SessionLockLost(QueueError):
    """The session lock expired or was taken by another receiver. Nothing in the session
    may be settled by the old holder any more."""


class MessageLockLost(QueueError):
    """The lock on one message expired; it will be (or was) redelivered."""
