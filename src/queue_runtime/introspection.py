"""What a running worker is doing: the ``/sessions`` document (schema 1).

The supervisor and its sessions keep a few plain attributes up to date as they work (set
where the loop already has the values: no clock read or allocation of their own per
message). `Supervisor.snapshot` copies them into the raw `WorkerSnapshot` and
`SessionSnapshot` below, on request only, and `sessions_document` turns those into the JSON
document the worker's HTTP endpoint serves at ``GET /sessions?limit=N`` and ``queue-runtime
top`` reads. ``docs/worker.md`` documents the schema; a change that removes or renames a field
raises `SCHEMA_VERSION`.

Nothing of a message's body is ever part of it, and every text that came from outside (session
ids, message ids, error type names) passes through `queue_runtime.redaction.redact`.

Sessions are listed most in need of attention first (`attention`): a lock close to its
deadline, then a message being retried, then a ``handle()`` running long; ``limit`` keeps the
document bounded however many sessions are active (`DEFAULT_LIMIT`, at most `MAX_LIMIT`).

This module is near the bottom of the package: it imports only `redaction`, so that `session`
and `supervisor` can build its snapshots.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec

from .redaction import redact

__all__ = [
    "DEFAULT_LIMIT",
    "LONG_RUNNING_SECONDS",
    "MAX_LIMIT",
    "SCHEMA_VERSION",
    "SessionSnapshot",
    "WorkerSnapshot",
    "attention",
    "lock_warning_seconds",
    "parse_limit",
    "render_sessions",
    "session_state",
    "sessions_document",
]

#: Version of the ``/sessions`` document: raised when a field is removed or changes meaning
#: (new fields may be added within a version).
SCHEMA_VERSION: Final = 1
#: Sessions listed when ``?limit=`` is not given, and the most that may be asked for.
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
#: A ``handle()`` running this many seconds or more needs attention ("running_long").
LONG_RUNNING_SECONDS: Final = 10.0
#: A lock with less than this fraction of its duration left needs attention ("lock_at_risk"):
#: the renewer renews at half the remaining time, so a healthy lock never drops far below 50%.
LOCK_WARNING_FRACTION: Final = 0.4


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """Raw facts about one active session, times on the runtime's (trio) clock."""

    session_id: str | None
    started_at: float | None
    received: int
    pending: int
    """Received messages waiting in the mailbox (not yet in ``handle()``)."""
    message_id: str | None
    """The message in hand (in ``handle()``, its retry backoff or its settlement), if any."""
    delivery_count: int | None
    attempt: int
    busy_since: float | None
    """When the running ``handle()`` call started; None when none runs."""
    retry_at: float | None
    """When the next attempt is due, while the message in hand waits in a retry backoff."""
    locked_until: float | None
    renewals: int
    failures: int
    last_error: str | None
    """The exception type name of the last failed ``handle()`` call."""


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """Raw facts about one supervisor (see `Supervisor.snapshot`)."""

    queue: str
    system: str
    now: float
    stats: Any
    """A `queue_runtime.supervisor.SupervisorStats`."""
    lock_duration: float | None
    lock_margin: float
    circuit_open_until: float | None
    circuit_times_opened: int
    max_concurrent_sessions: int
    sessions: list[SessionSnapshot]


def parse_limit(query: str) -> int:
    """The ``limit`` of a ``/sessions`` query string (`DEFAULT_LIMIT` when absent).

    Raises ``ValueError`` with one line naming the problem when it is not an integer from 1
    to `MAX_LIMIT` (or is given more than once)."""
    try:
        values = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=20).get("limit")
    except ValueError:
        raise ValueError("malformed query string") from None
    if not values:
        return DEFAULT_LIMIT
    if len(values) > 1:
        raise ValueError("limit is given more than once")
    text = values[0]
    shown = repr(text if len(text) <= 20 else text[:20] + "...")
    if not (text.isascii() and text.isdigit() and len(text) <= 7):
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {shown}")
    value = int(text)
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {shown}")
    return value


def lock_warning_seconds(lock_duration: float | None, lock_margin: float) -> float:
    """Seconds left on a lock below which it needs attention: `LOCK_WARNING_FRACTION` of the
    lock duration, and never less than twice the safety margin at which it counts as lost."""
    if lock_duration is None or not math.isfinite(lock_duration) or lock_duration <= 0:
        return 2 * lock_margin
    return max(LOCK_WARNING_FRACTION * lock_duration, 2 * lock_margin)


def session_state(session: SessionSnapshot) -> str:
    """``"handling"`` (in ``handle()``), ``"retrying"`` (waiting in a retry backoff),
    ``"settling"`` (a message in hand outside ``handle()``: decoding, completing,
    dead-lettering) or ``"idle"`` (waiting for messages)."""
    if session.busy_since is not None:
        return "handling"
    if session.message_id is not None:
        return "retrying" if session.retry_at is not None else "settling"
    return "idle"


def attention(
    session: SessionSnapshot, now: float, warn_lock_below: float
) -> tuple[list[str], tuple[int, float]]:
    """Why ``session`` needs attention (``"lock_at_risk"``, ``"retrying"``,
    ``"running_long"``; most urgent first) and a sort key, larger = more urgent."""
    reasons: list[str] = []
    key: tuple[int, float] = (0, 0.0)
    until = session.locked_until
    left = until - now if until is not None and math.isfinite(until) else None
    if left is not None and left < warn_lock_below:
        reasons.append("lock_at_risk")
        key = (3, -left)
    if session.message_id is not None and (session.retry_at is not None or session.attempt > 1):
        reasons.append("retrying")
        if key[0] < 2:
            key = (2, float(session.attempt))
    running = now - session.busy_since if session.busy_since is not None else None
    if running is not None and running >= LONG_RUNNING_SECONDS:
        reasons.append("running_long")
        if key[0] < 1:
            key = (1, running)
    if not reasons and running is not None:
        key = (0, running / 1e6)  # busy before idle, otherwise as found
    return reasons, key


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(max(value, 0.0), 3)


def _wall(now_wall: float, now: float, at: float | None) -> str | None:
    if at is None:
        return None
    stamp = datetime.fromtimestamp(now_wall - (now - at), tz=UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: str | None) -> str | None:
    return redact(value) if value else value


def sessions_document(
    snapshot: WorkerSnapshot, *, limit: int = DEFAULT_LIMIT, now_wall: float | None = None
) -> dict[str, Any]:
    """The ``/sessions`` document (schema `SCHEMA_VERSION`) for ``snapshot``: at most ``limit``
    sessions, most in need of attention first. Wall-clock times are derived from
    ``now_wall`` (default ``time.time()``) and the snapshot's own clock."""
    wall = time.time() if now_wall is None else now_wall
    now = snapshot.now
    warn = lock_warning_seconds(snapshot.lock_duration, snapshot.lock_margin)
    ranked = []
    for session in snapshot.sessions:
        reasons, key = attention(session, now, warn)
        ranked.append((key, session, reasons))
    ranked.sort(key=lambda item: item[0], reverse=True)
    sessions = []
    for _, session, reasons in ranked[:limit]:
        message = None
        if session.message_id is not None:
            message = {
                "message_id": _text(session.message_id),
                "attempt": session.attempt,
                "delivery_count": session.delivery_count,
                "running_seconds": _seconds(now - session.busy_since)
                if session.busy_since is not None
                else None,
                "retry_in_seconds": _seconds(session.retry_at - now)
                if session.retry_at is not None
                else None,
            }
        lock = None
        if session.locked_until is not None and math.isfinite(session.locked_until):
            lock = {
                "deadline": _wall(wall, now, session.locked_until),
                "expires_in_seconds": round(session.locked_until - now, 3),
                "renewals": session.renewals,
            }
        in_hand = 1 if session.message_id is not None else 0
        sessions.append(
            {
                "session_id": _text(session.session_id),
                "state": session_state(session),
                "attention": reasons,
                "since": _wall(wall, now, session.started_at),
                "age_seconds": _seconds(now - session.started_at) if session.started_at is not None else None,
                "received": session.received,
                "handled": max(session.received - session.pending - in_hand, 0),
                "pending": session.pending,
                "failed_attempts": session.failures,
                "last_error": _text(session.last_error),
                "message": message,
                "lock": lock,
            }
        )
    open_until = snapshot.circuit_open_until
    stats = msgspec.structs.asdict(snapshot.stats)
    return {
        "schema": SCHEMA_VERSION,
        "worker": {
            "queue": _text(snapshot.queue),
            "provider": snapshot.system,
            "pid": os.getpid(),
            "time": _wall(wall, now, now),
        },
        "stats": stats,
        "circuit": {
            "state": stats.get("circuit"),
            "times_opened": snapshot.circuit_times_opened,
            "reopens_in_seconds": _seconds(open_until - now) if open_until is not None else None,
        },
        "lock": {
            "duration_seconds": snapshot.lock_duration,
            "margin_seconds": snapshot.lock_margin,
            "warning_below_seconds": round(warn, 3),
        },
        "max_sessions": snapshot.max_concurrent_sessions,
        "sessions_total": len(snapshot.sessions),
        "limit": limit,
        "truncated": len(snapshot.sessions) > limit,
        "sessions": sessions,
    }


def render_sessions(snapshot: WorkerSnapshot, limit: int = DEFAULT_LIMIT) -> bytes:
    """`sessions_document` as UTF-8 JSON (one line and a newline)."""
    document = sessions_document(snapshot, limit=limit)
    return (json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
