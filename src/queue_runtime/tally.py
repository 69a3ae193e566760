"""The runtime's metrics as plain in-process arithmetic, read by OpenTelemetry at collection.

Per message the runtime only adds to integers and to fixed-bucket histograms kept here (a
`QueueTally` per queue, shared by every supervisor of that queue in the process). The
OpenTelemetry instruments are fed from these tallies when a reader collects:

* counters through observable counters (public API: any SDK sees them);
* histograms through `attach`, which makes every reader of an SDK ``MeterProvider`` merge our
  pre-aggregated histogram points into what it collects. This is what the OpenTelemetry
  specification calls a *MetricProducer*; the Python SDK (1.45) has none yet, so `attach`
  wraps each reader's collect callback (SDK internals, checked by the tests). Where that is
  not possible (a meter provider that is not the SDK's), `attach` returns False and the
  histograms forward every value to the API instruments, as before.

Either way a reader sees the same names, units, label sets, bucket bounds, counts and sums as
when every value was recorded through the SDK. Values are cumulative since the tally was
created; readers that prefer delta temporality get the difference since their last collect.

Thread safety: the runtime writes from the trio thread; a periodic exporter reads from its
own thread. Counter reads copy (``list(...)``, atomic under the GIL); histograms fold their
buffered values under a lock before they are read, and a histogram's count is taken as the sum
of its bucket counts, so count, buckets and sum always agree.
"""

from __future__ import annotations

import threading
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

__all__ = ["BucketHistogram", "QueueTally", "attach", "tally_for"]

#: Broker-call and handler latencies: 1 ms to 60 s, with 0.5 s exactly (the p95 alert threshold).
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
#: Session lifetimes: 100 ms to 1 h (an idle actor lives at least ``session_idle_timeout``).
SESSION_BUCKETS: Final = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


#: Values a histogram buffers before it sorts them into its buckets (the buffer's bound).
FOLD_AT: Final = 512


class BucketHistogram:
    """An explicit-bucket histogram: bucket ``i`` counts values in ``(bounds[i-1], bounds[i]]``
    (the last one everything above the last bound), as OpenTelemetry and Prometheus do.

    `record` only appends to a bounded buffer; `fold` (at every `FOLD_AT` values, and before
    anything is read) sorts the buffered values into the buckets in one go, which costs a
    fraction of bucketing each value as it comes. Reads (`counts`, `sum`, `min`, `max`) are
    valid after `fold`."""

    __slots__ = ("_lock", "bounds", "counts", "max", "min", "pending", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.pending: list[float] = []
        self._lock = threading.Lock()

    def record(self, value: float) -> None:
        """Add one value (an append; every `FOLD_AT` values, a `fold`)."""
        pending = self.pending
        pending.append(value)
        if len(pending) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Move the buffered values into the buckets. Safe from any thread: values recorded
        meanwhile stay buffered for the next fold."""
        with self._lock:
            pending = self.pending
            taken = len(pending)
            if not taken:
                return
            batch = pending[:taken]
            del pending[:taken]  # (appends made since `len` stay: each list operation is atomic)
            batch.sort()
            below = 0
            counts = self.counts
            for index, bound in enumerate(self.bounds):
                upto = bisect_right(batch, bound, below)
                counts[index] += upto - below
                below = upto
            counts[-1] += taken - below
            self.sum += sum(batch)
            if batch[0] < self.min:
                self.min = batch[0]
            if batch[-1] > self.max:
                self.max = batch[-1]

    def snapshot(self) -> tuple[list[int], float, float, float]:
        """Bucket counts, sum, min and max, all as of one moment (buffered values included)."""
        self.fold()
        with self._lock:
            return list(self.counts), self.sum, self.min, self.max

    @property
    def count(self) -> int:
        return sum(self.snapshot()[0])


class _Forwarding:
    """A histogram that records each value into an API instrument (no SDK to attach to)."""

    __slots__ = ("_attrs", "_instrument")

    def __init__(self, instrument: Any, attrs: dict[str, str]) -> None:
        self._instrument = instrument
        self._attrs = attrs

    def record(self, value: float) -> None:
        self._instrument.record(value, self._attrs)


#: name, description, buckets of each histogram a `QueueTally` keeps (its attribute is the name
#: without ``queue_`` and ``_seconds``).
HISTOGRAMS: Final = (
    ("queue_send_duration_seconds", "Send call latency.", LATENCY_BUCKETS),
    ("queue_receive_duration_seconds", "Receive call latency (long-poll wait included).", LATENCY_BUCKETS),
    ("queue_complete_duration_seconds", "Complete call latency.", LATENCY_BUCKETS),
    ("queue_process_duration_seconds", "handle() duration, per attempt.", LATENCY_BUCKETS),
    ("queue_session_duration_seconds", "Session (actor) lifetime.", SESSION_BUCKETS),
)


def _attribute(name: str) -> str:
    return name.removeprefix("queue_").removesuffix("_seconds")


class QueueTally:
    """Every count and histogram of one queue in this process.

    Plain counters are attributes (``received``, ``completed``, ...); labelled ones are dicts
    from the (already capped) label value to the count; histograms are `BucketHistogram`
    attributes named after their metric (``process_duration``, ...)."""

    __slots__ = (
        "_complete_pending",
        "_process_pending",
        "_receive_pending",
        "abandoned",
        "complete_duration",
        "completed",
        "created_ns",
        "dead_lettered",
        "errors",
        "process_duration",
        "queue",
        "receive_duration",
        "received",
        "retries",
        "send_duration",
        "sent",
        "session_duration",
        "sessions_abandoned",
        "sessions_accepted",
        "sessions_completed",
    )

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.created_ns = time.time_ns()
        self.received = 0
        self.completed = 0
        self.abandoned = 0
        self.retries = 0
        self.sessions_accepted = 0
        self.sent: dict[str, int] = {}
        self.dead_lettered: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.sessions_completed: dict[str, int] = {}
        self.sessions_abandoned: dict[str, int] = {}
        self.send_duration: BucketHistogram | _Forwarding = BucketHistogram(LATENCY_BUCKETS)
        receive, complete, process = (BucketHistogram(LATENCY_BUCKETS) for _ in range(3))
        self.receive_duration: BucketHistogram | _Forwarding = receive
        self.complete_duration: BucketHistogram | _Forwarding = complete
        self.process_duration: BucketHistogram | _Forwarding = process
        self.session_duration: BucketHistogram | _Forwarding = BucketHistogram(SESSION_BUCKETS)
        # The per-message histograms' buffers, held here too so the per-message methods reach
        # them in one step; None once the histograms forward (`forward_histograms`).
        self._receive_pending: list[float] | None = receive.pending
        self._complete_pending: list[float] | None = complete.pending
        self._process_pending: list[float] | None = process.pending

    def messages_received(self, count: int, seconds: float) -> None:
        """One receive call: ``received`` += ``count`` and its duration (empty polls too)."""
        self.received += count
        pending = self._receive_pending
        if pending is None:
            self.receive_duration.record(seconds)
        else:
            pending.append(seconds)
            if len(pending) >= FOLD_AT:
                self.receive_duration.fold()  # type: ignore[union-attr]

    def message_completed(self, seconds: float, handled: float | None) -> None:
        """One completed message: ``completed`` += 1, its complete call's duration and, when
        given, its ``handle()`` duration. The per-message path: the two values go straight
        into the histograms' buffers (both folded when the complete buffer is full; the
        process buffer, also filled by `BucketHistogram.record`, stays under twice the bound)."""
        self.completed += 1
        pending = self._complete_pending
        if pending is None:
            self.complete_duration.record(seconds)
            if handled is not None:
                self.process_duration.record(handled)
            return
        pending.append(seconds)
        if handled is not None:
            self._process_pending.append(handled)  # type: ignore[union-attr]
        if len(pending) >= FOLD_AT:
            self.complete_duration.fold()  # type: ignore[union-attr]
            self.process_duration.fold()  # type: ignore[union-attr]

    def forward_histograms(self, instruments: dict[str, Any]) -> None:
        """Record histogram values straight into ``instruments`` (by metric name) from now on."""
        for name, _, _ in HISTOGRAMS:
            setattr(self, _attribute(name), _Forwarding(instruments[name], {"queue": self.queue}))
        self._receive_pending = self._complete_pending = self._process_pending = None


_tallies: dict[str, QueueTally] = {}
_tallies_lock = threading.Lock()
#: Set by `attach` when histograms cannot be produced at collection (see `QueueTally.forward_histograms`).
_forward_to: dict[str, Any] | None = None


def tally_for(queue: str) -> QueueTally:
    """The process-wide tally of ``queue`` (created on first use, kept for the process's life,
    like the SDK keeps a counter's label sets)."""
    tally = _tallies.get(queue)
    if tally is None:
        with _tallies_lock:
            tally = _tallies.get(queue)
            if tally is None:
                tally = _tallies[queue] = QueueTally(queue)
                if _forward_to is not None:
                    tally.forward_histograms(_forward_to)
    return tally


def tallies() -> list[QueueTally]:
    """Every queue's tally (a copy: safe to iterate from any thread)."""
    return list(_tallies.values())


def counter_callback(name: str, label: str | None = None) -> Callable[[Any], Iterable[Any]]:
    """An observable-counter callback reporting the tally attribute ``name`` of every queue:
    one point per queue (``{"queue": q}``), or per label value (``{"queue": q, label: v}``)
    when the attribute is a dict."""
    from opentelemetry.metrics import Observation

    def observe(options: Any) -> Iterable[Any]:
        points = []
        for tally in tallies():
            value = getattr(tally, name)
            if label is None:
                points.append(Observation(value, {"queue": tally.queue}))
            else:
                for key, count in list(value.items()):
                    points.append(Observation(count, {"queue": tally.queue, label: key}))
        return points

    return observe


# -- producing histograms at collection ---------------------------------------------------------

_attached: weakref.WeakSet[Any] = weakref.WeakSet()
_attach_lock = threading.Lock()


def attach(provider: Any, scope_name: str, forwarding: Callable[[], dict[str, Any]]) -> bool:
    """Make every reader of ``provider`` (an SDK ``MeterProvider``) collect our histograms.

    Returns True when done (or done before). Otherwise (not an SDK provider, or an SDK whose
    internals differ) histograms forward each value to the API instruments ``forwarding()``
    creates (by metric name) from now on, and False is returned."""
    global _forward_to
    with _attach_lock:
        if provider in _attached:
            return True
        readers = _sdk_readers(provider)
        if readers is None:
            if _forward_to is not None:
                return False
            forward = _forward_to = forwarding()
            for tally in tallies():
                tally.forward_histograms(forward)
            return False
        for reader in readers:
            _wrap(reader, provider, scope_name)
        _attached.add(provider)
        return True


def _sdk_readers(provider: Any) -> list[Any] | None:
    try:
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError:  # pragma: no cover - the otel extra is a dev dependency here
        return None
    if not isinstance(provider, MeterProvider):
        return None
    readers = getattr(provider, "_metric_readers", None)
    if readers is None or not all(callable(getattr(r, "_collect", None)) for r in readers):
        return None
    return list(readers)


def _wrap(reader: Any, provider: Any, scope_name: str) -> None:
    from opentelemetry.sdk.metrics import Histogram as SdkHistogram
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    collect = reader._collect
    if getattr(collect, "_queue_runtime", False):
        return
    temporality = getattr(reader, "_instrument_class_temporality", {})
    delta = any(
        issubclass(kind, SdkHistogram) and value == AggregationTemporality.DELTA
        for kind, value in temporality.items()
        if isinstance(kind, type)
    )
    previous: dict[tuple[str, str], tuple[int, list[int], float]] = {}

    def collect_with_histograms(metric_reader: Any, timeout_millis: float = 10_000) -> Any:
        data = collect(metric_reader, timeout_millis=timeout_millis)
        return _merge(data, provider, scope_name, previous if delta else None)

    collect_with_histograms._queue_runtime = True  # type: ignore[attr-defined]
    reader._collect = collect_with_histograms


def _merge(
    data: Any,
    provider: Any,
    scope_name: str,
    previous: dict[tuple[str, str], tuple[int, list[int], float]] | None,
) -> Any:
    """``data`` (the SDK's `MetricsData`, or None) with our histograms in ``scope_name``."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        HistogramDataPoint,
        Metric,
        MetricsData,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.sdk.metrics.export import Histogram as HistogramData
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    now = time.time_ns()
    produced = []
    for name, description, _ in HISTOGRAMS:
        points = []
        for tally in tallies():
            histogram = getattr(tally, _attribute(name))
            if not isinstance(histogram, BucketHistogram):
                continue
            counts, value_sum, low, high = histogram.snapshot()
            total = sum(counts)
            if total == 0:
                continue
            start = tally.created_ns
            if previous is not None:
                key = (name, tally.queue)
                last = previous.get(key)
                previous[key] = (now, counts, value_sum)
                if last is not None:
                    start = last[0]
                    counts = [c - p for c, p in zip(counts, last[1], strict=True)]
                    value_sum -= last[2]
                    total = sum(counts)
                    if total == 0:
                        continue
            points.append(
                HistogramDataPoint(
                    attributes={"queue": tally.queue},
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    count=total,
                    sum=value_sum,
                    bucket_counts=counts,
                    explicit_bounds=list(histogram.bounds),
                    min=low,
                    max=high,
                )
            )
        if points:
            temporality = (
                AggregationTemporality.DELTA if previous is not None else AggregationTemporality.CUMULATIVE
            )
            produced.append(Metric(name, description, "s", HistogramData(points, temporality)))
    if not produced:
        return data
    if data is None or not data.resource_metrics:
        resource = provider._sdk_config.resource
        return MetricsData(
            [ResourceMetrics(resource, [ScopeMetrics(InstrumentationScope(scope_name), produced, "")], "")]
        )
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for index, scope in enumerate(scopes):
        if scope.scope.name == scope_name:
            scopes[index] = ScopeMetrics(scope.scope, [*scope.metrics, *produced], scope.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(InstrumentationScope(scope_name), produced, ""))
    return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])
