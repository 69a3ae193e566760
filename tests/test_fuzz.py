"""Fuzzing the boundaries where hostile input enters (issue 16): the config loader (YAML, TOML,
environment), the command line (its parser, and whole commands against the in-memory broker),
the message body codec, and the decoding of SQS and Service Bus messages.

Each property asserts one clear error type and no other exception, and bounded time and
memory per input (`bounded`). A few hundred examples each, within the normal test run.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import msgspec
import pytest
import trio.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queue_runtime.cli import main
from queue_runtime.cli.common import ParserError, build_parser
from queue_runtime.cli.operator import use_provider
from queue_runtime.codec import DecodeError, make_decoder
from queue_runtime.config import ENVIRONMENT, Settings, load_settings
from queue_runtime.errors import ConfigurationError
from queue_runtime.message import ReceivedMessage
from queue_runtime.providers import _sqs_codec
from queue_runtime.providers.memory import InMemoryProvider

T = TypeVar("T")

#: Per input: at most this long (generous: the machine is shared) and this much new memory.
MAX_SECONDS = 2.0
MAX_BYTES = 32 * 1024 * 1024

FUZZ = settings(
    max_examples=300,
    deadline=None,  # `bounded` checks the time itself, with room for a busy machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


def bounded(fn: Callable[[], T]) -> T:
    """``fn()``, asserting it took at most `MAX_SECONDS` and peaked at `MAX_BYTES` of new memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        return fn()
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < MAX_SECONDS, f"took {elapsed:.2f} s"
        assert peak < MAX_BYTES, f"peaked at {peak / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


# --------------------------------------------------------------------------------------------
# the config loader

SECTIONS = ["worker", "worker.retry", "aws", "azure", "memory", "telemetry", "secrets"]
LEAVES = sorted(
    {"provider", "queue", "dlq_name", "receive_timeout", "visibility_timeout", "log_level", "log_format"}
    | {
        f"worker.{k}"
        for k in ("max_concurrent_sessions", "prefetch", "session_idle_timeout", "shutdown_grace")
    }
    | {"worker.retry.max_attempts", "worker.retry.jitter", "aws.region", "aws.endpoint_url"}
    | {"aws.secret_access_key", "azure.connection_string", "azure.fully_qualified_namespace"}
    | {"memory.lock_duration", "telemetry.metrics_port", "telemetry.metrics_host", "secrets.refresh_interval"}
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=abcdefghij=",
            "keyvault://myvault/name",
            "keyvault://x",
            "secretsmanager://prod/db#key",
            "[/x]",
            "aws",
            "memory",
            "orders.fifo",
            "http://127.0.0.1:9/123456789012/orders.fifo",
            "9" * 5000,
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Nested mappings shaped (mostly) like a config file, with hostile values."""
    document: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(LEAVES) | st.text(max_size=12), max_size=8)):
        value = draw(values)
        target = document
        *sections, leaf = key.split(".")
        for section in sections:
            child = target.setdefault(section, {})
            if not isinstance(child, dict):
                break
            target = child
        else:
            target[leaf] = value
    if draw(st.booleans()):
        document[draw(st.sampled_from(SECTIONS)).split(".")[0]] = draw(values)
    return document


YAML_SNIPPETS = [
    "a: &a [x, x, x]\nb: *a\n",
    "worker: {<<: *missing}\n",
    "!!python/object/apply:os.system ['true']\n",
    "--- 1\n--- 2\n",
    "queue: a\nqueue: b\n",
    "[" * 3000,
    "{" * 3000,
    "- " * 3000,
    "queue: !!binary aGVsbG8=\n",
    "\ufeffqueue: orders\n",
    "worker:\n  prefetch: 1\n  prefetch: 2\n",
    "%YAML 1.1\n%TAG ! tag:x,2000:\n---\n!x {a: 1}\n",
    "? [complex, key]\n: value\n",
]


def load_file(directory: Path, name: str, data: bytes) -> Settings | None:
    path = directory / name
    path.write_bytes(data)
    try:
        return bounded(lambda: load_settings(path, env={}))
    except ConfigurationError as error:
        assert "\n" not in error.message and len(error.message) < 2000
        return None


@FUZZ
@given(
    st.one_of(
        config_documents().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
        st.lists(st.sampled_from(YAML_SNIPPETS) | st.text(max_size=60), max_size=5).map(
            lambda parts: "".join(parts).encode("utf-8", "surrogatepass")
        ),
        st.binary(max_size=300),
    )
)
def test_yaml_config_files(scratch: Path, data: bytes) -> None:
    load_file(scratch, "config.yaml", data)


def toml_value(value: Any) -> str:
    """A TOML rendering of ``value`` (close enough: some renderings are not valid TOML)."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value).replace("inf", "inf").replace("nan", "nan")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(document: dict[str, Any]) -> str:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in document.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    for name, table in tables:
        lines.append(f"[{json.dumps(name)}]")
        lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


TOML_SNIPPETS = [
    "a = [" * 2000,
    'queue = "a"\nqueue = "b"\n',
    "[worker]\n[worker]\n",
    "x = 1979-05-27T07:32:00Z\n",
    "provider = '''aws'''\n",
    'q = "\\ud800"\n',
    "[[worker]]\n",
]


@FUZZ
@given(
    st.one_of(
        config_documents().map(lambda d: toml_document(d).encode("utf-8", "surrogatepass")),
        st.lists(st.sampled_from(TOML_SNIPPETS) | st.text(max_size=60), max_size=5).map(
            lambda parts: "".join(parts).encode("utf-8", "surrogatepass")
        ),
        st.binary(max_size=300),
    )
)
def test_toml_config_files(scratch: Path, data: bytes) -> None:
    load_file(scratch, "config.toml", data)


ENV_NAMES = sorted({name for names in ENVIRONMENT.values() for name in names})


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(ENV_NAMES),
        st.one_of(st.text(max_size=50), scalars.map(str), st.sampled_from(["1e309", "-0", " 5 ", "0x10"])),
        max_size=8,
    )
)
def test_environment(env: dict[str, str]) -> None:
    try:
        bounded(lambda: load_settings(env=env))
    except ConfigurationError as error:
        assert "\n" not in error.message


# --------------------------------------------------------------------------------------------
# the command line

COMMANDS = [
    ["send"],
    ["dlq", "peek"],
    ["dlq", "export"],
    ["dlq", "replay"],
    ["dlq", "purge"],
    ["stats"],
    ["config", "show"],
    ["config", "validate"],
]
FLAGS = [
    "--queue", "-q", "--max", "--count", "-n", "--timeout", "--json", "--session-id", "-s", "--property",
    "-p", "--body", "-b", "--correlation-id", "--content-type", "--dry-run", "--yes", "--provider",
    "--debug", "--out", "--file", "--config",
]  # fmt: skip
NUMBERS = ["0", "-1", "1", "3", "1e3", "nan", "inf", "1" + "0" * 40, "0x10", " 7", "", "2.5"]
SAFE_PATHS = ["out.jsonl", "sub/out.jsonl", ".", "missing/dir/x.jsonl", "body.bin", "cfg.toml", "cfg.yaml"]
arguments = st.one_of(
    st.sampled_from(FLAGS),
    st.sampled_from(NUMBERS),
    st.sampled_from(["orders", "o-1", "memory", "aws", "kafka", "KEY=VALUE", "=v", "k=", "[/x]", ":smile:"]),
    st.text(max_size=20).map(
        lambda t: t.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    ),
    st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


WORDS = sorted({word for command in COMMANDS for word in command})


def _no_help(argv: list[str]) -> bool:
    # argparse prints help and exits 0 for -h / --help and their abbreviations.
    return not any(arg.startswith(("-h", "--h")) for arg in argv)


def _safe_paths(argv: list[str]) -> list[str]:
    """Paths the commands would write or read are from a safe list (never random text: the
    tests may run as root)."""
    out = list(argv)
    for index, arg in enumerate(out[:-1]):
        if arg in ("--out", "-o", "--file", "-f", "--config"):
            out[index + 1] = SAFE_PATHS[len(out[index + 1]) % len(SAFE_PATHS)]
    if out and out[-1] in ("--out", "-o", "--file", "-f", "--config"):
        out.append("out.jsonl")
    return out


argv_lists = st.tuples(st.sampled_from(COMMANDS), st.lists(arguments, max_size=8)).map(
    lambda pair: _safe_paths([*pair[0], *pair[1]])
)


@FUZZ
@given(st.lists(st.sampled_from(["worker", "demo", "bench", *WORDS]) | arguments, max_size=10))
def test_the_argument_parser(argv: list[str]) -> None:
    if not _no_help(argv):
        return
    parser = build_parser()
    try:
        bounded(lambda: parser.parse_args(argv))
    except ParserError as error:
        assert "\n" not in str(error)


@pytest.fixture
def cli_env(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    scratch = scratch / "cli"  # not where the config fuzzing leaves its config files
    scratch.mkdir(exist_ok=True)
    monkeypatch.chdir(scratch)
    for name in list(os.environ):
        if name.startswith(("QUEUE_", "AWS_", "AZURE_", "SERVICE_BUS")):
            monkeypatch.delenv(name)
    (scratch / "sub").mkdir(exist_ok=True)
    (scratch / "body.bin").write_bytes(b"\xff\x00body")
    (scratch / "cfg.toml").write_text('queue = "orders"\n')
    (scratch / "cfg.yaml").write_text("queue: [/x]\n")
    # `send` without --body reads stdin: a pipe holding a few bytes.
    monkeypatch.setattr(
        "sys.stdin", SimpleNamespace(isatty=lambda: False, buffer=io.BytesIO(b"piped body"), read=lambda: "")
    )
    return scratch


@settings(FUZZ, max_examples=150)
@given(argv_lists)
def test_whole_commands_on_the_memory_broker(
    cli_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    if not _no_help(argv):
        return
    provider = InMemoryProvider()
    with use_provider(provider, clock=trio.testing.MockClock(autojump_threshold=0)):
        code = bounded(lambda: main(argv))
    _, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "unexpected" not in err, (argv, err)
    assert "Traceback" not in err or "--debug" in argv, (argv, err)
    if code:
        assert err.count("queue-runtime: error:") + err.count("queue-runtime: problem:") >= 1, (argv, err)


# --------------------------------------------------------------------------------------------
# the message body codec


class Order(msgspec.Struct):
    order_id: str
    amount: int = 0
    items: list[str] = []


BODY_TYPES: list[Any] = [Order, bytes, str, dict[str, int], list[Order], int]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/msgpack",
    "application/x-msgpack; charset=x",
    "text/plain",
    "",
]

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_like.map(lambda v: json.dumps(v).encode()),
    json_like.map(lambda v: msgspec.msgpack.encode(v)),
    st.builds(
        lambda n, open_, close: open_ * n + close * n,
        st.integers(0, 100_000),
        st.sampled_from([b"[", b'{"a":', b"\x91"]),
        st.sampled_from([b"]", b"}", b""]),
    ),
    st.just(b'{"order_id": "o-1", "amount": 1' + b"0" * 5000 + b"}"),
)


@FUZZ
@given(st.sampled_from(BODY_TYPES), bodies, st.sampled_from(CONTENT_TYPES) | st.text(max_size=20))
def test_the_body_codec(body_type: Any, body: bytes, content_type: str | None) -> None:
    decode = make_decoder(body_type)
    try:
        bounded(lambda: decode(body, content_type))
    except DecodeError as error:
        assert "\n" not in str(error) and len(str(error)) < 1000


# --------------------------------------------------------------------------------------------
# SQS messages as the broker hands them over

texts = st.text(max_size=30) | st.sampled_from(["", " ", "a b", "\x00", "\ud800", "x" * 300, "1" * 30])
meta_documents = st.fixed_dictionaries(
    {},
    optional={
        "id": texts | st.integers(),
        "sid": texts | st.none(),
        "cid": texts | st.none() | st.integers(),
        "ct": texts | st.none(),
        "exp": st.floats() | st.none() | texts,
        "enc": st.sampled_from(["b64", "empty", None, "zzz"]) | texts,
        "empty": st.lists(texts, max_size=3) | st.none() | texts,
    },
).map(json.dumps)
sqs_attributes = st.dictionaries(
    texts | st.sampled_from(["qr.meta", "qr.dl.reason", "qr.dl.description", "qr.dl.source"]),
    st.fixed_dictionaries(
        {"DataType": st.sampled_from(["String", "Number", "Binary", "String.custom"]) | texts},
        optional={"StringValue": texts | meta_documents, "BinaryValue": st.binary(max_size=20)},
    ),
    max_size=6,
)
sqs_messages = st.fixed_dictionaries(
    {},
    optional={
        "MessageId": texts,
        "ReceiptHandle": texts,
        "Body": texts | st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),
        "Attributes": st.dictionaries(
            st.sampled_from(["MessageGroupId", "ApproximateReceiveCount", "SentTimestamp", "SequenceNumber"]),
            texts
            | st.sampled_from(["1", "0", "-5", "9" * 40, "1e3", "1700000000000", "99999999999999999999"]),
        ),
        "MessageAttributes": sqs_attributes,
    },
)


@FUZZ
@given(sqs_messages, st.none() | st.floats(allow_nan=False))
def test_sqs_message_decoding(raw: dict[str, Any], locked_until: float | None) -> None:
    received, expiry = bounded(lambda: _sqs_codec.decode(raw, locked_until=locked_until))
    assert isinstance(received, ReceivedMessage)
    assert expiry is None or isinstance(expiry, float)


# --------------------------------------------------------------------------------------------
# Service Bus messages as the SDK hands them over (AMQP strings are strict UTF-8: no lone
# surrogates)

sb_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["", " ", "a b", "\x00", "x" * 300, "1" * 30]
)

amqp_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(),
    sb_texts,
    st.binary(max_size=20),
    st.uuids(),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
)
sb_messages = st.builds(
    SimpleNamespace,
    body=st.binary(max_size=50) | st.lists(st.binary(max_size=10), max_size=3) | sb_texts,
    application_properties=st.none()
    | st.dictionaries(sb_texts | st.binary(max_size=10), amqp_scalars, max_size=5),
    message_id=st.none()
    | sb_texts
    | st.binary(max_size=10)
    | st.integers(min_value=0, max_value=2**64)
    | st.uuids(),
    session_id=st.none() | sb_texts,
    correlation_id=st.none() | sb_texts | st.binary(max_size=10) | st.uuids(),
    content_type=st.none() | sb_texts,
    time_to_live=st.none()
    | st.timedeltas(min_value=dt.timedelta(seconds=-10), max_value=dt.timedelta(days=9)),
    scheduled_enqueue_time_utc=st.none() | st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    enqueued_time_utc=st.none() | st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    locked_until_utc=st.none() | st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    sequence_number=st.none() | st.integers(min_value=0, max_value=2**63),
    delivery_count=st.none() | st.integers(min_value=0, max_value=2**31),
    dead_letter_reason=st.none() | sb_texts,
    dead_letter_error_description=st.none() | sb_texts,
    dead_letter_source=st.none() | sb_texts,
    lock_token=st.uuids().map(str),
)


@FUZZ
@given(sb_messages, st.booleans())
async def test_service_bus_message_decoding(sdk: Any, with_receipt: bool) -> None:
    from queue_runtime.providers.servicebus import _to_received

    received = bounded(lambda: _to_received(sdk, receipt=str(uuid.uuid4()) if with_receipt else ""))
    assert isinstance(received, ReceivedMessage)
