"""The worker endpoints over real TCP on 127.0.0.1: /metrics, /healthz, /readyz, limits, and a
scrape of a separate process that set up Prometheus the way the worker does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from queue_runtime.health import MAX_REQUEST_BYTES, METRICS_CONTENT_TYPE, serve_endpoints


async def request(port: int, raw: bytes, *, limit: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` and read the answer until the server closes: (status, headers, body)."""
    with trio.fail_after(limit):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await request(port, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


async def start(
    nursery: trio.Nursery, ready: Callable[[], bool], metrics: Callable[[], bytes], **kw: float
) -> int:
    port: int = await nursery.start(
        partial(serve_endpoints, 0, host="127.0.0.1", ready=ready, metrics=metrics, **kw)  # type: ignore[arg-type]
    )
    return port


async def test_endpoints_answer_and_readiness_flips() -> None:
    state = {"ready": False, "scrapes": 0}

    def metrics() -> bytes:
        state["scrapes"] += 1
        return b"# TYPE queue_x counter\nqueue_x_total 1.0\n"

    async with trio.open_nursery() as nursery:
        port = await start(nursery, lambda: bool(state["ready"]), metrics)
        assert port > 0

        status, headers, body = await get(port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert headers["connection"] == "close" and headers["content-length"] == "3"

        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, b"not ready\n")
        state["ready"] = True
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        state["ready"] = False
        assert (await get(port, "/readyz"))[0] == 503

        status, headers, body = await get(port, "/metrics?name[]=x")
        assert status == 200 and headers["content-type"] == METRICS_CONTENT_TYPE
        assert body == metrics.__call__() and state["scrapes"] == 2

        status, headers, body = await get(port, "/metrics", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0

        assert (await get(port, "/"))[0] == 404
        assert (await get(port, "/metricsx"))[0] == 404
        status, headers, _ = await get(port, "/healthz", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert (await request(port, b"garbage\r\n\r\n"))[0] == 400
        assert (await request(port, b"GET /healthz SPDY/3\r\n\r\n"))[0] == 400
        nursery.cancel_scope.cancel()


async def test_failing_callbacks_give_503_and_500_not_a_crash() -> None:
    def broken_ready() -> bool:
        raise RuntimeError("provider gone")

    def broken_metrics() -> bytes:
        raise RuntimeError("collector failed")

    async with trio.open_nursery() as nursery:
        port = await start(nursery, broken_ready, broken_metrics)
        assert (await get(port, "/readyz"))[0] == 503
        assert (await get(port, "/metrics"))[0] == 500
        assert (await get(port, "/healthz"))[0] == 200  # still alive
        nursery.cancel_scope.cancel()


async def test_request_size_is_bounded() -> None:
    async with trio.open_nursery() as nursery:
        port = await start(nursery, lambda: True, lambda: b"")
        big = b"GET /healthz HTTP/1.1\r\nX-Fill: " + b"a" * (MAX_REQUEST_BYTES + 100) + b"\r\n\r\n"
        assert (await request(port, big))[0] == 431
        # Just under the limit is fine.
        fits = b"GET /healthz HTTP/1.1\r\nX-Fill: " + b"a" * (MAX_REQUEST_BYTES - 200) + b"\r\n\r\n"
        assert (await request(port, fits))[0] == 200
        nursery.cancel_scope.cancel()


async def test_idle_connections_time_out_and_connections_are_bounded() -> None:
    async with trio.open_nursery() as nursery:
        port = await start(nursery, lambda: True, lambda: b"", timeout=0.3, max_connections=1)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        async with idle:
            await trio.sleep(0.05)  # let the server take the slot
            status, _, body = await get(port, "/healthz")  # the only slot is held: busy
            assert (status, body) == (503, b"busy\n")
            started = trio.current_time()
            with trio.fail_after(3):
                assert await idle.receive_some(100) == b""  # closed by the server's deadline
            assert 0.1 < trio.current_time() - started < 2.0
        assert (await get(port, "/healthz"))[0] == 200  # the slot is free again
        nursery.cancel_scope.cancel()


async def test_cancelling_the_server_closes_listener_and_connections() -> None:
    async with trio.open_nursery() as outer:
        inner_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with inner_scope:
                await serve_endpoints(0, host="127.0.0.1", ready=lambda: True, metrics=lambda: b"",
                                      task_status=task_status)  # fmt: skip

        port: int = await outer.start(run)
        held = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(0.05)
        inner_scope.cancel()
        await trio.sleep(0.05)
        with trio.fail_after(2):
            assert await held.receive_some(10) == b""  # the open connection was closed
        await held.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_bind_errors_raise_before_started() -> None:
    async with trio.open_nursery() as nursery:
        port = await start(nursery, lambda: True, lambda: b"")
        with pytest.raises(OSError):
            await nursery.start(partial(serve_endpoints, port, host="127.0.0.1", ready=lambda: True))
        nursery.cancel_scope.cancel()


WORKER = textwrap.dedent(
    """
    import os, sys, trio
    from queue_runtime.health import serve_endpoints
    from queue_runtime.telemetry import Telemetry, setup_prometheus
    from queue_runtime.message import Message, ReceivedMessage

    assert setup_prometheus() is True and setup_prometheus() is False
    flag = sys.argv[1]
    telemetry = Telemetry("orders", "memory")
    message = ReceivedMessage(message=Message(body=b"{}", session_id="s-1"))

    async def main():
        telemetry.observe_gauges(active_sessions=lambda: 3, breaker_state=lambda: 0)
        telemetry.messages_received([message], seconds=0.01)
        telemetry.message_completed(message, seconds=0.002)
        telemetry.message_dead_lettered(message, "DeserializationFailed", None)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_endpoints(0, host="127.0.0.1", ready=lambda: os.path.exists(flag),
                                                    task_status=task_status))
            print(port, flush=True)

    trio.run(main)
    """
)


@pytest.mark.slow
async def test_scrape_a_running_worker_process(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", WORKER, str(flag)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(100)
                assert chunk, "worker exited before reporting its port"
                line += chunk
        port = int(line)
        assert (await get(port, "/healthz"))[0] == 200
        assert (await get(port, "/readyz"))[0] == 503
        flag.write_text("")
        assert (await get(port, "/readyz"))[0] == 200
        status, headers, body = await get(port, "/metrics")
        assert status == 200 and headers["content-type"] == METRICS_CONTENT_TYPE
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        assert samples[("queue_messages_received_total", (("queue", "orders"),))] == 1
        assert samples[("queue_messages_completed_total", (("queue", "orders"),))] == 1
        assert (
            samples[
                (
                    "queue_messages_dead_lettered_total",
                    (("queue", "orders"), ("reason", "DeserializationFailed")),
                )
            ]
            == 1
        )
        assert samples[("queue_active_sessions", (("queue", "orders"),))] == 3
        assert samples[("queue_complete_duration_seconds_count", (("queue", "orders"),))] == 1
        assert (
            samples[("queue_complete_duration_seconds_bucket", (("le", "0.0025"), ("queue", "orders")))] == 1
        )
        assert not any(name.startswith("target_info") for name, _ in samples)
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
