"""4. SQS end to end against a moto server: the runtime vs a hand-written aiobotocore loop.

Both consumers read the same kind of FIFO queue on one moto server process (a fresh queue per
try, tries interleaved), in the same run, on trio with aiobotocore's httpx backend. The server
is the drills' `StrictMotoServer`: moto with the fixes that make its FIFO receive behave as
SQS's (one instant per call, and a long poll that sees deletes landing during it, where plain
moto decides a poll's blocked groups once, at its start):

* runtime: `SqsProvider` + `Supervisor` (``max_concurrent_sessions`` = groups), an actor that
  decodes the body with msgspec and awaits the handler; ``overlap_deletes`` on, as it is by
  default against AWS (the poll's receive goes out right behind its deletes);
* hand-written: one loop that receives up to 10 (long poll), processes each message group's
  messages in order (msgspec decode, await the handler), then deletes them with
  ``DeleteMessageBatch``.

A producer thread (boto3, its own client, not counted) sends batches of 10 over ``GROUPS``
groups while fewer than ``BACKLOG`` messages are waiting, so the queue stays shallow: moto's
FIFO receive costs about 1 ms per queued message, so a deep queue would measure moto.

Figures: msgs/s (moto-bound; see the notes), client CPU per message (``time.thread_time()`` of
the consumer's trio thread: the producer thread and moto's process are excluded), and SQS API
calls per message. Both sides are measured the same way:

* calls are counted by an aiobotocore ``before-call`` hook on the consumer's own client (the
  provider's ``api_calls`` is one; the hand-written loop registers the same), so a call counts
  when it is sent, answered or not (a receive cancelled at shutdown counts);
* steady state is the window between the handler's 10% mark and its last message, both read
  inside the handler: start-up (client creation; the runtime's GetQueueUrl and
  GetQueueAttributes) falls before it and the last batch's delete after it, on both sides;
* the whole-run figures run from before the client is made to after the last delete (the
  runtime's ``aclose`` flush; the loop's last DeleteMessageBatch). The harness hands the loop
  the queue URL, while the runtime resolves the name and reads the queue's attributes: those
  2 calls per try show in the whole-run figures only.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import trio

from queue_runtime import MessageContext, SessionActor, SupervisorConfig
from queue_runtime.supervisor import Supervisor

from ._common import ROOT, Event, body_for, check_size, median, table, write_result

NAME = "sqs"
TITLE = "SQS end to end on moto: runtime vs hand-written aiobotocore loop"
GROUPS = 10
BACKLOG = 30
WAIT = 2  # long poll seconds, both sides
PLANS = {"tiny": (12, 1), "quick": (300, 2), "full": (600, 3)}
#: Seconds the latency proxy (`drills.proxy`, ``--delay``) adds each way to every consumer
#: call: 0 is the direct connection; 10 and 25 ms are round trips of 20 and 50 ms, as to SQS
#: in a nearby or a farther region.
DELAYS = {"tiny": (0.0, 0.01), "quick": (0.0, 0.01, 0.025), "full": (0.0, 0.01, 0.025)}

sys.path.insert(0, str(ROOT / "tests"))  # the moto server helper the tests use


class _State:
    def __init__(self) -> None:
        self.produced = 0
        self.handled = 0
        self.stop = False
        self.total = 0
        self.warm = 0
        self.calls: collections.Counter[str] = collections.Counter()
        # (handled, thread CPU, wall, API calls so far) at the warm-up mark and at the end
        self.marks: list[tuple[int, float, float, int]] = []
        self.done: trio.Event | None = None  # set by the handler: no polling loop to pay for


_state = _State()


async def handler(event: Event) -> None:
    _state.handled += 1
    if _state.handled in (_state.warm, _state.total):
        marks = (_state.handled, time.thread_time(), time.perf_counter(), sum(_state.calls.values()))
        _state.marks.append(marks)
        if _state.handled == _state.total and _state.done is not None:
            _state.done.set()


class SqsBenchActor(SessionActor[Event]):
    async def handle(self, message: Event, ctx: MessageContext) -> None:
        await handler(message)


def _boto(url: str) -> Any:
    import boto3

    from sqs_server import CREDENTIALS, REGION

    return boto3.client(
        "sqs",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )


def _produce(endpoint: str, queue_url: str, total: int) -> None:
    client = _boto(endpoint)
    tag = uuid.uuid4().hex[:8]
    sent = 0
    while sent < total and not _state.stop:
        if _state.produced - _state.handled >= BACKLOG:
            time.sleep(0.001)
            continue
        n = min(10, total - sent)
        client.send_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {
                    "Id": str(k),
                    "MessageBody": body_for(sent + k).decode(),
                    "MessageGroupId": f"g{(sent + k) % GROUPS}",
                    "MessageDeduplicationId": f"{tag}-{sent + k}",
                }
                for k in range(n)
            ],
        )
        sent += n
        _state.produced += n


async def _runtime(endpoint: str, queue: str, total: int) -> dict[str, Any]:
    from queue_runtime.providers.sqs import SqsProvider
    from sqs_server import CREDENTIALS, REGION

    cpu0 = time.thread_time()
    start = time.perf_counter()
    provider = SqsProvider(
        endpoint_url=endpoint,
        region=REGION,
        visibility_timeout=30,
        wait_time=WAIT,
        overlap_deletes=True,  # AWS's default (off by default for other endpoints)
        **CREDENTIALS,
    )
    config = SupervisorConfig(
        queue=queue, max_concurrent_sessions=GROUPS, receive_timeout=WAIT, session_idle_timeout=5.0
    )
    supervisor = Supervisor(provider, SqsBenchActor, config)
    _state.calls = provider.api_calls
    _state.done = done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        await done.wait()
        elapsed = time.perf_counter() - start
        supervisor.stop()
    await provider.aclose()  # flushes the last deletes: counted
    cpu = time.thread_time() - cpu0
    stats = supervisor.stats()
    if stats.completed != total:
        raise RuntimeError(f"runtime SQS try completed {stats.completed} of {total}")
    return {"seconds": elapsed, "cpu_seconds": cpu, "calls": dict(provider.api_calls)}


async def _hand_written(endpoint: str, queue_url: str, total: int) -> dict[str, Any]:
    from aiobotocore.config import AioConfig
    from aiobotocore.httpxsession import HttpxSession
    from aiobotocore.session import AioSession

    from sqs_server import CREDENTIALS, REGION

    cpu0 = time.thread_time()
    start = time.perf_counter()
    calls = _state.calls
    decode = msgspec.json.Decoder(Event).decode
    config = AioConfig(http_session_cls=HttpxSession, retries={"max_attempts": 2, "mode": "standard"})
    session = AioSession()
    session.set_default_client_config(config)
    async with session.create_client(
        "sqs",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
        config=config,
    ) as client:

        def count(model: Any = None, **_: Any) -> None:
            calls[getattr(model, "name", "unknown")] += 1

        client.meta.events.register("before-call.sqs", count)
        handled = 0
        elapsed = 0.0
        while handled < total:
            response = await client.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=WAIT,
                VisibilityTimeout=30,
                AttributeNames=["MessageGroupId"],
            )
            by_group: dict[str, list[dict[str, Any]]] = {}
            for message in response.get("Messages", []):
                by_group.setdefault(message["Attributes"]["MessageGroupId"], []).append(message)
            receipts: list[str] = []
            for messages in by_group.values():  # each group in order
                for message in messages:
                    await handler(decode(message["Body"]))
                    receipts.append(message["ReceiptHandle"])
            handled += len(receipts)
            if handled >= total:
                elapsed = time.perf_counter() - start
            for first in range(0, len(receipts), 10):
                chunk = receipts[first : first + 10]
                result = await client.delete_message_batch(
                    QueueUrl=queue_url,
                    Entries=[{"Id": str(k), "ReceiptHandle": r} for k, r in enumerate(chunk)],
                )
                if result.get("Failed"):
                    raise RuntimeError(f"delete failed: {result['Failed']}")
    cpu = time.thread_time() - cpu0
    return {"seconds": elapsed, "cpu_seconds": cpu, "calls": dict(calls)}


def _try(endpoint: str, side: str, total: int, consumer_endpoint: str | None = None) -> dict[str, Any]:
    """One try; the consumer talks to ``consumer_endpoint`` (a latency proxy in front of
    ``endpoint``) when given, the producer always to ``endpoint`` directly."""
    sqs = _boto(endpoint)
    consumer = consumer_endpoint or endpoint
    queue = f"bench-{uuid.uuid4().hex[:10]}.fifo"
    queue_url = sqs.create_queue(
        QueueName=queue, Attributes={"FifoQueue": "true", "VisibilityTimeout": "30"}
    )["QueueUrl"]
    _state.__init__()  # type: ignore[misc]
    _state.total = total
    _state.warm = max(1, total // 10)
    producer = threading.Thread(target=_produce, args=(endpoint, queue_url, total), daemon=True)
    producer.start()
    try:
        if side == "runtime":
            result = trio.run(_runtime, consumer, queue, total)
        else:
            # The queue URL names the server; the loop's client sends to its own endpoint.
            result = trio.run(_hand_written, consumer, queue_url, total)
    finally:
        _state.stop = True
        producer.join(timeout=30)
        sqs.delete_queue(QueueUrl=queue_url)
    (n0, cpu0, wall0, calls0), (n1, cpu1, wall1, calls1) = _state.marks
    result["steady"] = {
        "messages": n1 - n0,
        "seconds": wall1 - wall0,
        "cpu_seconds": cpu1 - cpu0,
        "calls": calls1 - calls0,
    }
    return result


def run(size: str, results_dir: Path, endpoint: str | None = None) -> dict[str, Any]:
    """``endpoint``: a running moto server; None starts one (and stops it afterwards)."""
    check_size(size)
    total, tries = PLANS[size]
    delays = DELAYS[size]
    server = None
    proxies: dict[float, Any] = {}
    if endpoint is None:
        from drills.moto import StrictMotoServer

        server = StrictMotoServer()
        endpoint = server.url
    by_delay: dict[float, dict[str, list[dict[str, Any]]]] = {
        delay: {"runtime": [], "hand-written": []} for delay in delays
    }
    try:
        import tempfile

        from drills.proxy import ProxyProcess

        logs = Path(tempfile.mkdtemp(prefix="sqs-bench-proxy-"))
        for delay in delays:
            if delay > 0:
                proxies[delay] = ProxyProcess(
                    endpoint, ["--listen-port", "0", "--delay", str(delay)], log=logs / f"proxy-{delay}.log"
                )
        for _ in range(tries):  # interleaved: every latency and side once per round
            for delay, sides in by_delay.items():
                via = proxies[delay].url if delay > 0 else None
                for side in sides:
                    sides[side].append(_try(endpoint, side, total, via))
    finally:
        for proxy in proxies.values():
            proxy.stop()
        if server is not None:
            server.stop()
    latency_rows = []
    for delay, sides in by_delay.items():
        pair = {side: _summary(results) for side, results in sides.items()}
        runtime, hand = pair["runtime"], pair["hand-written"]
        latency_rows.append(
            {
                "delay_ms_each_way": round(delay * 1000),
                "runtime": {k: v for k, v in runtime.items() if k != "tries_raw"},
                "hand_written": {k: v for k, v in hand.items() if k != "tries_raw"},
                "rate_ratio": round(runtime["msgs_per_s"] / hand["msgs_per_s"], 3),
                "cpu_ratio": round(runtime["cpu_us_per_msg"] / hand["cpu_us_per_msg"], 3),
                "calls_ratio": round(runtime["api_calls_per_msg"] / hand["api_calls_per_msg"], 3),
            }
        )
    rows = []
    for side, results in by_delay[delays[0]].items():
        calls: collections.Counter[str] = collections.Counter()
        for r in results:
            calls.update(r["calls"])
        steady = [r["steady"] for r in results]
        rows.append(
            {
                "consumer": side,
                "messages": total,
                "tries": tries,
                "msgs_per_s": round(median([s["messages"] / s["seconds"] for s in steady]), 1),
                "cpu_us_per_msg": round(median([s["cpu_seconds"] / s["messages"] for s in steady]) * 1e6, 1),
                "api_calls_per_msg": round(median([s["calls"] / s["messages"] for s in steady]), 3),
                "whole_run_cpu_us_per_msg": round(
                    median([r["cpu_seconds"] for r in results]) / total * 1e6, 1
                ),
                "whole_run_api_calls_per_msg": round(sum(calls.values()) / (total * tries), 3),
                "calls_by_operation_per_try": {k: round(v / tries, 1) for k, v in sorted(calls.items())},
                "tries_raw": results,
            }
        )
    runtime, hand = rows
    result: dict[str, Any] = {
        "size": size,
        "groups": GROUPS,
        "backlog": BACKLOG,
        "long_poll_s": WAIT,
        "rows": rows,
        "cpu_ratio_runtime_over_hand_written": round(runtime["cpu_us_per_msg"] / hand["cpu_us_per_msg"], 3),
        "calls_ratio_runtime_over_hand_written": round(
            runtime["api_calls_per_msg"] / hand["api_calls_per_msg"], 3
        ),
    }
    result["table"] = table(
        f"{TITLE} ({total} messages, {GROUPS} groups, backlog <= {BACKLOG}, median of {tries});"
        " steady state = after the first 10% of messages",
        [
            "consumer",
            "msg/s",
            "client CPU/msg (us)",
            "API calls/msg",
            "whole run CPU/msg (us)",
            "whole run calls/msg",
            "calls per try",
        ],
        [
            (
                r["consumer"],
                r["msgs_per_s"],
                r["cpu_us_per_msg"],
                r["api_calls_per_msg"],
                r["whole_run_cpu_us_per_msg"],
                r["whole_run_api_calls_per_msg"],
                ", ".join(f"{k} {v:g}" for k, v in r["calls_by_operation_per_try"].items()),
            )
            for r in rows
        ],
    )
    result["latency"] = latency_rows
    result["latency_table"] = table(
        f"SQS at added network latency (latency proxy in front of moto, consumer calls only;"
        f" {total} messages, median of {tries}, steady state)",
        [
            "added each way",
            "runtime msg/s",
            "hand-written msg/s",
            "rate ratio",
            "runtime CPU/msg (us)",
            "hand-written CPU/msg (us)",
            "CPU ratio",
            "runtime calls/msg",
            "hand-written calls/msg",
            "calls ratio",
        ],
        [
            (
                f"{r['delay_ms_each_way']} ms",
                r["runtime"]["msgs_per_s"],
                r["hand_written"]["msgs_per_s"],
                r["rate_ratio"],
                r["runtime"]["cpu_us_per_msg"],
                r["hand_written"]["cpu_us_per_msg"],
                r["cpu_ratio"],
                r["runtime"]["api_calls_per_msg"],
                r["hand_written"]["api_calls_per_msg"],
                r["calls_ratio"],
            )
            for r in latency_rows
        ],
    )
    print(result["table"])
    print(result["latency_table"])
    print(
        f"steady-state CPU/msg runtime / hand-written = {result['cpu_ratio_runtime_over_hand_written']},"
        f" calls/msg ratio = {result['calls_ratio_runtime_over_hand_written']}"
    )
    write_result(results_dir, NAME, result)
    return result


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Steady-state medians of one side's tries at one latency."""
    steady = [r["steady"] for r in results]
    return {
        "msgs_per_s": round(median([s["messages"] / s["seconds"] for s in steady]), 1),
        "cpu_us_per_msg": round(median([s["cpu_seconds"] / s["messages"] for s in steady]) * 1e6, 1),
        "api_calls_per_msg": round(median([s["calls"] / s["messages"] for s in steady]), 3),
        "tries_raw": results,
    }
