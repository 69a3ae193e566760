"""``queue-runtime worker --metrics-port``: /metrics, /healthz and /readyz of a running worker
process, and readiness going away while it drains."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from sqs_server import CREDENTIALS, REGION
from test_sqs_workers import StrictMotoServer
from worker_process import WorkerProcess

IDLE_ACTOR = """
from queue_runtime import SessionActor


class Idle(SessionActor[bytes]):
    async def handle(self, body, ctx):
        pass
"""

# A handler that blocks until the test lets it go, so the drain can be observed.
BLOCKING_ACTOR = """
import os
import pathlib

import trio

from queue_runtime import SessionActor

GATE = pathlib.Path(os.environ["GATE_DIR"])


class Blocking(SessionActor[bytes]):
    async def handle(self, body, ctx):
        (GATE / "started").write_text(ctx.message_id)
        while not (GATE / "release").exists():
            await trio.sleep(0.05)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


@pytest.mark.slow
def test_endpoints_of_a_memory_worker(tmp_path: Path) -> None:
    (tmp_path / "idle_actor.py").write_text(IDLE_ACTOR)
    port = free_port()
    queue = f"q-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(
        ["idle_actor:Idle", "-q", queue, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
        cwd=tmp_path,
    )
    try:
        worker.wait_for(f"serving /metrics /healthz /readyz on 127.0.0.1:{port}")
        worker.wait_for("accepting sessions")
        health = get(port, "/healthz")
        assert (health.status_code, health.text.strip()) == (200, "ok")
        ready = get(port, "/readyz")
        assert (ready.status_code, ready.text.strip()) == (200, "ready")
        assert get(port, "/nope").status_code == 404
        assert httpx.post(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 405

        # The queue-depth refresh runs once at start-up: the depth gauges have values.
        deadline = time.monotonic() + 10
        while True:
            metrics = get(port, "/metrics")
            if "queue_depth{" in metrics.text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = metrics.text
        for gauge in ("queue_active_sessions", "queue_circuit_breaker_state", "queue_depth"):
            assert f"# TYPE {gauge} gauge" in text, text
        assert metric_lines(text, f'queue_active_sessions{{queue="{queue}"}}') == [
            f'queue_active_sessions{{queue="{queue}"}} 0.0'
        ]
        assert metric_lines(text, f'queue_circuit_breaker_state{{queue="{queue}"}}') == [
            f'queue_circuit_breaker_state{{queue="{queue}"}} 0.0'
        ]
        depth = {
            match.group(1): match.group(2)
            for match in re.finditer(rf'^queue_depth{{queue="{queue}",state="(\w+)"}} (\S+)$', text, re.M)
        }
        assert depth == {"active": "0.0", "in_flight": "0.0", "scheduled": "0.0"}, text
        assert f'queue_dead_letter_depth{{queue="{queue}"}} 0.0' in text

        worker.terminate()
        assert worker.wait(timeout=20) == 0, worker.log
        with pytest.raises(httpx.ConnectError):  # the listener is closed once drained
            get(port, "/healthz")
    finally:
        worker.kill()


@pytest.fixture(scope="module")
def sqs_endpoint() -> Iterator[str]:
    server = StrictMotoServer()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.slow
def test_readiness_goes_away_while_draining_and_metrics_count_the_work(
    tmp_path: Path, sqs_endpoint: str
) -> None:
    sqs: Any = boto3.client(
        "sqs",
        endpoint_url=sqs_endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )
    name = f"endpoints-{uuid.uuid4().hex[:8]}.fifo"
    dlq_url = sqs.create_queue(
        QueueName=name.replace(".fifo", "-dlq.fifo"), Attributes={"FifoQueue": "true"}
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "FifoQueue": "true",
            "VisibilityTimeout": "10",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="{}", MessageGroupId="g1", MessageDeduplicationId="m1")

    (tmp_path / "blocking_actor.py").write_text(BLOCKING_ACTOR)
    gate = tmp_path / "gate"
    gate.mkdir()
    port = free_port()
    env = {
        "QUEUE_PROVIDER": "aws",
        "AWS_ENDPOINT_URL_SQS": sqs_endpoint,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "AWS_REGION": REGION,
        "QUEUE_RECEIVE_TIMEOUT_SECONDS": "1",
        "GATE_DIR": str(gate),
    }
    args = ["blocking_actor:Blocking", "-q", name, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    worker = WorkerProcess([*args, "--shutdown-grace", "30", "--log-format", "json"], env=env, cwd=tmp_path)
    try:
        worker.wait_for("accepting sessions")
        deadline = time.monotonic() + 20
        while not (gate / "started").exists():
            assert time.monotonic() < deadline, worker.log
            time.sleep(0.05)
        assert get(port, "/readyz").status_code == 200
        text = get(port, "/metrics").text
        assert f'queue_messages_received_total{{queue="{name}"}} 1.0' in text, text
        assert f'queue_sessions_accepted_total{{queue="{name}"}} 1.0' in text
        assert f'queue_active_sessions{{queue="{name}"}} 1.0' in text

        worker.terminate()
        worker.wait_for("draining")
        # Draining: alive but not ready, for as long as the handler runs.
        for _ in range(5):
            assert get(port, "/healthz").status_code == 200
            not_ready = get(port, "/readyz")
            assert (not_ready.status_code, not_ready.text.strip()) == (503, "not ready")
            time.sleep(0.1)
        assert worker.process.poll() is None
        (gate / "release").write_text("go")
        assert worker.wait(timeout=30) == 0, worker.log
        records = [json.loads(line) for line in worker.lines]
        messages = [r["message"] for r in records]
        assert any(m.startswith("drained:") for m in messages), messages
        assert any(m.startswith("exiting: 1 completed, 0 dead-lettered") for m in messages), messages
    finally:
        worker.kill()
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert attributes == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}
    assert re.fullmatch(r"[0-9a-f-]{36}", (gate / "started").read_text())


@pytest.mark.slow
def test_second_signal_stops_at_once_without_settling(tmp_path: Path, sqs_endpoint: str) -> None:
    sqs: Any = boto3.client(
        "sqs",
        endpoint_url=sqs_endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )
    name = f"second-{uuid.uuid4().hex[:8]}.fifo"
    url = sqs.create_queue(QueueName=name, Attributes={"FifoQueue": "true", "VisibilityTimeout": "30"})[
        "QueueUrl"
    ]
    sqs.send_message(QueueUrl=url, MessageBody="{}", MessageGroupId="g1", MessageDeduplicationId="m1")
    (tmp_path / "blocking_actor.py").write_text(BLOCKING_ACTOR)
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {
        "QUEUE_PROVIDER": "aws",
        "AWS_ENDPOINT_URL_SQS": sqs_endpoint,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "AWS_REGION": REGION,
        "QUEUE_RECEIVE_TIMEOUT_SECONDS": "1",
        "GATE_DIR": str(gate),
    }
    worker = WorkerProcess(
        ["blocking_actor:Blocking", "-q", name, "--shutdown-grace", "60"], env=env, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 20
        while not (gate / "started").exists():
            assert time.monotonic() < deadline and worker.process.poll() is None, worker.log
            time.sleep(0.05)
        worker.terminate()
        worker.wait_for("draining")
        time.sleep(0.5)
        assert worker.process.poll() is None  # the handler is still running: still draining
        started = time.monotonic()
        worker.terminate()
        assert worker.wait(timeout=15) == 143, worker.log  # 128 + SIGTERM
        assert time.monotonic() - started < 10  # not the 60 s grace
        assert "second signal: stopping at once" in worker.log
        assert "stopped before the drain finished" in worker.log
        assert "drained:" not in worker.log
        assert "exiting: 0 completed" in worker.log
    finally:
        worker.kill()
    # Nothing was settled: the message is still in the queue (in flight until its lock lapses).
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert (
        int(attributes["ApproximateNumberOfMessages"])
        + int(attributes["ApproximateNumberOfMessagesNotVisible"])
        == 1
    )


# -- the depth gauges a real worker reports, per provider (docs/operations.md, "What each
# provider reports") ----------------------------------------------------------------------------

# Blocks in handle() until cancelled: what the worker received stays in flight.
STUCK_ACTOR = """
import trio

from queue_runtime import SessionActor


class Stuck(SessionActor[bytes]):
    async def handle(self, body, ctx):
        await trio.sleep_forever()
"""

# The same actor over the SDK-shaped Service Bus fake (tests/fakes/servicebus.py), living in the
# worker process: only the SDK clients are fakes; settings, provider, supervisor, entrypoint and
# the /metrics endpoint are the real ones. The namespace holds 5 messages in two sessions, one
# scheduled an hour ahead and one already dead-lettered.
SERVICEBUS_STUCK_ACTOR = """
import sys
from datetime import timedelta

sys.path.insert(0, {tests!r})
import trio
from azure.servicebus import ServiceBusMessage

import queue_runtime.providers.servicebus as servicebus
from fakes.servicebus import FakeAdministrationClient, FakeNamespace
from queue_runtime import SessionActor

namespace = FakeNamespace()
namespace.create_queue("orders")
with namespace.lock:
    q = namespace.queues["orders"]
    for session in ("s1", "s1", "s1", "s2", "s2"):
        namespace._enqueue(q, ServiceBusMessage(b"{{}}", session_id=session))
    namespace._enqueue(
        q,
        ServiceBusMessage(
            b"{{}}", session_id="s3", scheduled_enqueue_time_utc=namespace.now() + timedelta(hours=1)
        ),
    )
    namespace._enqueue(q, ServiceBusMessage(b"{{}}", session_id="s4"))
    q.dlq.append(q.active.pop())


def from_settings(cls, settings, **_):
    conn = settings.azure.connection_string.get_secret_value()
    return cls(
        connection_string=conn,
        client_factory=lambda: namespace.client(conn),
        admin_client_factory=lambda: FakeAdministrationClient(namespace),
    )


servicebus.ServiceBusProvider.from_settings = classmethod(from_settings)


class Stuck(SessionActor[bytes]):
    async def handle(self, body, ctx):
        await trio.sleep_forever()
"""


def scrape_depth(port: int, queue: str, worker: WorkerProcess) -> str:
    """/metrics once the first queue-stats refresh has landed (the gauges appear)."""
    deadline = time.monotonic() + 20
    while True:
        text = get(port, "/metrics").text
        if f'queue_depth{{queue="{queue}"' in text or f'queue_dead_letter_depth{{queue="{queue}"}}' in text:
            return text
        assert time.monotonic() < deadline, f"no depth gauges within 20 s:\n{text}\n{worker.log}"
        time.sleep(0.2)


def gauge_values(text: str, name: str, queue: str) -> dict[str, float]:
    """``{state or "": value}`` of one gauge for one queue, from Prometheus text."""
    found = {}
    for match in re.finditer(rf'^{name}{{queue="{re.escape(queue)}"(?:,state="(\w+)")?}} (\S+)$', text, re.M):
        found[match.group(1) or ""] = float(match.group(2))
    return found


@pytest.mark.slow
def test_sqs_worker_reports_depth_and_dead_letter_depth(tmp_path: Path, sqs_endpoint: str) -> None:
    """SQS: ``ApproximateNumberOfMessages`` / ``...NotVisible`` / ``...Delayed`` of the queue and
    the redrive target's count reach /metrics; the oldest age does not (SQS does not tell it
    through its API: CloudWatch's ``ApproximateAgeOfOldestMessage`` does)."""
    sqs: Any = boto3.client(
        "sqs",
        endpoint_url=sqs_endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )
    name = f"depth-{uuid.uuid4().hex[:8]}.fifo"
    dlq_url = sqs.create_queue(
        QueueName=name.replace(".fifo", "-dlq.fifo"), Attributes={"FifoQueue": "true"}
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "FifoQueue": "true",
            "VisibilityTimeout": "30",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )["QueueUrl"]
    for i, group in enumerate(["g1", "g1", "g1", "g2", "g2"]):
        sqs.send_message(QueueUrl=url, MessageBody="{}", MessageGroupId=group, MessageDeduplicationId=f"m{i}")
    for i in range(2):
        sqs.send_message(
            QueueUrl=dlq_url, MessageBody="{}", MessageGroupId="g9", MessageDeduplicationId=f"d{i}"
        )

    (tmp_path / "stuck_actor.py").write_text(STUCK_ACTOR)
    port = free_port()
    env = {
        "QUEUE_PROVIDER": "aws",
        "AWS_ENDPOINT_URL_SQS": sqs_endpoint,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "AWS_REGION": REGION,
        "QUEUE_RECEIVE_TIMEOUT_SECONDS": "1",
    }
    args = ["stuck_actor:Stuck", "-q", name, "--metrics-port", str(port), "--shutdown-grace", "1"]
    worker = WorkerProcess(args, env=env, cwd=tmp_path)
    try:
        worker.wait_for("accepting sessions")
        text = scrape_depth(port, name, worker)
        depth = gauge_values(text, "queue_depth", name)
        assert set(depth) == {"active", "in_flight", "scheduled"}, text
        # Waiting or received (in flight) depending on when the refresh ran: 5 either way.
        assert depth["active"] + depth["in_flight"] == 5, text
        assert depth["scheduled"] == 0, text
        assert gauge_values(text, "queue_dead_letter_depth", name) == {"": 2.0}, text
        assert gauge_values(text, "queue_oldest_message_age_seconds", name) == {}, text
        worker.terminate()
        assert worker.wait(timeout=30) == 0, worker.log
    finally:
        worker.kill()


@pytest.mark.slow
def test_servicebus_worker_reports_active_scheduled_and_dead_letter_depth(tmp_path: Path) -> None:
    """Service Bus: the queue's runtime properties (administration client, Manage rights) reach
    /metrics: ``active_message_count`` as ``state="active"`` (Service Bus counts locked messages
    as active, so ``in_flight`` is not reported), scheduled and dead-letter counts. Without
    ``active`` the ``QueueDepthGrowing`` alert could never fire on Service Bus."""
    tests = str(Path(__file__).resolve().parent)
    (tmp_path / "sb_stuck_actor.py").write_text(SERVICEBUS_STUCK_ACTOR.format(tests=tests))
    port = free_port()
    env = {
        "QUEUE_PROVIDER": "azure",
        "AZURE_SERVICE_BUS_CONNECTION_STRING": (
            "Endpoint=sb://fake.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=dGVzdA=="
        ),
    }
    args = ["sb_stuck_actor:Stuck", "-q", "orders", "--metrics-port", str(port), "--shutdown-grace", "1"]
    worker = WorkerProcess(args, env=env, cwd=tmp_path)
    try:
        worker.wait_for("accepting sessions")
        text = scrape_depth(port, "orders", worker)
        # 5 waiting or locked (Service Bus cannot tell them apart), 1 scheduled, 1 dead-lettered.
        assert gauge_values(text, "queue_depth", "orders") == {"active": 5.0, "scheduled": 1.0}, text
        assert gauge_values(text, "queue_dead_letter_depth", "orders") == {"": 1.0}, text
        assert gauge_values(text, "queue_oldest_message_age_seconds", "orders") == {}, text
        worker.terminate()
        assert worker.wait(timeout=30) == 0, worker.log
    finally:
        worker.kill()
