"""QueueClient: batching to provider limits, validation before I/O, telemetry calls, DLQ
peek/replay without losing messages, and open_client over configuration.

Runs against the real InMemoryProvider (a subclass only records the send calls it gets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from queue_runtime import client as client_module
from queue_runtime.client import REPLAYED_REASON_PROPERTY, QueueClient, ReplayResult, open_client
from queue_runtime.errors import (
    ConfigurationError,
    ConnectionFailed,
    MessageTooLarge,
    QueueError,
    ValidationError,
)
from queue_runtime.message import Message, ReceivedMessage
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.telemetry import Telemetry


class RecordingProvider(InMemoryProvider):
    """The in-memory broker, noting each send call (and failing the n-th if asked)."""

    def __init__(self, *, fail_call: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[list[Message]] = []
        self.fail_call = fail_call

    async def send(self, queue: str, messages: Sequence[Message]) -> None:
        self.calls.append(list(messages))
        if self.fail_call == len(self.calls):
            await trio.lowlevel.checkpoint()
            raise ConnectionFailed("broker unreachable")
        await super().send(queue, messages)


class RecordingTelemetry(Telemetry):
    instances: list[RecordingTelemetry] = []

    def __init__(self, queue: str, system: str) -> None:
        super().__init__(queue, system)
        self.events: list[tuple[Any, ...]] = []
        self.in_span = False
        RecordingTelemetry.instances.append(self)

    def messages_sent(self, count: int, *, status: str, seconds: float) -> None:
        self.events.append(("sent", count, status))

    def error(self, error: BaseException, *, operation: str) -> None:
        self.events.append(("error", type(error).__name__, operation))

    def inject(self, properties: Mapping[str, str]) -> dict[str, str]:
        self.events.append(("inject", self.in_span))
        return {**properties, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}

    @contextlib.contextmanager
    def send_span(self, messages: list[Message]) -> Iterator[None]:
        self.events.append(("span", len(messages)))
        self.in_span = True
        try:
            yield
        finally:
            self.in_span = False


@pytest.fixture
def telemetry(monkeypatch: pytest.MonkeyPatch) -> type[RecordingTelemetry]:
    RecordingTelemetry.instances = []
    monkeypatch.setattr(client_module, "Telemetry", RecordingTelemetry)
    return RecordingTelemetry


def msg(session: str | None, label: object, **fields: Any) -> Message:
    return Message(body=str(label).encode(), session_id=session, **fields)


async def drain(provider: InMemoryProvider, queue: str) -> dict[str, list[ReceivedMessage]]:
    out: dict[str, list[ReceivedMessage]] = {}
    while (receiver := await provider.accept_session(queue, timeout=0)) is not None:
        async with receiver:
            while batch := await receiver.receive(100):
                for m in batch:
                    assert receiver.session_id is not None
                    out.setdefault(receiver.session_id, []).append(m)
                    await receiver.complete(m)
    return out


async def dead_letter_all(provider: InMemoryProvider, queue: str, reason: str = "Bad") -> int:
    count = 0
    while (receiver := await provider.accept_session(queue, timeout=0)) is not None:
        async with receiver:
            while batch := await receiver.receive(100):
                for m in batch:
                    await receiver.dead_letter(m, reason, f"{reason} description")
                    count += 1
    return count


# -- sending ------------------------------------------------------------------------------------------
async def test_send_batch_chunks_by_count_in_order(autojump_clock: Any) -> None:
    provider = RecordingProvider()
    client = QueueClient(provider)
    await client.send_batch("q", [msg("s", i) for i in range(250)])
    assert [len(call) for call in provider.calls] == [100, 100, 50]
    got = await drain(provider, "q")
    assert [m.message.body for m in got["s"]] == [str(i).encode() for i in range(250)]


async def test_send_batch_chunks_by_bytes(autojump_clock: Any) -> None:
    provider = RecordingProvider(max_message_size=1000)
    client = QueueClient(provider)
    messages = [Message(body=b"x" * 280, session_id="s") for _ in range(10)]
    await client.send_batch("q", messages)
    assert len(provider.calls) > 1
    for call in provider.calls:
        assert sum(provider.message_size(m) for m in call) <= 1000
    assert [m.message_id for call in provider.calls for m in call] == [m.message_id for m in messages]
    assert len((await drain(provider, "q"))["s"]) == 10


async def test_send_batch_validates_all_before_sending(autojump_clock: Any) -> None:
    provider = RecordingProvider(max_message_size=500)
    client = QueueClient(provider)
    good = [msg("s", i) for i in range(150)]
    with pytest.raises(MessageTooLarge, match="over the provider limit of 500"):
        await client.send_batch("q", [*good, Message(body=b"x" * 501, session_id="s")])
    with pytest.raises(ValidationError, match="expected a Message"):
        await client.send_batch("q", [*good, "text"])  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        await client.send_batch("no such queue!", good)
    assert provider.calls == []
    await client.send_batch("q", [])
    assert provider.calls == []


async def test_send_batch_partial_failure_keeps_earlier_chunks(autojump_clock: Any) -> None:
    provider = RecordingProvider(fail_call=2)
    client = QueueClient(provider)
    with pytest.raises(ConnectionFailed):
        await client.send_batch("q", [msg("s", i) for i in range(250)])
    assert (await provider.queue_stats("q")).active == 100  # the first chunk went through


async def test_send_reports_telemetry_and_injects_trace_context(
    autojump_clock: Any, telemetry: type[RecordingTelemetry]
) -> None:
    provider = RecordingProvider()
    client = QueueClient(provider)
    await client.send("q", msg("s", 1, properties={"app": "x"}))
    await client.send_batch("q", [msg("s", i) for i in range(150)])
    await client.send("other", msg("s", 1))
    assert [t.queue for t in telemetry.instances] == ["q", "other"]  # one per queue, cached
    events = telemetry.instances[0].events
    assert ("span", 1) in events and ("span", 100) in events and ("span", 50) in events
    assert [e for e in events if e[0] == "sent"] == [("sent", 1, "success"), ("sent", 100, "success"),
                                                     ("sent", 50, "success")]  # fmt: skip
    # Every sent message was injected inside its send span (besides the sizing pass).
    assert events.count(("inject", True)) == 151
    got = await drain(provider, "q")
    assert all("traceparent" in m.message.properties for m in got["s"])
    assert got["s"][0].message.properties["app"] == "x"


async def test_send_failure_is_counted(autojump_clock: Any, telemetry: type[RecordingTelemetry]) -> None:
    provider = RecordingProvider(fail_call=1)
    client = QueueClient(provider)
    with pytest.raises(ConnectionFailed):
        await client.send("q", msg("s", 1))
    events = telemetry.instances[0].events
    assert ("sent", 1, "failure") in events
    assert ("error", "ConnectionFailed", "send") in events


async def test_trace_context_counts_towards_the_size_limit(
    autojump_clock: Any, telemetry: type[RecordingTelemetry]
) -> None:
    provider = RecordingProvider(max_message_size=200)
    client = QueueClient(provider)
    body = b"x" * (200 - len("abc") - 40)  # fits alone, not with a traceparent
    with pytest.raises(MessageTooLarge):
        await client.send("q", Message(body=body, session_id="s", message_id="abc"))
    assert provider.calls == []


# -- dead letters ---------------------------------------------------------------------------------------
async def test_peek_dead_letters(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    client = QueueClient(provider)
    await client.send_batch("q", [msg("s", i) for i in range(5)])
    await dead_letter_all(provider, "q", "Poison")
    peeked = await client.peek_dead_letters("q", max_messages=3)
    assert [m.message.body for m in peeked] == [b"0", b"1", b"2"]
    assert all(m.dead_letter_reason == "Poison" and m.receipt == "" for m in peeked)
    with pytest.raises(ValidationError):
        await client.peek_dead_letters("q", max_messages=0)


async def test_replay_copies_and_completes(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    client = QueueClient(provider)
    original = Message(
        body=b"\x00\x01",
        session_id="s",
        correlation_id="c",
        properties={"k": "v"},
        content_type="application/octet-stream",
        time_to_live=3600,
    )
    await client.send("q", original)
    await dead_letter_all(provider, "q", "Transient")
    assert await client.replay_dead_letters("q") == ReplayResult(replayed=1, failed=0, skipped=0)
    assert await client.peek_dead_letters("q") == []
    [m] = (await drain(provider, "q"))["s"]
    copy = m.message
    assert copy.body == original.body
    assert (copy.correlation_id, copy.content_type) == ("c", "application/octet-stream")
    assert copy.properties["k"] == "v"
    assert copy.properties[REPLAYED_REASON_PROPERTY] == "Transient"
    assert copy.message_id != original.message_id
    assert m.delivery_count == 1


async def test_replay_dry_run_changes_nothing(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    client = QueueClient(provider)
    await client.send_batch("q", [msg("a", 1), msg("b", 2), msg("a", 3)])
    await dead_letter_all(provider, "q")
    before = [m.message_id for m in await client.peek_dead_letters("q")]
    result = await client.replay_dead_letters("q", dry_run=True, session_id="a")
    assert result == ReplayResult(replayed=2, failed=0, skipped=1)
    assert [m.message_id for m in await client.peek_dead_letters("q")] == before
    assert await provider.accept_session("q", timeout=0) is None


async def test_replay_session_filter_and_max_messages(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    client = QueueClient(provider)
    await client.send_batch("q", [msg("a" if i % 2 else "b", i) for i in range(30)])
    await dead_letter_all(provider, "q")
    result = await client.replay_dead_letters("q", session_id="a", max_messages=5)
    assert result.replayed == 5 and result.failed == 0
    left = await client.peek_dead_letters("q", 100)
    assert len(left) == 25
    got = await drain(provider, "q")
    assert list(got) == ["a"]
    assert [m.message.body for m in got["a"]] == [str(i).encode() for i in (1, 3, 5, 7, 9)]
    # A second pass finishes the job, in order.
    assert (await client.replay_dead_letters("q")).replayed == 25
    assert await client.peek_dead_letters("q") == []


async def test_replay_failure_keeps_the_dead_letter(autojump_clock: Any) -> None:
    provider = RecordingProvider()
    client = QueueClient(provider)
    await client.send_batch("q", [msg("s", 1), msg("s", 2)])
    await dead_letter_all(provider, "q")
    provider.inject_fault("send", ConnectionFailed("down"))
    result = await client.replay_dead_letters("q")
    assert result == ReplayResult(replayed=1, failed=1, skipped=0)
    left = await client.peek_dead_letters("q")
    assert [m.message.body for m in left] == [b"1"]
    assert [m.message.body for m in (await drain(provider, "q"))["s"]] == [b"2"]


async def test_replay_complete_failure_duplicates_rather_than_loses(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    client = QueueClient(provider)
    await client.send("q", msg("s", 1))
    await dead_letter_all(provider, "q")
    provider.inject_fault("complete", ConnectionFailed("down"))
    with pytest.raises(ConnectionFailed):
        await client.replay_dead_letters("q")
    # The copy is out, and the original is still dead-lettered: a duplicate, never a loss.
    assert [m.message.body for m in (await drain(provider, "q"))["s"]] == [b"1"]
    assert [m.message.body for m in await client.peek_dead_letters("q")] == [b"1"]


async def test_replay_validates_arguments(autojump_clock: Any) -> None:
    client = QueueClient(InMemoryProvider())
    with pytest.raises(ValidationError):
        await client.replay_dead_letters("q", max_messages=0)
    with pytest.raises(ValidationError):
        await client.replay_dead_letters("q", session_id="")
    with pytest.raises(ValidationError):
        await client.replay_dead_letters("bad name!")


# -- open_client --------------------------------------------------------------------------------------
async def test_open_client_builds_and_closes_the_configured_provider(autojump_clock: Any) -> None:
    async with open_client(provider="memory", env={}, config_file=None) as client:
        assert isinstance(client.provider, InMemoryProvider)
        assert client.provider.system == "memory"
        await client.send("orders", msg("s", 1))
        assert (await client.provider.queue_stats("orders")).active == 1
    with pytest.raises(QueueError, match="closed"):
        await client.send("orders", msg("s", 2))


async def test_open_client_with_settings_and_overrides(autojump_clock: Any) -> None:
    from queue_runtime.config import load_settings

    settings = load_settings(env={}, provider="memory", memory={"lock_duration": 7.0})
    async with open_client(settings) as client:
        assert isinstance(client.provider, InMemoryProvider)
        assert client.provider.lock_duration == 7.0
    async with open_client(settings, queue="orders") as client:
        assert isinstance(client.provider, InMemoryProvider)
    with pytest.raises(ConfigurationError):
        async with open_client(settings, no_such_setting=1):
            pass


async def test_open_client_defaults_to_sqlite_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from queue_runtime.providers.sqlite import SqliteProvider

    monkeypatch.chdir(tmp_path)
    async with open_client(env={}, config_file=None) as client:
        assert isinstance(client.provider, SqliteProvider)
        assert client.provider.system == "sqlite"
        await client.send("orders", msg("s", 1))
    assert (tmp_path / "queue-runtime.db").is_file()
    async with open_client(env={}, config_file=None) as client:  # durable: a new client sees it
        assert (await client.provider.queue_stats("orders")).active == 1


async def test_open_client_bad_configuration_is_one_clear_error(autojump_clock: Any) -> None:
    with pytest.raises(ConfigurationError):
        async with open_client(provider="carrier-pigeon", env={}):
            pass


def test_client_repr_has_no_secrets() -> None:
    assert repr(QueueClient(InMemoryProvider())) == "<QueueClient system='memory'>"


async def test_replay_reports_each_outcome(autojump_clock: Any) -> None:
    provider = InMemoryProvider()
    client = QueueClient(provider)
    await client.send_batch("q", [msg("a", 1), msg("b", 2)])
    await dead_letter_all(provider, "q")
    seen: list[tuple[bytes, str]] = []
    result = await client.replay_dead_letters(
        "q", session_id="a", on_message=lambda m, outcome: seen.append((m.message.body, outcome))
    )
    assert result == ReplayResult(replayed=1, failed=0, skipped=1)
    assert seen == [(b"1", "replayed"), (b"2", "skipped")]
