"""The operator CLI (``send``, ``dlq peek|export|replay|purge``, ``stats``, ``config``).

Two halves:

* in-process against one `InMemoryProvider` shared by several ``main([...])`` calls through
  `cli.operator.use_provider`, all on one `MockClock` (each command runs its own ``trio.run``;
  the broker keeps its times on trio's clock, so they must share one);
* against SQS on a moto server subprocess: send → a real `Supervisor` dead-letters some →
  peek shows the reasons → export writes JSON lines → replay restores them with their session
  ids and empties the dead-letter queue (checked with ``stats`` and by receiving).
"""

from __future__ import annotations

import base64
import io
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from queue_runtime import DeadLetter, MessageContext, SessionActor, Supervisor, SupervisorConfig
from queue_runtime.cli import main, progress
from queue_runtime.cli import operator as op
from queue_runtime.client import REPLAYED_REASON_PROPERTY
from queue_runtime.errors import ConnectionFailed
from queue_runtime.message import Message, ReceivedMessage
from queue_runtime.providers.base import Provider
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.retry import RetryPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: the sqs_server helper

from sqs_server import CREDENTIALS, REGION, moto_sqs  # noqa: F401  (moto_sqs: a fixture, used by name)

Run = Callable[..., tuple[int, str, str]]

# --------------------------------------------------------------------------------------------
# shared pieces


class Picky(SessionActor[str]):
    """Dead-letters bodies starting with ``bad``; records what it handled, in order."""

    handled: list[tuple[str, str]] = []

    async def handle(self, body: str, ctx: MessageContext) -> None:
        if body.startswith("bad"):
            raise DeadLetter("BadBody", f"body of {ctx.message_id} starts with 'bad'")
        type(self).handled.append((self.session_id, body))


async def work_off(provider: Provider, queue: str, expected: int, *, timeout: float = 60.0) -> None:
    """Run a real supervisor with `Picky` until ``expected`` messages are settled, then drain."""
    config = SupervisorConfig(
        queue=queue,
        session_idle_timeout=0.5,
        receive_timeout=1.0,
        retry=RetryPolicy(max_attempts=1),
        shutdown_grace=5.0,
    )
    supervisor = Supervisor(provider, Picky, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        with trio.fail_after(timeout):
            while True:
                stats = supervisor.stats()
                if stats.completed + stats.dead_lettered >= expected:
                    break
                await trio.sleep(0.05)
        supervisor.stop()
    stats = supervisor.stats()
    assert stats.completed + stats.dead_lettered == expected


class Broker:
    """One in-memory broker and one MockClock shared by every command of a test."""

    def __init__(self) -> None:
        self.provider = InMemoryProvider(lock_duration=30.0, max_delivery_count=5)
        self.clock = trio.testing.MockClock(autojump_threshold=0)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.run(fn, *args, clock=self.clock)

    def receive_all(self, queue: str) -> list[ReceivedMessage]:
        """Receive (and complete) everything in ``queue``, session by session."""

        async def go() -> list[ReceivedMessage]:
            out: list[ReceivedMessage] = []
            while (receiver := await self.provider.accept_session(queue, timeout=0.1)) is not None:
                async with receiver:
                    while batch := await receiver.receive(100, timeout=0.0):
                        for message in batch:
                            await receiver.complete(message)
                        out.extend(batch)
            return out

        result: list[ReceivedMessage] = self.run(go)
        return result

    def stats(self, queue: str) -> Any:
        return self.run(self.provider.queue_stats, queue)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    with op.use_provider(b.provider, clock=b.clock):
        yield b


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Run:
    """``main(argv)`` → (exit code, stdout, stderr), in an empty directory and environment."""
    monkeypatch.chdir(tmp_path)  # no stray ./config.toml
    for name in list(__import__("os").environ):
        if name.startswith(("QUEUE_", "AWS_", "AZURE_", "SERVICE_BUS")):
            monkeypatch.delenv(name)

    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def send_ids(run: Run, *argv: str) -> list[str]:
    code, out, err = run("send", *argv)
    assert code == 0, err
    return out.split()


def dead_letter_some(broker: Broker, queue: str) -> dict[str, list[str]]:
    """Two sessions, some good and some bad bodies; a real supervisor dead-letters the bad."""
    bodies = {"s1": ["ok-1", "bad-1", "ok-2"], "s2": ["bad-2", "ok-3", "bad-3"]}

    async def go() -> None:
        for session, items in bodies.items():
            await broker.provider.send(queue, [Message(body=b.encode(), session_id=session) for b in items])
        await work_off(broker.provider, queue, 6)

    Picky.handled = []
    broker.run(go)
    return bodies


# --------------------------------------------------------------------------------------------
# send


def test_send_prints_each_id_in_send_order_with_every_field(broker: Broker, run: Run) -> None:
    ids = send_ids(
        run,
        "--queue", "orders", "--session-id", "o-1", "--body", '{"n": 1}',
        "--property", "tenant=acme", "--property", "expr=a=b", "-p", "empty=",
        "--correlation-id", "corr-9", "--content-type", "application/json", "--count", "3",
    )  # fmt: skip
    assert len(ids) == 3 and len(set(ids)) == 3
    got = broker.receive_all("orders")
    assert [m.message_id for m in got] == ids  # printed ids are the sent ones, in order
    for message in got:
        assert message.session_id == "o-1"
        assert message.message.body == b'{"n": 1}'
        assert message.message.correlation_id == "corr-9"
        assert message.message.content_type == "application/json"
        props = message.message.properties
        assert (props["tenant"], props["expr"], props["empty"]) == ("acme", "a=b", "")


def test_send_reads_a_binary_file_and_stdin(
    broker: Broker, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = bytes(range(256))
    (tmp_path / "body.bin").write_bytes(blob)
    [from_file] = send_ids(run, "-q", "files", "-s", "s", "--file", str(tmp_path / "body.bin"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n\xff")))
    [from_stdin] = send_ids(run, "-q", "files", "-s", "s")
    got = {m.message_id: m.message.body for m in broker.receive_all("files")}
    assert got == {from_file: blob, from_stdin: b"from stdin\n\xff"}


def test_send_many_copies_chunks_and_keeps_order(broker: Broker, run: Run) -> None:
    ids = send_ids(run, "-q", "bulk", "-s", "s", "-b", "x", "--count", "1203")
    assert len(ids) == 1203 == len(set(ids))
    assert [m.message_id for m in broker.receive_all("bulk")] == ids


def test_send_to_a_session_queue_without_session_is_a_usage_error(broker: Broker, run: Run) -> None:
    code, out, err = run("send", "-q", "orders", "-b", "x")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and "session" in err
    assert broker.stats("orders").active == 0


# --------------------------------------------------------------------------------------------
# dlq peek / export


def test_dlq_peek_table_and_json_show_reasons_without_bodies(broker: Broker, run: Run) -> None:
    dead_letter_some(broker, "orders")
    assert sorted(Picky.handled) == [("s1", "ok-1"), ("s1", "ok-2"), ("s2", "ok-3")]

    code, out, err = run("dlq", "peek", "--queue", "orders", "--json")
    assert (code, err) == (0, "")
    records = json.loads(out)
    assert len(records) == 3
    assert {(r["session_id"], r["reason"]) for r in records} == {
        ("s1", "BadBody"),
        ("s2", "BadBody"),
    }
    assert all(r["description"].startswith(f"body of {r['message_id']}") for r in records)
    assert all(r["delivery_count"] == 1 and r["enqueued_at"] for r in records)
    assert all("body" not in r and r["body_size"] == 5 for r in records)

    code, out, err = run("dlq", "peek", "--queue", "orders", "--max", "2")
    assert code == 0
    assert out.count("BadBody") == 2  # --max bounds the table
    assert records[0]["message_id"] in out and records[2]["message_id"] not in out
    assert "bad-1" not in out  # never a body

    assert broker.stats("orders").dead_letter == 3  # peeking changed nothing


def test_dlq_summary_groups_by_reason_error_type_and_session_prefix(broker: Broker, run: Run) -> None:
    letters = [
        ("order-1", "MaxAttemptsExceeded", "ValueError: amount must be >= 0"),
        ("order-2", "MaxAttemptsExceeded", "ValueError: amount must be >= 0"),
        ("order-2", "MaxAttemptsExceeded", "KeyError: 'sku'"),
        ("tenant:acme", "DeserializationFailed", "DecodeError: Expected `object`, got `int`"),
        ("s007", "[red]Weird[/red]", "password=hunter2hunter2 was wrong"),
    ]

    async def seed() -> None:
        for sid, _, _ in letters:
            await broker.provider.send("orders", [Message(body=b"secret-body", session_id=sid)])
        done = 0
        while (receiver := await broker.provider.accept_session("orders", timeout=0.1)) is not None:
            async with receiver:
                for message in await receiver.receive(10, timeout=0.0):
                    sid, reason, description = next(x for x in letters[done:] if x[0] == message.session_id)
                    await receiver.dead_letter(message, reason, description)
                    done += 1

    broker.run(seed)
    code, out, err = run("dlq", "summary", "-q", "orders", "--json")
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert (summary["examined"], summary["complete"]) == (5, True)
    counts = {
        name: {row["key"]: row["count"] for row in summary[name]} for name in summary if name[:3] == "by_"
    }
    assert counts["by_reason"] == {
        "MaxAttemptsExceeded": 3,
        "DeserializationFailed": 1,
        "[red]Weird[/red]": 1,
    }
    assert counts["by_error_type"] == {"ValueError": 2, "KeyError": 1, "DecodeError": 1, None: 1}
    assert counts["by_session_prefix"] == {"order": 3, "tenant": 1, "s": 1}
    first = summary["by_reason"][0]
    assert first["first_enqueued"] <= first["last_enqueued"] and first["reasons"] == {
        "MaxAttemptsExceeded": 3
    }

    code, out, err = run("dlq", "summary", "-q", "orders")
    assert (code, err) == (0, "")
    assert "[red]Weird[/red]" in out  # broker text literally, never as markup
    assert "hunter2hunter2" not in out and "secret-body" not in out
    assert "5 dead letters of 'orders'" in out and "MaxAttemptsExceeded 2" in out  # ValueError's reasons
    assert run("dlq", "summary", "-q", "nothing")[1] == "no dead-lettered messages in 'nothing'\n"
    assert broker.stats("orders").dead_letter == 5  # summarizing changed nothing


def test_dlq_peek_on_an_empty_dead_letter_queue(broker: Broker, run: Run) -> None:
    assert run("dlq", "peek", "-q", "quiet") == (0, "no dead-lettered messages in 'quiet'\n", "")
    assert run("dlq", "peek", "-q", "quiet", "--json")[1].strip() == "[]"


def test_dlq_export_writes_json_lines_atomically_and_leaves_the_dlq(
    broker: Broker, run: Run, tmp_path: Path
) -> None:
    async def dead() -> None:
        await broker.provider.send(
            "exp",
            [
                Message(body=b"bad text \xc3\xa9", session_id="a", properties={"k": "v"}, correlation_id="c"),
                Message(body=b"bad\xff\x00binary", session_id="b", content_type="application/octet-stream"),
            ],
        )
        await work_off(broker.provider, "exp", 2)

    broker.run(dead)
    out = tmp_path / "dead.jsonl"
    out.write_text("old content\n")
    code, stdout, err = run("dlq", "export", "-q", "exp", "--out", str(out))
    assert (code, err) == (0, "")
    assert "exported 2 dead-lettered messages" in stdout
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    by_session = {record["session_id"]: record for record in map(json.loads, lines)}
    first, second = by_session["a"], by_session["b"]
    assert (first["body"], first["body_encoding"]) == ("bad text é", "utf-8")
    assert (first["properties"], first["correlation_id"], first["reason"]) == ({"k": "v"}, "c", "BadBody")
    assert (second["body_encoding"], second["reason"]) == ("base64", "DeserializationFailed")
    assert base64.b64decode(second["body"]) == b"bad\xff\x00binary"
    assert second["content_type"] == "application/octet-stream"
    assert second["delivery_count"] == 1 and second["enqueued_at"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    assert broker.stats("exp").dead_letter == 2


def test_an_interrupted_export_leaves_no_file(
    broker: Broker, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_letter_some(broker, "orders")
    calls = 0
    real = op.export_record

    def fail_on_second(dead: ReceivedMessage, *, body: bool = True) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real(dead, body=body)

    monkeypatch.setattr(op, "export_record", fail_on_second)
    code, _, err = run("dlq", "export", "-q", "orders", "--out", str(tmp_path / "x.jsonl"))
    assert code == 130 and "interrupted" in err
    assert calls == 2
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


@given(
    body=st.binary(max_size=300), key=st.text(min_size=1).filter(lambda k: "=" not in k and k.strip() == k)
)
def test_export_record_round_trips_any_body_and_property_parsing(body: bytes, key: str) -> None:
    dead = ReceivedMessage(message=Message(body=body, session_id="s"), dead_letter_reason="R")
    record = json.loads(json.dumps(op.export_record(dead)))
    assert op.record_body(record) == body
    assert record["body_encoding"] == ("utf-8" if _is_utf8(body) else "base64")
    assert op.parse_property(f"{key}={body.hex()}=x") == (key, f"{body.hex()}=x")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# dlq replay / purge


def test_dlq_replay_dry_run_then_one_session_then_all(broker: Broker, run: Run) -> None:
    dead_letter_some(broker, "orders")
    code, out, err = run("dlq", "replay", "-q", "orders", "--dry-run")
    assert (code, err) == (0, "")
    assert out.count("would replay") == 4  # three lines and the summary
    assert out.splitlines()[-1] == "would replay 3, failed 0, skipped 0"
    assert broker.stats("orders").dead_letter == 3 and broker.stats("orders").active == 0

    code, out, err = run("dlq", "replay", "-q", "orders", "--session-id", "s2")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == "replayed 2, failed 0, skipped 1"
    stats = broker.stats("orders")
    assert (stats.dead_letter, stats.active) == (1, 2)

    code, out, _ = run("dlq", "replay", "-q", "orders")
    assert (code, out.splitlines()[-1]) == (0, "replayed 1, failed 0, skipped 0")
    back = broker.receive_all("orders")
    by_session = sorted((m.session_id, m.message.body) for m in back)
    assert by_session == [("s1", b"bad-1"), ("s2", b"bad-2"), ("s2", b"bad-3")]
    assert all(m.message.properties[REPLAYED_REASON_PROPERTY] == "BadBody" for m in back)
    assert broker.stats("orders").dead_letter == 0


def test_dlq_replay_max_bounds_the_count(broker: Broker, run: Run) -> None:
    dead_letter_some(broker, "orders")
    code, out, _ = run("dlq", "replay", "-q", "orders", "--max", "2")
    assert (code, out.splitlines()[-1]) == (0, "replayed 2, failed 0, skipped 0")
    assert broker.stats("orders").dead_letter == 1


def test_a_failed_send_keeps_the_message_dead_lettered_and_exits_1(broker: Broker, run: Run) -> None:
    dead_letter_some(broker, "orders")
    broker.provider.inject_fault("send", ConnectionFailed("broker unreachable"), times=1)
    code, out, err = run("dlq", "replay", "-q", "orders")
    assert code == 1
    assert out.splitlines()[-1] == "replayed 2, failed 1, skipped 0"
    assert "failed " in out and "stays dead-lettered" in out
    assert len(err.splitlines()) == 1 and "could not be sent back" in err
    stats = broker.stats("orders")
    assert (stats.dead_letter, stats.active) == (1, 2)  # nothing lost, nothing duplicated


def test_dlq_purge_needs_yes_then_empties(broker: Broker, run: Run) -> None:
    dead_letter_some(broker, "orders")
    code, out, err = run("dlq", "purge", "-q", "orders")
    assert (code, out) == (2, "") and len(err.splitlines()) == 1 and "--yes" in err
    assert broker.stats("orders").dead_letter == 3
    assert run("dlq", "purge", "-q", "orders", "--yes") == (
        0,
        "purged 3 dead-lettered messages of 'orders'\n",
        "",
    )
    assert broker.stats("orders").dead_letter == 0


# --------------------------------------------------------------------------------------------
# stats


def test_stats_counts_and_oldest_age_on_the_mock_clock(broker: Broker, run: Run) -> None:
    send_ids(run, "-q", "depth", "-s", "a", "-b", "1", "--count", "4")

    async def lock_one_and_wait() -> None:
        receiver = await broker.provider.accept_session("depth", timeout=1)
        assert receiver is not None
        await receiver.receive(1)
        await trio.sleep(12.5)  # MockClock: instant

    broker.run(lock_one_and_wait)
    code, out, _ = run("stats", "-q", "depth", "--json")
    assert code == 0
    figures = json.loads(out)
    assert {k: figures[k] for k in ("queue", "depth", "in_flight", "scheduled", "dead_letter")} == {
        "queue": "depth",
        "depth": 3,
        "in_flight": 1,
        "scheduled": 0,
        "dead_letter": 0,
    }
    assert 12.5 <= figures["oldest_message_age_seconds"] < 13.0
    code, out, _ = run("stats", "-q", "depth")
    assert code == 0 and "in flight (locked)" in out and "12." in out
    code, out, _ = run("stats", "-q", "empty")
    assert "unknown" in out  # no message: no age


# --------------------------------------------------------------------------------------------
# config show / validate

SECRET = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=SECRETSECRET0123"


def test_config_show_names_every_source_and_masks_secrets(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "qr.toml").write_text('queue = "from-file"\n[worker]\nprefetch = 3\n')
    monkeypatch.setenv("QUEUE_PROVIDER", "azure")
    monkeypatch.setenv("AZURE_SERVICE_BUS_CONNECTION_STRING", SECRET)
    monkeypatch.setenv("QUEUE_MAX_RETRY_ATTEMPTS", "7")
    code, out, err = run("config", "show", "--config", "qr.toml", "--queue", "from-flag", "--json")
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert shown["queue"] == {"value": "from-flag", "source": "flag"}
    assert shown["worker.prefetch"] == {"value": 3, "source": "file:qr.toml"}
    assert shown["provider"] == {"value": "azure", "source": "env:QUEUE_PROVIDER"}
    assert shown["worker.retry.max_attempts"] == {"value": 7, "source": "env:QUEUE_MAX_RETRY_ATTEMPTS"}
    assert shown["azure.connection_string"] == {
        "value": "**********",
        "source": "env:AZURE_SERVICE_BUS_CONNECTION_STRING",
    }
    assert shown["log_level"] == {"value": "INFO", "source": "default"}
    from queue_runtime.config import _leaves

    assert set(shown) == set(_leaves())  # every effective value
    code, table, _ = run("config", "show", "--config", "qr.toml")
    assert code == 0 and "file:qr.toml" in table and "**********" in table
    assert "SECRETSECRET" not in out + table


def test_config_validate_ok_and_problems_one_per_line(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run("config", "validate", "--queue", "orders")
    assert (code, err) == (0, "")
    assert out == "configuration is valid: provider 'sqlite', queue 'orders'\n"

    code, out, err = run("config", "validate")  # no queue
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "queue-runtime: problem: queue is not set: pass --queue, set QUEUE_NAME, or set 'queue' in the"
        " config file"
    ]

    monkeypatch.setenv("QUEUE_PROVIDER", "azure")
    monkeypatch.setenv("QUEUE_SHUTDOWN_GRACE_SECONDS", "-1")
    code, out, err = run("config", "validate", "--queue", "orders")
    assert code == 1 and len(err.splitlines()) == 1
    assert "worker.shutdown_grace from env:QUEUE_SHUTDOWN_GRACE_SECONDS" in err

    monkeypatch.delenv("QUEUE_SHUTDOWN_GRACE_SECONDS")
    code, out, err = run("config", "validate", "--queue", "orders")
    assert code == 1
    assert [line.split(":")[1].strip() for line in err.splitlines()] == ["problem"]
    assert "connection string" in err  # azure with neither connection string nor namespace

    monkeypatch.setenv("QUEUE_PROVIDER", "aws")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code, out, err = run("config", "validate", "--queue", "plain")
    assert code == 1
    problems = err.splitlines()
    assert len(problems) == 1
    assert "aws.region is not set" in problems[0]
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert run("config", "validate", "--queue", "orders.fifo")[0] == 0
    # A standard queue is valid: the worker serves it without sessions, and both say so.
    code, out, err = run("config", "validate", "--queue", "plain")
    assert code == 0 and out.startswith("configuration is valid")
    assert err.startswith("queue-runtime: note: queue 'plain' is a standard SQS queue")


def test_help_text_contains_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["send"], ["dlq"], ["dlq", "peek"], ["dlq", "export"], ["dlq", "replay"], ["dlq", "purge"],
                 ["stats"], ["config"], ["config", "show"], ["config", "validate"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "Example:" in out and f"queue-runtime {' '.join(argv)}" in out


def test_a_group_without_subcommand_is_a_usage_error(run: Run) -> None:
    code, out, err = run("dlq")
    assert (code, out) == (2, "") and len(err.splitlines()) == 1 and "subcommand" in err


# --------------------------------------------------------------------------------------------
# SQS on a moto server: the whole operator session


@pytest.fixture
def sqs_env(request: pytest.FixtureRequest, run: Run, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    endpoint: str = request.getfixturevalue("moto_sqs")
    monkeypatch.setenv("QUEUE_PROVIDER", "aws")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", endpoint)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield endpoint


def make_sqs_queue(endpoint: str) -> str:
    import boto3

    sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )
    base = f"cli-{uuid.uuid4().hex[:12]}"
    dlq = sqs.create_queue(QueueName=f"{base}-dlq.fifo", Attributes={"FifoQueue": "true"})
    arn = sqs.get_queue_attributes(QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sqs.create_queue(
        QueueName=f"{base}.fifo",
        Attributes={
            "FifoQueue": "true",
            "VisibilityTimeout": "10",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "5"}),
        },
    )
    return f"{base}.fifo"


def sqs_provider(endpoint: str) -> Any:
    from queue_runtime.providers.sqs import SqsProvider

    return SqsProvider(endpoint_url=endpoint, region=REGION, visibility_timeout=None, **CREDENTIALS)


@pytest.mark.slow
def test_sqs_operator_session(sqs_env: str, run: Run, tmp_path: Path) -> None:
    queue = make_sqs_queue(sqs_env)
    sent: dict[str, str] = {}
    for session, body in (("g1", "ok-a"), ("g1", "bad-a"), ("g2", "bad-b"), ("g3", "bad-c")):
        [message_id] = send_ids(run, "-q", queue, "-s", session, "-b", body, "-p", "origin=cli")
        sent[message_id] = body

    async def work() -> None:
        async with sqs_provider(sqs_env) as provider:
            await work_off(provider, queue, 4, timeout=60)

    Picky.handled = []
    trio.run(work)
    assert Picky.handled == [("g1", "ok-a")]

    code, out, err = run("dlq", "peek", "-q", queue, "--json")
    assert (code, err) == (0, "")
    peeked = json.loads(out)
    assert sorted((r["session_id"], sent[r["message_id"]], r["reason"]) for r in peeked) == [
        ("g1", "bad-a", "BadBody"),
        ("g2", "bad-b", "BadBody"),
        ("g3", "bad-c", "BadBody"),
    ]
    code, out, _ = run("dlq", "peek", "-q", queue)
    assert code == 0 and out.count("BadBody") == 3

    target = tmp_path / "dlq.jsonl"
    code, out, err = run("dlq", "export", "-q", queue, "--out", str(target))
    assert (code, err) == (0, ""), err
    exported = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted((r["session_id"], r["body"], r["properties"]["origin"]) for r in exported) == [
        ("g1", "bad-a", "cli"),
        ("g2", "bad-b", "cli"),
        ("g3", "bad-c", "cli"),
    ]
    code, out, _ = run("stats", "-q", queue, "--json")
    assert json.loads(out)["dead_letter"] == 3  # export left the DLQ intact
    assert json.loads(out)["oldest_message_age_seconds"] is None  # SQS cannot tell

    code, out, err = run("dlq", "replay", "-q", queue)
    assert (code, err) == (0, ""), err
    assert out.splitlines()[-1] == "replayed 3, failed 0, skipped 0"
    code, out, _ = run("stats", "-q", queue, "--json")
    figures = json.loads(out)
    assert (figures["dead_letter"], figures["depth"], figures["in_flight"]) == (0, 3, 0)
    code, out, _ = run("stats", "-q", queue)
    assert code == 0 and "unknown" in out  # the oldest age

    async def receive_back() -> list[ReceivedMessage]:
        got: list[ReceivedMessage] = []
        async with sqs_provider(sqs_env) as provider:
            with trio.fail_after(30):
                while len(got) < 3:
                    receiver = await provider.accept_session(queue, timeout=2)
                    assert receiver is not None
                    async with receiver:
                        for message in await receiver.receive(10, timeout=1):
                            await receiver.complete(message)
                            got.append(message)
        return got

    back = trio.run(receive_back)
    assert sorted((m.session_id, m.message.body) for m in back) == [
        ("g1", b"bad-a"),
        ("g2", b"bad-b"),
        ("g3", b"bad-c"),
    ]
    for message in back:
        assert message.message.properties["origin"] == "cli"
        assert message.message.properties[REPLAYED_REASON_PROPERTY] == "BadBody"


def test_progress_bars_on_a_terminal_do_not_change_results(
    broker: Broker, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_letter_some(broker, "orders")
    totals: list[int | None] = []
    real = op._progress

    def recording(description: str, total: int | None) -> Any:
        totals.append(total)
        return real(description, total)

    monkeypatch.setattr(op, "_is_tty", lambda stderr=True: stderr)  # stderr "is" a terminal
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: True)  # (rich bars, then)
    monkeypatch.setattr(op, "_progress", recording)
    code, out, _ = run("dlq", "export", "-q", "orders", "--out", str(tmp_path / "d.jsonl"))
    assert code == 0 and len((tmp_path / "d.jsonl").read_text().splitlines()) == 3
    code, out, _ = run("dlq", "replay", "-q", "orders", "--max", "2")
    assert (code, out.splitlines()[-1]) == (0, "replayed 2, failed 0, skipped 0")
    assert totals == [None, 3, 2]  # reading (unknown), writing 3 lines, replaying min(depth, --max)
    assert broker.stats("orders").dead_letter == 1
    code, out, _ = run("dlq", "purge", "-q", "orders", "--yes")
    assert (code, out, totals[-1]) == (0, "purged 1 dead-lettered messages of 'orders'\n", 1)
    assert broker.stats("orders").dead_letter == 0


class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_quietly_with_the_sigpipe_code(
    broker: Broker, run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_letter_some(broker, "orders")
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", ClosedPipe())
        code = main(["dlq", "peek", "-q", "orders", "--json"])
    assert code == op.EXIT_BROKEN_PIPE == 141
    assert capsys.readouterr().err == ""  # quiet: the reader went away on purpose
