"""Telemetry: metric names/labels/values, spans and trace continuation, log fields, redaction.

The OpenTelemetry SDK is installed once per process (the global providers can be set only
once): a MeterProvider with an in-memory reader and a Prometheus reader, and a span processor
into an in-memory exporter. Each test uses its own queue name, so cumulative metrics do not
leak between tests, and clears the span exporter before it starts.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from queue_runtime import DeadLetter, MessageContext, RetryPolicy, SessionActor, Supervisor, SupervisorConfig
from queue_runtime import telemetry as telemetry_module
from queue_runtime.client import QueueClient
from queue_runtime.errors import AuthenticationFailed, ConfigurationError, ConnectionFailed, QueueError
from queue_runtime.message import Message, ReceivedMessage
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.telemetry import (
    LATENCY_BUCKETS,
    JsonFormatter,
    Telemetry,
    TextFormatter,
    configure_logging,
    redact,
    refresh_queue_stats,
    render_metrics,
    setup_prometheus,
)

ROOT = Path(__file__).resolve().parents[1]

# -- the SDK, once per process ------------------------------------------------------------------

_STATE = "_queue_runtime_test_otel"


@dataclass
class Otel:
    reader: InMemoryMetricReader
    spans: InMemorySpanExporter


class _WhileTesting(Sampler):
    """Records spans only while a test of this module runs, so the tracer provider this
    module must install (once per process) costs later tests of the session almost nothing."""

    active = False

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        # ALWAYS_ON passes the span's attributes and trace state through; DROP records nothing.
        return (ALWAYS_ON if self.active else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "queue-runtime telemetry tests"


_SAMPLER = _WhileTesting()


def _install() -> Otel:
    provider = metrics.get_meter_provider()
    state = getattr(provider, _STATE, None)
    if isinstance(state, Otel):
        return state
    if isinstance(provider, MeterProvider):
        pytest.fail("an SDK MeterProvider was installed before the telemetry tests (no in-memory reader)")
    reader = InMemoryMetricReader()
    prometheus = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False)
    provider = MeterProvider(metric_readers=[reader, prometheus])
    metrics.set_meter_provider(provider)
    tracer_provider = trace.get_tracer_provider()
    if not isinstance(tracer_provider, TracerProvider):
        tracer_provider = TracerProvider(sampler=_SAMPLER)
        trace.set_tracer_provider(tracer_provider)
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    state = Otel(reader, exporter)
    setattr(provider, _STATE, state)
    return state


@pytest.fixture
def otel() -> Iterator[Otel]:
    state = _install()
    state.spans.clear()
    _SAMPLER.active = True
    try:
        yield state
    finally:
        _SAMPLER.active = False
        state.spans.clear()


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:12]}"


def points(otel: Otel, name: str, queue: str) -> dict[frozenset[tuple[str, Any]], Any]:
    """Data points of instrument ``name`` whose ``queue`` label is ``queue``: attrs -> point."""
    found: dict[frozenset[tuple[str, Any]], Any] = {}
    data = otel.reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    attrs = dict(point.attributes or {})
                    if attrs.get("queue") == queue:
                        found[frozenset(attrs.items())] = point
    return found


def value(otel: Otel, name: str, queue: str, **labels: str) -> float:
    key = frozenset({"queue": queue, **labels}.items())
    point = points(otel, name, queue).get(key)
    if point is None:
        return 0
    assert isinstance(point, NumberDataPoint)
    return point.value


def received(
    body: bytes = b"{}", *, session_id: str | None = "s-1", delivery_count: int = 1, **kw: Any
) -> ReceivedMessage:
    return ReceivedMessage(
        message=Message(body=body, session_id=session_id, **kw), receipt="r", delivery_count=delivery_count
    )


# -- metrics ------------------------------------------------------------------------------------


def test_counters_and_histograms_after_successes_retries_and_dead_letters(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "memory")
    t.messages_sent(3, status="success", seconds=0.004)
    t.messages_sent(1, status="failure", seconds=0.2)
    batch = [received(message_id=f"m{i}") for i in range(3)]
    t.messages_received(batch, seconds=0.05)
    t.messages_received([], seconds=1.0)  # an empty long poll: duration only
    # m0 succeeds at once; m1 fails twice then succeeds; m2 fails, retries, then goes to the DLQ.
    for attempt in (1,):
        with t.process_span(batch[0], attempt):
            pass
    t.message_completed(batch[0], seconds=0.002)
    for attempt in (2, 3):
        t.retry_attempt(batch[1], attempt, ValueError("flaky"))
    t.message_completed(batch[1], seconds=0.7)
    t.retry_attempt(batch[2], 2, ValueError("still bad"))
    t.message_dead_lettered(batch[2], "MaxAttemptsExceeded", "ValueError: still bad")
    t.message_abandoned(received(message_id="m9"))
    t.error(ConnectionFailed("broker down"), operation="receive")
    t.error(ConnectionFailed("broker down"), operation="receive")
    t.error(AuthenticationFailed("denied"), operation="describe")

    assert value(otel, "queue_messages_sent", queue, status="success") == 3
    assert value(otel, "queue_messages_sent", queue, status="failure") == 1
    assert value(otel, "queue_messages_received", queue) == 3
    assert value(otel, "queue_messages_completed", queue) == 2
    assert value(otel, "queue_retry_attempts", queue) == 3
    assert value(otel, "queue_messages_dead_lettered", queue, reason="MaxAttemptsExceeded") == 1
    assert value(otel, "queue_messages_abandoned", queue) == 1
    assert value(otel, "queue_errors", queue, error_type="ConnectionFailed") == 2
    assert value(otel, "queue_errors", queue, error_type="AuthenticationFailed") == 1
    # Label sets are exactly the documented ones.
    assert {frozenset(dict(k)) for k in points(otel, "queue_messages_sent", queue)} == {
        frozenset({"queue", "status"})
    }
    assert [set(dict(k)) for k in points(otel, "queue_messages_received", queue)] == [{"queue"}]

    send = points(otel, "queue_send_duration_seconds", queue)[frozenset({("queue", queue)})]
    assert isinstance(send, HistogramDataPoint)
    assert send.count == 2 and send.sum == pytest.approx(0.204)
    assert tuple(send.explicit_bounds) == LATENCY_BUCKETS
    receive = points(otel, "queue_receive_duration_seconds", queue)[frozenset({("queue", queue)})]
    assert receive.count == 2 and receive.sum == pytest.approx(1.05)
    complete = points(otel, "queue_complete_duration_seconds", queue)[frozenset({("queue", queue)})]
    assert complete.count == 2
    # 0.002 s lands in the (0.001, 0.0025] bucket, 0.7 s in (0.5, 1.0].
    assert complete.bucket_counts[LATENCY_BUCKETS.index(0.0025)] == 1
    assert complete.bucket_counts[LATENCY_BUCKETS.index(1.0)] == 1
    process = points(otel, "queue_process_duration_seconds", queue)[frozenset({("queue", queue)})]
    assert process.count == 1


def test_units_and_instrument_types(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "aws_sqs")
    t.messages_sent(1, status="success", seconds=0.01)
    t.session_accepted("s")
    t.session_ended("s", seconds=2.0, reason="idle")
    data = otel.reader.get_metrics_data()
    assert data is not None
    units = {m.name: m.unit for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert units["queue_messages_sent"] == "1"
    assert units["queue_sessions_accepted"] == "1"
    assert units["queue_send_duration_seconds"] == "s"
    assert units["queue_session_duration_seconds"] == "s"


def test_session_counters_split_by_end_reason(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "azure_service_bus")
    for _ in range(4):
        t.session_accepted("s")
    t.session_ended("s", seconds=1.0, reason="idle")
    t.session_ended("s", seconds=2.0, reason="shutdown")
    t.session_ended("s", seconds=3.0, reason="lock_lost")
    t.session_ended("s", seconds=4.0, reason="error")
    assert value(otel, "queue_sessions_accepted", queue) == 4
    assert value(otel, "queue_sessions_completed", queue, reason="idle") == 1
    assert value(otel, "queue_sessions_completed", queue, reason="shutdown") == 1
    assert value(otel, "queue_sessions_abandoned", queue, reason="lock_lost") == 1
    assert value(otel, "queue_sessions_abandoned", queue, reason="error") == 1
    duration = points(otel, "queue_session_duration_seconds", queue)[frozenset({("queue", queue)})]
    assert duration.count == 4 and duration.sum == pytest.approx(10.0)


def test_gauges_follow_callbacks_add_up_and_disappear(otel: Otel, queue: str) -> None:
    active = {"a": 3, "b": 2}
    t1, t2 = Telemetry(queue, "memory"), Telemetry(queue, "memory")
    t1.observe_gauges(active_sessions=lambda: active["a"], breaker_state=lambda: 0)
    t2.observe_gauges(active_sessions=lambda: active["b"], breaker_state=lambda: 2)
    assert value(otel, "queue_active_sessions", queue) == 5
    assert value(otel, "queue_circuit_breaker_state", queue) == 2  # half-open beats closed
    active["a"] = 7
    t1.observe_gauges(active_sessions=lambda: active["a"], breaker_state=lambda: 1)
    assert value(otel, "queue_active_sessions", queue) == 9
    assert value(otel, "queue_circuit_breaker_state", queue) == 1  # open beats half-open

    def broken() -> int:
        raise RuntimeError("must be called from trio")

    t2.observe_gauges(active_sessions=broken, breaker_state=broken)  # skipped, never fails a scrape
    assert value(otel, "queue_active_sessions", queue) == 7
    t1.close()
    assert points(otel, "queue_active_sessions", queue) == {}
    t1.close()  # idempotent

    t3 = Telemetry(queue, "memory")
    t3.observe_gauges(active_sessions=lambda: 11, breaker_state=lambda: 0)
    assert value(otel, "queue_active_sessions", queue) == 11
    del t3
    gc.collect()  # a supervisor that went away takes its gauges with it
    assert points(otel, "queue_active_sessions", queue) == {}


class _FakeStats:
    def __init__(self) -> None:
        self.calls = 0
        self.fail_on = {2}

    async def queue_stats(self, queue: str) -> Any:
        from queue_runtime.providers.base import QueueStats

        self.calls += 1
        if self.calls in self.fail_on:
            raise ConnectionFailed("SharedAccessKey=hunter2-should-not-leak is unreachable")
        return QueueStats(
            queue=queue, active=10 * self.calls, in_flight=1, dead_letter=2, oldest_message_age=5.0
        )


async def test_refresh_queue_stats_feeds_depth_gauges(
    otel: Otel, queue: str, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    source = _FakeStats()
    async with trio.open_nursery() as nursery:
        await nursery.start(refresh_queue_stats, source, queue, 15.0)
        await trio.sleep(1)
        assert source.calls == 1
        assert value(otel, "queue_depth", queue, state="active") == 10
        assert value(otel, "queue_depth", queue, state="in_flight") == 1
        assert "state=scheduled" not in str(points(otel, "queue_depth", queue))  # None: not exported
        assert value(otel, "queue_dead_letter_depth", queue) == 2
        assert value(otel, "queue_oldest_message_age_seconds", queue) == 5.0
        await trio.sleep(15)  # second call fails: the last value stays, the error is counted
        assert source.calls == 2
        assert value(otel, "queue_depth", queue, state="active") == 10
        assert value(otel, "queue_errors", queue, error_type="ConnectionFailed") == 1
        await trio.sleep(15)
        assert source.calls == 3
        assert value(otel, "queue_depth", queue, state="active") == 30
        nursery.cancel_scope.cancel()
    assert points(otel, "queue_depth", queue) == {}  # unregistered on cancellation
    assert "hunter2" not in caplog.text


async def test_refresh_queue_stats_rejects_bad_interval(queue: str) -> None:
    with pytest.raises(ConfigurationError, match="interval"):
        await refresh_queue_stats(_FakeStats(), queue, 0)


@given(st.lists(st.text(max_size=80), max_size=200))
def test_label_cap_bounds_distinct_values(values: list[str]) -> None:
    cap = telemetry_module._LabelCap(10)
    mapped = [cap(v) for v in values]
    assert len(set(mapped)) <= 11  # ten real values plus "other"
    first = list(dict.fromkeys(values))[:10]
    for original, shown in zip(values, mapped, strict=True):
        assert shown == cap(original)  # stable
        assert len(shown) <= 64
        if original in first and original:
            assert shown == original[:64]


# -- Prometheus -----------------------------------------------------------------------------------

EXPECTED_SAMPLES = {
    "queue_messages_sent_total": {"queue", "status"},
    "queue_messages_received_total": {"queue"},
    "queue_messages_completed_total": {"queue"},
    "queue_messages_abandoned_total": {"queue"},
    "queue_messages_dead_lettered_total": {"queue", "reason"},
    "queue_errors_total": {"queue", "error_type"},
    "queue_retry_attempts_total": {"queue"},
    "queue_sessions_accepted_total": {"queue"},
    "queue_sessions_completed_total": {"queue", "reason"},
    "queue_sessions_abandoned_total": {"queue", "reason"},
    "queue_send_duration_seconds_bucket": {"queue", "le"},
    "queue_send_duration_seconds_count": {"queue"},
    "queue_send_duration_seconds_sum": {"queue"},
    "queue_receive_duration_seconds_bucket": {"queue", "le"},
    "queue_complete_duration_seconds_bucket": {"queue", "le"},
    "queue_process_duration_seconds_bucket": {"queue", "le"},
    "queue_session_duration_seconds_bucket": {"queue", "le"},
    "queue_active_sessions": {"queue"},
    "queue_circuit_breaker_state": {"queue"},
    "queue_depth": {"queue", "state"},
    "queue_dead_letter_depth": {"queue"},
    "queue_oldest_message_age_seconds": {"queue"},
    "queue_secret_refresh_failures_total": {"queue", "setting", "store"},
}


def _exercise(t: Telemetry) -> None:
    m = received()
    t.messages_sent(2, status="success", seconds=0.01)
    t.messages_received([m], seconds=0.02)
    with t.process_span(m, 1):
        pass
    t.message_completed(m, seconds=0.003)
    t.message_abandoned(m)
    t.message_dead_lettered(m, "DeserializationFailed", None)
    t.retry_attempt(m, 2, ValueError("x"))
    t.error(ConnectionFailed("down"), operation="receive")
    t.session_accepted("s-1")
    t.session_ended("s-1", seconds=1.0, reason="idle")
    t.session_ended("s-1", seconds=1.0, reason="lock_lost")
    t.observe_gauges(active_sessions=lambda: 1, breaker_state=lambda: 0)

    class Stats:
        active, in_flight, scheduled, dead_letter, oldest_message_age = 4, 1, 0, 2, 3.5

    t.observe_queue_depth(lambda: Stats)  # type: ignore[arg-type, return-value]
    from queue_runtime.secrets import record_refresh_failure

    record_refresh_failure(t.queue, "azure.connection_string", "keyvault")


def scraped_samples(text: str, queue: str) -> dict[str, set[frozenset[str]]]:
    samples: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("queue") == queue:
                samples.setdefault(sample.name, set()).add(frozenset(sample.labels))
    return samples


def test_prometheus_scrape_shows_exactly_the_guide_names(otel: Otel, queue: str) -> None:
    assert setup_prometheus() is False  # an SDK provider is installed already: nothing changes
    t = Telemetry(queue, "memory")
    _exercise(t)
    text = render_metrics().decode()
    samples = scraped_samples(text, queue)
    for name, labels in EXPECTED_SAMPLES.items():
        assert samples.get(name) is not None, f"{name} missing from the scrape"
        assert all(set(label_set) == labels for label_set in samples[name]), (name, samples[name])
    assert set(samples) <= _exported_sample_names(), set(samples) - _exported_sample_names()
    # No target_info / otel_scope labels leak into our series.
    assert "otel_scope" not in text and "target_info" not in text
    assert f'queue_send_duration_seconds_bucket{{le="0.5",queue="{queue}"}}' in text
    t.close()


def _exported_sample_names() -> set[str]:
    names = set()
    for name, labels in EXPECTED_SAMPLES.items():
        names.add(name)
        if "le" in labels:
            base = name.removesuffix("_bucket")
            names |= {base + "_bucket", base + "_count", base + "_sum"}
    return names


def _exported_metric_names() -> set[str]:
    """Every series name we export, plus the histogram family names."""
    names = _exported_sample_names()
    return names | {n.removesuffix("_bucket") for n in names if n.endswith("_bucket")}


# -- the shipped alert rules and dashboard only use metrics we export -------------------------------

_NAME = r"\b(queue_[a-z_]+)\b"


def _metric_refs(expr: str) -> set[str]:
    import re

    return set(re.findall(_NAME, expr))


def test_alert_rules_use_exported_metrics_only() -> None:
    rules = yaml.safe_load((ROOT / "docs/alerts/queue-runtime.rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert len(exprs) >= 6
    for alert in ("QueueHighDeadLetterRate", "QueueHighLatency", "QueueDepthGrowing",
                  "QueueHighRetryRate", "QueueSessionLockTimeouts", "QueueConnectionFailures"):  # fmt: skip
        assert alert in alerts
    used = set().union(*(_metric_refs(e) for e in exprs))
    assert used, "no metric referenced"
    assert used <= _exported_metric_names(), used - _exported_metric_names()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"critical", "warning"}
                assert rule["annotations"]["summary"]


def test_grafana_dashboard_uses_exported_metrics_only() -> None:
    dashboard = json.loads((ROOT / "docs/grafana/queue-runtime.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 8
    used = set().union(*(_metric_refs(e) for e in exprs))
    assert used <= _exported_metric_names(), used - _exported_metric_names()
    # The dashboard shows every counter family at least once.
    for counter in ("queue_messages_sent_total", "queue_messages_dead_lettered_total", "queue_errors_total"):
        assert counter in used


def test_operations_doc_names_every_metric() -> None:
    doc = (ROOT / "docs/operations.md").read_text()
    for name in _exported_metric_names():
        if name.endswith(("_bucket", "_count", "_sum")):
            continue
        assert name in doc, name


# -- traces -----------------------------------------------------------------------------------------


def _by_name(otel: Otel) -> dict[str, ReadableSpan]:
    spans = otel.spans.get_finished_spans()
    return {span.name.split(" ")[0]: span for span in spans}


def test_producer_trace_continues_into_processing(otel: Otel, queue: str) -> None:
    producer, consumer = Telemetry(queue, "memory"), Telemetry(queue, "memory")
    outgoing = Message(body=b"payload", session_id="s-7", correlation_id="c-1")
    with producer.send_span([outgoing]):
        properties = producer.inject({"app": "x"})
    assert properties["app"] == "x" and properties["traceparent"].startswith("00-")
    message = ReceivedMessage(
        message=Message(
            body=b"payload", session_id="s-7", message_id=outgoing.message_id, properties=properties
        ),
        delivery_count=2,
    )
    with consumer.session_span("s-7"):
        with consumer.process_span(message, 1), consumer.settle_span("complete", message):
            pass
        with consumer.settle_span("dead_letter", message):
            pass
    spans = otel.spans.get_finished_spans()
    send = next(s for s in spans if s.name == f"send {queue}")
    process = next(s for s in spans if s.name == f"process {queue}")
    session = next(s for s in spans if s.name == f"session {queue}")
    complete = next(s for s in spans if s.name == f"complete {queue}")
    dead = next(s for s in spans if s.name == f"dead_letter {queue}")
    assert send.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert complete.kind is SpanKind.CLIENT and session.kind is SpanKind.INTERNAL
    # Same trace, and the send span is the process span's parent.
    assert process.context.trace_id == send.context.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    # The session span is linked, not the parent.
    assert [link.context.span_id for link in process.links] == [session.context.span_id]
    # A settle inside the process span is its child; one outside it joins the producer's trace.
    assert complete.parent is not None and complete.parent.span_id == process.context.span_id
    assert dead.parent is not None and dead.parent.span_id == send.context.span_id
    assert [link.context.span_id for link in dead.links] == [session.context.span_id]
    assert process.attributes is not None
    assert dict(process.attributes) | {} == {
        "messaging.system": "memory",
        "messaging.destination": queue,
        "messaging.destination.name": queue,
        "messaging.operation": "process",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.message_id": outgoing.message_id,
        "messaging.message.id": outgoing.message_id,
        "messaging.conversation_id": "s-7",
        "messaging.message.delivery_count": 2,
        "queue_runtime.attempt": 1,
    }
    assert send.attributes is not None and send.attributes["messaging.operation"] == "send"
    assert send.attributes["messaging.message.conversation_id"] == "c-1"
    assert session.attributes is not None and session.attributes["messaging.conversation_id"] == "s-7"
    assert dead.attributes is not None and dead.attributes["messaging.operation"] == "dead_letter"


def test_without_producer_context_messages_are_children_of_the_session(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "aws_sqs")
    message = received(session_id="g-1")
    with t.session_span("g-1"):
        with t.process_span(message, 1):
            pass
        t.session_ended("g-1", seconds=1.5, reason="idle")
    spans = _by_name(otel)
    assert spans["process"].parent is not None
    assert spans["process"].parent.span_id == spans["session"].context.span_id
    assert spans["process"].links == ()
    assert spans["session"].attributes is not None
    assert spans["session"].attributes["queue_runtime.session.end_reason"] == "idle"
    assert spans["session"].attributes["messaging.system"] == "aws_sqs"


def test_a_batch_send_is_one_span(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "memory")
    with t.send_span([Message(body=b"a"), Message(body=b"b"), Message(body=b"c")]):
        pass
    (span,) = otel.spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 3
    assert "messaging.message.id" not in span.attributes


def test_receive_span_links_producers(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "memory")
    with t.send_span([Message(body=b"x")]):
        props = t.inject({})
    traced = ReceivedMessage(message=Message(body=b"x", properties=props))
    t.messages_received([traced, received()], seconds=0.25)
    t.messages_received([], seconds=1.0)  # empty polls make no span
    spans = otel.spans.get_finished_spans()
    send = next(s for s in spans if s.name.startswith("send"))
    (receive,) = [s for s in spans if s.name.startswith("receive")]
    assert receive.kind is SpanKind.CONSUMER
    assert [link.context.span_id for link in receive.links] == [send.context.span_id]
    assert receive.end_time is not None and receive.start_time is not None
    assert receive.end_time - receive.start_time == pytest.approx(0.25e9, rel=0.01)
    assert receive.attributes is not None and receive.attributes["messaging.batch.message_count"] == 2


def test_process_span_records_errors_redacted_and_reraises(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "azure_service_bus")
    with pytest.raises(ValueError), t.process_span(received(), 3):
        raise ValueError("could not connect: Endpoint=sb://x/;SharedAccessKey=TOPSECRET-abc123;")
    (span,) = otel.spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "ValueError"
    (event,) = span.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert "SharedAccessKey=***" in str(event.attributes["exception.message"])
    dumped = span.to_json()
    assert "TOPSECRET" not in dumped


def test_configured_secret_values_are_masked_on_spans(otel: Otel, queue: str) -> None:
    from queue_runtime.config import Secret

    configured = "plainSECRETvalue0for0spans0test"
    Secret(configured)  # what loading settings does: the value is now known to redact()
    t = Telemetry(queue, "aws_sqs")
    message = received(session_id=f"s-{configured}", correlation_id=configured)
    with pytest.raises(RuntimeError), t.process_span(message, 1):
        raise RuntimeError(f"auth failed for {configured}")  # no key= prefix to go by
    (span,) = otel.spans.get_finished_spans()
    dumped = span.to_json()
    assert configured not in dumped
    assert "auth failed for ***" in dumped
    assert span.attributes is not None and span.attributes["messaging.conversation_id"] == "s-***"


async def test_secret_refresh_failures_are_counted(otel: Otel, queue: str) -> None:
    from queue_runtime.config import load_settings
    from queue_runtime.secrets import SecretResolver

    class Refusing:
        async def read(self, reference: Any) -> str:
            raise AuthenticationFailed("access to the vault refused")

        async def aclose(self) -> None:
            pass

    settings = load_settings(
        env={}, provider="azure", queue=queue, azure={"connection_string": "keyvault://vault1/sb"}
    )
    resolver = SecretResolver(settings, stores={"keyvault": Refusing()})
    assert await resolver.refresh() is False
    await resolver.refresh_after_failure()
    labels = {"setting": "azure.connection_string", "store": "keyvault"}
    assert value(otel, "queue_secret_refresh_failures", queue, **labels) == 2
    assert resolver.failures == 2


async def test_cancellation_marks_the_span_without_an_exception_event(otel: Otel, queue: str) -> None:
    t = Telemetry(queue, "memory")
    with trio.move_on_after(0.01):
        with t.process_span(received(), 1):
            await trio.sleep(10)
    (span,) = otel.spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "Cancelled"
    assert span.events == ()


def test_inject_without_a_span_adds_nothing(otel: Otel, queue: str) -> None:
    original = {"k": "v"}
    assert Telemetry(queue, "memory").inject(original) == {"k": "v"}
    assert original == {"k": "v"}


# -- logs -------------------------------------------------------------------------------------------

BODY_CANARY = "BODY-CANARY-5d1e"
SECRET_CANARY = "SECRET-CANARY-7c2b"
GUIDE_FIELDS = ("queue_name", "message_id", "session_id", "correlation_id", "operation", "delivery_count")


def test_log_records_carry_the_guide_fields_and_never_bodies_or_secrets(
    otel: Otel, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="queue_runtime")
    t = Telemetry(queue, "memory")
    m = received(f'{{"card": "{BODY_CANARY}"}}'.encode(), session_id="s-9", correlation_id="corr-1",
                 delivery_count=3)  # fmt: skip
    secret_error = ConnectionFailed(f"amqp error; Endpoint=sb://ns/;SharedAccessKey={SECRET_CANARY};x")
    with t.process_span(m, 1):
        t.messages_received([m], seconds=0.01)
        t.retry_attempt(m, 2, ValueError(f"aws_secret_access_key={SECRET_CANARY} rejected"))
        t.message_completed(m, seconds=0.01)
        t.message_abandoned(m)
        t.message_dead_lettered(
            m, "MaxAttemptsExceeded", f"ValueError: Authorization: Bearer {SECRET_CANARY}"
        )
        t.error(secret_error, operation="receive")
        t.error(AuthenticationFailed(f"AccountKey={SECRET_CANARY} denied"), operation="send")
        t.log(logging.INFO, "custom", operation="complete", message=m, message_extra="kept", args="clash")
    records = [r for r in caplog.records if getattr(r, "queue_name", None) == queue]
    by_op = {(r.operation, r.levelno) for r in records}
    assert ("receive", logging.DEBUG) in by_op
    assert ("process", logging.WARNING) in by_op  # retry
    assert ("complete", logging.DEBUG) in by_op
    assert ("abandon", logging.INFO) in by_op
    assert ("dead_letter", logging.ERROR) in by_op
    assert ("receive", logging.WARNING) in by_op  # transient error
    assert ("send", logging.ERROR) in by_op  # permanent error
    for record in records:
        for field in GUIDE_FIELDS:
            assert hasattr(record, field), (field, record.getMessage())
        if record.operation not in ("receive", "send") or record.levelno == logging.DEBUG:
            assert record.message_id == m.message_id
            assert record.session_id == "s-9"
            assert record.correlation_id == "corr-1"
            assert record.delivery_count == 3
            assert len(record.trace_id) == 32 and len(record.span_id) == 16
    custom = next(r for r in records if r.getMessage() == "custom")
    assert custom.message_extra == "kept" and custom.x_args == "clash"
    dead = next(r for r in records if r.operation == "dead_letter")
    assert dead.reason == "MaxAttemptsExceeded"
    formatter, texts = JsonFormatter(), TextFormatter()
    for record in records:
        for line in (formatter.format(record), texts.format(record), str(record.__dict__)):
            assert BODY_CANARY not in line
            assert SECRET_CANARY not in line


def test_json_and_text_formatters(queue: str) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("queue_runtime").level)
    try:
        configure_logging("debug", "json", stream=stream)
        configure_logging("debug", "json", stream=stream)  # replaces, does not add
        assert sum(getattr(h, "_queue_runtime", False) for h in root.handlers) == 1
        t = Telemetry(queue, "memory")
        m = received(session_id="s-1", correlation_id="c-9")
        t.message_completed(m, seconds=0.5)
        try:
            raise RuntimeError(f"token=abc {SECRET_CANARY}x SharedAccessKey={SECRET_CANARY}")
        except RuntimeError:
            logging.getLogger("queue_runtime").exception("boom", extra={"queue_name": queue})
        lines = [line for line in stream.getvalue().splitlines() if queue in line]
        assert len(lines) == 2
        first, second = (json.loads(line) for line in lines)
        assert list(first)[:10] == [
            "timestamp", "level", "logger", "message", "queue_name", "operation", "message_id", "session_id",
            "correlation_id", "delivery_count",
        ]  # fmt: skip
        assert first["level"] == "DEBUG" and first["operation"] == "complete"
        assert first["message_id"] == m.message_id and first["duration_ms"] == 500.0
        assert first["timestamp"].endswith("+00:00")
        assert (
            "RuntimeError" in second["exception"]
            and f"SharedAccessKey={SECRET_CANARY}" not in second["exception"]
        )
        extra = {"queue_name": queue, "detail": f"pwd={SECRET_CANARY}"}
        logging.getLogger("queue_runtime").warning("x", extra=extra)
        assert json.loads(stream.getvalue().splitlines()[-1])["detail"] == "pwd=***"

        text_stream = io.StringIO()
        configure_logging("info", "text", stream=text_stream)
        t.message_completed(m, seconds=0.5)  # DEBUG: filtered at info
        t.session_accepted("s-2")
        out = text_stream.getvalue()
        assert "completed" not in out
        assert f"INFO queue_runtime: session accepted queue_name={queue} operation=accept_session" in out
        assert "session_id=s-2" in out and "message_id" not in out  # None fields are left out
        assert logging.getLogger("botocore").level == logging.WARNING
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_queue_runtime", False):
                root.removeHandler(handler)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("queue_runtime").setLevel(saved[2])


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml"), (True, "json")])
def test_configure_logging_rejects_bad_values(level: Any, fmt: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        configure_logging(level, fmt)
    assert "\n" not in str(info.value)


# -- redaction --------------------------------------------------------------------------------------

_SECRET = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-", min_size=12, max_size=60
)
_TEMPLATES = [
    "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey={s};EntityPath=q",
    "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={s};EndpointSuffix=core.windows.net",
    "aws_secret_access_key={s}",
    "AWS_SECRET_ACCESS_KEY = {s}",
    "{{'aws_secret_access_key': '{s}', 'region': 'eu'}}",
    '{{"SecretAccessKey": "{s}"}}',
    "Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/x, SignedHeaders=host, Signature={s}",
    "Authorization: Bearer {s}",
    "'Authorization': 'SharedAccessSignature sr=x&sig={s}&se=1&skn=Root'",
    "https://q.amazonaws.com/?X-Amz-Signature={s}&X-Amz-Date=1",
    "SharedAccessSignature sr=sb%3a%2f%2fns&sig={s}&se=1",
    "failed with Signature={s} in request",
]


@settings(max_examples=200)
@given(secret=_SECRET, template=st.sampled_from(_TEMPLATES), prefix=st.text(max_size=20))
def test_redact_masks_credentials(secret: str, template: str, prefix: str) -> None:
    assume(secret not in prefix + " " + template.format(s=""))
    text = prefix + " " + template.format(s=secret)
    masked = redact(text)
    assert secret not in masked
    assert "***" in masked
    assert redact(masked) == masked  # idempotent


def test_redact_keeps_ordinary_text() -> None:
    for text in (
        "queue 'orders' not found",
        "session s-1 lock lost after 30.0 s",
        "Endpoint=sb://ns/;EntityPath=q",
    ):
        assert redact(text) == text
    assert redact("Endpoint=sb://ns/;SharedAccessKeyName=Root;SharedAccessKey=abc=;EntityPath=q") == (
        "Endpoint=sb://ns/;SharedAccessKeyName=Root;SharedAccessKey=***;EntityPath=q"
    )


def test_errors_carry_their_type_label() -> None:
    assert telemetry_module.error_type(ConnectionFailed("x")) == "ConnectionFailed"
    assert telemetry_module.error_type(KeyError("x")) == "KeyError"
    assert telemetry_module.error_type(QueueError("x")) == "QueueError"


# -- without an SDK: near-zero cost, nothing imported -------------------------------------------------


def test_without_sdk_everything_is_a_cheap_no_op() -> None:
    script = textwrap.dedent(
        """
        import sys, time, json
        from queue_runtime.telemetry import Telemetry, tracing_enabled
        from queue_runtime.message import Message, ReceivedMessage
        t = Telemetry("orders", "memory")
        m = ReceivedMessage(message=Message(body=b"x", session_id="s"))
        assert not tracing_enabled()
        assert t.inject({"a": "b"}) == {"a": "b"}
        def bench(fn, n=20000):
            fn()
            start = time.perf_counter_ns()
            for _ in range(n):
                fn()
            return (time.perf_counter_ns() - start) / n
        def process():
            with t.process_span(m, 1):
                pass
        def settle():
            with t.settle_span("complete", m):
                pass
        result = {
            "process_span": bench(process),
            "settle_span": bench(settle),
            "message_completed": bench(lambda: t.message_completed(m, seconds=0.001)),
            "messages_received": bench(lambda: t.messages_received([m], seconds=0.001)),
            "inject": bench(lambda: t.inject({})),
            "sdk_imported": any(name.startswith("opentelemetry.sdk") for name in sys.modules),
        }
        # An SDK installed later (after our instruments exist) sees everything from then on.
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        assert tracing_enabled()
        t.message_completed(m, seconds=0.001)
        with t.process_span(m, 1):
            pass
        completed = [
            point.value
            for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
            for metric in sm.metrics if metric.name == "queue_messages_completed"
            for point in metric.data.data_points
        ]
        assert completed == [1], completed
        assert [span.name for span in exporter.get_finished_spans()] == ["process orders"]
        print(json.dumps(result))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("sdk_imported") is False
    # Generous bounds (shared CI cores); typical figures are a few hundred ns to ~2 us.
    for name, ns in result.items():
        assert ns < 25_000, (name, ns)
    print(result)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_promtool_validates_rules_and_dashboard_queries(tmp_path: Path) -> None:
    alerts = ROOT / "docs/alerts"
    checked = subprocess.run(
        ["promtool", "check", "rules", str(alerts / "queue-runtime.rules.yml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Unit tests: each alert fires on synthetic series that break its threshold, not below it.
    tested = subprocess.run(
        ["promtool", "test", "rules", str(alerts / "queue-runtime.rules.test.yml")],
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every dashboard query parses (Grafana variables replaced by concrete values).
    dashboard = json.loads((ROOT / "docs/grafana/queue-runtime.json").read_text())
    records = []
    for i, panel in enumerate(dashboard["panels"]):
        for j, target in enumerate(panel.get("targets", [])):
            expr = (
                target["expr"]
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$queue", ".*")
            )
            records.append({"record": f"dashboard:panel{i}_{j}", "expr": expr})
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    parsed = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr


# -- a real run: client → in-memory broker → supervisor → actor ---------------------------------------


class _Event(msgspec.Struct):
    kind: str


class _Actor(SessionActor[_Event]):
    async def handle(self, event: _Event, ctx: MessageContext) -> None:
        if event.kind == "flaky" and ctx.attempt == 1:
            raise ValueError("flaky once")
        if event.kind == "bad":
            raise DeadLetter("Rejected", "bad input")
        if event.kind == "poison":
            raise ValueError("always fails")


async def test_a_real_run_reports_metrics_and_one_trace_per_message(
    otel: Otel, queue: str, autojump_clock: trio.testing.MockClock
) -> None:
    kinds = {"s-1": ["ok", "flaky", "bad", "ok"], "s-2": ["poison", "ok"]}
    messages = [Message.json({"kind": k}, session_id=s) for s, ks in kinds.items() for k in ks]
    config = SupervisorConfig(
        queue=queue,
        retry=RetryPolicy(max_attempts=2, initial_backoff=0.5, jitter=0.0),
        session_idle_timeout=1.0,
    )
    async with InMemoryProvider() as provider:
        await QueueClient(provider).send_batch(queue, messages)
        supervisor = Supervisor(provider, _Actor, config)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            with trio.fail_after(60):
                while (stats := supervisor.stats()).completed + stats.dead_lettered < len(messages):
                    await trio.sleep(0.1)
            supervisor.stop()
        supervisor.telemetry.close()

    assert value(otel, "queue_messages_sent", queue, status="success") == 6
    assert value(otel, "queue_messages_received", queue) == 6
    assert value(otel, "queue_messages_completed", queue) == 4  # ok, flaky, ok, ok
    assert value(otel, "queue_retry_attempts", queue) == 2  # flaky and poison, once each
    assert value(otel, "queue_messages_dead_lettered", queue, reason="Rejected") == 1
    assert value(otel, "queue_messages_dead_lettered", queue, reason="MaxAttemptsExceeded") == 1
    assert value(otel, "queue_sessions_accepted", queue) == 2
    ended = value(otel, "queue_sessions_completed", queue, reason="idle") + value(
        otel, "queue_sessions_completed", queue, reason="shutdown"
    )
    assert ended == 2

    spans = otel.spans.get_finished_spans()
    (send,) = [s for s in spans if s.name == f"send {queue}"]
    processes = [s for s in spans if s.name == f"process {queue}"]
    assert len(processes) == 8  # 6 messages, two of them twice
    for span in processes:
        assert span.context.trace_id == send.context.trace_id
        assert span.parent is not None and span.parent.span_id == send.context.span_id
    failed = [s for s in processes if s.status.status_code is StatusCode.ERROR]
    assert sorted(str(s.attributes["error.type"]) for s in failed if s.attributes) == [
        "DeadLetter", "ValueError", "ValueError", "ValueError",
    ]  # fmt: skip
    sessions = [s for s in spans if s.name == f"session {queue}"]
    assert len(sessions) == 2
    session_ids = {s.context.span_id for s in sessions}
    assert all(link.context.span_id in session_ids for s in processes for link in s.links)
    settles = [s for s in spans if s.name in (f"complete {queue}", f"dead_letter {queue}")]
    assert len(settles) == 6
    assert all(s.context.trace_id == send.context.trace_id for s in settles)


# -- issue 15: what the telemetry said that was not true ------------------------------------------


async def test_a_real_run_counts_handler_errors_empty_polls_and_sets_end_reasons(
    otel: Otel, queue: str, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Handler exceptions reach ``queue_errors_total``; every receive call (empty long polls
    included) is in the receive histogram; each session span carries its end reason; the
    dead-letter ERROR line carries the message's own trace, not the session's."""
    caplog.set_level(logging.INFO, logger="queue_runtime")
    kinds = {"s-1": ["ok", "flaky", "ok"], "s-2": ["poison", "ok"]}
    messages = [Message.json({"kind": k}, session_id=s) for s, ks in kinds.items() for k in ks]
    config = SupervisorConfig(
        queue=queue,
        retry=RetryPolicy(max_attempts=2, initial_backoff=0.5, jitter=0.0),
        session_idle_timeout=3.0,
        receive_timeout=1.0,
    )
    async with InMemoryProvider() as provider:
        await QueueClient(provider).send_batch(queue, messages)
        supervisor = Supervisor(provider, _Actor, config)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            with trio.fail_after(60):
                while supervisor.stats().sessions_started < 2 or supervisor.stats().active_sessions:
                    await trio.sleep(0.1)
            supervisor.stop()
        supervisor.telemetry.close()

    # flaky once + poison twice, by class name.
    assert value(otel, "queue_errors", queue, error_type="ValueError") == 3
    # Each session: one receive with messages, then empty 1 s polls until 3 s idle.
    receive = points(otel, "queue_receive_duration_seconds", queue)[frozenset({("queue", queue)})]
    assert isinstance(receive, HistogramDataPoint)
    assert receive.count >= 2 + 2 * 2, receive.count
    spans = otel.spans.get_finished_spans()
    sessions = [s for s in spans if s.name == f"session {queue}"]
    assert len(sessions) == 2
    assert all(s.attributes and s.attributes["queue_runtime.session.end_reason"] == "idle" for s in sessions)
    (send,) = [s for s in spans if s.name == f"send {queue}"]
    (dead,) = [r for r in caplog.records if getattr(r, "operation", None) == "dead_letter"]
    assert dead.trace_id == f"{send.context.trace_id:032x}"  # the message's trace


def test_each_label_has_its_own_cap(otel: Otel, queue: str) -> None:
    """A flood of distinct dead-letter reasons must not turn session end reasons (or error
    types) into "other": the session lock-timeout alert reads them."""
    t = Telemetry(queue, "memory")
    m = received()
    for index in range(telemetry_module.MAX_LABEL_VALUES + 10):
        t.message_dead_lettered(m, f"reason-{queue}-{index}", None)
    assert value(otel, "queue_messages_dead_lettered", queue, reason="other") >= 10  # cap reached
    t.session_ended("s", seconds=1.0, reason=f"ended-{queue}")
    assert value(otel, "queue_sessions_abandoned", queue, reason=f"ended-{queue}") == 1
    t.handler_failed(type(f"Err{queue[-6:]}", (Exception,), {})())
    assert value(otel, "queue_errors", queue, error_type=f"Err{queue[-6:]}") == 1


def test_histograms_are_the_same_through_every_reader(otel: Otel, queue: str) -> None:
    """The pre-aggregated histograms: same bounds, counts and sums on the in-memory reader and
    on the Prometheus scrape, bucket edges inclusive (``le``)."""
    t = Telemetry(queue, "memory")
    for seconds in (0.001, 0.0011, 0.5, 0.5, 61.0):
        t.handled(seconds)
    point = points(otel, "queue_process_duration_seconds", queue)[frozenset({("queue", queue)})]
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == LATENCY_BUCKETS
    assert point.count == 5 and point.sum == pytest.approx(62.0021)
    assert point.min == 0.001 and point.max == 61.0
    counts = dict(zip([*LATENCY_BUCKETS, math.inf], point.bucket_counts, strict=True))
    assert counts[0.001] == 1 and counts[0.0025] == 1 and counts[0.5] == 2 and counts[math.inf] == 1
    scraped = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(render_metrics().decode())
        for sample in family.samples
        if sample.labels.get("queue") == queue
    }
    assert scraped[("queue_process_duration_seconds_count", None)] == 5
    assert scraped[("queue_process_duration_seconds_bucket", "0.001")] == 1
    assert scraped[("queue_process_duration_seconds_bucket", "0.5")] == 4
    assert scraped[("queue_process_duration_seconds_bucket", "+Inf")] == 5
    assert scraped[("queue_process_duration_seconds_sum", None)] == pytest.approx(62.0021)


def test_a_traceparent_in_correlation_id_is_the_producer_context(
    otel: Otel, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The operations guide propagates trace context through ``correlation_id``: a message
    with a W3C ``traceparent`` there (and none in its properties) continues that trace."""
    caplog.set_level(logging.DEBUG, logger="queue_runtime")
    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    t = Telemetry(queue, "memory")
    m = received(correlation_id=f"00-{trace_id}-{span_id}-01")
    plain = received(correlation_id="order-1234")
    with t.session_span("s-1"):
        with t.process_span(m, 1):
            pass
        with t.process_span(plain, 1):
            pass
        t.message_completed(m, seconds=0.001)
    process, process_plain = [s for s in otel.spans.get_finished_spans() if s.name == f"process {queue}"]
    assert f"{process.context.trace_id:032x}" == trace_id
    assert process.parent is not None and f"{process.parent.span_id:016x}" == span_id
    (session,) = [s for s in otel.spans.get_finished_spans() if s.name == f"session {queue}"]
    assert process_plain.parent is not None and process_plain.parent.span_id == session.context.span_id
    (completed,) = [r for r in caplog.records if getattr(r, "operation", None) == "complete"]
    assert completed.trace_id == trace_id


async def test_a_worker_without_metrics_port_still_reports_depth_to_an_sdk(
    otel: Otel, queue: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Metrics exported over OTLP only (an SDK meter provider, no ``--metrics-port``): the
    queue-depth gauges are refreshed too, or the depth alerts could never fire."""
    from queue_runtime.config import load_settings
    from queue_runtime.entrypoint import serve_worker

    settings = load_settings(env={}, provider="memory", queue=queue, receive_timeout=1)
    assert settings.telemetry.metrics_port is None
    async with InMemoryProvider() as provider:
        provider.create_queue(queue, requires_session=True)
        await QueueClient(provider).send_batch(
            queue, [Message.json({"kind": "ok"}, session_id=f"s{i}") for i in range(3)]
        )

        async with trio.open_nursery() as nursery:
            supervisor = await nursery.start(
                partial(serve_worker, _Stuck, settings, provider=provider, install_signal_handlers=False)
            )
            await trio.sleep(1)
            depth = points(otel, "queue_depth", queue)
            assert {dict(key)["state"] for key in depth} >= {"active", "in_flight"}, depth
            supervisor.stop()
            _Stuck.release.set()


class _Stuck(SessionActor[_Event]):
    release = trio.Event()

    async def handle(self, event: _Event, ctx: MessageContext) -> None:
        await self.release.wait()


async def test_a_telemetry_subclass_with_the_older_hook_signature_sees_every_completion(
    queue: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A subclass written against ``message_completed(message, *, seconds)`` keeps working:
    the runtime's one-call form (``handled=``) is only for the base hooks."""
    seen: list[str] = []

    class Timed(Telemetry):
        def message_completed(self, message: ReceivedMessage, *, seconds: float) -> None:
            seen.append(message.message_id)
            super().message_completed(message, seconds=seconds)

    messages = [Message.json({"kind": "ok"}, session_id=f"s{i % 2}") for i in range(6)]
    config = SupervisorConfig(queue=queue, session_idle_timeout=1.0)
    async with InMemoryProvider() as provider:
        await QueueClient(provider).send_batch(queue, messages)
        supervisor = Supervisor(provider, _Actor, config, telemetry=Timed(queue, "memory"))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            with trio.fail_after(30):
                while supervisor.stats().completed < len(messages):
                    await trio.sleep(0.1)
            supervisor.stop()
    assert sorted(seen) == sorted(m.message_id for m in messages)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=2000))
def test_a_bucket_histogram_counts_as_bucketing_each_value_would(values: list[float]) -> None:
    """The buffered histogram (appends, folded in batches) agrees with bucketing each value
    on its own: bucket i holds values in (bounds[i-1], bounds[i]]."""
    from bisect import bisect_left

    from queue_runtime.tally import BucketHistogram

    histogram = BucketHistogram(LATENCY_BUCKETS)
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    for value in values:
        histogram.record(value)
        expected[bisect_left(LATENCY_BUCKETS, value)] += 1
    counts, total, low, high = histogram.snapshot()
    assert counts == expected
    assert total == pytest.approx(sum(values))
    if values:
        assert (low, high) == (min(values), max(values))
    else:
        assert (low, high) == (math.inf, -math.inf)


def test_a_queue_tally_buffers_per_message_values_and_forwards_them_once_told_to() -> None:
    """The per-message path (`messages_received`, `message_completed`) lands in the same
    histograms `record` fills, folded past the buffer bound; after `forward_histograms` (a
    meter provider that is not the SDK's) each value goes to its API instrument instead."""
    from queue_runtime.tally import FOLD_AT, HISTOGRAMS, BucketHistogram, QueueTally

    tally = QueueTally("orders")
    for index in range(FOLD_AT + 3):
        tally.messages_received(2, 0.002)
        tally.message_completed(0.003, 0.2 if index % 2 else None)
    assert (tally.received, tally.completed) == (2 * (FOLD_AT + 3), FOLD_AT + 3)
    for histogram, count in (
        (tally.receive_duration, FOLD_AT + 3),
        (tally.complete_duration, FOLD_AT + 3),
        (tally.process_duration, (FOLD_AT + 3) // 2),
    ):
        assert isinstance(histogram, BucketHistogram)
        assert len(histogram.pending) < FOLD_AT  # bounded: folded along the way
        assert histogram.count == count

    class Instrument:
        def __init__(self) -> None:
            self.values: list[tuple[float, dict[str, str]]] = []

        def record(self, value: float, attributes: dict[str, str]) -> None:
            self.values.append((value, attributes))

    instruments = {name: Instrument() for name, _, _ in HISTOGRAMS}
    tally.forward_histograms(instruments)
    tally.messages_received(1, 0.5)
    tally.message_completed(0.25, 1.5)
    tally.message_completed(0.125, None)
    queue = {"queue": "orders"}
    assert instruments["queue_receive_duration_seconds"].values == [(0.5, queue)]
    assert instruments["queue_complete_duration_seconds"].values == [(0.25, queue), (0.125, queue)]
    assert instruments["queue_process_duration_seconds"].values == [(1.5, queue)]
    assert (tally.received, tally.completed) == (2 * (FOLD_AT + 3) + 1, FOLD_AT + 5)
