"""An operator command against an in-memory broker holding dead letters, in one process, so a
test can run it in a real terminal (tmux) or with pipes: ``python tests/dlq_harness.py
[--dead N] [--send-delay S] [--peek-delay S] -- COMMAND ARGS...``.

The broker gets ``N`` dead letters on queue ``orders`` (sessions ``s000``...``s049``; reasons
``BadBody`` and ``MaxAttemptsExceeded`` with ``ValueError``/``KeyError`` descriptions), then
``queue_runtime.cli.main(COMMAND ARGS)`` runs against it (`use_provider`). ``--send-delay``
slows each send (a replay of thousands then takes seconds, long enough to press Ctrl-C);
``--peek-delay`` slows the peek. Afterwards the broker's counts go as JSON to the file named by
``HARNESS_RESULT`` (stdout belongs to the command), and the exit code is the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import trio
import trio.testing

from queue_runtime.cli import main
from queue_runtime.cli import operator as op
from queue_runtime.message import Message
from queue_runtime.providers.memory import InMemoryProvider

SESSIONS = 50


async def seed(provider: InMemoryProvider, count: int) -> None:
    per_session = -(-count // SESSIONS) if count else 0
    left = count
    for index in range(SESSIONS):
        take = min(per_session, left)
        if take <= 0:
            break
        left -= take
        sid = f"s{index:03d}"
        await provider.send(
            "orders", [Message(body=f"body-{sid}-{n}".encode(), session_id=sid) for n in range(take)]
        )
    while (receiver := await provider.accept_session("orders", timeout=0.01)) is not None:
        async with receiver:
            while batch := await receiver.receive(100, timeout=0.0):
                for message in batch:
                    number = int(message.message.body.rsplit(b"-", 1)[1])
                    if number % 3 == 0:
                        await receiver.dead_letter(message, "BadBody", "no order id")
                    else:
                        kind = "ValueError" if number % 3 == 1 else "KeyError"
                        await receiver.dead_letter(
                            message, "MaxAttemptsExceeded", f"{kind}: attempt {number}"
                        )


def counts(provider: InMemoryProvider, clock: trio.abc.Clock) -> dict[str, Any]:
    stats = trio.run(provider.queue_stats, "orders", clock=clock)
    return {"dead_letter": stats.dead_letter, "active": stats.active, "in_flight": stats.in_flight}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dead", type=int, default=5000)
    parser.add_argument("--send-delay", type=float, default=0.0)
    parser.add_argument("--peek-delay", type=float, default=0.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    provider = InMemoryProvider(lock_duration=600)
    # One clock for every run (the broker keeps lock deadlines on trio's clock), in real time.
    clock = trio.testing.MockClock(rate=1.0)
    trio.run(seed, provider, options.dead, clock=clock)
    if options.send_delay:
        send = provider.send

        async def slow_send(queue: str, messages: Any) -> Any:
            await trio.sleep(options.send_delay)
            return await send(queue, messages)

        provider.send = slow_send  # type: ignore[method-assign]
    if options.peek_delay:
        peek = provider.peek_dead_letters

        async def slow_peek(queue: str, max_messages: int = 32) -> Any:
            await trio.sleep(options.peek_delay)
            return await peek(queue, max_messages)

        provider.peek_dead_letters = slow_peek  # type: ignore[method-assign]
    with op.use_provider(provider, clock=clock):
        code = main(command)
    result = os.environ.get("HARNESS_RESULT")
    if result:
        with open(result, "w") as handle:
            json.dump({"code": code, **counts(provider, clock)}, handle)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
