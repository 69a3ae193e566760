"""The fault drills (``drills/``): their checker on made-up records, the fault proxy against a
small HTTP server and moto, the strict moto server's receipt handles, and a quick round of
every drill scenario with real worker processes (which must find no violation).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import h11
import httpx
import pytest
import trio

from drills.checks import Violation, check_calls
from drills.faults import QUICK, SCENARIOS, Drill
from drills.moto import _STRICT_PATCHES, StrictMotoServer
from drills.proxy import FaultProxy, Faults, ProxyProcess
from drills.recorder import Call, read_calls
from queue_runtime import Message
from queue_runtime.errors import ConnectionFailed, QueueError, Throttled
from queue_runtime.providers.sqs import SqsProvider
from sqs_server import CREDENTIALS, REGION, moto_sqs  # noqa: F401  (moto_sqs: a fixture, used by name)

pytestmark = pytest.mark.slow

MS = 1_000_000  # nanoseconds


# -- the checker ---------------------------------------------------------------------------------


def call(
    pid: int, group: str, seq: int, start_ms: int, end_ms: int | None, outcome: str | None = "done"
) -> Call:
    return Call(
        pid=pid,
        call=start_ms,
        group=group,
        seq=seq,
        message_id=f"{group}-{seq}",
        delivery_count=1,
        attempt=1,
        start=start_ms * MS,
        end=end_ms * MS if end_ms is not None else None,
        outcome=outcome if end_ms is not None else None,
    )


def kinds(violations: list[Violation]) -> list[str]:
    return [v.kind for v in violations]


def test_checker_passes_one_group_handled_in_order_across_processes() -> None:
    calls = [call(1, "g", 0, 0, 100), call(2, "g", 1, 100, 200), call(1, "g", 2, 250, 300)]
    assert check_calls(calls, {"g": 3}) == []


def test_checker_finds_two_processes_handling_one_group_at_once() -> None:
    calls = [call(1, "g", 0, 0, 100), call(1, "g", 1, 100, 500), call(2, "g", 1, 300, 400, "done")]
    violations = check_calls(calls, {"g": 2})
    assert kinds(violations) == ["overlap"]
    assert "pid 1 seq 1" in violations[0].detail and "pid 2 seq 1" in violations[0].detail
    assert "overlap by 100.0 ms" in violations[0].detail


def test_checker_finds_an_overlap_within_one_process_and_with_a_cancelled_call() -> None:
    calls = [call(1, "g", 0, 0, 300, "cancelled"), call(1, "g", 0, 200, 400)]
    assert kinds(check_calls(calls, {"g": 1})) == ["overlap"]


def test_checker_finds_a_gap_when_k_plus_1_starts_before_k_returned() -> None:
    calls = [call(1, "g", 0, 0, 300), call(2, "g", 1, 200, 250)]
    violations = check_calls(calls, {"g": 2})
    assert "gap" in kinds(violations)  # (and these two overlap too)
    gap = next(v for v in violations if v.kind == "gap")
    assert "seq 1" in gap.detail and "seq 0 first done at 0.300 s" in gap.detail


def test_checker_counts_only_done_calls_for_order_and_loss() -> None:
    # seq 0 was cancelled, then seq 1 ran: a gap; seq 0 never returned: lost.
    calls = [call(1, "g", 0, 0, 100, "cancelled"), call(1, "g", 1, 100, 200)]
    assert sorted(kinds(check_calls(calls, {"g": 2}))) == ["gap", "lost"]


def test_checker_finds_lost_messages_and_groups() -> None:
    calls = [call(1, "a", 0, 0, 100)]
    violations = check_calls(calls, {"a": 2, "b": 1})
    assert [(v.kind, v.group) for v in violations] == [("lost", "a"), ("lost", "b")]


def test_checker_ends_an_open_call_of_a_killed_process_at_the_kill() -> None:
    open_call = call(1, "g", 0, 0, None)  # killed with -9 inside handle(): no end line
    after = call(2, "g", 0, 500, 600)  # redelivered after the kill
    assert check_calls([open_call, after], {"g": 1}, killed={1: 400 * MS}) == []
    during = call(2, "g", 0, 300, 350)  # ... but this one ran while the killed call still did
    violations = check_calls([open_call, during], {"g": 1}, killed={1: 400 * MS})
    assert kinds(violations) == ["overlap"]
    assert "no end line, kill" in violations[0].detail


def test_checker_reports_an_open_call_of_a_process_that_was_not_killed() -> None:
    violations = check_calls([call(1, "g", 0, 0, None)], {"g": 1}, exited={1: 50 * MS})
    assert sorted(kinds(violations)) == ["lost", "unfinished"]


def test_read_calls_pairs_lines_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    (tmp_path / "7.log").write_text(
        "S 1000 7 1 g 0 m0 1 1\n"
        "E 2000 7 1 g 0 m0 1 1 done\n"
        "S 3000 7 2 g 1 m1 1 1\n"
        "E 4000 7 2 g 1 m1 1 1 canc"  # torn by kill -9
    )
    calls = read_calls(tmp_path)
    assert [(c.seq, c.start, c.end, c.outcome) for c in calls] == [
        (0, 1000, 2000, "done"),
        (1, 3000, None, None),
    ]


# -- the proxy -----------------------------------------------------------------------------------


class EchoServer:
    """An HTTP/1.1 server (h11) to put behind the proxy. It echoes the request body; the path
    picks the response's framing: ``/length``, ``/chunked`` (with a trailer), ``/close``
    (close-delimited), ``/length-close`` (Content-Length, then ``Connection: close``, as
    moto's server answers)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.url = ""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            conn = h11.Connection(h11.SERVER)
            while True:
                request, body = await self._request(conn, stream)
                if request is None:
                    return
                self.requests += 1
                target = request.target
                if target.startswith(b"/close"):
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
                    return
                if target.startswith(b"/chunked"):
                    headers = [(b"transfer-encoding", b"chunked"), (b"trailer", b"x-echo-length")]
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
                    for at in range(0, len(body), 100_000):
                        await stream.send_all(conn.send(h11.Data(data=body[at : at + 100_000])))
                    end = h11.EndOfMessage(headers=[(b"x-echo-length", str(len(body)).encode())])
                    await stream.send_all(conn.send(end))
                else:
                    headers = [(b"content-length", str(len(body)).encode())]
                    if target.startswith(b"/length-close"):
                        headers.append((b"connection", b"close"))
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
                    await stream.send_all(conn.send(h11.Data(data=body)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()

    @staticmethod
    async def _request(conn: h11.Connection, stream: trio.SocketStream) -> tuple[h11.Request | None, bytes]:
        request = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed
                return None, b""


@pytest.fixture
async def echo(nursery: trio.Nursery) -> EchoServer:
    server = EchoServer()
    await nursery.start(server.serve)
    return server


async def start_proxy(nursery: trio.Nursery, upstream: str, faults: Faults | None = None) -> FaultProxy:
    proxy = FaultProxy(upstream, faults, seed=1)
    await nursery.start(proxy.serve)
    return proxy


async def test_proxy_forwards_many_keep_alive_requests_on_one_connection(
    nursery: trio.Nursery, echo: EchoServer
) -> None:
    proxy = await start_proxy(nursery, echo.url)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for i in range(300):
            path = "/length" if i % 3 else "/length-close"  # the server closes after a third
            response = await client.post(path, content=f"request {i}".encode())
            assert response.status_code == 200
            assert response.content == f"request {i}".encode()
    assert proxy.stats["connections"] == 1  # the client kept its one connection throughout
    assert proxy.stats["forwarded"] == 300
    assert echo.connections == 100 + 1  # a new one after each close, one reused for the rest


async def test_proxy_forwards_large_bodies_in_every_framing(nursery: trio.Nursery, echo: EchoServer) -> None:
    proxy = await start_proxy(nursery, echo.url)
    body = os.urandom(3 * 1024 * 1024 + 17)

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 250_000):
            yield body[at : at + 250_000]

    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
        for path in ("/length", "/chunked", "/close", "/length-close"):
            response = await client.post(path, content=body)
            assert response.status_code == 200, path
            assert response.content == body, path
        response = await client.post("/chunked", content=chunks())  # a chunked request too
        assert response.content == body
        assert response.headers.get("content-length") is None  # forwarded chunked, as it came
        response = await client.post("/close", content=b"")
        assert response.content == b"" and response.headers["content-length"] == "0"
    assert proxy.stats["connections"] == 1  # even the close-delimited answers kept the client's
    assert proxy.stats["bad_requests"] == 0


async def test_proxy_fixed_delay_is_added_each_way(nursery: trio.Nursery, echo: EchoServer) -> None:
    proxy = await start_proxy(nursery, echo.url, Faults(delay=0.15))
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        await client.post("/length", content=b"warm-up")
        for _ in range(5):
            started = time.perf_counter()
            await client.post("/length", content=b"x")
            elapsed = time.perf_counter() - started
            assert 0.30 <= elapsed < 0.30 + 0.2, elapsed
        proxy.paused = True  # faults off: no delay
        started = time.perf_counter()
        await client.post("/length", content=b"x")
        assert time.perf_counter() - started < 0.1
    assert proxy.stats["delayed"] == 6


async def test_proxy_closes_every_connection_when_cancelled(echo: EchoServer) -> None:
    proxy = FaultProxy(echo.url)
    async with trio.open_nursery() as inner:
        port = await inner.start(proxy.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST /length HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        answer = b""
        while not answer.endswith(b"hi"):
            answer += await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        inner.cancel_scope.cancel()  # the proxy stops, its client connection still open
    with trio.fail_after(5):
        assert await stream.receive_some(65536) == b""  # ... and closed by the proxy
    await stream.aclose()


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> str:
    """The shared moto server's URL."""
    return str(request.getfixturevalue("moto_sqs"))


@pytest.fixture
def sqs(endpoint: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )


@pytest.fixture
def fifo(sqs: Any) -> Iterator[tuple[str, str]]:
    name = f"proxy-{uuid.uuid4().hex[:10]}.fifo"
    url = sqs.create_queue(QueueName=name, Attributes={"FifoQueue": "true"})["QueueUrl"]
    yield name, url
    sqs.delete_queue(QueueUrl=url)


def provider_via(proxy: FaultProxy) -> SqsProvider:
    return SqsProvider(
        region=REGION,
        endpoint_url=proxy.url,
        access_key_id=CREDENTIALS["access_key_id"],
        secret_access_key=CREDENTIALS["secret_access_key"],
        visibility_timeout=10,
    )


async def test_throttling_answer_is_throttled_for_our_sqs_provider(
    nursery: trio.Nursery, endpoint: str, fifo: tuple[str, str]
) -> None:
    name, _ = fifo
    proxy = await start_proxy(nursery, endpoint, Faults(throttle=1.0))
    provider = provider_via(proxy)
    try:
        with pytest.raises(Throttled) as caught:
            await provider.describe(name)
        assert caught.value.transient
        assert "RequestThrottled" in str(caught.value)
        # botocore took it for throttling, so its retry policy tried again (after a back-off).
        assert proxy.stats["throttled"] >= 2
        assert proxy.stats["forwarded"] == 0
        proxy.faults = Faults()  # the same provider and connection work once it stops
        info = await provider.describe(name)
        assert info.name == name
    finally:
        await provider.aclose()


async def test_dropped_connections_are_transient_errors_and_after_forwarding_the_call_took_effect(
    nursery: trio.Nursery, endpoint: str, fifo: tuple[str, str], sqs: Any
) -> None:
    name, url = fifo
    proxy = await start_proxy(nursery, endpoint)
    provider = provider_via(proxy)
    try:
        await provider.describe(name)  # queue metadata cached before the faults
        forwarded = proxy.stats["forwarded"]
        proxy.faults = Faults(drop_before=1.0)
        with pytest.raises(QueueError) as caught:
            await provider.send(name, [Message(b"{}", session_id="g")])
        assert isinstance(caught.value, ConnectionFailed) and caught.value.transient
        assert proxy.stats["forwarded"] == forwarded  # none of the SDK's tries got through
        assert proxy.stats["dropped_before"] >= 2  # it did try again
        proxy.faults = Faults(drop_after=1.0)
        with pytest.raises(QueueError) as caught:
            await provider.send(name, [Message(b"{}", session_id="g", message_id="once")])
        assert isinstance(caught.value, ConnectionFailed) and caught.value.transient
    finally:
        await provider.aclose()
    assert proxy.stats["dropped_after"] >= 1
    # The send reached the server though its answer was lost (the SDK's retries were
    # deduplicated by the FIFO queue: one message).
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_proxy_subprocess_prints_its_port_pauses_resumes_and_reports(tmp_path: Path, endpoint: str) -> None:
    proxy = ProxyProcess(endpoint, ["--throttle", "1", "--paused", "--seed", "3"], log=tmp_path / "proxy.log")
    try:
        client = boto3.client(
            "sqs",
            endpoint_url=proxy.url,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["access_key_id"],
            aws_secret_access_key=CREDENTIALS["secret_access_key"],
            config=botocore.config.Config(retries={"total_max_attempts": 1}),
        )
        client.list_queues()  # paused: forwarded
        proxy.resume_faults()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.list_queues()
            except botocore.exceptions.ClientError as error:
                assert error.response["Error"]["Code"] == "RequestThrottled"
                break
            assert time.monotonic() < deadline, "faults never resumed"
            time.sleep(0.05)
    finally:
        stats = proxy.stop()
    assert proxy.process.returncode == 0
    assert stats["throttled"] == 1 and stats["forwarded"] >= 1


# -- the strict moto server ------------------------------------------------------------------------


def test_strict_moto_server_honours_only_live_fifo_receipt_handles() -> None:
    server = StrictMotoServer()
    try:
        sqs = server.client()
        url = sqs.create_queue(QueueName="receipts.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="m", MessageGroupId="g", MessageDeduplicationId="1")
        first = sqs.receive_message(QueueUrl=url, VisibilityTimeout=1)["Messages"][0]["ReceiptHandle"]
        time.sleep(1.2)  # the visibility lapses; the message is received again
        second = sqs.receive_message(QueueUrl=url, VisibilityTimeout=30)["Messages"][0]["ReceiptHandle"]
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first, VisibilityTimeout=0)
        assert caught.value.response["Error"]["Code"] == "ReceiptHandleIsInvalid"
        with pytest.raises(botocore.exceptions.ClientError):  # FIFO: "the receipt handle has expired"
            sqs.delete_message(QueueUrl=url, ReceiptHandle=first)
        names = ["ApproximateNumberOfMessagesNotVisible"]
        assert sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"][names[0]] == "1"
        sqs.delete_message(QueueUrl=url, ReceiptHandle=second)
        assert sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"][names[0]] == "0"
        # A delete after the visibility ran out (nobody received it again) fails too.
        sqs.send_message(QueueUrl=url, MessageBody="n", MessageGroupId="g", MessageDeduplicationId="2")
        late = sqs.receive_message(QueueUrl=url, VisibilityTimeout=1)["Messages"][0]["ReceiptHandle"]
        time.sleep(1.2)
        with pytest.raises(botocore.exceptions.ClientError):
            sqs.delete_message(QueueUrl=url, ReceiptHandle=late)
        with pytest.raises(botocore.exceptions.ClientError):
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=late, VisibilityTimeout=30)
    finally:
        server.stop()


class _Clock:
    """moto's millisecond clock, moved by hand."""

    def __init__(self) -> None:
        self.ms = float(int(time.time() * 1000))

    def __call__(self) -> float:
        return self.ms


@pytest.fixture
def strict_moto_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, _Clock, dict[str, Any]]]:
    """moto's SQS backend in this process with the strict server's patches, on a hand-moved
    clock: (backend, clock, the patches' namespace). Everything patched is restored after."""
    from moto.sqs import models

    for name in ("receive_message", "delete_message", "change_message_visibility"):
        monkeypatch.setattr(models.SQSBackend, name, getattr(models.SQSBackend, name))
    monkeypatch.setattr(models, "unix_time_millis", models.unix_time_millis)
    clock = _Clock()
    namespace: dict[str, Any] = {}
    exec(_STRICT_PATCHES, namespace)
    namespace["_clock"] = clock  # the patches' clock, read at each call
    yield models.sqs_backends["123456789012"][REGION], clock, namespace


def test_strict_moto_server_decides_a_receive_at_one_instant(
    strict_moto_in_process: tuple[Any, _Clock, dict[str, Any]],
) -> None:
    """Messages 0 and 1 of a group received together lapse a millisecond apart. A receive that
    starts between the two lapses and runs past the second must not hand out 1 while skipping
    0 (seen in a kill9 drill as a gap: message 1 handled before message 0)."""
    backend, clock, namespace = strict_moto_in_process
    name = f"instant-{uuid.uuid4().hex[:8]}.fifo"
    backend.create_queue(name, FifoQueue="true", VisibilityTimeout="4")
    for seq in range(2):
        backend.send_message(name, f"m{seq}", group_id="g", deduplication_id=str(seq))
    first = backend.receive_message(name, 10, 0, 4)
    assert [m.body for m in first] == ["m0", "m1"]
    queue = backend.get_queue(name)
    message_1 = next(m for m in queue._messages if m.body == "m1")
    message_1.visible_at += 2  # marked received 2 ms after message 0

    receive = namespace["_receive"]

    def slow_receive(*args: Any, **kwargs: Any) -> Any:
        clock.ms += 3  # time passes inside the call (another thread held the GIL)
        return receive(*args, **kwargs)

    namespace["_receive"] = slow_receive
    clock.ms += 4000 + 1  # message 0 lapsed, message 1 lapses during the receive
    second = [m.body for m in backend.receive_message(name, 10, 0, 4)]
    assert second in ([], ["m0", "m1"]), f"FIFO order broken: {second}"
    clock.ms += 10
    assert [m.body for m in backend.receive_message(name, 10, 0, 4)] in (["m0", "m1"], [])


def test_strict_moto_server_times_visibility_on_a_steady_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's wall clock has stepped 3.4 s forward during a drill: on moto's wall-clock
    timing every lock in flight lapsed that much early, while the workers (on the monotonic
    clock, as they should be) still held them. The strict server's clock does not step."""
    from moto.sqs import models

    for name in ("receive_message", "delete_message", "change_message_visibility"):
        monkeypatch.setattr(models.SQSBackend, name, getattr(models.SQSBackend, name))
    monkeypatch.setattr(models, "unix_time_millis", models.unix_time_millis)
    namespace: dict[str, Any] = {}
    exec(_STRICT_PATCHES, namespace)
    before = models.unix_time_millis()
    wall, steady = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: wall() + 3.4)  # the wall clock steps
    monkeypatch.setattr(time, "monotonic", lambda: steady() + 5.0)  # 5 s pass
    assert 4900 < models.unix_time_millis() - before < 5100


# -- a quick round of the drills ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_drill(scenario: str) -> None:
    result = Drill(scenario, 2, QUICK, seed=7).run()
    assert result.handled == result.messages
    assert not result.violation_counts, "\n".join(
        [result.line(), *(f"{v['kind']} {v['group'] or ''}: {v['detail']}" for v in result.violations)]
    )
