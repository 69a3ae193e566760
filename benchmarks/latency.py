"""3. Latency at low load, in memory: send -> handle() start, handle() return -> completed.

Messages are sent one at a time, ``INTERVAL`` apart (far below capacity), round robin over 10
sessions whose actors stay active (idle timeout 5 s), so each delivery wakes a waiting session
receiver rather than accepting a new session. Times are ``time.perf_counter()``: "send" is
just before `InMemoryProvider.send`, "start" the first line of ``handle()``, "return" its last
line, "completed" when the runtime reports the completion (`Telemetry.message_completed`,
called right after the broker's ``complete`` returned).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from queue_runtime import MessageContext, SessionActor, SupervisorConfig
from queue_runtime.message import Message, ReceivedMessage
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.supervisor import Supervisor
from queue_runtime.telemetry import Telemetry

from ._common import Event, body_for, check_size, percentile, session_name, table, write_result

NAME = "latency"
TITLE = "Latency at low load (in-memory, microseconds)"
QUEUE = "latency"
SESSIONS = 10
INTERVAL = 0.002
PLANS = {"tiny": 50, "quick": 1_000, "full": 3_000}

_sent: dict[str, float] = {}
_started: dict[str, float] = {}
_returned: dict[str, float] = {}
_completed: dict[str, float] = {}


class TimedActor(SessionActor[Event]):
    async def handle(self, message: Event, ctx: MessageContext) -> None:
        _started[ctx.message_id] = time.perf_counter()
        _returned[ctx.message_id] = time.perf_counter()


class TimedTelemetry(Telemetry):
    def message_completed(self, message: ReceivedMessage, *, seconds: float) -> None:
        _completed[message.message_id] = time.perf_counter()
        super().message_completed(message, seconds=seconds)


async def _measure(messages: int) -> None:
    provider = InMemoryProvider()
    config = SupervisorConfig(queue=QUEUE, max_concurrent_sessions=SESSIONS)
    supervisor = Supervisor(provider, TimedActor, config, telemetry=TimedTelemetry(QUEUE, "memory"))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        for i in range(messages):
            message = Message(body_for(i), session_id=session_name(i % SESSIONS), message_id=f"m{i}")
            _sent[message.message_id] = time.perf_counter()
            await provider.send(QUEUE, [message])
            await trio.sleep(INTERVAL)
        with trio.fail_after(60 + messages * INTERVAL * 10):  # a runtime that stopped completing
            while len(_completed) < messages:
                await trio.sleep(0.01)
        supervisor.stop()
    await provider.aclose()


def _summary(values: list[float]) -> dict[str, float]:
    micros = [v * 1e6 for v in values]
    return {
        "p50_us": round(percentile(micros, 0.50), 1),
        "p99_us": round(percentile(micros, 0.99), 1),
        "max_us": round(max(micros), 1),
    }


def run(size: str, results_dir: Path) -> dict[str, Any]:
    check_size(size)
    messages = PLANS[size]
    for store in (_sent, _started, _returned, _completed):
        store.clear()
    trio.run(_measure, messages)
    ids = list(_sent)
    to_start = _summary([_started[i] - _sent[i] for i in ids])
    to_complete = _summary([_completed[i] - _returned[i] for i in ids])
    end_to_end = _summary([_completed[i] - _sent[i] for i in ids])
    rows = [
        {"interval": "send -> handle() start", **to_start},
        {"interval": "handle() return -> completed", **to_complete},
        {"interval": "send -> completed", **end_to_end},
    ]
    result: dict[str, Any] = {
        "size": size,
        "messages": messages,
        "sessions": SESSIONS,
        "send_interval_s": INTERVAL,
        "rows": rows,
    }
    result["table"] = table(
        f"{TITLE}, {messages:,} messages, one every {INTERVAL * 1000:g} ms over {SESSIONS} sessions",
        ["interval", "p50 (us)", "p99 (us)", "max (us)"],
        [(r["interval"], r["p50_us"], r["p99_us"], r["max_us"]) for r in rows],
    )
    print(result["table"])
    write_result(results_dir, NAME, result)
    return result
