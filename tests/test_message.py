"""Validation rules of `queue_runtime.message`: Message fields, ids, queue names per system."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_runtime.errors import ValidationError
from queue_runtime.message import (
    SYSTEMS,
    Message,
    ReceivedMessage,
    message_size,
    validate_message_id,
    validate_queue_name,
    validate_session_id,
)

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


# -- Message ----------------------------------------------------------------------------------------
def test_defaults_and_body_coercion() -> None:
    m = Message(body="h\u00e9llo")
    assert m.body == "h\u00e9llo".encode()
    assert uuid.UUID(m.message_id).version == 4
    assert Message(body=bytearray(b"ab")).body == b"ab"
    assert Message(body=memoryview(b"cd")).body == b"cd"
    assert m.properties == {} and m.session_id is None
    assert Message(body=b"").message_id != Message(body=b"").message_id


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"body": 123}, "body must be bytes or str"),
        ({"body": b"x", "session_id": ""}, "session id is empty"),
        ({"body": b"x", "session_id": "a" * 129}, "limit is 128"),
        ({"body": b"x", "session_id": "new\nline"}, "printable ASCII"),
        ({"body": b"x", "message_id": "has space"}, "message id"),
        ({"body": b"x", "message_id": ""}, "message id"),
        ({"body": b"x", "correlation_id": "c" * 129}, "correlation id"),
        ({"body": b"x", "properties": {"": "v"}}, "property names"),
        ({"body": b"x", "properties": {"k": 1}}, "property 'k' must be a string"),
        ({"body": b"x", "time_to_live": 0}, "time_to_live"),
        ({"body": b"x", "time_to_live": -5}, "time_to_live"),
        ({"body": b"x", "scheduled_enqueue_time": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_invalid_fields_raise_one_clear_validation_error(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match) as caught:
        Message(**fields)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_valid_optional_fields() -> None:
    when = datetime.now(UTC) + timedelta(minutes=5)
    m = Message(
        body=b"x",
        session_id="order-1",
        correlation_id="c",
        properties={"k": "v"},
        content_type="text/plain",
        time_to_live=1.5,
        scheduled_enqueue_time=when,
    )
    assert m.scheduled_enqueue_time == when


def test_json_helper() -> None:
    m = Message.json({"a": 1}, session_id="s")
    assert m.content_type == "application/json"
    assert msgspec.json.decode(m.body) == {"a": 1}
    assert Message.json([1], content_type="application/x").content_type == "application/x"


def test_repr_never_shows_the_body() -> None:
    secret = b"card=4111111111111111"
    m = Message(body=secret, session_id="s")
    received = ReceivedMessage(message=m, receipt="r", delivery_count=2)
    for text in (repr(m), str(m), repr(received), str(received)):
        assert "4111" not in text
        assert f"<{len(secret)} bytes>" in text
    assert received.message_id == m.message_id and received.session_id == "s"


def test_message_size_counts_body_properties_and_system_fields() -> None:
    m = Message(body=b"12345", message_id="id", properties={"ab": "cde"}, session_id="s", correlation_id="cc")
    assert message_size(m) == 5 + 2 + 3 + 1 + 2 + 2
    assert message_size(Message(body="\u00e9", message_id="i")) == 2 + 1  # UTF-8 bytes


@given(st.binary(max_size=2048))
def test_bodies_survive_msgpack_round_trip(body: bytes) -> None:
    m = Message(body=body, session_id="s")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(m), type=Message).body == body


# -- session ids --------------------------------------------------------------------------------------
@given(st.text(alphabet=PRINTABLE, min_size=1, max_size=128))
def test_printable_session_ids_are_valid(session_id: str) -> None:
    assert validate_session_id(session_id, "memory") == session_id
    assert validate_session_id(session_id, "azure_service_bus") == session_id
    if " " in session_id:
        with pytest.raises(ValidationError, match="no spaces"):
            validate_session_id(session_id, "aws_sqs")
    else:
        assert validate_session_id(session_id, "aws_sqs") == session_id


@given(st.text(min_size=1, max_size=200))
def test_session_id_rule_matches_its_definition(session_id: str) -> None:
    valid = len(session_id) <= 128 and all(0x20 <= ord(c) <= 0x7E for c in session_id)
    for system in SYSTEMS:
        rule_ok = valid and (system != "aws_sqs" or " " not in session_id)
        if rule_ok:
            assert validate_session_id(session_id, system) == session_id
        else:
            with pytest.raises(ValidationError):
                validate_session_id(session_id, system)


def test_session_id_type_and_error_truncation() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        validate_session_id(5)
    with pytest.raises(ValidationError) as caught:
        validate_session_id("x" * 500)
    assert len(str(caught.value)) < 200  # the value is shown truncated


@given(st.text(min_size=0, max_size=140))
def test_message_id_rule(message_id: str) -> None:
    valid = 1 <= len(message_id) <= 128 and all(0x21 <= ord(c) <= 0x7E for c in message_id)
    if valid:
        assert validate_message_id(message_id) == message_id
    else:
        with pytest.raises(ValidationError):
            validate_message_id(message_id)


# -- queue names --------------------------------------------------------------------------------------
_SQS = re.compile(r"[A-Za-z0-9_-]{1,80}|[A-Za-z0-9_-]{1,75}\.fifo")
_ASB = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?")
_MEM = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
names = st.text(alphabet="abcXYZ019._-/ !\u00e9", min_size=0, max_size=90) | st.text(
    alphabet="ab1.-", min_size=255, max_size=265
)


@settings(max_examples=300)
@given(names)
def test_queue_name_rules_per_system(name: str) -> None:
    expected = {
        "aws_sqs": bool(_SQS.fullmatch(name)),
        "azure_service_bus": len(name) <= 260 and bool(_ASB.fullmatch(name)),
        "memory": len(name) <= 260 and bool(_MEM.fullmatch(name)),
    }
    for system, ok in expected.items():
        if ok:
            assert validate_queue_name(name, system) == name
        else:
            with pytest.raises(ValidationError):
                validate_queue_name(name, system)


@pytest.mark.parametrize(
    ("name", "system", "valid"),
    [
        ("orders", "aws_sqs", True),
        ("orders.fifo", "aws_sqs", True),
        ("or.ders", "aws_sqs", False),
        ("a" * 80, "aws_sqs", True),
        ("a" * 81, "aws_sqs", False),
        ("a" * 75 + ".fifo", "aws_sqs", True),
        ("a" * 76 + ".fifo", "aws_sqs", False),
        ("team/orders", "azure_service_bus", True),
        ("team/orders", "memory", False),
        ("-orders", "azure_service_bus", False),
        ("orders-", "memory", False),
        ("a" * 260, "memory", True),
        ("a" * 261, "memory", False),
        ("", "memory", False),
    ],
)
def test_queue_name_examples(name: str, system: str, valid: bool) -> None:
    if valid:
        assert validate_queue_name(name, system) == name
    else:
        with pytest.raises(ValidationError, match="queue name"):
            validate_queue_name(name, system)


def test_queue_name_must_be_a_string() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        validate_queue_name(None)


def test_default_message_ids_are_distinct_uuid4_whatever_the_user_seeds() -> None:
    import random
    import uuid

    random.seed(7)
    first = [Message(b"x").message_id for _ in range(1000)]
    random.seed(7)
    second = [Message(b"x").message_id for _ in range(1000)]
    assert len(set(first + second)) == 2000
    for text in first[:50]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)


def test_a_forked_child_does_not_repeat_the_parents_message_ids() -> None:
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, Message(b"x").message_id.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child and child != Message(b"x").message_id


def test_session_ids_are_checked_once_each_even_across_many_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer sending round robin over 10,000 sessions pays the session id check once per
    session, not once per message (the cache of checked ids holds that many)."""
    import queue_runtime.message as message_module

    checked: list[str] = []
    real = message_module.validate_session_id

    def counting(session_id: object, system: str = "memory") -> str:
        checked.append(str(session_id))
        return real(session_id, system)

    monkeypatch.setattr(message_module, "validate_session_id", counting)
    monkeypatch.setattr(message_module, "_valid_session_ids", set())
    for _ in range(3):
        for i in range(10_000):
            Message(b"x", session_id=f"session-{i}")
    assert len(checked) == 10_000
    with pytest.raises(ValidationError, match="session id"):
        Message(b"x", session_id="bad id\n")
