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

import json
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_PYTHON_METER_PROVIDER, OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.metrics import _internal as _metrics_api
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .errors import ConfigurationError, QueueError
from .message import Message, ReceivedMessage
from .redaction import has_known_secrets, mask_known, redact
from .tally import (
    HISTOGRAMS,
    LATENCY_BUCKETS,
    SESSION_BUCKETS,
    QueueTally,
    attach,
    counter_callback,
    tally_for,
)

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
    is installed, after which the API forwards to it).

    Counters are observable: their callbacks read the per-queue tallies (`queue_runtime.tally`)
    the runtime adds to per message. Histograms are produced from the tallies at collection
    (`tally.attach`), or forwarded per value to the API instruments `forwarding` makes when the
    meter provider is not the SDK's."""

    def __init__(self) -> None:
        meter = self.meter = metrics.get_meter(INSTRUMENTATION_NAME)
        if isinstance(meter, _metrics_api._ProxyMeter):
            # A meter provider set later turns metrics on at once (the per-message hooks read
            # `_metrics_on`, a flag, not the provider), and its readers get our histograms.
            forward_set = meter.on_set_meter_provider

            def on_set_meter_provider(provider: metrics.MeterProvider) -> None:
                forward_set(provider)
                metrics_enabled()

            meter.on_set_meter_provider = on_set_meter_provider  # type: ignore[method-assign,assignment]

        def counter(name: str, description: str, attribute: str, label: str | None = None) -> None:
            # Unit "1": Prometheus exporters append only "_total" to counters.
            meter.create_observable_counter(
                name, [counter_callback(attribute, label)], unit="1", description=description
            )

        for name, description, attribute, label in (
            ("queue_messages_sent", "Messages sent, by status (success/failure).", "sent", "status"),
            ("queue_messages_received", "Messages received from the broker.", "received", None),
            ("queue_messages_completed", "Messages completed after handle().", "completed", None),
            ("queue_messages_abandoned", "Messages handed back to the queue.", "abandoned", None),
            (
                "queue_messages_dead_lettered",
                "Messages moved to the DLQ, by reason.",
                "dead_lettered",
                "reason",
            ),
            ("queue_errors", "Errors, by error type (handler exceptions included).", "errors", "error_type"),
            ("queue_retry_attempts", "handle() attempts after the first.", "retries", None),
            ("queue_sessions_accepted", "Sessions accepted.", "sessions_accepted", None),
            (
                "queue_sessions_completed",
                "Sessions released (idle/shutdown).",
                "sessions_completed",
                "reason",
            ),
            ("queue_sessions_abandoned", "Sessions lost (lock_lost/error).", "sessions_abandoned", "reason"),
        ):
            counter(name, description, attribute, label)
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
        # Each label its own cap: a flood of distinct dead-letter reasons must not push lock
        # losses (a session-end reason) into "other".
        self.status_label = _LabelCap(MAX_LABEL_VALUES)
        self.dead_letter_label = _LabelCap(MAX_LABEL_VALUES)
        self.error_label = _LabelCap(MAX_LABEL_VALUES)
        self.session_end_label = _LabelCap(MAX_LABEL_VALUES)

    def forwarding(self) -> dict[str, Any]:
        """API histograms, one per tally histogram, for a meter provider `tally.attach` cannot
        extend (each value is then recorded through the API, at the API's cost)."""
        instruments = {}
        for name, description, buckets in HISTOGRAMS:
            # The "_seconds" suffix is in the name and the unit is "s": exporters that add unit
            # suffixes see it is already there, and those that don't still show the full name.
            try:
                instruments[name] = self.meter.create_histogram(
                    name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets
                )
            except TypeError:  # pragma: no cover - API older than 1.23: SDK default buckets
                instruments[name] = self.meter.create_histogram(name, unit="s", description=description)
        return instruments


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
    provider = metrics.get_meter_provider()
    if isinstance(provider, _metrics_api._ProxyMeterProvider | _metrics_api.NoOpMeterProvider):
        return False
    instruments = _get_instruments()
    attach(provider, INSTRUMENTATION_NAME, instruments.forwarding)
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


def timed() -> bool:
    """Whether a message's counts and durations would be seen now: metrics on, or
    message-level logging (its lines carry durations). Tracing alone does not need them."""
    if _metrics_on or metrics_enabled():
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
    provider = trace.get_tracer_provider()
    if isinstance(provider, _NO_SDK_TYPES):
        return False
    global _drops_unsampled
    _drops_unsampled = _unsampled_parents_dropped(provider)
    _tracing_on = True
    return True


#: Whether the tracer provider's sampler drops every span whose parent is not sampled:
#: (remote parent, local parent). True for the SDK's parent-based samplers with their default
#: delegates (``OTEL_TRACES_SAMPLER=parentbased_*``). Then a span under an unsampled parent is
#: not even handed to the SDK (see `Telemetry._unsampled`).
_drops_unsampled: tuple[bool, bool] = (False, False)


def _unsampled_parents_dropped(provider: Any) -> tuple[bool, bool]:
    try:
        from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
    except ImportError:  # pragma: no cover - an SDK other than the reference one
        return False, False
    sampler = getattr(provider, "sampler", None)
    if not isinstance(sampler, ParentBased):
        return False, False

    def drops(delegate: Any) -> bool:
        return isinstance(delegate, StaticSampler) and getattr(delegate, "_decision", None) is Decision.DROP

    return (
        drops(getattr(sampler, "_remote_parent_not_sampled", None)),
        drops(getattr(sampler, "_local_parent_not_sampled", None)),
    )


class _Timer:
    """Records the block's duration into a tally's ``process_duration`` (the no-SDK
    `process_span`)."""

    __slots__ = ("_started", "_tally")

    def __init__(self, tally: QueueTally) -> None:
        self._tally = tally
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if _metrics_on:
            self._tally.process_duration.record(time.perf_counter() - self._started)


class _NoSpan:
    """What the span helpers return while nothing is traced: does nothing. Its methods are
    static, so a ``with`` on it keeps no bound method alive while it lasts (a session span
    lasts the session's life, and each such object is one more for the garbage collector)."""

    __slots__ = ()

    @staticmethod
    def __enter__() -> None:
        return None

    @staticmethod
    def __exit__(*exc_info: object) -> None:
        return None


_NULL: Final[AbstractContextManager[None]] = _NoSpan()


class _Continued:
    """The unsampled stand-in for a process or settle span under a remote, unsampled parent:
    the producer's span context is the current span for the block, so what the handler sends
    carries the trace on (unsampled, as the producer decided); nothing is recorded. With a
    tally, the block's duration is recorded as `_Timer` does."""

    __slots__ = ("_context", "_started", "_tally", "_token")

    def __init__(self, span_context: SpanContext, tally: QueueTally | None) -> None:
        self._context = span_context
        self._tally = tally
        self._started = 0.0
        self._token: object = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(self._context)))
        if self._tally is not None:
            self._started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if self._tally is not None and _metrics_on:
            self._tally.process_duration.record(time.perf_counter() - self._started)
        otel_context.detach(self._token)  # type: ignore[arg-type]


def _traceparent(message: Message) -> str | None:
    """The W3C ``traceparent`` a message carries: its ``traceparent`` property, or else its
    ``correlation_id`` when that is one (the operations guide propagates trace context there)."""
    carried = message.properties.get("traceparent")
    if carried is not None:
        return carried
    correlation = message.correlation_id
    if correlation is not None and len(correlation) == 55 and correlation[2] == correlation[35] == "-":
        return correlation
    return None


def _carried_trace_id(message: Message) -> str | None:
    """The trace id (32 hex digits) of the trace context ``message`` carries, if valid."""
    carried = _traceparent(message)
    if carried is None or len(carried) < 55 or carried[2] != "-":
        return None
    trace_id = carried[3:35].lower()
    if trace_id == "0" * 32 or not all(c in "0123456789abcdef" for c in trace_id):
        return None
    return trace_id


def _unsampled_remote(carried: str) -> SpanContext | None:
    """The span context of a W3C ``traceparent`` whose sampled flag is off (None otherwise, or
    when it does not parse: then the propagator decides, as for any other)."""
    if len(carried) != 55 or carried[:3] != "00-" or carried[35] != "-" or carried[52] != "-":
        return None
    try:
        flags = int(carried[53:], 16)
        if flags & 1:
            return None
        trace_id, span_id = int(carried[3:35], 16), int(carried[36:52], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


def _producer_context(message: ReceivedMessage) -> Context | None:
    """The producer's context from the message properties (``traceparent``/``tracestate``,
    or a ``traceparent`` in ``correlation_id`` when the properties carry none), or None."""
    properties = message.message.properties
    if "traceparent" not in properties:
        carried = _traceparent(message.message)
        if carried is None:
            return None
        properties = {"traceparent": carried}
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
        #: This queue's counts and histograms (shared by every `Telemetry` of the queue).
        self.tally: QueueTally = tally_for(queue)
        metrics_enabled()  # an SDK set up already: its readers collect our histograms from now
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

    # -- metrics ---------------------------------------------------------------------------
    # Per call: integer and histogram arithmetic on `self.tally` (read by the instruments at
    # collection) while a meter provider is set, then a log line only if its level is on.
    def messages_sent(self, count: int, *, status: str, seconds: float) -> None:
        """``queue_messages_sent_total{queue,status}`` += count; send duration recorded.

        ``status`` is ``"success"`` or ``"failure"``. A failure also logs a WARNING (the
        error itself is reported through `error`)."""
        if _metrics_on or metrics_enabled():
            tally = self.tally
            label = self._metrics.status_label(status)
            tally.sent[label] = tally.sent.get(label, 0) + count
            tally.send_duration.record(seconds)
        level = MESSAGE_EVENT_LEVEL if status == "success" else logging.WARNING
        if logger.isEnabledFor(level):
            self.log(level, f"sent {count} message(s): {status}", operation="send", count=count,
                     status=status, duration_ms=round(seconds * 1000, 3))  # fmt: skip

    def messages_received(
        self, messages: list[ReceivedMessage], *, seconds: float, span: bool = True
    ) -> None:
        """``queue_messages_received_total`` += len; ``queue_receive_duration_seconds``
        (every call, empty ones included: the histogram shows long-poll waits too).

        A non-empty batch also makes a ``receive`` span (CONSUMER) covering the last
        ``seconds``, linked to each message's producer context (unless ``span`` is False: the
        caller knows it would be dropped), and a DEBUG line per message."""
        if _metrics_on:  # (set as soon as a meter provider is: see `_Instruments`)
            self.tally.messages_received(len(messages), seconds)
        if span and messages and (_tracing_on or tracing_enabled()) and self._unsampled(None) is False:
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

    def timing(self) -> QueueTally | bool:
        """Whether a message's counts and durations would be seen now (`timed`), asked once per
        receive. With metrics on and message logs off, the answer is the queue's tally: the
        session records receives and completions straight into it
        (`QueueTally.messages_received`, `QueueTally.message_completed`) instead of calling
        `messages_received` and `message_completed`, which would do just that."""
        if _metrics_on:
            return True if logger.isEnabledFor(MESSAGE_EVENT_LEVEL) else self.tally
        return timed()

    def message_completed(
        self, message: ReceivedMessage, *, seconds: float, handled: float | None = None
    ) -> None:
        """``queue_messages_completed_total`` += 1; ``queue_complete_duration_seconds``; and,
        when ``handled`` is given, the ``handle()`` call's duration as `handled` records it
        (one call per message instead of two)."""
        if _metrics_on:
            self.tally.message_completed(seconds, handled)
        if logger.isEnabledFor(MESSAGE_EVENT_LEVEL):
            self.log(MESSAGE_EVENT_LEVEL, "completed", operation="complete", message=message,
                     duration_ms=round(seconds * 1000, 3))  # fmt: skip

    def message_abandoned(self, message: ReceivedMessage) -> None:
        """``queue_messages_abandoned_total`` += 1 and an INFO line (handed back to the queue)."""
        if _metrics_on or metrics_enabled():
            self.tally.abandoned += 1
        if logger.isEnabledFor(logging.INFO):
            self.log(
                logging.INFO, "abandoned (handed back to the queue)", operation="abandon", message=message
            )

    def message_dead_lettered(self, message: ReceivedMessage, reason: str, description: str | None) -> None:
        """``queue_messages_dead_lettered_total{queue,reason}`` += 1 and an ERROR log with the
        reason and the (redacted, truncated) description; never the body."""
        if _metrics_on or metrics_enabled():
            counts = self.tally.dead_lettered
            label = self._metrics.dead_letter_label(reason)
            counts[label] = counts.get(label, 0) + 1
        if logger.isEnabledFor(logging.ERROR):
            self.log(
                logging.ERROR, f"dead-lettered: {_short(reason)}", operation="dead_letter", message=message,
                reason=_short(reason), description=_short(description),
            )  # fmt: skip

    def retry_attempt(self, message: ReceivedMessage, attempt: int, error: BaseException) -> None:
        """``queue_retry_attempts_total`` += 1 (``attempt`` is the attempt about to run, 2, 3, …)
        and a WARNING naming the error type and its redacted text."""
        if _metrics_on or metrics_enabled():
            self.tally.retries += 1
        if logger.isEnabledFor(logging.WARNING):
            text = f"retrying (attempt {attempt}) after {_error_text(error)}"
            self.log(
                logging.WARNING, text, operation="process", message=message, attempt=attempt,
                error_type=error_type(error),
            )  # fmt: skip

    def _count_error(self, kind: str) -> None:
        if not (_metrics_on or metrics_enabled()):
            return
        counts = self.tally.errors
        label = self._metrics.error_label(kind)
        counts[label] = counts.get(label, 0) + 1

    def error(self, error: BaseException, *, operation: str) -> None:
        """``queue_errors_total{queue,error_type}`` += 1 and a log line: WARNING for transient
        errors (they are retried), ERROR for permanent ones. The text is redacted."""
        kind = error_type(error)
        self._count_error(kind)
        level = logging.WARNING if getattr(error, "transient", False) else logging.ERROR
        if logger.isEnabledFor(level):
            self.log(level, f"{operation} failed: {_error_text(error)}", operation=operation, error_type=kind)

    def handler_failed(self, error: BaseException) -> None:
        """``queue_errors_total{queue,error_type}`` += 1 for an exception ``handle()`` raised
        (``error_type`` is its class name). No log line: `retry_attempt` or the dead-letter
        line that follows says what happened."""
        self._count_error(error_type(error))

    def session_accepted(self, session_id: str | None) -> None:
        """``queue_sessions_accepted_total`` += 1 and an INFO line."""
        if _metrics_on or metrics_enabled():
            self.tally.sessions_accepted += 1
        if logger.isEnabledFor(logging.INFO):
            self.log(logging.INFO, "session accepted", operation="accept_session", session_id=session_id)

    def session_ended(self, session_id: str | None, *, seconds: float, reason: str) -> None:
        """``queue_sessions_completed_total{reason}`` (idle/shutdown) or
        ``queue_sessions_abandoned_total{reason}`` (lock_lost/error/anything else) += 1;
        ``queue_session_duration_seconds`` recorded; INFO line, WARNING when abandoned. The reason
        is also set on the current span when it is recording (the session span: call this
        inside `session_span`)."""
        completed = reason in ("idle", "shutdown")
        if _metrics_on or metrics_enabled():
            tally = self.tally
            counts = tally.sessions_completed if completed else tally.sessions_abandoned
            label = self._metrics.session_end_label(reason)
            counts[label] = counts.get(label, 0) + 1
            tally.session_duration.record(seconds)
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

    def _unsampled(self, message: ReceivedMessage | None) -> bool | SpanContext:
        """Whether the span about ``message`` (parented like `process_span`) would be dropped by
        the sampler: True when its parent is the current span and unsampled, the producer's
        span context when that is the parent and unsampled, else False (the SDK decides).

        Known only for the SDK's parent-based samplers (see `_drops_unsampled`); for any other
        sampler the answer is False. A message carrying baggage always gets the SDK's path,
        which extracts it."""
        drops_remote, drops_local = _drops_unsampled
        if not (drops_remote or drops_local):
            return False
        if message is not None:
            inner = message.message
            carried = _traceparent(inner)
            if carried is not None:
                if not drops_remote or "baggage" in inner.properties:
                    return False
                current = trace.get_current_span().get_span_context()
                unsampled = _unsampled_remote(carried)
                if unsampled is None:
                    return False
                if current.is_valid and current.trace_id == unsampled.trace_id:
                    return not current.trace_flags.sampled and drops_local  # parent: current span
                return unsampled
        current = trace.get_current_span().get_span_context()
        if not current.is_valid or current.trace_flags.sampled:
            return False  # a root (the root sampler decides) or a sampled parent
        return drops_remote if current.is_remote else drops_local

    def children_dropped(self) -> bool:
        """Whether every span parented by the current span would be dropped now: tracing is
        off, or the current span is unsampled and the sampler drops the children of unsampled
        spans (the SDK's parent-based samplers). Sessions ask once, inside `session_span`, and
        then skip the span helpers for messages that carry no trace context of their own."""
        if not tracing_enabled():
            return True
        return self._unsampled(None) is True

    def process_span(self, message: ReceivedMessage, attempt: int) -> AbstractContextManager[None]:
        """CONSUMER span ``process {queue}`` around one ``handle()`` call.

        Parent: the producer's context carried in the message properties (so the producer's
        trace continues here), with a link to the current (session) span; without producer
        context it is a child of the current span. Attributes: the messaging ones plus
        ``messaging.message.delivery_count`` and ``queue_runtime.attempt``. An exception is
        recorded (redacted text) and the status set to ERROR, then re-raised. Also records
        ``queue_process_duration_seconds`` (always, SDK or not)."""
        timer = _Timer(self.tally)
        if not tracing_enabled():
            return timer
        unsampled = self._unsampled(message)
        if unsampled is True:
            return timer
        if unsampled is not False:
            return _Continued(unsampled, self.tally)
        return self._span(f"process {self.queue}", SpanKind.CONSUMER, "process", "process", message,
                          follow=True, attempt=attempt, timed=True)  # fmt: skip

    def handled(self, seconds: float) -> None:
        """Record one ``handle()`` call's duration (what `process_span` records, for callers
        that time the call themselves when tracing is off)."""
        if _metrics_on:
            self.tally.process_duration.record(seconds)

    def settle_span(self, operation: str, message: ReceivedMessage) -> AbstractContextManager[None]:
        """CLIENT span ``{operation} {queue}`` for ``complete`` / ``abandon`` / ``dead_letter``,
        parented like `process_span` (producer context, link to the current span)."""
        if not tracing_enabled():
            return _NULL
        unsampled = self._unsampled(message)
        if unsampled is True:
            return _NULL
        if unsampled is not False:
            return _Continued(unsampled, None)
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
        timed: bool = False,
    ) -> _SpanScope:
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
        span = _tracer.start_span(
            name,
            context=parent,
            kind=kind,
            attributes=attrs,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        )
        return _SpanScope(span, self.tally if timed else None)

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
        trace_id = f"{context.trace_id:032x}" if context.is_valid else None
        if message is not None:
            # A line about a message belongs to the message's trace (the producer's, which its
            # process span continues), even when written outside that span.
            carried = _carried_trace_id(message if isinstance(message, Message) else message.message)
            if carried is not None and carried != trace_id:
                trace_id, context = carried, trace.INVALID_SPAN_CONTEXT
        if trace_id is not None:
            extra["trace_id"] = trace_id
            if context.is_valid:
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


class _SpanScope:
    """A started span as the current span for a block (what ``start_as_current_span`` does, in
    one object instead of three generator layers): an exception leaving the block is recorded
    on it (text redacted; cancellation only marks the status), then it ends. With a tally, the
    block's duration also goes to ``process_duration``."""

    __slots__ = ("_span", "_started", "_tally", "_token")

    def __init__(self, span: trace.Span, tally: QueueTally | None) -> None:
        self._span = span
        self._tally = tally
        self._started = 0.0
        self._token: object = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        if self._tally is not None:
            self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if self._tally is not None and _metrics_on:
                self._tally.process_duration.record(time.perf_counter() - self._started)
            if exc is not None and self._span.is_recording():
                _record_error(self._span, exc)
        finally:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._span.end()


def _record_error(span: trace.Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span``: an exception event (redacted text and stack), ``error.type``
    and ERROR status; for cancellation and other base exceptions only the last two."""
    if isinstance(exc, Exception):
        # The stack trace repeats the text (and source lines may hold literals): redact both.
        stack = redact("".join(traceback.format_exception(exc)))
        span.record_exception(
            exc, attributes={"exception.message": _short(str(exc)) or "", "exception.stacktrace": stack}
        )
        span.set_attribute("error.type", error_type(exc))
        span.set_status(Status(StatusCode.ERROR, _short(f"{type(exc).__name__}: {exc}")))
    else:
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


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
