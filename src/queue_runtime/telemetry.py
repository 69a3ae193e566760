"""Metrics, spans and log fields (interface stub; the observability work fills it in).

The runtime and the client call only the methods of `Telemetry`; each call must be cheap
when no OpenTelemetry SDK is installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .message import Message, ReceivedMessage

__all__ = ["Telemetry", "logger"]

logger = logging.getLogger("queue_runtime")


class Telemetry:
    """The instruments, spans and log helpers of one queue on one provider system."""

    def __init__(self, queue: str, system: str) -> None:
        self.queue = queue
        self.system = system

    # -- metrics ---------------------------------------------------------------------------
    def messages_sent(self, count: int, *, status: str, seconds: float) -> None:
        """``queue_messages_sent_total{queue,status}`` += count; send duration recorded."""

    def messages_received(self, messages: list[ReceivedMessage], *, seconds: float) -> None:
        """``queue_messages_received_total`` += len; ``queue_receive_duration_seconds``."""

    def message_completed(self, message: ReceivedMessage, *, seconds: float) -> None:
        """``queue_messages_completed_total`` += 1; ``queue_complete_duration_seconds``."""

    def message_abandoned(self, message: ReceivedMessage) -> None:
        """``queue_messages_abandoned_total`` += 1."""

    def message_dead_lettered(self, message: ReceivedMessage, reason: str, description: str | None) -> None:
        """``queue_messages_dead_lettered_total`` += 1 and an ERROR log (reason, no body)."""

    def retry_attempt(self, message: ReceivedMessage, attempt: int, error: BaseException) -> None:
        """``queue_retry_attempts_total`` += 1 (attempts after the first) and a WARN log."""

    def error(self, error: BaseException, *, operation: str) -> None:
        """``queue_errors_total{error_type}`` += 1 and a log at the level the guide says."""

    def session_accepted(self, session_id: str | None) -> None:
        """``queue_sessions_accepted_total`` += 1."""

    def session_ended(self, session_id: str | None, *, seconds: float, reason: str) -> None:
        """``queue_sessions_completed_total`` (idle/shutdown) or ``_abandoned_total``
        (lock_lost/error) += 1; ``queue_session_duration_seconds`` recorded."""

    def observe_gauges(self, *, active_sessions: Callable[[], int], breaker_state: Callable[[], int]) -> None:
        """Register the callbacks behind the active-sessions and circuit-breaker gauges."""

    # -- traces ----------------------------------------------------------------------------
    def inject(self, properties: Mapping[str, str]) -> dict[str, str]:
        """``properties`` plus the current W3C trace context (``traceparent``...)."""
        return dict(properties)

    @contextlib.contextmanager
    def send_span(self, messages: list[Message]) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def process_span(self, message: ReceivedMessage, attempt: int) -> Iterator[None]:
        """Consumer span around one ``handle()`` call; continues the producer's trace."""
        yield

    @contextlib.contextmanager
    def settle_span(self, operation: str, message: ReceivedMessage) -> Iterator[None]:
        """Span for ``complete`` / ``abandon`` / ``dead_letter``."""
        yield

    @contextlib.contextmanager
    def session_span(self, session_id: str | None) -> Iterator[None]:
        yield

    # -- logs ------------------------------------------------------------------------------
    def log(
        self,
        level: int,
        text: str,
        *,
        operation: str,
        message: ReceivedMessage | Message | None = None,
        session_id: str | None = None,
        **fields: Any,
    ) -> None:
        """Log ``text`` with the guide's fields as record attributes (never the body)."""
        if logger.isEnabledFor(level):
            logger.log(level, text, extra={"queue_name": self.queue, "operation": operation})
