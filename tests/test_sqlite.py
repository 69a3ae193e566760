"""`SqliteProvider` beyond the contract suite: the file (schema version, foreign files, the
CLI's one-line errors), durability across provider instances, the threaded path on the wall
clock (cancellation, in-process and cross-process wake-ups within the stated bound).

The contract suite (``tests/contract``, ``[sqlite]``) runs the broker model on MockClock;
these run on the real clock, with SQLite calls on worker threads as in production.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from queue_runtime.errors import ConfigurationError
from queue_runtime.message import Message
from queue_runtime.providers.sqlite import SCHEMA_VERSION, SqliteProvider
from worker_process import clean_env


def msg(session: str, label: str) -> Message:
    return Message(body=label.encode(), session_id=session)


async def test_file_created_on_first_use_with_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    provider = SqliteProvider(path)
    assert not path.exists()  # nothing opened before the first call
    async with provider:
        await provider.send("orders", [msg("s", "1")])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_messages_and_state_survive_a_new_provider(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    async with SqliteProvider(path) as first:
        await first.send("orders", [msg("s", "1"), msg("s", "2")])
        receiver = await first.accept_session("orders", timeout=1)
        assert receiver is not None
        async with receiver:
            got = await receiver.receive(1, timeout=1)
            await receiver.complete(got[0])
            await receiver.set_state(b"total=1")
    async with SqliteProvider(path) as second:
        receiver = await second.accept_session("orders", timeout=1)
        assert receiver is not None
        async with receiver:
            assert await receiver.get_state() == b"total=1"
            got = await receiver.receive(5, timeout=1)
            assert [m.message.body for m in got] == [b"2"]
            await receiver.complete(got[0])
        stats = await second.queue_stats("orders")
        assert (stats.active, stats.in_flight, stats.dead_letter) == (0, 0, 0)


async def test_a_foreign_sqlite_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    async with SqliteProvider(path) as provider:
        with pytest.raises(ConfigurationError, match="database of another application") as caught:
            await provider.send("orders", [msg("s", "1")])
    assert "\n" not in str(caught.value)
    with sqlite3.connect(path) as conn:  # left untouched: still not in WAL mode, no tables of ours
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["invoices"]


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    async with SqliteProvider(path) as provider:
        with pytest.raises(ConfigurationError, match="is not a queue-runtime database"):
            await provider.describe("orders")


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    async with SqliteProvider(path) as provider:
        await provider.describe("orders")
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    async with SqliteProvider(path) as provider:
        with pytest.raises(ConfigurationError, match=r"newer queue-runtime .*upgrade queue-runtime"):
            await provider.describe("orders")


def test_cli_on_a_foreign_file_prints_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("queue-runtime")), "stats", "-q", "orders"],
        env=clean_env({"QUEUE_SQLITE_PATH": str(path)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "another application" in result.stderr
    missing = subprocess.run(
        [str(Path(sys.executable).with_name("queue-runtime")), "stats", "-q", "orders"],
        env=clean_env({"QUEUE_SQLITE_PATH": str(tmp_path / "no" / "such" / "dir.db")}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "does not exist" in missing.stderr


async def test_receive_wakes_at_once_on_a_send_in_this_process(tmp_path: Path) -> None:
    async with SqliteProvider(tmp_path / "q.db", poll_interval=5.0) as provider:
        await provider.send("orders", [msg("s", "1")])
        receiver = await provider.accept_session("orders", timeout=1)
        assert receiver is not None
        async with receiver:
            await receiver.complete((await receiver.receive(1, timeout=1))[0])
            got: list[float] = []

            async def waiter() -> None:
                started = trio.current_time()
                batch = await receiver.receive(1, timeout=10)
                got.append(trio.current_time() - started)
                await receiver.complete(batch[0])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(0.2)
                await provider.send("orders", [msg("s", "2")])
            # Woken by the send, not by a poll (every 5 s here) or the timeout.
            assert 0.15 < got[0] < 1.0


async def test_receive_sees_another_process_send_within_the_poll_bound(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    poll = 0.1
    async with SqliteProvider(path, poll_interval=poll) as provider:
        await provider.send("orders", [msg("s", "1")])
        receiver = await provider.accept_session("orders", timeout=1)
        assert receiver is not None
        async with receiver:
            await receiver.complete((await receiver.receive(1, timeout=1))[0])
            await trio.sleep(1.0)  # the wait's backoff has reached poll_interval
            async with SqliteProvider(path) as other:  # another connection: as another process
                done = trio.Event()
                waited: list[float] = []

                async def waiter() -> None:
                    batch = await receiver.receive(1, timeout=10)
                    waited.append(trio.current_time())
                    assert [m.message.body for m in batch] == [b"2"]
                    await receiver.complete(batch[0])
                    done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    await trio.sleep(1.0)
                    sent_at = trio.current_time()
                    await other.send("orders", [msg("s", "2")])
                    await done.wait()
                assert waited[0] - sent_at < poll + 0.4  # the bound, plus a query on a busy machine


async def test_cancelled_calls_on_threads_leave_whole_transactions(tmp_path: Path) -> None:
    async with SqliteProvider(tmp_path / "q.db") as provider:
        await provider.send("orders", [msg("s", str(i)) for i in range(3)])
        receiver = await provider.accept_session("orders", timeout=1)
        assert receiver is not None
        with trio.move_on_after(0.3) as scope:
            assert len(await receiver.receive(3, timeout=0)) == 3  # held, unsettled
            await receiver.receive(1, timeout=60)  # waits on a thread-backed poll: cancelled
        assert scope.cancelled_caught
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await receiver.aclose()  # shielded: releases even when cancelled
        stats = await provider.queue_stats("orders")
        assert (stats.active, stats.in_flight) == (3, 0)  # handed back, none lost
        again = await provider.accept_session("orders", timeout=1)
        assert again is not None
        async with again:
            got = await again.receive(10, timeout=1)
            assert [m.message.body for m in got] == [b"0", b"1", b"2"]
            assert [m.delivery_count for m in got] == [2, 2, 2]
            for m in got:
                await again.complete(m)
