"""Issue 16, "security and hostile input": one test per numbered defect, and the minor ones.

Each test names its defect. Distinctive fake secrets: any output holding one of them leaks.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from queue_runtime import MessageContext, SessionActor, Supervisor, SupervisorConfig
from queue_runtime.cli import main
from queue_runtime.cli import operator as op
from queue_runtime.config import load_settings
from queue_runtime.message import Message
from queue_runtime.providers.base import Provider
from queue_runtime.providers.memory import InMemoryProvider
from queue_runtime.retry import RetryPolicy
from queue_runtime.telemetry import configure_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: the sqs_server helper

from sqs_server import CREDENTIALS, REGION, moto_sqs  # noqa: F401  (moto_sqs: a fixture, used by name)

SAS_KEY = "SASKEYsecurityTEST0fake0must0never0show0up="
CONNECTION = f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={SAS_KEY}"
AWS_SECRET = "AWSsecurityTESTsecret0fake0must0never0show"


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no QUEUE_/AWS_/AZURE_ variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in list(os.environ):
        if name.startswith(("QUEUE_", "AWS_", "AZURE_", "SERVICE_BUS")):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


class Broker:
    """One in-memory broker and one MockClock shared by the CLI commands of a test."""

    def __init__(self) -> None:
        self.provider = InMemoryProvider(lock_duration=30.0, max_delivery_count=5)
        self.clock = trio.testing.MockClock(autojump_threshold=0)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.run(fn, *args, clock=self.clock)

    def dead_letter(self, queue: str, session_id: str, reason: str, description: str) -> None:
        """Put one message straight into the DLQ with this reason and description."""

        async def go() -> None:
            await self.provider.send(queue, [Message(body=b"{}", session_id=session_id)])
            receiver = await self.provider.accept_session(queue, timeout=1.0)
            assert receiver is not None
            async with receiver:
                (message,) = await receiver.receive(1, timeout=1.0)
                await receiver.dead_letter(message, reason, description)

        self.run(go)


@pytest.fixture
def broker(clean_env: Path) -> Iterator[Broker]:
    b = Broker()
    with op.use_provider(b.provider, clock=b.clock):
        yield b


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def work_off(provider: Provider, actor: type[SessionActor[Any]], queue: str, expected: int) -> None:
    """A real supervisor (one attempt per message) until ``expected`` messages are settled."""
    config = SupervisorConfig(
        queue=queue, session_idle_timeout=0.5, receive_timeout=1.0, retry=RetryPolicy(max_attempts=2)
    )
    supervisor = Supervisor(provider, actor, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        with trio.fail_after(60):
            while supervisor.stats().completed + supervisor.stats().dead_lettered < expected:
                await trio.sleep(0.05)
        supervisor.stop()


# --------------------------------------------------------------------------------------------
# 1. dlq peek crashed on broker text that looks like rich markup


def test_1_dlq_peek_shows_broker_text_literally(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    broker.dead_letter("orders", "[/x]", "Bad[/]", "text [/x] [bold]not bold[/bold] :thumbs_up: [link=x]")
    code, out, err = cli(capsys, "dlq", "peek", "-q", "orders")
    assert code == 0, err
    assert "[/x]" in out and "Bad[/]" in out
    assert "[bold]not bold[/bold]" in out and ":thumbs_up:" in out
    code, out, err = cli(capsys, "dlq", "peek", "-q", "orders", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["session_id"] == "[/x]"


# --------------------------------------------------------------------------------------------
# 2. a handler's exception text went raw into the dead-letter description


class LeakyActor(SessionActor[bytes]):
    """Fails with a text holding the connection string (as a careless driver error might)."""

    async def handle(self, body: bytes, ctx: MessageContext) -> None:
        raise ConnectionError(f"could not connect with {CONNECTION}")


def test_2_dead_letter_descriptions_are_redacted(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    load_settings(env={"AZURE_SERVICE_BUS_CONNECTION_STRING": CONNECTION})  # the configured secret

    async def go() -> None:
        await broker.provider.send("orders", [Message(body=b"x", session_id="s-1")])
        await work_off(broker.provider, LeakyActor, "orders", 1)

    broker.run(go)
    # Dead-lettered by an older version, with the key stored in clear:
    broker.dead_letter("orders", "s-2", "Old", f"stored raw: {CONNECTION}")
    stored = broker.run(broker.provider.peek_dead_letters, "orders", 10)
    assert [m.dead_letter_reason for m in stored] == ["MaxAttemptsExceeded", "Old"]
    assert SAS_KEY not in (stored[0].dead_letter_description or "")
    assert "ConnectionError" in (stored[0].dead_letter_description or "")
    for argv in (["dlq", "peek", "-q", "orders"], ["dlq", "peek", "-q", "orders", "--json"]):
        code, out, err = cli(capsys, *argv)
        assert code == 0, err
        assert "ConnectionError" in out and "stored raw" in out
        assert SAS_KEY not in out + err
    code, out, err = cli(capsys, "dlq", "export", "-q", "orders", "--out", "dlq.jsonl")
    assert code == 0, err
    assert SAS_KEY not in Path("dlq.jsonl").read_text()


# --------------------------------------------------------------------------------------------
# 3. masking was pattern-only: a configured secret value without a key= prefix leaked


class SecretRaiser(SessionActor[bytes]):
    async def handle(self, body: bytes, ctx: MessageContext) -> None:
        raise RuntimeError(AWS_SECRET)


def test_3_configured_secret_values_are_masked_everywhere(
    broker: Broker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    load_settings()  # what every worker and command does first
    stream = io.StringIO()
    handler = configure_logging("debug", "json", stream=stream)
    try:

        async def go() -> None:
            await broker.provider.send("orders", [Message(body=b"x", session_id="s-1")])
            await work_off(broker.provider, SecretRaiser, "orders", 1)

        broker.run(go)
    finally:
        import logging

        logging.getLogger().removeHandler(handler)
    logs = stream.getvalue()
    assert "retrying" in logs and "RuntimeError" in logs
    assert AWS_SECRET not in logs
    (dead,) = broker.run(broker.provider.peek_dead_letters, "orders", 10)
    assert AWS_SECRET not in (dead.dead_letter_description or "")
    # The worker's error line (an actor module whose import fails with the key as its text):
    Path("leaky.py").write_text("import os\nraise RuntimeError(os.environ['AWS_SECRET_ACCESS_KEY'])\n")
    code, out, err = cli(capsys, "worker", "leaky:Actor", "-q", "orders")
    assert code == 2
    assert "cannot import module 'leaky': RuntimeError" in err
    assert AWS_SECRET not in out + err


# --------------------------------------------------------------------------------------------
# 4. --debug tracebacks were not masked


def test_4_debug_tracebacks_are_masked(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("leaky_debug.py").write_text(f"raise RuntimeError('cannot reach {CONNECTION}')\n")
    code, out, err = cli(capsys, "--debug", "worker", "leaky_debug:Actor", "-q", "orders")
    assert code == 2
    assert "Traceback" in err and "RuntimeError" in err
    assert SAS_KEY not in out + err


# --------------------------------------------------------------------------------------------
# 5. a connection string given as SERVICE_BUS_NAMESPACE was shown and called valid


def test_5_a_connection_string_in_a_plain_field_is_an_error_and_masked(
    clean_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUEUE_PROVIDER", "azure")
    monkeypatch.setenv("SERVICE_BUS_NAMESPACE", CONNECTION)
    code, out, err = cli(capsys, "config", "show")
    assert code == 2, out
    assert "azure.fully_qualified_namespace from env:SERVICE_BUS_NAMESPACE" in err
    assert "connection string" in err
    code2, out2, err2 = cli(capsys, "config", "validate", "-q", "orders")
    assert code2 == 1
    assert "azure.fully_qualified_namespace" in err2
    for text in (out, err, out2, err2):
        assert SAS_KEY not in text and "SharedAccessKeyName" not in text


# --------------------------------------------------------------------------------------------
# 6. dlq export --out replaced special files (a FIFO, a symlink) with a regular file


def test_6_export_writes_into_special_files_and_keeps_symlinks(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    broker.dead_letter("orders", "s-1", "Bad", "one")
    # A FIFO: written in place (a reader is attached first), never replaced.
    fifo = Path("out.fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        code, out, err = cli(capsys, "dlq", "export", "-q", "orders", "--out", str(fifo))
        assert code == 0, err
        assert out == "" and "exported 1 dead-lettered" in err  # the summary stays out of the data
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
        data = os.read(reader, 65536)
    finally:
        os.close(reader)
    assert json.loads(data.decode().splitlines()[0])["reason"] == "Bad"
    # A symlink to a regular file: the link stays, its target gets the export (atomically).
    target = Path("real.jsonl")
    target.write_text("old\n")
    link = Path("link.jsonl")
    link.symlink_to(target)
    code, _out, err = cli(capsys, "dlq", "export", "-q", "orders", "--out", str(link))
    assert code == 0, err
    assert link.is_symlink()
    assert json.loads(target.read_text().splitlines()[0])["reason"] == "Bad"
    # A dangling symlink is refused with one line.
    dangling = Path("dangling.jsonl")
    dangling.symlink_to("nowhere/x.jsonl")
    code, _out, err = cli(capsys, "dlq", "export", "-q", "orders", "--out", str(dangling))
    assert code == 2 and len(err.splitlines()) == 1 and "symlink" in err
    assert dangling.is_symlink()


# --------------------------------------------------------------------------------------------
# 7. SQS queue URLs were refused although the docs accept them


@pytest.fixture
def sqs_env(clean_env: Path, monkeypatch: pytest.MonkeyPatch, moto_sqs: str) -> str:  # noqa: F811
    monkeypatch.setenv("QUEUE_PROVIDER", "aws")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_sqs)
    return moto_sqs


def _create_queue(endpoint: str, name: str, **attributes: str) -> str:
    import boto3

    client = boto3.client(
        "sqs",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )
    fifo = name.endswith(".fifo")
    dlq_name = f"{name.removesuffix('.fifo')}-dlq{'.fifo' if fifo else ''}"
    dlq = client.create_queue(QueueName=dlq_name, Attributes={"FifoQueue": "true"} if fifo else {})
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"])
    policy = json.dumps({"deadLetterTargetArn": dlq_arn["Attributes"]["QueueArn"], "maxReceiveCount": "5"})
    attrs = {"RedrivePolicy": policy, **attributes}
    if fifo:
        attrs["FifoQueue"] = "true"
    return str(client.create_queue(QueueName=name, Attributes=attrs)["QueueUrl"])


def test_7_sqs_queue_urls_are_accepted(sqs_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = _create_queue(sqs_env, "url-orders.fifo")
    assert url.startswith("http")
    code, out, err = cli(capsys, "send", "-q", url, "-s", "g-1", "-b", "hello")
    assert code == 0, err
    code, out, err = cli(capsys, "stats", "-q", url, "--json")
    assert code == 0, err
    assert json.loads(out)["depth"] == 1
    code, out, err = cli(capsys, "dlq", "peek", "-q", url)
    assert code == 0, err
    code, out, err = cli(capsys, "config", "validate", "-q", url)
    assert code == 0, err
    # The worker starts on the URL (and drains at once: the stop is requested on start-up).
    settings = load_settings(queue=url, receive_timeout=1)
    from queue_runtime.entrypoint import serve_worker

    class Echo(SessionActor[bytes]):
        async def handle(self, body: bytes, ctx: MessageContext) -> None:
            pass

    async def go() -> None:
        await serve_worker(Echo, settings, install_signal_handlers=False, on_started=lambda s: s.stop())

    trio.run(go)


# --------------------------------------------------------------------------------------------
# 8. --max beyond what a machine integer holds was an "unexpected ValueError"


@pytest.mark.parametrize(
    "command", [["dlq", "peek"], ["dlq", "export", "--out", "x.jsonl"], ["dlq", "replay"]]
)
def test_8_huge_max_is_a_usage_error(
    broker: Broker, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, _out, err = cli(capsys, *command, "-q", "orders", "--max", "1" + "0" * 30)
    assert code == 2
    assert len(err.splitlines()) == 1 and "argument --max" in err and "unexpected" not in err


# --------------------------------------------------------------------------------------------
# 9. a body that is not UTF-8 on the command line was an "unexpected UnicodeEncodeError"


def test_9_a_non_utf8_body_argument_is_sent_as_its_bytes(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    body = b"\xff\xfe".decode("utf-8", "surrogateescape")  # how Python hands over such argv bytes
    code, _out, err = cli(capsys, "send", "-q", "orders", "-s", "s-1", "-b", body)
    assert code == 0, err

    async def receive() -> bytes:
        receiver = await broker.provider.accept_session("orders", timeout=1.0)
        assert receiver is not None
        async with receiver:
            (message,) = await receiver.receive(1, timeout=1.0)
            return message.message.body

    assert broker.run(receive) == b"\xff\xfe"
    bad_session = b"s\xff".decode("utf-8", "surrogateescape")
    code, _out, err = cli(capsys, "send", "-q", "orders", "-s", bad_session, "-b", "x")
    assert code == 2 and len(err.splitlines()) == 1 and "unexpected" not in err


# --------------------------------------------------------------------------------------------
# 10. an interrupted send --count printed no ids


class InterruptAfter(InMemoryProvider):
    """Raises KeyboardInterrupt (Ctrl-C) on the send call after ``calls`` successful ones."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.left = calls
        self.sent: list[str] = []

    async def send(self, queue: str, messages: Any) -> None:
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        await super().send(queue, messages)
        self.sent.extend(m.message_id for m in messages)


def test_10_an_interrupted_send_prints_the_ids_already_sent(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = InterruptAfter(calls=2)
    with op.use_provider(provider, clock=trio.testing.MockClock(autojump_threshold=0)):
        code, out, _err = cli(capsys, "send", "-q", "orders", "-s", "s-1", "-b", "x", "--count", "300")
    assert code == 130
    assert provider.sent, "two batches were sent before the interrupt"
    assert out.split() == provider.sent


# --------------------------------------------------------------------------------------------
# 11. no overall deadline: a server that accepts TCP and never answers hung the command


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_11_operator_commands_have_a_deadline(
    clean_env: Path, silent_server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUEUE_PROVIDER", "aws")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", silent_server)
    started = time.monotonic()
    code, _out, err = cli(capsys, "stats", "-q", "orders.fifo", "--timeout", "1.5")
    elapsed = time.monotonic() - started
    assert code == 1
    assert elapsed < 15
    assert len(err.splitlines()) == 1 and "--timeout" in err


# --------------------------------------------------------------------------------------------
# 12. an Azure send failure printed three stderr lines (two raw log lines before the error)


SCRIPT = Path(sys.executable).with_name("queue-runtime")


FAILING_SENDS = {
    # Nothing listens on 127.0.0.1:9 (SQS over HTTP, Service Bus over AMQP on 5671).
    "aws": (
        {"QUEUE_PROVIDER": "aws", "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:9"},
        ["-q", "orders.fifo"],
        "queue-runtime: error: SQS get_queue_url on 'orders.fifo': cannot reach",
    ),
    "azure": (
        {"QUEUE_PROVIDER": "azure", "AZURE_SERVICE_BUS_CONNECTION_STRING": CONNECTION.replace(
            "sb://ns.servicebus.windows.net/", "sb://127.0.0.1:9/")},
        ["-q", "orders"],
        "queue-runtime: error: Service Bus open_sender on queue 'orders' failed: ServiceBusConnectionError",
    ),
}  # fmt: skip


@pytest.mark.skipif(not SCRIPT.exists(), reason="the queue-runtime script is not installed in this venv")
@pytest.mark.parametrize("provider", list(FAILING_SENDS))
def test_12_a_failed_send_is_one_line(tmp_path: Path, provider: str) -> None:
    # In a real process: pytest's own log handlers would hide lines Python's last-resort
    # handler prints (the library logs a failed send too; those lines came first, raw).
    variables, queue, line = FAILING_SENDS[provider]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "AWS_", "AZURE_"))}
    env.update(variables, AWS_EC2_METADATA_DISABLED="true")
    done = subprocess.run(
        [str(SCRIPT), "send", *queue, "-s", "s-1", "-b", "x"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(line)
    assert SAS_KEY not in done.stderr


# --------------------------------------------------------------------------------------------
# 13. a YAML alias bomb took seconds and hundreds of MB


def test_13_yaml_aliases_are_refused_at_once(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 10 ** 7 leaves behind a few hundred bytes: each level repeats the one before ten times.
    lines = ["worker:", "  prefetch:", '    - &a ["x","x","x","x","x","x","x","x","x","x"]']
    for level in range(1, 7):
        previous, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"    - &{name} [{','.join(['*' + previous] * 10)}]")
    Path("bomb.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    code, _out, err = cli(capsys, "config", "show", "--config", "bomb.yaml")
    assert time.monotonic() - started < 1.0
    assert code == 2
    assert len(err.splitlines()) == 1 and "alias" in err


# --------------------------------------------------------------------------------------------
# 14. the worker ran on a standard SQS queue while config validate called it a problem


def test_14_worker_and_validate_agree_on_a_standard_sqs_queue(
    sqs_env: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    _create_queue(sqs_env, "plain-orders")
    code, out, err = cli(capsys, "config", "validate", "-q", "plain-orders")
    assert code == 0, err
    assert "configuration is valid" in out
    assert "standard SQS queue" in err and "in no order" in err
    from queue_runtime.entrypoint import serve_worker

    class Echo(SessionActor[bytes]):
        async def handle(self, body: bytes, ctx: MessageContext) -> None:
            pass

    settings = load_settings(queue="plain-orders", receive_timeout=1)
    with caplog.at_level("WARNING", logger="queue_runtime"):
        trio.run(
            lambda: serve_worker(Echo, settings, install_signal_handlers=False, on_started=lambda s: s.stop())
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("standard SQS queue" in text and "in no order" in text for text in warnings), warnings


# --------------------------------------------------------------------------------------------
# minor ones


def test_minor_demo_sizes_are_bounded(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = cli(capsys, "demo", "--sessions", "100000000")
    assert code == 2 and "--sessions" in err
    code, _out, err = cli(capsys, "demo", "--sessions", "1000", "--events", "10000")
    assert code == 2 and "messages" in err


def test_minor_grammar_an_int(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("values.py").write_text("VALUE = 3\nTHING = object()\n")
    code, _out, err = cli(capsys, "worker", "values:VALUE", "-q", "orders")
    assert code == 2 and "values:VALUE is an int, not a SessionActor subclass" in err
    code, _out, err = cli(capsys, "worker", "values:THING", "-q", "orders")
    assert code == 2 and "values:THING is an object, not a SessionActor subclass" in err


def test_minor_duplicate_yaml_keys_are_refused(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("dup.yaml").write_text("queue: a\nworker:\n  prefetch: 1\n  prefetch: 2\n")
    code, _out, err = cli(capsys, "config", "show", "--config", "dup.yaml")
    assert code == 2
    assert len(err.splitlines()) == 1 and "duplicate key" in err and "line 4" in err


def test_minor_system_exit_on_import_is_a_usage_error(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("exits.py").write_text("raise SystemExit('no thanks')\n")
    code, _out, err = cli(capsys, "worker", "exits:Actor", "-q", "orders")
    assert code == 2
    assert err.splitlines() == ["queue-runtime: error: cannot import module 'exits': SystemExit: no thanks"]
