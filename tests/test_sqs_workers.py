"""Several ``queue-runtime worker`` processes on one SQS FIFO queue (moto server over HTTP).

Every group's messages must be handled exactly once and in order across the processes, each
process must drain and exit 0 on SIGTERM, and the queue (and its DLQ) must end empty.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from drills.moto import StrictMotoServer  # moto with FIFO receive safe for many consumers
from sqs_server import CREDENTIALS, REGION
from worker_process import WorkerProcess

pytestmark = pytest.mark.slow

GROUPS = 24
PER_GROUP = 8
WORKERS = 2

ACTOR_MODULE = """
import os
import random
import time

import msgspec
import trio

from queue_runtime import MessageContext, SessionActor


class Step(msgspec.Struct):
    group: str
    seq: int


# One file per process, one line per handled message, flushed at once (line buffered).
_out = open(os.path.join(os.environ["HANDLED_DIR"], f"{os.getpid()}.log"), "a", buffering=1)


class Recorder(SessionActor[Step]):
    async def handle(self, step: Step, ctx: MessageContext) -> None:
        assert step.group == ctx.session_id
        await trio.sleep(random.uniform(0, 0.01))  # a little I/O, so sessions interleave
        _out.write(f"{time.time_ns()} {os.getpid()} {step.group} {step.seq} {ctx.message_id}\\n")
"""


@pytest.fixture(scope="module")
def moto_sqs() -> Iterator[str]:
    # SQS_WORKERS_TRAIL: a file for the server's line per receive, visibility change and delete.
    server = StrictMotoServer(trail=os.environ.get("SQS_WORKERS_TRAIL"))
    try:
        yield server.url
    finally:
        server.stop()


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
def fifo_queue(sqs: Any) -> Iterator[tuple[str, str, str]]:
    """A FIFO queue with a FIFO DLQ (redrive after 5 receives); yields (name, url, dlq url).

    With 24 groups and 6 sessions per worker, groups wait unclaimed in each worker and move
    between them; none may be received often enough to reach the DLQ unhandled (CI failed this
    test once on a redrive after 10 receives, before the workers stopped releasing the groups
    they could not take).
    """
    base = f"workers-{uuid.uuid4().hex[:10]}"
    dlq_url = sqs.create_queue(QueueName=f"{base}-dlq.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    name = f"{base}.fifo"
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "FifoQueue": "true",
            "VisibilityTimeout": "10",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )["QueueUrl"]
    yield name, url, dlq_url
    for queue_url in (url, dlq_url):
        sqs.delete_queue(QueueUrl=queue_url)


def worker_env(
    endpoint: str, handled: Path, secret: str = CREDENTIALS["secret_access_key"]
) -> dict[str, str]:
    return {
        "QUEUE_PROVIDER": "aws",
        "AWS_ENDPOINT_URL_SQS": endpoint,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": REGION,
        "QUEUE_VISIBILITY_TIMEOUT_SECONDS": "10",
        "QUEUE_RECEIVE_TIMEOUT_SECONDS": "2",
        "HANDLED_DIR": str(handled),
    }


def depth(sqs: Any, url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes[n]) for n in names)


def read_handled(handled: Path) -> list[tuple[int, int, str, int]]:
    rows = []
    for path in handled.glob("*.log"):
        for line in path.read_text().split("\n")[:-1]:  # the last piece may be a partial line
            stamp, pid, group, seq, _message_id = line.split()
            rows.append((int(stamp), int(pid), group, int(seq)))
    return rows


@pytest.mark.parametrize("overlap_deletes", ["true", "false"])
def test_many_worker_processes_keep_every_group_in_order_exactly_once(
    tmp_path: Path,
    sqs: Any,
    fifo_queue: tuple[str, str, str],
    moto_sqs: str,
    overlap_deletes: str,
) -> None:
    name, url, dlq_url = fifo_queue
    (tmp_path / "recorder_actor.py").write_text(ACTOR_MODULE)
    handled = tmp_path / "handled"
    handled.mkdir()

    # Round by round, so every group is spread over the whole queue.
    entries = [
        {
            "Id": f"{g}-{s}",
            "MessageBody": json.dumps({"group": f"g{g:02d}", "seq": s}),
            "MessageGroupId": f"g{g:02d}",
            "MessageDeduplicationId": uuid.uuid4().hex,
        }
        for s in range(PER_GROUP)
        for g in range(GROUPS)
    ]
    for start in range(0, len(entries), 10):
        response = sqs.send_message_batch(QueueUrl=url, Entries=entries[start : start + 10])
        assert not response.get("Failed"), response

    env = {**worker_env(moto_sqs, handled), "QUEUE_SQS_OVERLAP_DELETES": overlap_deletes}
    # Far fewer sessions per worker than groups: no process can hold every group, and groups are
    # released and taken again (often by the other process) all the time.
    args = ["recorder_actor:Recorder", "--queue", name, "--max-sessions", "6", "--idle-timeout", "1"]
    args += os.environ.get("SQS_WORKERS_EXTRA_ARGS", "").split()
    workers = [WorkerProcess(args, env=env, cwd=tmp_path) for _ in range(WORKERS)]
    try:
        for worker in workers:
            worker.wait_for(f"accepting sessions on {name}", timeout=30)
        deadline = time.monotonic() + 60
        while len(read_handled(handled)) < GROUPS * PER_GROUP and time.monotonic() < deadline:
            for worker in workers:
                assert worker.process.poll() is None, worker.log
            time.sleep(0.2)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            assert worker.wait(timeout=30) == 0, worker.log
            assert "received SIGTERM: draining" in worker.log
            assert "drained:" in worker.log
            assert "Traceback" not in worker.log
    finally:
        for worker in workers:
            worker.kill()

    rows = read_handled(handled)
    by_group: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for stamp, pid, group, seq in rows:
        by_group[group].append((stamp, seq, pid))
    assert sorted(by_group) == [f"g{g:02d}" for g in range(GROUPS)]
    broken = {
        group: [(seq, pid) for _, seq, pid in sorted(steps)]
        for group, steps in by_group.items()
        if [seq for _, seq, _ in sorted(steps)] != list(range(PER_GROUP))
    }
    if broken:
        diag = os.environ.get("SQS_WORKERS_DIAG")
        if diag:
            for worker in workers:
                Path(diag, f"worker-{worker.pid}.log").write_text(worker.log)
    # Exactly once (no duplicate, no gap) and in send order across all processes: per group,
    # the (seq, pid) pairs in handling-time order.
    assert not broken, broken
    pids = {pid for _, pid, _, _ in rows}
    assert pids == {worker.pid for worker in workers}, "every worker process took part"
    assert depth(sqs, url) == 0
    assert depth(sqs, dlq_url) == 0


def test_missing_queue_fails_start_up_with_one_line_exit_1(tmp_path: Path, moto_sqs: str) -> None:
    (tmp_path / "recorder_actor.py").write_text(ACTOR_MODULE)
    missing = f"missing-{uuid.uuid4().hex[:8]}.fifo"
    secret = f"s3cr3t-{uuid.uuid4().hex}"  # moto accepts any key; it must never be shown
    worker = WorkerProcess(
        ["recorder_actor:Recorder", "--queue", missing],
        env=worker_env(moto_sqs, tmp_path, secret),
        cwd=tmp_path,
    )
    try:
        assert worker.wait(timeout=30) == 1, worker.log
        errors = [line for line in worker.lines if line.startswith("queue-runtime: error:")]
        assert len(errors) == 1, worker.log
        assert "QueueNotFound" in errors[0] and missing in errors[0]
        assert "Traceback" not in worker.log
        assert secret not in worker.log
    finally:
        worker.kill()
