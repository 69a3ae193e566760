"""The stock worker exports over OTLP: a real ``queue-runtime worker`` process on a moto SQS FIFO
queue sends its spans and metrics to an OTLP/HTTP receiver started here on 127.0.0.1, which
decodes the protobuf payloads (``opentelemetry-proto``) the way a collector does.

Messages are produced with boto3 in the library's own SQS layout, each carrying a W3C
``traceparent`` made up by the test, so the producer's trace and span ids are known exactly.
The ``OTEL_*`` parsing rules (`queue_runtime.exporting.read_export_settings`) are checked
in-process, without installing anything.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from queue_runtime.cli import main
from queue_runtime.errors import ConfigurationError
from queue_runtime.exporting import ExportSettings, _Throttle, read_export_settings
from queue_runtime.message import Message
from queue_runtime.providers._sqs_codec import encode
from queue_runtime.redaction import redact
from queue_runtime.telemetry import LATENCY_BUCKETS
from sqs_server import CREDENTIALS, REGION
from sqs_server import moto_sqs as moto_sqs  # a fixture, used by name
from worker_process import WorkerProcess

ACTOR = """
import sys

from queue_runtime import SessionActor


class Echo(SessionActor[bytes]):
    async def handle(self, body, ctx):
        print("handled", ctx.message_id, file=sys.stderr, flush=True)
"""

MESSAGE_ID = "messaging.message.id"
API_KEY = "otlp-api-key-" + "7f3c9a1e5d"  # an OTLP header value: a secret

# -- an OTLP/HTTP receiver ---------------------------------------------------------------------


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attrs(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    resource: dict[str, Any]


@dataclass
class Point:
    name: str
    kind: str  # "sum", "histogram", "gauge"
    attributes: dict[str, Any]
    time: int
    value: float = 0.0
    count: int = 0
    bounds: tuple[float, ...] = ()
    resource: dict[str, Any] = field(default_factory=dict)


class Collector:
    """Accepts ``POST /v1/traces`` and ``/v1/metrics`` (protobuf, gzip or not) and keeps what
    it decoded; answers 200 with the empty export response, like an OpenTelemetry Collector."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.points: list[Point] = []
        self.headers: list[dict[str, str]] = []
        self.requests = 0
        self._changed = threading.Condition()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    collector._traces(ExportTraceServiceRequest.FromString(body))
                    payload = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    collector._metrics(ExportMetricsServiceRequest.FromString(body))
                    payload = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                with collector._changed:
                    collector.headers.append({k.lower(): v for k, v in self.headers.items()})
                    collector.requests += 1
                    collector._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _traces(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = _attrs(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Span(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=_attrs(span.attributes),
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            resource=resource,
                        )
                    )
        with self._changed:
            self.spans.extend(found)

    def _metrics(self, request: ExportMetricsServiceRequest) -> None:
        found = []
        for resource_metrics in request.resource_metrics:
            resource = _attrs(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    for p in getattr(metric, kind).data_points:
                        point = Point(
                            metric.name, kind, _attrs(p.attributes), p.time_unix_nano, resource=resource
                        )
                        if kind == "histogram":
                            point.count, point.bounds = p.count, tuple(p.explicit_bounds)
                        else:
                            point.value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        found.append(point)
        with self._changed:
            self.points.extend(found)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in self.spans})
                    raise AssertionError(f"collector: condition not met in {timeout} s; spans {names}")
                self._changed.wait(min(left, 0.2))

    def latest(self, name: str, **attributes: Any) -> Point | None:
        """The newest point of metric ``name`` whose attributes include ``attributes``
        (cumulative temporality: the newest is the total)."""
        points = [p for p in self.points if p.name == name and attributes.items() <= p.attributes.items()]
        return max(points, key=lambda p: p.time) if points else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    try:
        yield server
    finally:
        server.close()


# -- a queue and a worker ----------------------------------------------------------------------


@pytest.fixture
def sqs(moto_sqs: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=moto_sqs,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )


@pytest.fixture
def queue(sqs: Any) -> Iterator[tuple[str, str]]:
    """A FIFO queue: (name, url)."""
    name = f"otlp-{uuid.uuid4().hex[:10]}.fifo"
    url = sqs.create_queue(QueueName=name, Attributes={"FifoQueue": "true", "VisibilityTimeout": "10"})[
        "QueueUrl"
    ]
    yield name, url
    sqs.delete_queue(QueueUrl=url)


@dataclass
class Sent:
    message_id: str
    session_id: str
    trace_id: str
    span_id: str
    sampled: bool
    traced: bool


def produce(sqs: Any, url: str, session_id: str, *, sampled: bool = True, traced: bool = True) -> Sent:
    """Send one message as a traced producer would: a ``traceparent`` property naming the
    producer's span (ids made up here, so the test knows them)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    properties = {"traceparent": f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"} if traced else {}
    message = Message(body=b'{"n": 1}', session_id=session_id, properties=properties)
    body, attributes = encode(message)
    sqs.send_message(
        QueueUrl=url,
        MessageBody=body,
        MessageAttributes=attributes,
        MessageGroupId=session_id,
        MessageDeduplicationId=uuid.uuid4().hex,
    )
    return Sent(message.message_id, session_id, trace_id, span_id, sampled, traced)


def start_worker(tmp_path: Path, moto_sqs: str, queue: str, otel: dict[str, str]) -> WorkerProcess:
    (tmp_path / "otlp_actor.py").write_text(ACTOR)
    env = {
        "QUEUE_PROVIDER": "aws",
        "AWS_ENDPOINT_URL_SQS": moto_sqs,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "AWS_REGION": REGION,
        "QUEUE_RECEIVE_TIMEOUT_SECONDS": "1",
        # Short intervals: metrics every 0.5 s, spans batched for 0.2 s.
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        **otel,
    }
    args = ["otlp_actor:Echo", "--queue", queue, "--idle-timeout", "1", "--metrics-port", "0"]
    return WorkerProcess(args, env=env, cwd=tmp_path)


def stop(worker: WorkerProcess, timeout: float = 20.0) -> float:
    """SIGTERM; assert exit 0; return the seconds it took."""
    started = time.monotonic()
    worker.terminate()
    assert worker.wait(timeout=timeout) == 0, worker.log
    return time.monotonic() - started


# -- the worker exports ------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_exports_spans_and_metrics_over_otlp(
    tmp_path: Path, collector: Collector, sqs: Any, queue: tuple[str, str], moto_sqs: str
) -> None:
    name, url = queue
    worker = start_worker(
        tmp_path,
        moto_sqs,
        name,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_SERVICE_NAME": "orders-worker",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=payments",
            "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={API_KEY}",
        },
    )
    try:
        line = worker.wait_for("serving /metrics /healthz /readyz on 127.0.0.1:")
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        worker.wait_for(f"accepting sessions on {name}")
        sent = [produce(sqs, url, f"s{i % 2}") for i in range(4)]
        sent.append(produce(sqs, url, "s2", traced=False))
        for message in sent:
            worker.wait_for(f"handled {message.message_id}")

        # Prometheus /metrics keeps working next to OTLP, with the same counts.
        pattern = re.compile(rf'queue_messages_completed_total{{queue="{re.escape(name)}"}} (\S+)')
        deadline = time.monotonic() + 10
        while True:
            found = pattern.search(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            if found and float(found.group(1)) == len(sent):
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.1)

        process = f"process {name}"
        collector.wait_until(lambda: sum(s.name == process for s in collector.spans) >= len(sent))
        stop(worker)
    finally:
        worker.kill()

    # Every request carried the configured header; the worker never printed its value.
    assert collector.headers and all(h.get("x-api-key") == API_KEY for h in collector.headers)
    assert API_KEY not in worker.log and API_KEY not in worker.stdout
    assert "exporting traces: OTLP http/protobuf to " + collector.url + "/v1/traces" in worker.log
    assert "; sampler parentbased_always_on" in worker.log

    spans = collector.spans
    names = {span.name for span in spans}
    assert {f"process {name}", f"receive {name}", f"complete {name}", f"session {name}"} <= names, names
    for span in spans:
        assert span.resource["service.name"] == "orders-worker"
        assert span.resource["deployment.environment"] == "test" and span.resource["team"] == "payments"
        assert span.attributes["messaging.system"] == "aws_sqs"
        assert span.attributes["messaging.destination.name"] == name

    sessions = {s.span_id: s for s in spans if s.name == f"session {name}"}
    for message in sent:
        processed = [
            s
            for s in spans
            if s.name == process and s.attributes["messaging.message.id"] == message.message_id
        ]
        assert len(processed) == 1, processed
        span = processed[0]
        assert span.kind == SpanProto.SPAN_KIND_CONSUMER
        assert span.attributes["messaging.conversation_id"] == message.session_id
        assert span.attributes["messaging.message_id"] == message.message_id
        completes = [
            s
            for s in spans
            if s.name == f"complete {name}" and s.attributes.get(MESSAGE_ID) == message.message_id
        ]
        assert len(completes) == 1
        if message.traced:
            # The producer's trace continues: its span is the parent, the session span a link.
            assert (span.trace_id, span.parent_span_id) == (message.trace_id, message.span_id)
            assert len(span.links) == 1 and span.links[0][1] in sessions
            assert sessions[span.links[0][1]].attributes["messaging.conversation_id"] == message.session_id
            assert completes[0].trace_id == message.trace_id
            # The receive span links the producer's span.
            receives = [
                s
                for s in spans
                if s.name == f"receive {name}" and (message.trace_id, message.span_id) in s.links
            ]
            assert receives, "no receive span links the producer"
        else:
            # No producer context: a child of its session span.
            assert span.parent_span_id in sessions and span.trace_id == sessions[span.parent_span_id].trace_id

    # Metrics: the final export on shutdown holds every message.
    completed = collector.latest("queue_messages_completed", queue=name)
    assert completed is not None and completed.kind == "sum" and completed.value == len(sent)
    assert completed.resource["service.name"] == "orders-worker"
    duration = collector.latest("queue_process_duration_seconds", queue=name)
    assert duration is not None and duration.kind == "histogram"
    assert duration.count == len(sent) and duration.bounds == LATENCY_BUCKETS
    received = collector.latest("queue_messages_received", queue=name)
    assert received is not None and received.value == len(sent)


@pytest.mark.slow
def test_the_sampler_from_the_environment_is_honoured(
    tmp_path: Path, collector: Collector, sqs: Any, queue: tuple[str, str], moto_sqs: str
) -> None:
    """Parent-based ratio 0: a sampled producer's message is traced, unsampled producers' are
    not, and no root span (session, receive) is; metrics still count everything."""
    name, url = queue
    worker = start_worker(
        tmp_path,
        moto_sqs,
        name,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
        },
    )
    try:
        worker.wait_for(f"accepting sessions on {name}")
        unsampled = [produce(sqs, url, f"u{i}", sampled=False) for i in range(3)]
        sampled = produce(sqs, url, "s0")
        for message in [*unsampled, sampled]:
            worker.wait_for(f"handled {message.message_id}")
        stop(worker)  # flushes every span that was recorded
    finally:
        worker.kill()
    assert "; sampler parentbased_traceidratio 0" in worker.log
    processed = [s for s in collector.spans if s.name == f"process {name}"]
    assert [(s.trace_id, s.parent_span_id) for s in processed] == [(sampled.trace_id, sampled.span_id)]
    assert {s.trace_id for s in collector.spans} == {sampled.trace_id}, {s.name for s in collector.spans}
    assert not [s for s in collector.spans if s.name == f"session {name}"]
    completed = collector.latest("queue_messages_completed", queue=name)
    assert completed is not None and completed.value == 4
    # Untraced messages skip their spans, not their durations.
    for histogram in ("queue_process_duration_seconds", "queue_complete_duration_seconds"):
        duration = collector.latest(histogram, queue=name)
        assert duration is not None and duration.count == 4, histogram
    # Default resource name when OTEL_SERVICE_NAME is not set.
    assert completed.resource["service.name"] == "queue-runtime"


@pytest.mark.slow
def test_a_collector_that_is_down_stops_nothing(
    tmp_path: Path, sqs: Any, queue: tuple[str, str], moto_sqs: str
) -> None:
    """Nothing listens at the endpoint: messages are still handled, and SIGTERM still drains
    and exits 0 within the drain plus the 5 s export bound."""
    name, url = queue
    with refused_port() as port:
        worker = start_worker(
            tmp_path, moto_sqs, name, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        )
        try:
            worker.wait_for(f"accepting sessions on {name}")
            sent = [produce(sqs, url, f"s{i}") for i in range(3)]
            for message in sent:
                worker.wait_for(f"handled {message.message_id}")
            time.sleep(1.0)  # a few failed exports (spans every 0.2 s, metrics every 0.5 s)
            seconds = stop(worker, timeout=30)
        finally:
            worker.kill()
    # The exporters were still retrying (back-off up to their 10 s timeout): the bound ended it.
    assert "telemetry export did not finish within 5 s" in worker.log
    assert seconds < 9, f"SIGTERM to exit took {seconds:.1f} s"
    assert "exiting: 3 completed" in worker.log
    assert "Traceback" not in worker.log


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield int(bound.getsockname()[1])


# -- the OTEL_* rules (in-process, nothing installed) ------------------------------------------


RULES: list[tuple[dict[str, str], dict[str, Any]]] = [
    # Nothing set: no tracing, metrics on /metrics only.
    ({}, {"traces": (), "metrics": ()}),
    # An endpoint: both signals over OTLP/HTTP, paths appended.
    (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
        {
            "traces": ("otlp",),
            "metrics": ("otlp",),
            "traces_endpoint": "http://collector:4318/v1/traces",
            "metrics_endpoint": "http://collector:4318/v1/metrics",
        },
    ),
    # A signal's own endpoint is used as is, and turns on that signal only.
    (
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t.example/api/spans"},
        {"traces": ("otlp",), "metrics": (), "traces_endpoint": "https://t.example/api/spans"},
    ),
    # Naming otlp without an endpoint: the specification's default, localhost:4318.
    (
        {"OTEL_TRACES_EXPORTER": "otlp"},
        {"traces": ("otlp",), "metrics": (), "traces_endpoint": "http://localhost:4318/v1/traces"},
    ),
    # prometheus: /metrics only; none: nothing; lists.
    (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "prometheus"},
        {"traces": ("otlp",), "metrics": (), "prometheus": True, "metrics_endpoint": None},
    ),
    (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
        {"traces": (), "metrics": ("otlp",)},
    ),
    (
        {"OTEL_TRACES_EXPORTER": "console, otlp", "OTEL_METRICS_EXPORTER": "prometheus,console"},
        {"traces": ("console", "otlp"), "metrics": ("console",), "prometheus": True},
    ),
    # gRPC: no path appended, 4317 by default.
    (
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"traces_protocol": "grpc", "traces_endpoint": "http://localhost:4317"},
    ),
    # The sampler and its argument.
    (
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        {"sampler": "parentbased_traceidratio", "sampler_arg": 0.01},
    ),
    ({"OTEL_TRACES_SAMPLER": "traceidratio"}, {"sampler": "traceidratio", "sampler_arg": None}),
    # Disabled wins over everything.
    (
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
        {"disabled": True, "traces": ()},
    ),
]


@pytest.mark.parametrize(("environ", "expected"), RULES)
def test_the_default_rule_and_the_variables(environ: dict[str, str], expected: dict[str, Any]) -> None:
    settings = read_export_settings(environ)
    assert isinstance(settings, ExportSettings)
    for key, value in expected.items():
        assert getattr(settings, key) == value, (key, settings)


BAD: list[tuple[dict[str, str], str]] = [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'"),
    ({"OTEL_METRICS_EXPORTER": "otlp,none"}, "OTEL_METRICS_EXPORTER: 'none' cannot be combined"),
    (
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        "http/json is not supported",
    ),
    (
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"},
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: unknown protocol",
    ),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT: not an http(s) URL"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER: unknown sampler 'sometimes'"),
    (
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5%"},
        "OTEL_TRACES_SAMPLER_ARG: must be a number between 0 and 1, got '5%'",
    ),
    (
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
        "OTEL_TRACES_SAMPLER_ARG: must be a number between 0 and 1",
    ),
    ({"OTEL_METRIC_EXPORT_INTERVAL": "0"}, "OTEL_METRIC_EXPORT_INTERVAL: must be a number > 0"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT: must be a number >= 0"),
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE: must be a positive integer"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "api-key"}, "OTEL_EXPORTER_OTLP_HEADERS: expected name=value pairs"),
]


@pytest.mark.parametrize(("environ", "text"), BAD, ids=[text.split(":")[0] for _, text in BAD])
def test_bad_variables_raise_one_configuration_error(environ: dict[str, str], text: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        read_export_settings(environ)
    assert text in str(caught.value) and "\n" not in str(caught.value)


def test_header_values_are_registered_as_secrets() -> None:
    token = "tok3n-" + secrets.token_hex(8)
    read_export_settings(
        {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"Authorization=Bearer%20{token},x-team=payments-team"}
    )
    assert token not in redact(f"export failed with header Bearer {token}")
    assert "payments-team" not in redact("x-team was payments-team")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(("QUEUE_", "AWS_", "OTEL_"))]:
        monkeypatch.delenv(key)
    (tmp_path / "otlp_actor.py").write_text(ACTOR)
    return tmp_path


WORKER_ERRORS = [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER: unknown exporter 'jaeger'"),
    (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        "pip install opentelemetry-exporter-otlp-proto-grpc",
    ),
]


@pytest.mark.parametrize(("environ", "text"), WORKER_ERRORS, ids=["exporter", "grpc"])
def test_the_worker_reports_a_bad_variable_in_one_line_exit_2(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    environ: dict[str, str],
    text: str,
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    if "grpc" in text:
        try:
            import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("the gRPC exporter is installed here")
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    code = main(["worker", "otlp_actor:Echo", "--queue", "q"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("queue-runtime: error: ") and text in lines[-1], err
    assert "Traceback" not in err


def test_sdk_warnings_are_throttled() -> None:
    throttle = _Throttle(interval=60.0)
    sdk = logging.getLogger("test_otlp.sdk")
    records = [sdk.makeRecord(sdk.name, logging.WARNING, "f", 1, "Queue full, dropping %s.", ("span",), None)
               for _ in range(100)]  # fmt: skip
    passed = [record for record in records if throttle.filter(record)]
    assert len(passed) == 1
    throttle.interval = 0.0
    later = sdk.makeRecord(sdk.name, logging.WARNING, "f", 1, "Queue full, dropping %s.", ("span",), None)
    assert throttle.filter(later) and "99 more like this" in later.getMessage()
    assert json.dumps(later.getMessage())  # still a plain, formattable message
