"""``/sessions``: the document of a worker process with sessions in every state (idle,
handling, retrying, lock close to its deadline), its bounds and bad queries, and the pure
document builder (`queue_runtime.introspection`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from queue_runtime.introspection import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    SessionSnapshot,
    WorkerSnapshot,
    parse_limit,
    sessions_document,
)
from queue_runtime.supervisor import SupervisorStats
from session_workers import BODY_MARKER, free_port, start_attention_worker


def _by_id(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {session["session_id"]: session for session in document["sessions"]}


@pytest.mark.slow
def test_sessions_of_a_worker_in_every_state(tmp_path: Path) -> None:
    port = free_port()
    worker = start_attention_worker(
        tmp_path, ["stuck-1", "slow-1", "idle-1", "stall-1"], port=port, lock_duration=8
    )
    url = f"http://127.0.0.1:{port}/sessions"
    try:
        worker.wait_for("accepting sessions")
        seen: dict[str, dict[str, Any]] = {}
        texts: list[str] = []
        deadline = time.monotonic() + 20
        # The stalled lock is close to its deadline between ~4.8 s and 6.4 s after acceptance
        # (8 s lock, renewal due at 4 s hangs, lost at the 1.6 s margin): poll until it shows.
        while time.monotonic() < deadline:
            response = httpx.get(url, timeout=2)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json; charset=utf-8"
            texts.append(response.text)
            document = response.json()
            assert document["schema"] == 1
            sessions = _by_id(document)
            for sid, session in sessions.items():
                if "lock_at_risk" in session["attention"]:
                    seen.setdefault("at_risk", session)
                    # The most urgent first: nothing ranks above a lock about to be lost.
                    assert document["sessions"][0]["attention"][0] == "lock_at_risk", document
                    assert session["lock"]["expires_in_seconds"] < document["lock"]["warning_below_seconds"]
                    assert sid == "stall-1"
            stuck = sessions.get("stuck-1")
            if stuck and stuck["state"] == "retrying" and stuck["message"]["attempt"] >= 2:
                seen.setdefault("retrying", stuck)
            if "slow-1" in sessions and sessions["slow-1"]["state"] == "handling":
                seen["handling"] = sessions["slow-1"]
            if "idle-1" in sessions and sessions["idle-1"]["state"] == "idle":
                seen["idle"] = sessions["idle-1"]
            if {"at_risk", "retrying", "handling", "idle"} <= seen.keys():
                break
            time.sleep(0.2)
        assert {"at_risk", "retrying", "handling", "idle"} <= seen.keys(), (seen.keys(), texts[-1])

        retrying = seen["retrying"]
        assert retrying["attention"][:1] == ["retrying"]
        assert retrying["last_error"] == "RuntimeError"  # the type only, never the text
        assert retrying["failed_attempts"] >= 1
        assert retrying["handled"] == 0
        assert retrying["message"]["delivery_count"] == 1
        assert 0 < retrying["message"]["retry_in_seconds"] <= 30
        assert retrying["message"]["running_seconds"] is None

        handling = seen["handling"]
        assert handling["message"]["attempt"] == 1
        assert handling["message"]["running_seconds"] > 0.5
        assert handling["handled"] == 0 and handling["last_error"] is None

        idle = seen["idle"]
        assert (idle["message"], idle["handled"], idle["received"], idle["attention"]) == (None, 1, 1, [])
        assert 0 < idle["lock"]["expires_in_seconds"] <= 8
        assert idle["since"].endswith("Z") and idle["lock"]["deadline"].endswith("Z")

        final = httpx.get(url, timeout=2).json()
        assert final["stats"]["failed_attempts"] >= 1 and final["stats"]["circuit"] == "closed"
        assert final["circuit"] == {"state": "closed", "times_opened": 0, "reopens_in_seconds": None}
        assert final["lock"]["duration_seconds"] == 8.0
        for text in texts:
            assert BODY_MARKER not in text and "still failing" not in text

        # Bounded: ?limit= keeps the most urgent ones and says it cut.
        one = httpx.get(f"{url}?limit=1", timeout=2).json()
        assert len(one["sessions"]) == 1 and one["truncated"] is True and one["sessions_total"] >= 3
        assert one["limit"] == 1
        for bad in ("0", "abc", str(MAX_LIMIT + 1), "-1", "1&limit=2"):
            response = httpx.get(f"{url}?limit={bad}", timeout=2)
            assert response.status_code == 400, (bad, response.text)
            assert response.text.startswith("bad request: limit") and response.text.count("\n") == 1
    finally:
        worker.kill()


def _snapshot(sessions: list[SessionSnapshot], now: float = 100.0) -> WorkerSnapshot:
    stats = SupervisorStats(
        active_sessions=len(sessions),
        sessions_started=len(sessions),
        received=0,
        completed=0,
        dead_lettered=0,
        failed_attempts=0,
        retries=0,
        abandoned=0,
        lock_renewals=0,
        lock_lost=0,
        circuit="open",
        draining=False,
    )
    return WorkerSnapshot(
        queue="orders",
        system="memory",
        now=now,
        stats=stats,
        lock_duration=60.0,
        lock_margin=2.0,
        circuit_open_until=now + 12.5,
        circuit_times_opened=1,
        max_concurrent_sessions=64,
        sessions=sessions,
    )


def _session(sid: str, **changes: Any) -> SessionSnapshot:
    values: dict[str, Any] = {
        "session_id": sid,
        "started_at": 50.0,
        "received": 3,
        "pending": 1,
        "message_id": None,
        "delivery_count": None,
        "attempt": 1,
        "busy_since": None,
        "retry_at": None,
        "locked_until": 150.0,
        "renewals": 2,
        "failures": 0,
        "last_error": None,
    }
    values.update(changes)
    return SessionSnapshot(**values)


def test_document_order_bounds_and_redaction() -> None:
    long = _session("long", message_id="m1", delivery_count=1, busy_since=80.0)  # 20 s in handle()
    retry = _session("retry", message_id="m2", delivery_count=2, attempt=3, retry_at=101.0, failures=2)
    risky = _session("risky", locked_until=110.0)  # 10 s left of a 60 s lock
    secret = _session("pwd=hunter2hunter2", last_error="password=abc123")
    gone = _session("gone", locked_until=-math.inf)  # released: no lock to show
    document = sessions_document(_snapshot([secret, long, gone, retry, risky]), now_wall=1_000_000.0)
    order = [(s["session_id"], s["attention"]) for s in document["sessions"]]
    assert order[:3] == [("risky", ["lock_at_risk"]), ("retry", ["retrying"]), ("long", ["running_long"])]
    assert document["circuit"] == {"state": "open", "times_opened": 1, "reopens_in_seconds": 12.5}
    by_id = _by_id(document)
    assert "pwd=***" in by_id and by_id["pwd=***"]["last_error"] == "password=***"
    assert by_id["gone"]["lock"] is None
    assert by_id["retry"]["state"] == "retrying" and by_id["retry"]["message"]["retry_in_seconds"] == 1.0
    assert by_id["long"]["state"] == "handling" and by_id["long"]["handled"] == 1  # 3 - 1 pending - 1 in hand
    assert by_id["risky"]["lock"]["deadline"] == "1970-01-12T13:46:50.000Z"
    limited = sessions_document(_snapshot([long, retry, risky]), limit=2)
    assert [s["session_id"] for s in limited["sessions"]] == ["risky", "retry"]
    assert (limited["truncated"], limited["sessions_total"]) == (True, 3)


def test_parse_limit() -> None:
    assert parse_limit("") == DEFAULT_LIMIT
    assert parse_limit("limit=7&other=x") == 7
    for bad in ("limit=", "limit=1.5", "limit=%EF%BC%91", "limit=99999999999", "limit=1&limit=1"):
        with pytest.raises(ValueError, match="limit"):
            parse_limit(bad)
