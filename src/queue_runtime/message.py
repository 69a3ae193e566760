"""The message model and the validation of names and identifiers.

`Message` is what producers send; `ReceivedMessage` is what a receiver hands out: the original
`Message` plus broker metadata (receipt, delivery count, enqueue time, lock deadline and, for
dead-lettered messages, the reason and description).

Validation happens at construction (and when decoding), so a bad session id or property fails
before any I/O with one `ValidationError` line naming the field and the rule it broke.
Provider-specific rules (SQS group id characters, queue name rules) are in the `validate_*`
functions, which providers call with their ``system`` name.
"""

from __future__ import annotations

import itertools
import os
import random
import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from .errors import ValidationError

__all__ = [
    "SYSTEMS",
    "Message",
    "MessageId",
    "QueueName",
    "ReceivedMessage",
    "SessionId",
    "System",
    "message_size",
    "validate_message_id",
    "validate_queue_name",
    "validate_session_id",
]

System = Literal["memory", "sqlite", "aws_sqs", "azure_service_bus"]
"""The ``messaging.system`` value of a provider."""

SYSTEMS: Final = ("memory", "sqlite", "aws_sqs", "azure_service_bus")

#: Session ids: 1-128 printable ASCII characters (Service Bus and our own rule).
SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")]
#: Message ids: 1-128 printable ASCII characters without spaces (an SQS deduplication id).
MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
#: Queue names, in the widest form every provider accepts; `validate_queue_name` applies the
#: provider's own rule.
QueueName = Annotated[str, msgspec.Meta(min_length=1, max_length=260)]

_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_PRINTABLE_NO_SPACE = re.compile(r"[\x21-\x7e]+")
# SQS: "alphanumeric characters and punctuation" for MessageGroupId/MessageDeduplicationId.
_SQS_ID = _PRINTABLE_NO_SPACE
_SQS_QUEUE = re.compile(r"[A-Za-z0-9_-]{1,80}")
_SQS_FIFO_QUEUE = re.compile(r"[A-Za-z0-9_-]{1,75}\.fifo")
# Service Bus: letters, digits, '.', '-', '_', '/'; start and end with a letter or digit.
_ASB_QUEUE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,258}[A-Za-z0-9])?")
# In-memory: the union that is safe on both clouds (so tests written against memory port).
_MEMORY_QUEUE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,258}[A-Za-z0-9])?")


def _shown(value: str, limit: int = 40) -> str:
    """A value for an error line: truncated, and with non-printables escaped."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


def validate_queue_name(name: object, system: str = "memory") -> str:
    """Return ``name`` if it is a valid queue name for ``system``, else raise `ValidationError`.

    Rules: SQS 1-80 of ``[A-Za-z0-9_-]`` with ``.fifo`` allowed only as the suffix, or a queue
    URL (``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME``, any http(s) endpoint such as a local
    server's) whose last segment is such a name; Service Bus 1-260 of letters, digits,
    ``. - _ /`` starting and ending with a letter or digit; in-memory and SQLite 1-260 of
    letters, digits, ``. - _`` with the same start/end rule.
    """
    if not isinstance(name, str):
        raise ValidationError(f"queue name must be a string, got {type(name).__name__}")
    if not name:
        raise ValidationError("queue name is empty")
    if system == "aws_sqs" and "://" in name:
        _validate_sqs_url(name)
        return name
    if system == "aws_sqs":
        if len(name) > 80:
            raise ValidationError(f"queue name {_shown(name)} is {len(name)} characters; SQS allows 80")
        if not (_SQS_QUEUE.fullmatch(name) or _SQS_FIFO_QUEUE.fullmatch(name)):
            raise ValidationError(
                f"queue name {_shown(name)} is invalid for SQS: use letters, digits, '-' and '_'"
                " (and '.fifo' only as the suffix)"
            )
        return name
    if len(name) > 260:
        raise ValidationError(f"queue name {_shown(name)} is {len(name)} characters; the limit is 260")
    pattern = _ASB_QUEUE if system == "azure_service_bus" else _MEMORY_QUEUE
    if not pattern.fullmatch(name):
        allowed = "letters, digits, '.', '-', '_'" + (", '/'" if system == "azure_service_bus" else "")
        raise ValidationError(
            f"queue name {_shown(name)} is invalid: use {allowed}, starting and ending with a letter or digit"
        )
    return name


_SQS_URL = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+(?:/[A-Za-z0-9_-]+)?/([A-Za-z0-9_.-]+)/?")


def _validate_sqs_url(url: str) -> None:
    """An SQS queue URL: ``http(s)://HOST[:PORT]/ACCOUNT/NAME`` (NAME by the SQS name rule)."""
    match = _SQS_URL.fullmatch(url) if len(url) <= 2048 else None
    if match is None:
        raise ValidationError(
            f"queue URL {_shown(url)} is invalid: use https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
        )
    validate_queue_name(match.group(1), "aws_sqs")


def validate_session_id(session_id: object, system: str = "memory") -> str:
    """Return ``session_id`` if valid: 1-128 printable ASCII characters (SQS: no spaces)."""
    if not isinstance(session_id, str):
        raise ValidationError(f"session id must be a string, got {type(session_id).__name__}")
    if not session_id:
        raise ValidationError("session id is empty")
    if len(session_id) > 128:
        raise ValidationError(
            f"session id {_shown(session_id)} is {len(session_id)} characters; the limit is 128"
        )
    pattern = _SQS_ID if system == "aws_sqs" else _PRINTABLE
    if not pattern.fullmatch(session_id):
        rule = "letters, digits and punctuation (no spaces)" if system == "aws_sqs" else "printable ASCII"
        raise ValidationError(f"session id {_shown(session_id)} is invalid: use {rule}")
    return session_id


def validate_message_id(message_id: object) -> str:
    """Return ``message_id`` if valid: 1-128 printable ASCII characters without spaces."""
    if not isinstance(message_id, str):
        raise ValidationError(f"message id must be a string, got {type(message_id).__name__}")
    if not message_id or len(message_id) > 128 or not _PRINTABLE_NO_SPACE.fullmatch(message_id):
        raise ValidationError(
            f"message id {_shown(message_id)} is invalid: use 1-128 printable ASCII characters without spaces"
        )
    return message_id


# Message ids are in the format of random (version 4) UUIDs: a random 74-bit prefix per
# process, then a 48-bit counter from a random start. An id needs uniqueness, not secrecy:
# within a process the counter makes ids distinct, across processes the prefix does. Building
# one is a single format call; `uuid.uuid4` made a system call per id and random 128-bit ids
# cost a third of building a `Message`. The prefix comes from os.urandom (a user's
# `random.seed()` cannot make two processes repeat ids, which SQS would drop as duplicates)
# and is drawn again in every forked child for the same reason.
_ID_COUNTER_MASK = (1 << 48) - 1
_id_prefix = ""
_id_counter: Any = None


def _seed_ids() -> None:
    global _id_prefix, _id_counter
    draw = random.SystemRandom()
    bits = draw.getrandbits(74)
    # 8-4-4-4 hex digits: version nibble 4 and RFC 4122 variant bits set, the rest random.
    a, b = bits >> 42, (bits >> 26) & 0xFFFF
    c, d = (bits >> 14) & 0xFFF, bits & 0x3FFF
    _id_prefix = f"{a:08x}-{b:04x}-4{c:03x}-{0x8000 | d:04x}-"
    _id_counter = itertools.count(draw.getrandbits(48))


_seed_ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_seed_ids)


_generated: list[str] = [""]  # the id made last: `Message.__post_init__` need not check it


def _new_message_id() -> str:
    _generated[0] = text = f"{_id_prefix}{next(_id_counter) & _ID_COUNTER_MASK:012x}"
    return text


# Session ids that passed `validate_session_id`'s default rule lately: producers send many
# messages per session, and the regular expression was a sixth of building a `Message`.
# Bounded: cleared when full. The bound is above the sessions a busy worker keeps active
# (a smaller one was cleared over and over at 10,000 sessions sent round robin, and every
# message paid the expression again); the ids are mostly the messages' own strings.
_valid_session_ids: set[str] = set()
_VALID_SESSION_IDS_MAX = 65536


class Message(msgspec.Struct, omit_defaults=True, gc=False):
    """A message to send.

    ``body`` is opaque bytes (a ``str`` is encoded as UTF-8). ``session_id`` routes it to a
    session (Service Bus session, SQS ``MessageGroupId``); it is required on session queues.
    ``time_to_live`` is in seconds; ``scheduled_enqueue_time`` is an aware UTC datetime at which
    the message becomes visible. ``properties`` are application properties (string to string).
    """

    body: bytes
    session_id: str | None = None
    message_id: str = msgspec.field(default_factory=_new_message_id)
    correlation_id: str | None = None
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    content_type: str | None = None
    time_to_live: float | None = None
    scheduled_enqueue_time: datetime | None = None

    def __post_init__(self) -> None:
        # Every message a producer sends passes here: the common case (bytes body, generated
        # id, no properties) takes the fewest steps.
        body: object = self.body
        if type(body) is not bytes:
            if isinstance(body, str):
                self.body = body.encode("utf-8")
            elif isinstance(body, (bytes, bytearray, memoryview)):
                self.body = bytes(body)
            else:
                raise ValidationError(f"message body must be bytes or str, got {type(body).__name__}")
        session_id = self.session_id
        if session_id is not None and session_id not in _valid_session_ids:
            validate_session_id(session_id)
            if len(_valid_session_ids) >= _VALID_SESSION_IDS_MAX:
                _valid_session_ids.clear()
            _valid_session_ids.add(session_id)
        if self.message_id is not _generated[0]:  # one we generated is valid by construction
            validate_message_id(self.message_id)
        if self.correlation_id is not None and (
            not isinstance(self.correlation_id, str) or len(self.correlation_id) > 128
        ):
            raise ValidationError("correlation id must be a string of at most 128 characters")
        if self.properties:
            for key, value in self.properties.items():
                if not isinstance(key, str) or not key:
                    raise ValidationError(f"property names must be non-empty strings, got {key!r}")
                if not isinstance(value, str):
                    raise ValidationError(f"property {key!r} must be a string, got {type(value).__name__}")
        if self.time_to_live is not None and not self.time_to_live > 0:
            raise ValidationError(f"time_to_live must be > 0 seconds, got {self.time_to_live!r}")
        if self.scheduled_enqueue_time is not None and self.scheduled_enqueue_time.tzinfo is None:
            raise ValidationError("scheduled_enqueue_time must be timezone-aware (UTC)")

    @classmethod
    def json(cls, value: Any, **fields: Any) -> Message:
        """A message whose body is ``value`` encoded as JSON (msgspec), content type JSON."""
        fields.setdefault("content_type", "application/json")
        return cls(body=msgspec.json.encode(value), **fields)

    def __repr__(self) -> str:
        # Bodies may hold personal data: never show them, only their size.
        return (
            f"Message(message_id={self.message_id!r}, session_id={self.session_id!r},"
            f" body=<{len(self.body)} bytes>)"
        )

    __str__ = __repr__


def message_size(message: Message) -> int:
    """The size a broker counts: body, property names and values, and system fields (UTF-8)."""
    size = len(message.body)
    for key, value in message.properties.items():
        size += len(key.encode()) + len(value.encode())
    for extra in (message.session_id, message.correlation_id, message.content_type):
        if extra:
            size += len(extra.encode())
    return size + len(message.message_id)


class ReceivedMessage(msgspec.Struct, kw_only=True, gc=False):
    """A delivered message: the original `Message` plus what the broker knows of it.

    ``receipt`` is the opaque token settlement needs (lock token, receipt handle); it is empty
    for peeked messages, which cannot be settled. ``delivery_count`` is 1 on first delivery.
    ``locked_until`` is the lock deadline on trio's clock (``trio.current_time()``), or None.
    """

    message: Message
    receipt: str = ""
    delivery_count: int = 1
    enqueued_at: datetime | None = None
    sequence_number: int | None = None
    locked_until: float | None = None
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    dead_letter_source: str | None = None

    @property
    def message_id(self) -> str:
        return self.message.message_id

    @property
    def session_id(self) -> str | None:
        return self.message.session_id

    def __repr__(self) -> str:
        return (
            f"ReceivedMessage(message_id={self.message.message_id!r},"
            f" session_id={self.message.session_id!r}, delivery_count={self.delivery_count},"
            f" body=<{len(self.message.body)} bytes>)"
        )

    __str__ = __repr__
