"""``queue-runtime dlq summary``: dead letters grouped by reason, by error type and by session
prefix, with counts and first and last enqueue times: the operations guide's weekly
"categorize failure types" in one command.

The error type is read from the description the runtime writes (``"TypeName: text"``,
`queue_runtime.session.describe_exception`); the session prefix is a session id up to its
first separator (``order-42`` → ``order``), or without its trailing digits (``s001`` → ``s``).
Reasons and descriptions come from the broker: they are redacted and shown literally.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Final

from ..message import ReceivedMessage
from ..redaction import redact

__all__ = ["GROUPINGS", "error_type_of", "session_prefix", "summarize"]

_ERROR_TYPE: Final = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]{0,127})(?::|$)")
_SEPARATORS: Final = re.compile(r"[-_:/.#|@ ]")


def error_type_of(description: str | None) -> str | None:
    """``"ValueError"`` from ``"ValueError: bad amount"``; None when the description does not
    start with a type name."""
    if not description:
        return None
    match = _ERROR_TYPE.match(description.strip())
    return match.group(1) if match else None


def session_prefix(session_id: str | None) -> str | None:
    """A session id's family: up to its first separator (``-_:/.#|@`` or a space), else
    without its trailing digits; None for a message without a session."""
    if not session_id:
        return None
    head = _SEPARATORS.split(session_id, maxsplit=1)[0]
    if head and head != session_id:
        return head
    stripped = session_id.rstrip("0123456789")
    return stripped or session_id


def _reason(message: ReceivedMessage) -> str | None:
    return message.dead_letter_reason


def _error(message: ReceivedMessage) -> str | None:
    return error_type_of(message.dead_letter_description)


def _prefix(message: ReceivedMessage) -> str | None:
    return session_prefix(message.session_id)


#: Each grouping: (JSON key, column title, the group of one message).
GROUPINGS: Final[tuple[tuple[str, str, Callable[[ReceivedMessage], str | None]], ...]] = (
    ("by_reason", "reason", _reason),
    ("by_error_type", "error type", _error),
    ("by_session_prefix", "session prefix", _prefix),
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _group(
    messages: Iterable[ReceivedMessage], key: Callable[[ReceivedMessage], str | None]
) -> list[dict[str, Any]]:
    groups: dict[str | None, dict[str, Any]] = {}
    for message in messages:
        name = key(message)
        group = groups.get(name)
        if group is None:
            group = groups[name] = {"key": name, "count": 0, "first": None, "last": None, "reasons": {}}
        group["count"] += 1
        enqueued = message.enqueued_at
        if enqueued is not None:
            if group["first"] is None or enqueued < group["first"]:
                group["first"] = enqueued
            if group["last"] is None or enqueued > group["last"]:
                group["last"] = enqueued
        reason = message.dead_letter_reason or ""
        group["reasons"][reason] = group["reasons"].get(reason, 0) + 1
    rows = sorted(groups.values(), key=lambda g: (-g["count"], str(g["key"])))
    return [
        {
            "key": redact(row["key"]) if row["key"] else row["key"],
            "count": row["count"],
            "first_enqueued": _iso(row["first"]),
            "last_enqueued": _iso(row["last"]),
            "reasons": {
                redact(k) if k else k: v for k, v in sorted(row["reasons"].items(), key=lambda kv: -kv[1])
            },
        }
        for row in rows
    ]


def summarize(queue: str, messages: list[ReceivedMessage], *, limit: int) -> dict[str, Any]:
    """The summary document (``dlq summary --json``) of ``messages``, the first ``limit`` dead
    letters of ``queue`` (``"complete": false`` when the limit was reached: there may be more)."""
    document: dict[str, Any] = {
        "queue": queue,
        "examined": len(messages),
        "complete": len(messages) < limit,
    }
    for name, _, key in GROUPINGS:
        document[name] = _group(messages, key)
    return document
