"""Metrics, spans and log fields: the operations guide's observability, cheap by default.

Everything goes through the OpenTelemetry **API** (``opentelemetry.metrics``, ``trace``,
``propagate``), so whatever SDK an application installs sees our instruments and spans. Without
an SDK the API is a no-op and so is almost all of this module: instruments are created once per
process, each `Telemetry` caches its attribute dicts, and span helpers return at once when no
tracer provider is installed (see `tracing_enabled`).

The SDK and the Prometheus exporter (the ``otel`` extra) are imported only inside
`setup_prometheus` / `render_metrics`, which the worker's ``/metrics`` endpoint uses.

Metric names (what a Prometheus scrape shows; OTLP shows the instrument name without the
``_total`` suffix that Prometheus exporters add to counters):

* counters ``queue_messages_sent_total{queue,status}``, ``queue_messages_received_total{queue}``,
  ``queue_messages_completed_total{queue}``, ``queue_messages_abandoned_total{queue}``,
  ``queue_messages_dead_lettered_total{queue,reason}``, ``queue_errors_total{queue,error_type}``,
  ``queue_retry_attempts_total{queue}``, ``queue_sessions_accepted_total{queue}``,
  ``queue_sessions_completed_total{queue,reason}``, ``queue_sessions_abandoned_total{queue,reason}``;
* histograms (seconds) ``queue_send_duration_seconds``, ``queue_receive_duration_seconds``,
  ``queue_complete_duration_seconds``, ``queue_process_duration_seconds``,
  ``queue_session_duration_seconds`` (all ``{queue}``);
* gauges ``queue_active_sessions{queue}``, ``queue_circuit_breaker_state{queue}`` (0 closed,
  1 open, 2 half-open), ``queue_depth{queue,state}`` (state active / in_flight / scheduled),
  ``queue_dead_letter_depth{queue}``, ``queue_oldest_message_age_seconds{queue}``.

Label values that come from code (dead-letter reasons, error types) are capped per process
(`MAX_LABEL_VALUES` distinct values per label, then ``other``) so a careless
``DeadLetter(f"bad {order_id}")`` cannot explode the series count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_PYTHON_METER_PROVIDER, OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.metrics import _internal as _metrics_api
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from .errors import ConfigurationError, QueueError
from .message import Message, ReceivedMessage
from .redaction import has_known_secrets, mask_known, redact

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics.export import MetricReader

    from .providers.base import QueueStats

__all__ = [
    "INSTRUMENTATION_NAME",
    "LATENCY_BUCKETS",
    "LOG_FIELDS",
    "MAX_LABEL_VALUES",
    "MESSAGE_EVENT_LEVEL",
    "SESSION_BUCKETS",
    "JsonFormatter",
    "Telemetry",
    "TextFormatter",
    "configure_logging",
    "error_type",
    "logger",
    "redact",
    "refresh_queue_stats",
    "prometheus_reader",
    "render_metrics",
    "setup_prometheus",
    "tracing_enabled",
]

logger = logging.getLogger("queue_runtime")

INSTRUMENTATION_NAME: Final = "queue_runtime"

#: Broker-call and handler latencies: 1 ms to 60 s, with 0.5 s exactly (the p95 alert threshold).
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
#: Session lifetimes: 100 ms to 1 h (an idle actor lives at least ``session_idle_timeout``).
SESSION_BUCKETS: Final = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Most distinct values a code-derived label (reason, error_type) takes per process.
MAX_LABEL_VALUES: Final = 50
_MAX_LABEL_LENGTH: Final = 64
#: Longest error text or description put into a log record or span event.
MAX_TEXT: Final = 1024

#: Per-message lifecycle events (received, completed, sent) log at DEBUG: at thousands of
#: messages a second an INFO line each would cost more than the work; metrics carry the rates.
MESSAGE_EVENT_LEVEL: Final = logging.DEBUG


# -- redaction ---------------------------------------------------------------------------------
# `redact` lives in `queue_runtime.redaction` (it knows the configured secret values); it is
# re-exported here, where the log formatters and span helpers apply it.


def _error_text(error: BaseException) -> str:
    """``Type: text`` of an exception, redacted and at most `MAX_TEXT` characters."""
    text = redact(f"{type(error).__name__}: {error}")
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _short(text: str | None) -> str | None:
    if text is None:
        return None
    text = redact(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def error_type(error: BaseException) -> str:
    """The low-cardinality name used as the ``error_type`` label."""
    return error.error_type if isinstance(error, QueueError) else type(error).__name__


# -- instruments (one set per process) ---------------------------------------------------------


class _LabelCap:
    """Bounds the distinct values a label takes; the overflow is reported as ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        seen = self._seen.get(value)
        if seen is not None:
            return seen
        with self._lock:
            if value not in self._seen:
                cleaned = value[:_MAX_LABEL_LENGTH] if value else "unknown"
                self._seen[value] = cleaned if len(self._seen) < self._limit else "other"
            return self._seen[value]


class _Gauges:
    """The providers of every observable gauge: live `Telemetry` objects, weakly held, so a
    finished supervisor's gauges disappear with it (or at once via `Telemetry.close`)."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[Telemetry] = weakref.WeakSet()

    def _each(self) -> list[Telemetry]:
        return list(self.sources)

    def active_sessions(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[str, int] = {}
        for telemetry in self._each():
            value = _safe(telemetry._active_sessions)
            if value is not None:
                totals[telemetry.queue] = totals.get(telemetry.queue, 0) + int(value)
        return [metrics.Observation(total, {"queue": queue}) for queue, total in totals.items()]

    def breaker_state(self, options: CallbackOptions) -> Iterable[Observation]:
        # Several supervisors on one queue in one process: report the worst (open > half-open).
        rank = {0: 0, 2: 1, 1: 2}
        worst: dict[str, int] = {}
        for telemetry in self._each():
            value = _safe(telemetry._breaker_state)
            if value is None:
                continue
            state = int(value)
            current = worst.get(telemetry.queue)
            if current is None or rank.get(state, 3) > rank.get(current, 3):
                worst[telemetry.queue] = state
        return [metrics.Observation(state, {"queue": queue}) for queue, state in worst.items()]

    def _stats(self) -> dict[str, QueueStats]:
        found: dict[str, QueueStats] = {}
        for telemetry in self._each():
            stats = _safe(telemetry._queue_stats)
            if stats is not None:
                found[telemetry.queue] = stats
        return found

    def depth(self, options: CallbackOptions) -> Iterable[Observation]:
        observed = []
        for queue, stats in self._stats().items():
            for state in ("active", "in_flight", "scheduled"):
                value = getattr(stats, state)
                if value is not None:
                    observed.append(metrics.Observation(value, {"queue": queue, "state": state}))
        return observed

    def dead_letter_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            metrics.Observation(stats.dead_letter, {"queue": queue})
            for queue, stats in self._stats().items()
            if stats.dead_letter is not None
        ]

    def oldest_age(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            metrics.Observation(stats.oldest_message_age, {"queue": queue})
            for queue, stats in self._stats().items()
            if stats.oldest_message_age is not None
        ]


def _safe(callback: Callable[[], Any] | None) -> Any:
    """Run a gauge callback; a failing one is skipped (a scrape must not fail)."""
    if callback is None:
        return None
    try:
        return callback()
    except Exception:
        logger.debug("gauge callback failed", exc_info=True)
        return None


class _Instruments:
    """Every instrument, created once per process from the global meter (a proxy until an SDK
    is installed, after which the API forwards to it)."""

    def __init__(self) -> None:
        meter = metrics.get_meter(INSTRUMENTATION_NAME)

        def counter(name: str, description: str) -> metrics.Counter:
            # Unit "1": Prometheus exporters append only "_total" to counters.
            return meter.create_counter(name, unit="1", description=description)

        def histogram(name: str, description: str, buckets: tuple[float, ...]) -> metrics.Histogram:
            # The "_seconds" suffix is in the name and the unit is "s": exporters that add unit
            # suffixes see it is already there, and those that don't still show the full name.
            try:
                return meter.create_histogram(
                    name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets
                )
            except TypeError:  # pragma: no cover - API older than 1.23: SDK default buckets
                return meter.create_histogram(name, unit="s", description=description)

        self.sent = counter("queue_messages_sent", "Messages sent, by status (success/failure).")
        self.received = counter("queue_messages_received", "Messages received from the broker.")
        self.completed = counter("queue_messages_completed", "Messages completed after handle().")
        self.abandoned = counter("queue_messages_abandoned", "Messages handed back to the queue.")
        self.dead_lettered = counter("queue_messages_dead_lettered", "Messages moved to the DLQ, by reason.")
        self.errors = counter("queue_errors", "Errors, by error type.")
        self.retries = counter("queue_retry_attempts", "handle() attempts after the first.")
        self.sessions_accepted = counter("queue_sessions_accepted", "Sessions accepted.")
        self.sessions_completed = counter("queue_sessions_completed", "Sessions released (idle/shutdown).")
        self.sessions_abandoned = counter("queue_sessions_abandoned", "Sessions lost (lock_lost/error).")
        self.send_duration = histogram("queue_send_duration_seconds", "Send call latency.", LATENCY_BUCKETS)
        self.receive_duration = histogram(
            "queue_receive_duration_seconds", "Receive call latency (long-poll wait included).",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.complete_duration = histogram(
            "queue_complete_duration_seconds", "Complete call latency.", LATENCY_BUCKETS
        )
        self.process_duration = histogram(
            "queue_process_duration_seconds", "handle() duration, per attempt.", LATENCY_BUCKETS
        )
        self.session_duration = histogram(
            "queue_session_duration_seconds", "Session (actor) lifetime.", SESSION_BUCKETS
        )
        self.gauges = _Gauges()
        meter.create_observable_gauge(
            "queue_active_sessions", [self.gauges.active_sessions], unit="1",
            description="Sessions held by actors now.",
        )  # fmt: skip
        meter.create_observable_gauge(
            "queue_circuit_breaker_state", [self.gauges.breaker_state], unit="1",
            description="Provider circuit breaker: 0 closed, 1 open, 2 half-open.",
        )  # fmt: skip
        meter.create_observable_gauge(
            "queue_depth", [self.gauges.depth], unit="1",
            description="Messages in the queue by state (active, in_flight, scheduled).",
        )  # fmt: skip
        meter.create_observable_gauge(
            "queue_dead_letter_depth", [self.gauges.dead_letter_depth], unit="1",
            description="Messages in the dead-letter queue.",
        )  # fmt: skip
        meter.create_observable_gauge(
            "queue_oldest_message_age_seconds", [self.gauges.oldest_age], unit="s",
            description="Age of the oldest active message.",
        )  # fmt: skip
        self.reason_label = _LabelCap(MAX_LABEL_VALUES)
        self.error_label = _LabelCap(MAX_LABEL_VALUES)


_instruments: _Instruments | None = None
_instruments_lock = threading.Lock()


def _get_instruments() -> _Instruments:
    global _instruments
    if _instruments is None:
        with _instruments_lock:
            if _instruments is None:
                _instruments = _Instruments()
    return _instruments


# -- tracing helpers ---------------------------------------------------------------------------

_tracer = trace.get_tracer(INSTRUMENTATION_NAME)
_NO_SDK_TYPES = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
# `trace.get_tracer_provider()` consults os.environ on every call while no provider is set
# (~1 us). A provider, once set, is never replaced, so: read the API's module global when it
# exists and no provider comes from the environment, and remember a positive answer.
_PEEK_GLOBAL: Final = hasattr(trace, "_TRACER_PROVIDER") and OTEL_PYTHON_TRACER_PROVIDER not in os.environ
_tracing_on = False


# The same for metrics: until a meter provider is set, every instrument is the API's no-op
# proxy, and the per-message paths skip calling them (three to five calls per message).
_PEEK_METER: Final = hasattr(_metrics_api, "_METER_PROVIDER") and OTEL_PYTHON_METER_PROVIDER not in os.environ
_metrics_on = False


def metrics_enabled() -> bool:
    """False while no meter provider is set (instruments would do nothing). Turns True as soon
    as an application sets one; before that nothing is lost, as the API's instruments would
    have dropped the values too."""
    global _metrics_on
    if _metrics_on:
        return True
    if _PEEK_METER and _metrics_api._METER_PROVIDER is None:
        return False
    _metrics_on = True
    return True


def observed() -> bool:
    """Whether a per-message event would be seen now: ``metrics_enabled() or
    tracing_enabled()`` or message-level (DEBUG) logging on for ``queue_runtime``, in one call
    while no provider is set (sessions ask at every receive)."""
    if _metrics_on or _tracing_on:
        return True
    if not (
        _PEEK_METER
        and _PEEK_GLOBAL
        and _metrics_api._METER_PROVIDER is None
        and trace._TRACER_PROVIDER is None
    ) and (metrics_enabled() or tracing_enabled()):
        return True
    return logger.isEnabledFor(MESSAGE_EVENT_LEVEL)


def tracing_enabled() -> bool:
    """False while no tracer provider is installed: span helpers then do nothing at all.

    Turns True as soon as an application installs one (checked on every call, cheaply)."""
    global _tracing_on
    if _tracing_on:
        return True
    if _PEEK_GLOBAL and trace._TRACER_PROVIDER is None:
        return False
    if isinstance(trace.get_tracer_provider(), _NO_SDK_TYPES):
        return False
    _tracing_on = True
    return True


class _Timer:
    """Records the block's duration into a histogram (the no-SDK `process_span`)."""

    __slots__ = ("_attrs", "_histogram", "_started")

    def __init__(self, histogram: metrics.Histogram, attrs: dict[str, str]) -> None:
        self._histogram = histogram
        self._attrs = attrs
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self._histogram.record(time.perf_counter() - self._started, self._attrs)


_NULL: Final[AbstractContextManager[None]] = contextlib.nullcontext()


def _producer_context(message: ReceivedMessage) -> Context | None:
    """The producer's context from the message properties, or None when it carries none."""
    properties = message.message.properties
    if "traceparent" not in properties:
        return None
    context = propagate.extract(properties)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def _parent_and_links(message: ReceivedMessage) -> tuple[Context | None, list[Link] | None]:
    """Parent/link choice for a span about one received message.

    The producer's context (from the message) is the parent, so send → process → settle is one
    trace; the current span (the session span) is linked, so the session's view finds its
    messages. When the current span is already in the producer's trace (a settle span inside
    the process span) it stays the parent. Without producer context: a child of the current span.
    """
    producer = _producer_context(message)
    if producer is None:
        return None, None
    current = trace.get_current_span().get_span_context()
    producer_span = trace.get_current_span(producer).get_span_context()
    if current.is_valid and current.trace_id == producer_span.trace_id:
        return None, None
    return producer, [Link(current)] if current.is_valid else None


class _StatsSource(Protocol):
    """What `refresh_queue_stats` needs of a provider (keeps this module below providers)."""

    async def queue_stats(self, queue: str) -> QueueStats: ...


# -- Telemetry ---------------------------------------------------------------------------------


class Telemetry:
    """The instruments, spans and log helpers of one queue on one provider system.

    Cheap to build (it caches its attribute dicts); the instruments themselves are shared by
    the whole process. Every method is synchronous, non-blocking and safe to call from trio
    code; none raises because telemetry failed.
    """

    def __init__(self, queue: str, system: str) -> None:
        self.queue = queue
        self.system = system
        self._metrics = _get_instruments()
        self._attrs: dict[str, str] = {"queue": queue}
        self._status_attrs: dict[str, dict[str, str]] = {}
        self._label_attrs: dict[tuple[str, str], dict[str, str]] = {}
        self._span_attrs: dict[str, str] = {
            "messaging.system": system,
            "messaging.destination": queue,
            "messaging.destination.name": queue,
        }
        self._log_base: dict[str, Any] = {
            "queue_name": queue,
            "message_id": None,
            "session_id": None,
            "correlation_id": None,
            "delivery_count": None,
        }
        self._active_sessions: Callable[[], int] | None = None
        self._breaker_state: Callable[[], int] | None = None
        self._queue_stats: Callable[[], QueueStats | None] | None = None

    def __repr__(self) -> str:
        return f"Telemetry(queue={self.queue!r}, system={self.system!r})"

    def _labelled(self, key: str, value: str) -> dict[str, str]:
        cache_key = (key, value)
        attrs = self._label_attrs.get(cache_key)
        if attrs is None:
            cap = self._metrics.error_label if key == "error_type" else self._metrics.reason_label
            attrs = {"queue": self.queue, key: cap(value)}
            if len(self._label_attrs) < 4 * MAX_LABEL_VALUES:
                self._label_attrs[cache_key] = attrs
        return attrs

    # -- metrics ---------------------------------------------------------------------------
    def messages_sent(self, count: int, *, status: str, seconds: float) -> None:
        """``queue_messages_sent_total{queue,status}`` += count; send duration recorded.

        ``status`` is ``"success"`` or ``"failure"``. A failure also logs a WARNING (the
        error itself is reported through `error`)."""
        attrs = self._status_attrs.get(status)
        if attrs is None:
            attrs = self._status_attrs.setdefault(status, {"queue": self.queue, "status": status[:32]})
        self._metrics.sent.add(count, attrs)
        self._metrics.send_duration.record(seconds, self._attrs)
        level = MESSAGE_EVENT_LEVEL if status == "success" else logging.WARNING
        if logger.isEnabledFor(level):
            self.log(level, f"sent {count} message(s): {status}", operation="send", count=count,
                     status=status, duration_ms=round(seconds * 1000, 3))  # fmt: skip

    def messages_received(self, messages: list[ReceivedMessage], *, seconds: float) -> None:
        """``queue_messages_received_total`` += len; ``queue_receive_duration_seconds``
        (every call, empty ones included: the histogram shows long-poll waits too).

        A non-empty batch also makes a ``receive`` span (CONSUMER) covering the last
        ``seconds``, linked to each message's producer context, and a DEBUG line per message."""
        if _metrics_on or metrics_enabled():
            if messages:
                self._metrics.received.add(len(messages), self._attrs)
            self._metrics.receive_duration.record(seconds, self._attrs)
        if messages and tracing_enabled():
            self._receive_span(messages, seconds)
        if messages and logger.isEnabledFor(MESSAGE_EVENT_LEVEL):
            for message in messages:
                self.log(MESSAGE_EVENT_LEVEL, "received", operation="receive", message=message)

    def _receive_span(self, messages: list[ReceivedMessage], seconds: float) -> None:
        links = []
        for message in messages:
            producer = _producer_context(message)
            if producer is not None:
                links.append(Link(trace.get_current_span(producer).get_span_context()))
        attrs: dict[str, str | int] = {
            **self._span_attrs,
            "messaging.operation": "receive",
            "messaging.operation.name": "receive",
            "messaging.operation.type": "receive",
            "messaging.batch.message_count": len(messages),
        }
        if len(messages) == 1:
            _message_attrs(attrs, messages[0])
        end = time.time_ns()
        span = _tracer.start_span(
            f"receive {self.queue}",
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            links=links,
            start_time=end - int(seconds * 1e9),
        )
        span.end(end_time=end)

    def message_completed(self, message: ReceivedMessage, *, seconds: float) -> None:
        """``queue_messages_completed_total`` += 1; ``queue_complete_duration_seconds``."""
        if _metrics_on or metrics_enabled():
            self._metrics.completed.add(1, self._attrs)
            self._metrics.complete_duration.record(seconds, self._attrs)
        if logger.isEnabledFor(MESSAGE_EVENT_LEVEL):
            self.log(MESSAGE_EVENT_LEVEL, "completed", operation="complete", message=message,
                     duration_ms=round(seconds * 1000, 3))  # fmt: skip

    def message_abandoned(self, message: ReceivedMessage) -> None:
        """``queue_messages_abandoned_total`` += 1 and an INFO line (handed back to the queue)."""
        self._metrics.abandoned.add(1, self._attrs)
        if logger.isEnabledFor(logging.INFO):
            self.log(
                logging.INFO, "abandoned (handed back to the queue)", operation="abandon", message=message
            )

    def message_dead_lettered(self, message: ReceivedMessage, reason: str, description: str | None) -> None:
        """``queue_messages_dead_lettered_total{queue,reason}`` += 1 and an ERROR log with the
        reason and the (redacted, truncated) description; never the body."""
        self._metrics.dead_lettered.add(1, self._labelled("reason", reason))
        if logger.isEnabledFor(logging.ERROR):
            self.log(
                logging.ERROR, f"dead-lettered: {_short(reason)}", operation="dead_letter", message=message,
                reason=_short(reason), description=_short(description),
            )  # fmt: skip

    def retry_attempt(self, message: ReceivedMessage, attempt: int, error: BaseException) -> None:
        """``queue_retry_attempts_total`` += 1 (``attempt`` is the attempt about to run, 2, 3, …)
        and a WARNING naming the error type and its redacted text."""
        self._metrics.retries.add(1, self._attrs)
        if logger.isEnabledFor(logging.WARNING):
            text = f"retrying (attempt {attempt}) after {_error_text(error)}"
            self.log(
                logging.WARNING, text, operation="process", message=message, attempt=attempt,
                error_type=error_type(error),
            )  # fmt: skip

    def error(self, error: BaseException, *, operation: str) -> None:
        """``queue_errors_total{queue,error_type}`` += 1 and a log line: WARNING for transient
        errors (they are retried), ERROR for permanent ones. The text is redacted."""
        kind = error_type(error)
        self._metrics.errors.add(1, self._labelled("error_type", kind))
        level = logging.WARNING if getattr(error, "transient", False) else logging.ERROR
        if logger.isEnabledFor(level):
            self.log(level, f"{operation} failed: {_error_text(error)}", operation=operation, error_type=kind)

    def session_accepted(self, session_id: str | None) -> None:
        """``queue_sessions_accepted_total`` += 1 and an INFO line."""
        self._metrics.sessions_accepted.add(1, self._attrs)
        if logger.isEnabledFor(logging.INFO):
            self.log(logging.INFO, "session accepted", operation="accept_session", session_id=session_id)

    def session_ended(self, session_id: str | None, *, seconds: float, reason: str) -> None:
        """``queue_sessions_completed_total{reason}`` (idle/shutdown) or
        ``queue_sessions_abandoned_total{reason}`` (lock_lost/error/anything else) += 1;
        ``queue_session_duration_seconds`` recorded; INFO line, WARNING when abandoned. The reason
        is also set on the current span when it is recording (the session span)."""
        completed = reason in ("idle", "shutdown")
        counter = self._metrics.sessions_completed if completed else self._metrics.sessions_abandoned
        counter.add(1, self._labelled("reason", reason))
        self._metrics.session_duration.record(seconds, self._attrs)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("queue_runtime.session.end_reason", reason)
        level = logging.INFO if completed else logging.WARNING
        if logger.isEnabledFor(level):
            self.log(level, f"session ended: {reason}", operation="release_session", session_id=session_id,
                     reason=reason, duration_ms=round(seconds * 1000, 3))  # fmt: skip

    def observe_gauges(self, *, active_sessions: Callable[[], int], breaker_state: Callable[[], int]) -> None:
        """Register the callbacks behind ``queue_active_sessions`` and
        ``queue_circuit_breaker_state`` (replacing earlier ones of this object).

        The callbacks run when a reader collects: in the scraping task for the worker's
        ``/metrics`` (trio's thread), but on the reader's thread with a periodic exporter, so
        they should only read plain attributes. A callback that raises is skipped. The
        registration lasts until `close` or until this object is garbage-collected; several
        objects on one queue add up (sessions) or report the worst state (breaker)."""
        self._active_sessions = active_sessions
        self._breaker_state = breaker_state
        self._metrics.gauges.sources.add(self)

    def observe_queue_depth(self, callback: Callable[[], QueueStats | None]) -> None:
        """Register ``callback`` behind ``queue_depth{state}``, ``queue_dead_letter_depth`` and
        ``queue_oldest_message_age_seconds``. It must return a cached `QueueStats` (or None
        while unknown) without I/O: `refresh_queue_stats` keeps such a cache fresh."""
        self._queue_stats = callback
        self._metrics.gauges.sources.add(self)

    def close(self) -> None:
        """Stop reporting this object's gauges. Idempotent."""
        self._active_sessions = self._breaker_state = self._queue_stats = None
        self._metrics.gauges.sources.discard(self)

    # -- traces ----------------------------------------------------------------------------
    def inject(self, properties: Mapping[str, str]) -> dict[str, str]:
        """``properties`` plus the current W3C trace context (``traceparent``, ``tracestate``
        and baggage, per the global propagator). Call it inside `send_span` so the consumer's
        process span is a child of the send span. A new dict; ``properties`` is not changed."""
        carrier = dict(properties)
        if tracing_enabled():
            propagate.inject(carrier)
        return carrier

    # Each span helper returns a shared no-op context manager (or, for `process_span`, a tiny
    # timer) when tracing is off, so the no-SDK cost is a flag check and an attribute lookup.
    def send_span(self, messages: list[Message]) -> AbstractContextManager[None]:
        """PRODUCER span ``send {queue}`` around one send call (a batch is one span with
        ``messaging.batch.message_count``). An exception is recorded and re-raised."""
        if not tracing_enabled():
            return _NULL
        single = messages[0] if len(messages) == 1 else None
        return self._span(
            f"send {self.queue}", SpanKind.PRODUCER, "send", "send", single, batch=len(messages)
        )

    def process_span(self, message: ReceivedMessage, attempt: int) -> AbstractContextManager[None]:
        """CONSUMER span ``process {queue}`` around one ``handle()`` call.

        Parent: the producer's context carried in the message properties (so the producer's
        trace continues here), with a link to the current (session) span; without producer
        context it is a child of the current span. Attributes: the messaging ones plus
        ``messaging.message.delivery_count`` and ``queue_runtime.attempt``. An exception is
        recorded (redacted text) and the status set to ERROR, then re-raised. Also records
        ``queue_process_duration_seconds`` (always, SDK or not)."""
        timer = _Timer(self._metrics.process_duration, self._attrs)
        if not tracing_enabled():
            return timer
        return self._timed_span(timer, message, attempt)

    def handled(self, seconds: float) -> None:
        """Record one ``handle()`` call's duration (what `process_span` records, for callers
        that time the call themselves when tracing is off)."""
        if _metrics_on or metrics_enabled():
            self._metrics.process_duration.record(seconds, self._attrs)

    @contextlib.contextmanager
    def _timed_span(self, timer: _Timer, message: ReceivedMessage, attempt: int) -> Iterator[None]:
        with timer, self._span(f"process {self.queue}", SpanKind.CONSUMER, "process", "process", message,
                               follow=True, attempt=attempt):  # fmt: skip
            yield

    def settle_span(self, operation: str, message: ReceivedMessage) -> AbstractContextManager[None]:
        """CLIENT span ``{operation} {queue}`` for ``complete`` / ``abandon`` / ``dead_letter``,
        parented like `process_span` (producer context, link to the current span)."""
        if not tracing_enabled():
            return _NULL
        return self._span(
            f"{operation} {self.queue}", SpanKind.CLIENT, operation, "settle", message, follow=True
        )

    def session_span(self, session_id: str | None) -> AbstractContextManager[None]:
        """INTERNAL span ``session {queue}`` around an actor's life; the current span while
        the actor runs, so messages without producer context are its children (and the others
        link to it). ``session_ended`` adds the end reason."""
        if not tracing_enabled():
            return _NULL
        return self._span(
            f"session {self.queue}", SpanKind.INTERNAL, "session", None, None, session_id=session_id
        )

    @contextlib.contextmanager
    def _span(
        self,
        name: str,
        kind: SpanKind,
        operation: str,
        operation_type: str | None,
        message: ReceivedMessage | Message | None,
        *,
        follow: bool = False,
        batch: int = 0,
        attempt: int | None = None,
        session_id: str | None = None,
    ) -> Iterator[None]:
        parent, links = (
            _parent_and_links(message) if follow and isinstance(message, ReceivedMessage) else (None, None)
        )
        # One dict, given at creation: samplers see it and the SDK validates it once.
        attrs: dict[str, str | int] = {
            **self._span_attrs,
            "messaging.operation": operation,
            "messaging.operation.name": operation,
        }
        if operation_type is not None:
            attrs["messaging.operation.type"] = operation_type
        if attempt is not None:
            attrs["queue_runtime.attempt"] = attempt
        if batch > 1:
            attrs["messaging.batch.message_count"] = batch
        if session_id is not None:
            attrs["messaging.conversation_id"] = session_id
        if message is not None:
            _message_attrs(attrs, message)
        if has_known_secrets():  # ids and names come from brokers and users: mask secrets
            attrs = {key: mask_known(v) if isinstance(v, str) else v for key, v in attrs.items()}
        with (
            _tracer.start_as_current_span(
                name,
                context=parent,
                kind=kind,
                attributes=attrs,
                links=links,
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
            _record_errors(span),
        ):
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
        """Log ``text`` with the guide's fields as record attributes (never the body).

        Fields: ``queue_name``, ``operation``, and from ``message`` ``message_id``,
        ``session_id``, ``correlation_id``, ``delivery_count``; ``trace_id``/``span_id`` when a
        span is recording; plus ``fields`` (names that clash with `logging.LogRecord`
        attributes get an ``x_`` prefix). ``text`` is written as given: pass error texts
        through `redact` (the event methods do)."""
        if not logger.isEnabledFor(level):
            return
        extra: dict[str, Any] = {**self._log_base, "operation": operation}
        if message is not None:
            original = message.message if isinstance(message, ReceivedMessage) else message
            extra["message_id"] = original.message_id
            extra["session_id"] = original.session_id
            extra["correlation_id"] = original.correlation_id
            if isinstance(message, ReceivedMessage):
                extra["delivery_count"] = message.delivery_count
        if session_id is not None:
            extra["session_id"] = session_id
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            extra["trace_id"] = f"{context.trace_id:032x}"
            extra["span_id"] = f"{context.span_id:016x}"
        for key, value in fields.items():
            extra[f"x_{key}" if key in _RESERVED else key] = value
        logger.log(level, text, extra=extra)


def _message_attrs(attrs: dict[str, str | int], message: ReceivedMessage | Message) -> None:
    """Add the span attributes describing one message (ids, session, delivery count)."""
    original = message.message if isinstance(message, ReceivedMessage) else message
    attrs["messaging.message_id"] = attrs["messaging.message.id"] = original.message_id
    if original.session_id is not None:
        attrs["messaging.conversation_id"] = original.session_id
    if original.correlation_id is not None:
        attrs["messaging.message.conversation_id"] = original.correlation_id
    if isinstance(message, ReceivedMessage):
        attrs["messaging.message.delivery_count"] = message.delivery_count


@contextlib.contextmanager
def _record_errors(span: trace.Span) -> Iterator[None]:
    """Record an exception leaving the block on ``span`` (text redacted), then re-raise.
    Cancellation is marked on the span but not recorded as an exception event."""
    try:
        yield
    except Exception as exc:
        if span.is_recording():
            # The stack trace repeats the text (and source lines may hold literals): redact both.
            stack = redact("".join(traceback.format_exception(exc)))
            span.record_exception(
                exc, attributes={"exception.message": _short(str(exc)) or "", "exception.stacktrace": stack}
            )
            span.set_attribute("error.type", error_type(exc))
            span.set_status(Status(StatusCode.ERROR, _short(f"{type(exc).__name__}: {exc}")))
        raise
    except BaseException as exc:
        if span.is_recording():
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise


# -- queue depth refresh -------------------------------------------------------------------------


async def refresh_queue_stats(
    provider: _StatsSource,
    queue: str,
    interval: float = 15.0,
    *,
    telemetry: Telemetry | None = None,
    system: str = "memory",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the queue-depth gauges of ``queue`` fresh: call ``provider.queue_stats(queue)``
    every ``interval`` seconds and serve the cached result to the gauges.

    Start it in the worker's nursery (``await nursery.start(refresh_queue_stats, provider,
    queue)``); it reports started at once and runs until cancelled, then unregisters the
    gauges. A failed refresh is logged (WARNING, redacted) and counted in ``queue_errors_total``;
    values older than three intervals are dropped rather than shown stale. ``system`` is used
    only when ``telemetry`` is not given (pass ``provider.system``)."""
    if interval <= 0:
        raise ConfigurationError(f"queue stats interval must be > 0 seconds, got {interval!r}")
    owned = telemetry is None
    telemetry = telemetry if telemetry is not None else Telemetry(queue, getattr(provider, "system", system))
    cache: list[tuple[float, QueueStats]] = []

    def current() -> QueueStats | None:
        if not cache:
            return None
        fetched_at, stats = cache[0]
        return stats if time.monotonic() - fetched_at <= 3 * interval else None

    telemetry.observe_queue_depth(current)
    task_status.started()
    try:
        while True:
            try:
                with trio.fail_after(max(interval, 1.0)):
                    stats = await provider.queue_stats(queue)
            except (QueueError, trio.TooSlowError) as exc:
                telemetry.error(exc, operation="queue_stats")
            else:
                cache[:] = [(time.monotonic(), stats)]
            await trio.sleep(interval)
    finally:
        if owned:
            telemetry.close()
        else:
            telemetry._queue_stats = None


# -- Prometheus --------------------------------------------------------------------------------

_prometheus_lock = threading.Lock()
_prometheus_installed = False


def setup_prometheus() -> bool:
    """Make ``render_metrics`` serve our instruments: if no SDK `MeterProvider` is installed,
    install one whose only reader is a ``PrometheusMetricReader`` (no ``target_info``, no
    ``otel_scope_*`` labels, so label sets are exactly ours). Idempotent; returns True when it
    installed the provider. If the application installed its own SDK, nothing changes: our
    metrics go to its readers, and ``/metrics`` shows what the default Prometheus registry holds.

    Needs the ``otel`` extra; raises `ConfigurationError` naming it when missing."""
    global _prometheus_installed
    with _prometheus_lock:
        if _prometheus_installed:
            return False
        try:
            from opentelemetry.sdk.metrics import MeterProvider
        except ImportError as exc:  # pragma: no cover - the otel extra is a dev dependency here
            raise ConfigurationError(
                "Prometheus metrics need the otel extra: pip install 'queue-runtime[otel]'"
            ) from exc
        if isinstance(metrics.get_meter_provider(), MeterProvider):
            _prometheus_installed = True
            return False
        metrics.set_meter_provider(MeterProvider(metric_readers=[prometheus_reader()]))
        _prometheus_installed = True
        return True


def prometheus_reader() -> MetricReader:
    """The reader behind ``/metrics`` (registered in the default Prometheus registry): no
    ``target_info``, no ``otel_scope_*`` labels, so label sets are exactly ours. `setup_prometheus`
    and `queue_runtime.exporting` (which adds OTLP readers to the same provider) both use it.

    Needs the ``otel`` extra; raises `ConfigurationError` naming it when missing."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError as exc:  # pragma: no cover - the otel extra is a dev dependency here
        raise ConfigurationError(
            "Prometheus metrics need the otel extra: pip install 'queue-runtime[otel]'"
        ) from exc
    reader: MetricReader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False)
    return reader


def render_metrics() -> bytes:
    """The Prometheus text exposition (format 0.0.4) of the default registry.

    Collects synchronously (gauge callbacks run here): call it from the trio thread."""
    try:
        from prometheus_client import REGISTRY, generate_latest
    except ImportError as exc:  # pragma: no cover
        raise ConfigurationError(
            "Prometheus metrics need the otel extra: pip install 'queue-runtime[otel]'"
        ) from exc
    return bytes(generate_latest(REGISTRY))


# -- logging -----------------------------------------------------------------------------------

_RESERVED: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
#: The guide's fields, in the order formatters show them.
LOG_FIELDS: Final = (
    "queue_name",
    "operation",
    "message_id",
    "session_id",
    "correlation_id",
    "delivery_count",
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra attributes; string values redacted (defence in depth: callers of
    ``logger.log(..., extra=...)`` may pass error texts)."""
    return {
        key: redact(value) if isinstance(value, str) else value
        for key, value in record.__dict__.items()
        if key not in _RESERVED and not key.startswith("_")
    }


def _shown(value: object) -> str:
    """A non-string log field as text, redacted (its ``str()`` may hold anything)."""
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``timestamp`` (UTC ISO 8601), ``level``, ``logger``,
    ``message``, every extra record attribute (the guide's fields first), and ``exception``
    when there is one. The message and exception text are redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        extras = _extras(record)
        for key in LOG_FIELDS:
            if key in extras:
                entry[key] = extras.pop(key)
        entry.update(extras)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        return json.dumps(entry, default=_shown, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.000Z INFO queue_runtime: text key=value ...`` with the guide's
    fields first (None ones left out). The message and exception text are redacted."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [f"{stamp} {record.levelname} {record.name}: {redact(record.getMessage())}"]
        extras = _extras(record)
        ordered = [(key, extras.pop(key)) for key in LOG_FIELDS if key in extras]
        for key, value in [*ordered, *extras.items()]:
            if value is not None:
                shown = value if isinstance(value, str) else _shown(value)
                parts.append(f"{key}={json.dumps(shown) if (not shown or ' ' in shown) else shown}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


_LEVELS: Final = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: Third-party loggers kept at WARNING or above: at DEBUG they log request details.
_NOISY: Final = (
    "azure",
    "uamqp",
    "botocore",
    "aiobotocore",
    "boto3",
    "urllib3",
    "httpx",
    "httpcore",
    "asyncio",
)


def configure_logging(level: str | int = "info", fmt: str = "text", *, stream: Any = None) -> logging.Handler:
    """Set up the root logger for the worker: one handler writing to ``stream`` (stderr) with
    `JsonFormatter` (``fmt="json"``) or `TextFormatter` (``"text"``), at ``level``
    (``debug``/``info``/``warning``/``error`` or a number). SDK loggers stay at WARNING or
    above. Calling it again replaces the handler it installed. Bad values raise one
    `ConfigurationError` line. Returns the handler."""
    if isinstance(level, str):
        numeric = _LEVELS.get(level.strip().lower())
        if numeric is None:
            raise ConfigurationError(
                f"unknown log level {level[:20]!r}: use one of debug, info, warning, error, critical"
            )
    elif isinstance(level, int) and not isinstance(level, bool):
        numeric = level
    else:
        raise ConfigurationError(f"log level must be a name or a number, got {type(level).__name__}")
    formats: dict[str, Callable[[], logging.Formatter]] = {"json": JsonFormatter, "text": TextFormatter}
    make = formats.get(fmt.strip().lower() if isinstance(fmt, str) else "")
    if make is None:
        raise ConfigurationError(f"unknown log format {str(fmt)[:20]!r}: use json or text")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make())
    handler._queue_runtime = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_queue_runtime", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logger.setLevel(numeric)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    return handler
