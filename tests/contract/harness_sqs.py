"""Contract harness for `SqsProvider` against a real SQS endpoint over HTTP (moto server).

Runs on the real clock. Queues are FIFO with a 3 s visibility timeout and a RedrivePolicy to
a FIFO dead-letter queue; the provider uses each queue's own visibility timeout.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the sqs_server helper

from queue_runtime.providers.sqs import SqsProvider
from sqs_server import CREDENTIALS, REGION, shared_server


class SqsHarness:
    name: ClassVar[str] = "sqs"
    real_time: ClassVar[bool] = True
    skip_reason: ClassVar[str | None] = None
    skip_behaviours: ClassVar[Mapping[str, str]] = {}

    lock_duration: float = 3.0
    max_delivery_count: int = 3

    def __init__(self) -> None:
        self.provider: SqsProvider

    async def setup(self) -> None:
        server = await trio.to_thread.run_sync(shared_server)
        self.provider = SqsProvider(
            endpoint_url=server.url,
            region=REGION,
            visibility_timeout=None,  # each queue's own VisibilityTimeout, as make_queue sets it
            **CREDENTIALS,
        )

    async def teardown(self) -> None:
        provider = getattr(self, "provider", None)
        if provider is not None:
            await provider.aclose()

    async def make_queue(self, *, requires_session: bool = True) -> str:
        suffix = ".fifo" if requires_session else ""
        base = f"contract-{uuid.uuid4().hex[:16]}"
        fifo = {"FifoQueue": "true"} if requires_session else {}
        dlq = await self.provider._call(
            "create_queue", None, QueueName=f"{base}-dlq{suffix}", Attributes=fifo
        )
        dlq_arn = (
            await self.provider._call(
                "get_queue_attributes", None, QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"]
            )
        )["Attributes"]["QueueArn"]
        attributes = {
            **fifo,
            "VisibilityTimeout": str(int(self.lock_duration)),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(self.max_delivery_count)}
            ),
        }
        await self.provider._call("create_queue", None, QueueName=f"{base}{suffix}", Attributes=attributes)
        return f"{base}{suffix}"


HARNESS = SqsHarness
