"""The SQLite broker: the in-memory broker's model in a durable file, shared by processes.

`SqliteProvider` keeps queues in one SQLite database file (stdlib `sqlite3` only) with the
semantics of `providers.memory.InMemoryProvider`: peek-lock with lock tokens, sessions with
exclusive, expiring, renewable session locks, delivery counts, abandon (with a delay), a
dead-letter queue with reason and description after ``max_delivery_count`` deliveries,
time-to-live, scheduled messages, session state, peek and queue statistics. Many worker and
producer processes on one host may use the same file; each keeps every guarantee (one holder
per session, order within a session, nothing lost). It is the default provider when none is
configured (``./queue-runtime.db``). See ``docs/providers/sqlite.md``.

Durability
    The file is in WAL mode. Every operation is one short write transaction (a batch send is
    one transaction), taken with ``BEGIN IMMEDIATE`` so that read-modify-write steps (claiming
    a session, locking messages) are atomic across processes: exactly one process can hold a
    session. ``synchronous="NORMAL"`` (the default) survives a crash of any process (``kill
    -9`` included); ``synchronous="FULL"`` also survives a power loss or an OS crash, at the
    cost of an fsync per transaction. A process killed while it holds sessions loses nothing:
    its session locks expire after ``lock_duration`` and its messages are delivered again,
    in order, with their delivery counted.

Concurrency with other processes
    A transaction that finds the database locked by another process waits up to
    ``busy_timeout`` seconds (SQLite's busy handler), and the whole transaction is retried
    twice more before a transient `ConnectionFailed` is raised.

On trio
    With the default wall clock, every SQLite call runs on a worker thread
    (``trio.to_thread.run_sync``, ``abandon_on_cancel=False``), so the trio loop never blocks
    on the disk or on another process's lock. One connection per provider, used by one thread
    at a time, with group commit: calls made while a batch runs queue up and run as the next
    batch, in one thread hop, their writes in one transaction with a savepoint per call (a
    call that fails is rolled back alone), committed before any of them returns (batches of
    at most 64 calls). A call is never abandoned midway: a call cancelled while it is still
    queued is removed and does nothing; once its batch started, it completes (or rolls back)
    as a whole and the caller sees ``Cancelled`` at its next checkpoint. So a cancelled call
    leaves either nothing or its whole effect: a cancelled ``receive`` may have locked
    messages it never handed out, which come back when their lock expires (or at once when
    the session is released); a cancelled ``complete`` either completed the message or did
    not. `Receiver.aclose` is shielded: a cancelled close still releases the session (bounded
    by ``busy_timeout``).

Waiting without busy polling
    ``receive`` and ``accept_session`` on an empty source wait on a trio event that a send,
    abandon, dead-letter or release in the same process sets at once (per session, and per
    queue for ``accept_session``). They also wake at the next timed event they know of (a
    scheduled message coming due, a session lock expiring, a message lock expiring, their own
    session lock). Work done by another process is noticed by polling ``PRAGMA
    data_version`` (a read of a counter, no transaction, no lock) with a backoff from 10 ms up
    to ``poll_interval`` (0.1 s): a message sent by another process reaches a waiting receiver
    within ``poll_interval`` plus one query. (An abandon delay ending is noticed the same way
    by ``accept_session``.)

Time
    Broker times (lock deadlines, visibility, TTL) are seconds on the provider's clock,
    stored in the file, so every process using one file must use the same clock: the default,
    wall-clock time (`time.time`). Deadlines handed to the runtime (``locked_until``) are
    converted to trio's clock from a trio reading taken before the transaction started, so
    they are never later than the broker's. Tests pass ``clock=trio.current_time`` to run the
    broker on trio's `MockClock` as the in-memory broker does; with such a clock the calls run
    on the trio thread itself (a thread hop would let MockClock's autojump move virtual time
    while SQLite works), one process only.

Schema
    Versioned with ``PRAGMA user_version`` (migrations run in order under ``BEGIN IMMEDIATE``)
    and marked with ``PRAGMA application_id``. The file is created on first use; a file that
    is not ours, or that a newer queue-runtime wrote, is refused with one line
    (`ConfigurationError`).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeVar

import msgspec
import outcome
import trio

from ..errors import (
    ConfigurationError,
    ConnectionFailed,
    InvalidReceipt,
    MessageLockLost,
    MessageTooLarge,
    NotSupported,
    QueueError,
    QueueFull,
    SessionLockLost,
    ValidationError,
)
from ..message import Message, ReceivedMessage, message_size, validate_session_id
from .base import Capabilities, Provider, QueueInfo, QueueStats, Receiver

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["DEFAULT_PATH", "SCHEMA_VERSION", "SqliteProvider", "Synchronous"]

T = TypeVar("T")

DEFAULT_PATH: Final = "queue-runtime.db"
"""Where the database lives when ``sqlite.path`` is not set (relative to the working directory)."""

SCHEMA_VERSION: Final = 1
"""The schema this code writes (``PRAGMA user_version``)."""

APPLICATION_ID: Final = 0x71726E31  # "qrn1": marks the file as a queue-runtime database

Synchronous = Literal["NORMAL", "FULL"]
"""``NORMAL``: survives a process crash (WAL); ``FULL``: also survives a power loss."""

_DLQ_SUFFIX: Final = "/$deadletterqueue"
_ATTEMPTS: Final = 3  # whole-transaction attempts when the database stays locked
_POLL_MIN: Final = 0.01

_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 0 -> 1: the first schema.
    (
        """CREATE TABLE queues (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            parent INTEGER,                 -- set on a dead-letter queue: the queue it serves
            requires_session INTEGER NOT NULL,
            lock_duration REAL NOT NULL,
            max_delivery_count INTEGER,
            dead_letter_on_expiration INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the sequence number: delivery order
            queue INTEGER NOT NULL,
            session TEXT,                   -- session id on a session queue, else NULL
            visible_at REAL NOT NULL,       -- deliverable from then on (abandon delay)
            enqueued_at REAL NOT NULL,
            expires_at REAL,                -- time to live
            delivery_count INTEGER NOT NULL DEFAULT 0,
            lock TEXT,                      -- lock token while delivered and unsettled
            locked_until REAL,              -- message lock (non-session and dead-letter queues)
            message BLOB NOT NULL,          -- the Message, msgpack
            dl_reason TEXT,
            dl_description TEXT,
            dl_source TEXT
        )""",
        "CREATE INDEX messages_by_session ON messages (queue, session, seq)",
        "CREATE INDEX messages_by_queue ON messages (queue, seq)",
        "CREATE INDEX messages_locked ON messages (queue, locked_until) WHERE locked_until IS NOT NULL",
        "CREATE INDEX messages_expiring ON messages (queue, expires_at) WHERE expires_at IS NOT NULL",
        """CREATE TABLE scheduled (
            id INTEGER PRIMARY KEY,
            queue INTEGER NOT NULL,
            session TEXT,
            due REAL NOT NULL,
            ttl REAL,
            message BLOB NOT NULL
        )""",
        "CREATE INDEX scheduled_due ON scheduled (queue, due)",
        """CREATE TABLE sessions (
            queue INTEGER NOT NULL,
            session TEXT NOT NULL,
            holder TEXT,                    -- the holding receiver's token, NULL when free
            lock_until REAL,
            state BLOB,
            PRIMARY KEY (queue, session)
        ) WITHOUT ROWID""",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_ACCEPT = """
SELECT m.session FROM messages AS m
WHERE m.queue = ?1 AND m.session IS NOT NULL AND m.visible_at <= ?2
  AND m.seq = (SELECT MIN(e.seq) FROM messages AS e WHERE e.queue = ?1 AND e.session = m.session)
  AND NOT EXISTS (
    SELECT 1 FROM sessions AS s WHERE s.queue = ?1 AND s.session = m.session AND s.holder IS NOT NULL
  )
ORDER BY m.seq LIMIT 1
"""
_COLUMNS = (
    "seq, visible_at, expires_at, delivery_count, enqueued_at, message, dl_reason, dl_description, dl_source"
)


class _Q(NamedTuple):
    """One queue's row (settings never change once created, so processes may cache it)."""

    id: int
    name: str
    parent: int | None
    requires_session: bool
    lock_duration: float
    max_delivery_count: int | None
    dead_letter_on_expiration: bool


class _CommitThen(Exception):
    """Raised inside a transaction: commit what was done, then raise ``error`` to the caller
    (a session whose lock expired is released, then `SessionLockLost` is raised)."""

    def __init__(self, error: QueueError) -> None:
        super().__init__(error)
        self.error = error


class _Received(NamedTuple):
    """What a claiming transaction found: messages (``locked_until`` still on the broker's
    clock), the session lock, and when to look again if nothing came."""

    messages: list[ReceivedMessage]
    now: float
    lock_until: float | None
    next_at: float | None
    data_version: int


def _error_name(error: sqlite3.Error) -> str:
    return getattr(error, "sqlite_errorname", "") or ""


def _is_busy(error: sqlite3.Error) -> bool:
    name = _error_name(error)
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(error)


class _Job:
    """One call waiting for the connection (see `SqliteProvider._call`)."""

    __slots__ = ("args", "event", "fn", "lead", "outcome", "state", "write")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], write: bool | None) -> None:
        self.fn = fn
        self.args = args
        self.write = write
        self.event = trio.Event()
        self.state = "queued"  # "queued" -> "running" -> "done"
        self.lead = False  # handed the lead: it runs the next batches itself
        self.outcome: outcome.Outcome[Any] | None = None


class _Store:
    """The database side: one connection, one transaction per call (or per batch of calls,
    `run_batch`), used by one thread at a time (the provider's lead task). Every operation
    method here runs inside `transact` or `run_batch`."""

    def __init__(
        self, path: str, *, synchronous: Synchronous, busy_timeout: float, clock: Callable[[], float] | None
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.clock: Callable[[], float] = clock if clock is not None else time.time
        self.wall_offset: float | None = None if clock is not None else 0.0
        self.conn: sqlite3.Connection | None = None
        self.closed = False
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(Message)
        self.prefix = secrets.token_hex(6) + "-"
        self.tokens = itertools.count(1)

    # -- time -----------------------------------------------------------------------------------
    def now(self) -> float:
        now = self.clock()
        if self.wall_offset is None:
            self.wall_offset = time.time() - now
        return now

    def to_wall(self, at: float) -> datetime:
        return datetime.fromtimestamp(at + (self.wall_offset or 0.0), UTC)

    def from_wall(self, when: datetime) -> float:
        if self.wall_offset is None:
            self.now()
        return when.timestamp() - (self.wall_offset or 0.0)

    def token(self) -> str:
        return f"{self.prefix}{next(self.tokens)}"

    # -- the connection and the schema ----------------------------------------------------------
    def connection(self) -> sqlite3.Connection:
        if self.conn is not None:
            return self.conn
        if self.closed:
            raise QueueError("the SQLite provider is closed")
        path = Path(self.path)
        if not path.parent.is_dir():
            raise ConfigurationError(
                f"sqlite.path {self.path!r}: directory {str(path.parent)!r} does not exist"
            )
        if path.is_dir():
            raise ConfigurationError(f"sqlite.path {self.path!r} is a directory, not a database file")
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise ConfigurationError(f"sqlite.path {self.path!r} cannot be opened: {error}") from error
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    def _identity(self, conn: sqlite3.Connection) -> tuple[int, int, bool]:
        try:
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as error:
            if _is_busy(error):
                raise ConnectionFailed(f"SQLite database {self.path!r} stayed locked: {error}") from error
            raise ConfigurationError(
                f"{self.path!r} is not a queue-runtime database (SQLite says: {error})"
            ) from error
        return int(application_id), int(version), bool(tables)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        application_id, version, tables = self._identity(conn)
        self._check_identity(application_id, version, tables)
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    application_id, version, tables = self._identity(conn)  # another process may have
                    self._check_identity(application_id, version, tables)
                    for step in _MIGRATIONS[version:]:
                        for statement in step:
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as error:
            raise self._mapped(error) from error

    def _check_identity(self, application_id: int, version: int, tables: bool) -> None:
        if application_id not in (0, APPLICATION_ID) or (application_id == 0 and tables):
            raise ConfigurationError(
                f"{self.path!r} is an SQLite database of another application, not a queue-runtime"
                " database: set sqlite.path (QUEUE_SQLITE_PATH) to another file"
            )
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{self.path!r} has schema version {version}, written by a newer queue-runtime"
                f" (this one reads up to {SCHEMA_VERSION}): upgrade queue-runtime"
            )

    def close(self) -> None:
        self.closed = True
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.close()

    def _mapped(self, error: sqlite3.Error) -> QueueError:
        name = _error_name(error)
        text = f"SQLite database {self.path!r}: {error}"
        if _is_busy(error):
            return ConnectionFailed(
                f"SQLite database {self.path!r} stayed locked by another process for"
                f" {_ATTEMPTS} x {self.busy_timeout:g} s (busy_timeout)"
            )
        if name.startswith("SQLITE_FULL"):
            return QueueFull(f"{text} (the disk is full)")
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
            return ConfigurationError(text)
        if name.startswith("SQLITE_NOTADB"):
            return ConfigurationError(f"{self.path!r} is not a queue-runtime database (SQLite says: {error})")
        if name.startswith("SQLITE_IOERR"):
            return ConnectionFailed(text)
        return QueueError(text)

    # -- transactions ----------------------------------------------------------------------------
    def transact(self, fn: Callable[..., T], args: tuple[Any, ...], write: bool | None) -> T:
        """Run ``fn(*args)`` in one transaction (``BEGIN IMMEDIATE`` when ``write``, a read
        transaction when False, none when None) and commit; on an error, roll back. The whole
        transaction is retried when the database stays locked past ``busy_timeout``."""
        conn = self.connection()
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                if write is None:
                    return fn(*args)
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = fn(*args)
                except _CommitThen as then:
                    conn.execute("COMMIT")
                    raise then.error from None
                conn.execute("COMMIT")
                return result
            except sqlite3.Error as error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if _is_busy(error) and attempt < _ATTEMPTS:
                    time.sleep(0.01 * attempt)
                    continue
                raise self._mapped(error) from error
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def run_batch(self, jobs: list[_Job]) -> None:
        """Run ``jobs`` (the calls queued while the previous batch ran) in one thread hop:
        the write jobs in one ``BEGIN IMMEDIATE`` transaction, each in its own savepoint (a
        job that fails is rolled back alone), committed once before any caller is answered;
        the others one by one. Each job's outcome is stored on it; nothing raises."""
        writes = [job for job in jobs if job.write]
        for job in jobs:
            if not job.write:
                job.outcome = outcome.capture(self.transact, job.fn, job.args, job.write)
        if len(writes) == 1:
            job = writes[0]
            job.outcome = outcome.capture(self.transact, job.fn, job.args, True)
        elif writes:
            self._group(writes)

    def _group(self, jobs: list[_Job]) -> None:
        try:
            conn = self.connection()
        except BaseException as error:
            for job in jobs:
                job.outcome = outcome.Error(error)
            return
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                for job in jobs:
                    conn.execute("SAVEPOINT job")
                    try:
                        job.outcome = outcome.Value(job.fn(*job.args))
                    except _CommitThen as then:
                        job.outcome = outcome.Error(then.error)
                    except (QueueError, sqlite3.Error) as error:
                        if isinstance(error, sqlite3.Error) and _is_busy(error):
                            raise
                        conn.execute("ROLLBACK TO job")
                        job.outcome = outcome.Error(
                            self._mapped(error) if isinstance(error, sqlite3.Error) else error
                        )
                    conn.execute("RELEASE job")
                conn.execute("COMMIT")
                return
            except sqlite3.Error as error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if _is_busy(error) and attempt < _ATTEMPTS:
                    time.sleep(0.01 * attempt)
                    continue
                for job in jobs:
                    job.outcome = outcome.Error(self._mapped(error))
                return
            except BaseException as error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                for job in jobs:
                    job.outcome = outcome.Error(error)
                return

    def data_version(self) -> int:
        conn = self.connection()
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    # -- queues ------------------------------------------------------------------------------------
    def find_queue(self, name: str) -> tuple[_Q, _Q] | None:
        conn = self.connection()
        row = conn.execute("SELECT * FROM queues WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        dlq = conn.execute("SELECT * FROM queues WHERE parent = ?", (row[0],)).fetchone()
        return _row_queue(row), _row_queue(dlq)

    def create_queue(
        self,
        name: str,
        requires_session: bool,
        lock_duration: float,
        max_delivery_count: int,
        dead_letter_on_expiration: bool,
        strict: bool,
    ) -> tuple[_Q, _Q]:
        """The queue and its dead-letter queue, created if missing. ``strict``: an existing
        queue with other settings is a `ValidationError` (else it is used as it is)."""
        found = self.find_queue(name)
        if found is not None:
            queue = found[0]
            if strict and (
                queue.requires_session != requires_session
                or queue.lock_duration != lock_duration
                or queue.max_delivery_count != max_delivery_count
                or queue.dead_letter_on_expiration != dead_letter_on_expiration
            ):
                raise ValidationError(f"queue {name!r} already exists with different settings")
            return found
        conn = self.connection()
        cursor = conn.execute(
            "INSERT INTO queues (name, parent, requires_session, lock_duration, max_delivery_count,"
            " dead_letter_on_expiration) VALUES (?, NULL, ?, ?, ?, ?)",
            (name, int(requires_session), lock_duration, max_delivery_count, int(dead_letter_on_expiration)),
        )
        conn.execute(
            "INSERT INTO queues (name, parent, requires_session, lock_duration, max_delivery_count,"
            " dead_letter_on_expiration) VALUES (?, ?, 0, ?, NULL, 0)",
            (name + _DLQ_SUFFIX, cursor.lastrowid, lock_duration),
        )
        found = self.find_queue(name)
        assert found is not None
        return found

    # -- message movement (inside a write transaction) --------------------------------------------
    def _dead_letter(
        self, queue: _Q, dlq: int, seq: int, reason: str, description: str | None, now: float
    ) -> None:
        """Copy into the dead-letter queue, then remove the original (one transaction)."""
        conn = self.conn
        assert conn is not None
        conn.execute(
            "INSERT INTO messages (queue, session, visible_at, enqueued_at, delivery_count, message,"
            " dl_reason, dl_description, dl_source)"
            " SELECT ?, NULL, ?, enqueued_at, delivery_count, message, ?, ?, ? FROM messages WHERE seq = ?",
            (dlq, now, reason, description, queue.name, seq),
        )
        conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))

    def _expire(self, queue: _Q, dlq: int, seq: int, now: float) -> None:
        if queue.dead_letter_on_expiration:
            self._dead_letter(
                queue, dlq, seq, "TTLExpiredException", "the message's time to live passed", now
            )
        else:
            assert self.conn is not None
            self.conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))

    def _return(
        self,
        queue: _Q,
        dlq: int,
        seq: int,
        count: int,
        expires_at: float | None,
        now: float,
        delay: float | None,
    ) -> None:
        """Put a delivered message back (it keeps its place in its session), or dead-letter it
        when its next delivery would exceed ``max_delivery_count``, or expire it."""
        limit = queue.max_delivery_count
        if limit is not None and count >= limit:
            self._dead_letter(
                queue,
                dlq,
                seq,
                "MaxDeliveryCountExceeded",
                f"delivered {count} times; the queue's max_delivery_count is {limit}",
                now,
            )
        elif expires_at is not None and expires_at <= now:
            self._expire(queue, dlq, seq, now)
        else:
            assert self.conn is not None
            self.conn.execute(
                "UPDATE messages SET lock = NULL, locked_until = NULL, visible_at = ? WHERE seq = ?",
                (now + delay if delay else now, seq),
            )

    def _release(self, queue: _Q, dlq: int, session: str, now: float) -> None:
        """The holder is gone (closed, or its lock expired): hand its messages back, in order."""
        conn = self.conn
        assert conn is not None
        conn.execute(
            "UPDATE sessions SET holder = NULL, lock_until = NULL WHERE queue = ? AND session = ?",
            (queue.id, session),
        )
        rows = conn.execute(
            "SELECT seq, delivery_count, expires_at FROM messages"
            " WHERE queue = ? AND session = ? AND lock IS NOT NULL ORDER BY seq",
            (queue.id, session),
        ).fetchall()
        for seq, count, expires_at in rows:
            self._return(queue, dlq, seq, count, expires_at, now, None)
        # Forget a session with nothing to remember: the table holds held sessions and states.
        conn.execute(
            "DELETE FROM sessions WHERE queue = ? AND session = ? AND state IS NULL", (queue.id, session)
        )

    def _activate(self, queue: _Q, now: float) -> None:
        """Scheduled messages that came due join the queue, with their sequence numbers."""
        conn = self.conn
        assert conn is not None
        due = conn.execute(
            "SELECT id, session, due, ttl, message FROM scheduled"
            " WHERE queue = ? AND due <= ? ORDER BY due, id",
            (queue.id, now),
        ).fetchall()
        for row_id, session, when, ttl, blob in due:
            # As on Service Bus, a scheduled message's time to live starts when it is enqueued.
            conn.execute(
                "INSERT INTO messages (queue, session, visible_at, enqueued_at, expires_at, message)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (queue.id, session, now, when, when + ttl if ttl is not None else None, blob),
            )
            conn.execute("DELETE FROM scheduled WHERE id = ?", (row_id,))

    def _advance(self, queue: _Q, dlq: int, now: float) -> None:
        """Apply every timed event that is due: activations, lock expiries, TTL."""
        conn = self.conn
        assert conn is not None
        self._activate(queue, now)
        expired = conn.execute(
            "SELECT session FROM sessions WHERE queue = ? AND holder IS NOT NULL AND lock_until <= ?",
            (queue.id, now),
        ).fetchall()
        for (session,) in expired:
            self._release(queue, dlq, session, now)
        lapsed = conn.execute(
            "SELECT seq, delivery_count, expires_at FROM messages WHERE queue = ? AND locked_until <= ?",
            (queue.id, now),
        ).fetchall()
        for seq, count, expires_at in lapsed:
            self._return(queue, dlq, seq, count, expires_at, now, None)
        stale = conn.execute(
            "SELECT seq FROM messages WHERE queue = ? AND expires_at <= ? AND lock IS NULL", (queue.id, now)
        ).fetchall()
        for (seq,) in stale:
            self._expire(queue, dlq, seq, now)

    def _received(self, row: Sequence[Any], receipt: str, count: int) -> ReceivedMessage:
        seq, _visible, _expires, _count, enqueued_at, blob, reason, description, source = row
        return ReceivedMessage(
            message=self.decoder.decode(blob),
            receipt=receipt,
            delivery_count=count,
            enqueued_at=self.to_wall(enqueued_at),
            sequence_number=seq,
            dead_letter_reason=reason,
            dead_letter_description=description,
            dead_letter_source=source,
        )

    def _next_event(self, queue: _Q, *, session: str | None = None) -> float | None:
        conn = self.conn
        assert conn is not None
        if session is None:
            row = conn.execute(
                "SELECT (SELECT MIN(due) FROM scheduled WHERE queue = ?1),"
                " (SELECT MIN(lock_until) FROM sessions WHERE queue = ?1 AND holder IS NOT NULL),"
                " (SELECT MIN(locked_until) FROM messages WHERE queue = ?1 AND locked_until IS NOT NULL)",
                (queue.id,),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT MIN(due) FROM scheduled WHERE queue = ? AND session = ?", (queue.id, session)
            ).fetchone()
        times = [value for value in row if value is not None]
        return min(times) if times else None

    # -- operations (each is one transaction) -----------------------------------------------------
    def send(self, queue: _Q, rows: list[tuple[str | None, bytes, float | None, datetime | None]]) -> float:
        conn = self.conn
        assert conn is not None
        now = self.now()
        ready: list[tuple[int, str | None, float, float, float | None, bytes]] = []
        for session, blob, ttl, scheduled in rows:
            due = self.from_wall(scheduled) if scheduled is not None else now
            if due > now:
                conn.execute(
                    "INSERT INTO scheduled (queue, session, due, ttl, message) VALUES (?, ?, ?, ?, ?)",
                    (queue.id, session, due, ttl, blob),
                )
            else:
                ready.append((queue.id, session, now, now, now + ttl if ttl is not None else None, blob))
        if ready:
            conn.executemany(
                "INSERT INTO messages (queue, session, visible_at, enqueued_at, expires_at, message)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                ready,
            )
        return now

    def accept(self, queue: _Q, dlq: int, holder: str) -> tuple[str | None, float, float | None, int]:
        """Claim the session whose first available message is oldest among sessions nobody
        holds: (session, now, lock_until or next event, data_version)."""
        conn = self.conn
        assert conn is not None
        now = self.now()
        self._advance(queue, dlq, now)
        row = conn.execute(_ACCEPT, (queue.id, now)).fetchone()
        if row is None:
            return None, now, self._next_event(queue), self.data_version()
        lock_until = now + queue.lock_duration
        conn.execute(
            "INSERT INTO sessions (queue, session, holder, lock_until) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (queue, session)"
            " DO UPDATE SET holder = excluded.holder, lock_until = excluded.lock_until",
            (queue.id, row[0], holder, lock_until),
        )
        return row[0], now, lock_until, 0

    def _holding(self, queue: _Q, dlq: int, session: str, holder: str, now: float) -> float:
        """The session lock's deadline if ``holder`` holds it; else `SessionLockLost` (after
        releasing the session when the lock just expired)."""
        assert self.conn is not None
        row = self.conn.execute(
            "SELECT holder, lock_until FROM sessions WHERE queue = ? AND session = ?", (queue.id, session)
        ).fetchone()
        lost = SessionLockLost(
            f"session {session!r} on queue {queue.name!r}: the session lock expired or was released"
        )
        if row is None or row[0] != holder:
            raise lost
        if row[1] <= now:
            self._release(queue, dlq, session, now)
            raise _CommitThen(lost)
        lock_until: float = row[1]
        return lock_until

    def session_receive(self, queue: _Q, dlq: int, session: str, holder: str, count: int) -> _Received:
        conn = self.conn
        assert conn is not None
        now = self.now()
        self._activate(queue, now)
        lock_until = self._holding(queue, dlq, session, holder, now)
        out: list[ReceivedMessage] = []
        blocked: float | None = None
        after = -1
        while len(out) < count and blocked is None:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages"
                " WHERE queue = ? AND session = ? AND lock IS NULL AND seq > ? ORDER BY seq LIMIT ?",
                (queue.id, session, after, count - len(out)),
            ).fetchall()
            if not rows:
                break
            locks: list[tuple[str, int, int]] = []
            for row in rows:
                seq, visible_at, expires_at, delivered = row[0], row[1], row[2], row[3]
                after = seq
                if visible_at > now:
                    blocked = visible_at  # an abandoned message waits out its delay: nothing overtakes it
                    break
                if expires_at is not None and expires_at <= now:
                    self._expire(queue, dlq, seq, now)
                    continue
                receipt = f"{seq}:{self.token()}"
                locks.append((receipt, delivered + 1, seq))
                out.append(self._received(row, receipt, delivered + 1))
            if locks:
                conn.executemany("UPDATE messages SET lock = ?, delivery_count = ? WHERE seq = ?", locks)
        if out:
            return _Received(out, now, lock_until, None, 0)
        times = [t for t in (lock_until, blocked, self._next_event(queue, session=session)) if t is not None]
        return _Received(out, now, lock_until, min(times), self.data_version())

    def session_settle(
        self,
        queue: _Q,
        dlq: int,
        session: str,
        holder: str,
        receipt: str,
        action: str,
        delay: float | None,
        reason: str | None,
        description: str | None,
    ) -> None:
        conn = self.conn
        assert conn is not None
        now = self.now()
        self._holding(queue, dlq, session, holder, now)
        seq = _receipt_seq(receipt)
        if action == "complete":
            if (
                seq is None
                or not conn.execute(
                    "DELETE FROM messages WHERE seq = ? AND lock = ?", (seq, receipt)
                ).rowcount
            ):
                raise _invalid(receipt)
            return
        row = (
            conn.execute(
                "SELECT delivery_count, expires_at FROM messages WHERE seq = ? AND lock = ?", (seq, receipt)
            ).fetchone()
            if seq is not None
            else None
        )
        if row is None:
            raise _invalid(receipt)
        assert seq is not None
        if action == "abandon":
            self._return(queue, dlq, seq, row[0], row[1], now, delay)
        else:
            assert reason is not None
            self._dead_letter(queue, dlq, seq, reason, description, now)

    def renew(self, queue: _Q, dlq: int, session: str, holder: str) -> tuple[float, float]:
        assert self.conn is not None
        now = self.now()
        self._holding(queue, dlq, session, holder, now)
        lock_until = now + queue.lock_duration
        self.conn.execute(
            "UPDATE sessions SET lock_until = ? WHERE queue = ? AND session = ?",
            (lock_until, queue.id, session),
        )
        return lock_until, now

    def get_state(self, queue: _Q, dlq: int, session: str, holder: str) -> bytes | None:
        assert self.conn is not None
        self._holding(queue, dlq, session, holder, self.now())
        row = self.conn.execute(
            "SELECT state FROM sessions WHERE queue = ? AND session = ?", (queue.id, session)
        ).fetchone()
        return bytes(row[0]) if row is not None and row[0] is not None else None

    def set_state(self, queue: _Q, dlq: int, session: str, holder: str, state: bytes | None) -> None:
        assert self.conn is not None
        self._holding(queue, dlq, session, holder, self.now())
        self.conn.execute(
            "UPDATE sessions SET state = ? WHERE queue = ? AND session = ?", (state, queue.id, session)
        )

    def release(self, queue: _Q, dlq: int, session: str, holder: str) -> bool:
        """Release the session if ``holder`` still holds it (expired or not)."""
        assert self.conn is not None
        row = self.conn.execute(
            "SELECT holder FROM sessions WHERE queue = ? AND session = ?", (queue.id, session)
        ).fetchone()
        if row is None or row[0] != holder:
            return False
        self._release(queue, dlq, session, self.now())
        return True

    def queue_receive(self, queue: _Q, parent: _Q | None, dlq: int, count: int) -> _Received:
        """Lock up to ``count`` available messages of a non-session or dead-letter queue."""
        conn = self.conn
        assert conn is not None
        now = self.now()
        if parent is not None:
            self._advance(parent, queue.id, now)
        self._advance(queue, dlq, now)
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? AND session IS NULL AND lock IS NULL"
            " AND visible_at <= ? ORDER BY seq LIMIT ?",
            (queue.id, now, count),
        ).fetchall()
        out: list[ReceivedMessage] = []
        locked_until = now + queue.lock_duration
        for row in rows:
            seq, delivered = row[0], row[3]
            token = self.token()
            conn.execute(
                "UPDATE messages SET lock = ?, locked_until = ?, delivery_count = ? WHERE seq = ?",
                (token_receipt := f"{seq}:{token}", locked_until, delivered + 1, seq),
            )
            received = self._received(row, token_receipt, delivered + 1)
            received.locked_until = locked_until
            out.append(received)
        if out:
            return _Received(out, now, None, None, 0)
        return _Received(out, now, None, self._next_event(queue), self.data_version())

    def _locked(self, queue: _Q, receipt: str) -> tuple[int, int, float | None]:
        seq = _receipt_seq(receipt)
        row = (
            self.conn.execute(  # type: ignore[union-attr]
                "SELECT delivery_count, expires_at FROM messages WHERE seq = ? AND lock = ? AND queue = ?",
                (seq, receipt, queue.id),
            ).fetchone()
            if seq is not None
            else None
        )
        if row is None or seq is None:
            raise _invalid(receipt)
        return seq, row[0], row[1]

    def queue_settle(
        self,
        queue: _Q,
        parent: _Q | None,
        dlq: int,
        receipt: str,
        action: str,
        delay: float | None,
        reason: str | None,
        description: str | None,
    ) -> None:
        conn = self.conn
        assert conn is not None
        now = self.now()
        self._advance(queue, dlq, now)  # an expired lock is returned first: its receipt is stale
        seq, count, expires_at = self._locked(queue, receipt)
        if action == "complete":
            conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
        elif action == "abandon":
            self._return(queue, dlq, seq, count, expires_at, now, delay)
        else:
            assert reason is not None
            self._dead_letter(queue, dlq, seq, reason, description, now)

    def renew_message(self, queue: _Q, dlq: int, receipt: str) -> tuple[float, float]:
        conn = self.conn
        assert conn is not None
        now = self.now()
        self._advance(queue, dlq, now)
        seq = _receipt_seq(receipt)
        until = now + queue.lock_duration
        if (
            seq is None
            or not conn.execute(
                "UPDATE messages SET locked_until = ? WHERE seq = ? AND lock = ? AND locked_until > ?",
                (until, seq, receipt, now),
            ).rowcount
        ):
            raise MessageLockLost(f"receipt {receipt!r}: its lock expired or the message was settled")
        return until, now

    def peek(self, queue: _Q, dlq: _Q, count: int) -> list[ReceivedMessage]:
        conn = self.conn
        assert conn is not None
        now = self.now()
        self._advance(queue, dlq.id, now)
        self._advance(dlq, dlq.id, now)
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? ORDER BY seq LIMIT ?", (dlq.id, count)
        ).fetchall()
        return [self._received(row, "", row[3]) for row in rows]

    def stats(self, queue: _Q, dlq: _Q) -> tuple[int, int, int, int, float | None, float]:
        conn = self.conn
        assert conn is not None
        now = self.now()
        self._advance(queue, dlq.id, now)
        self._advance(dlq, dlq.id, now)
        total, locked = conn.execute(
            "SELECT COUNT(*), COUNT(lock) FROM messages WHERE queue = ?", (queue.id,)
        ).fetchone()
        scheduled = conn.execute("SELECT COUNT(*) FROM scheduled WHERE queue = ?", (queue.id,)).fetchone()[0]
        dead = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (dlq.id,)).fetchone()[0]
        oldest = conn.execute(
            "SELECT enqueued_at FROM messages WHERE queue = ? ORDER BY seq LIMIT 1", (queue.id,)
        ).fetchone()
        return total - locked, locked, scheduled, dead, oldest[0] if oldest else None, now

    def purge(self, dlq: _Q) -> int:
        assert self.conn is not None
        return int(self.conn.execute("DELETE FROM messages WHERE queue = ?", (dlq.id,)).rowcount)


def _row_queue(row: Sequence[Any]) -> _Q:
    return _Q(
        id=row[0],
        name=row[1],
        parent=row[2],
        requires_session=bool(row[3]),
        lock_duration=float(row[4]),
        max_delivery_count=row[5],
        dead_letter_on_expiration=bool(row[6]),
    )


def _receipt_seq(receipt: str) -> int | None:
    head, _, _ = receipt.partition(":")
    try:
        return int(head) if head else None
    except ValueError:
        return None


def _invalid(receipt: str) -> InvalidReceipt:
    return InvalidReceipt(
        f"receipt {receipt!r} is no longer valid"
        " (already settled, or its lock expired and it was redelivered)"
    )


class _Signals:
    """In-process wake-ups: one trio event per waited-on key, set (and dropped) by a change
    to that key. Keys: ``(queue id, session id)`` for a session's holder, ``(queue id, None)``
    for ``accept_session`` and non-session receivers. Entries live only while someone waits."""

    def __init__(self) -> None:
        self._events: dict[tuple[int, str | None], list[Any]] = {}

    def enter(self, key: tuple[int, str | None]) -> trio.Event:
        entry = self._events.get(key)
        if entry is None:
            entry = self._events[key] = [trio.Event(), 0]
        entry[1] += 1
        event: trio.Event = entry[0]
        return event

    def leave(self, key: tuple[int, str | None], event: trio.Event) -> None:
        entry = self._events.get(key)
        if entry is not None and entry[0] is event:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._events[key]

    def notify(self, key: tuple[int, str | None]) -> None:
        entry = self._events.pop(key, None)
        if entry is not None:
            entry[0].set()

    def notify_all(self) -> None:
        events, self._events = self._events, {}
        for entry in events.values():
            entry[0].set()


class SqliteProvider(Provider):
    """A durable peek-lock broker with sessions in one SQLite file. See the module docstring
    for the model, durability, cancellation and the cross-process wake-up bound.

    ``path``: the database file (created on first use, with its directory required to exist).
    ``synchronous``: ``"NORMAL"`` (survives a process crash) or ``"FULL"`` (survives a power
    loss). ``busy_timeout``: how long one transaction waits for another process's lock.
    ``lock_duration`` (60 s) and ``max_delivery_count`` (10), as Service Bus's defaults, apply
    to queues created on first use (`create_queue` sets them per queue; they are stored in
    the file). ``poll_interval``: the longest a waiting receive takes to notice another
    process's send. ``clock``: the broker's clock (see "Time"); leave it unset except in tests.

    Nothing is opened until the first call. Use it as an async context manager, or call
    `aclose`. Use one provider per ``trio.run``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 5.0,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        poll_interval: float = 0.1,
        max_message_size: int = 256 * 1024,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValidationError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        for name, value in (
            ("busy_timeout", busy_timeout),
            ("lock_duration", lock_duration),
            ("poll_interval", poll_interval),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValidationError(f"{name} must be a number > 0, got {value!r}")
        if not isinstance(max_delivery_count, int) or max_delivery_count < 1:
            raise ValidationError(f"max_delivery_count must be an integer >= 1, got {max_delivery_count!r}")
        if not isinstance(max_message_size, int) or max_message_size < 1:
            raise ValidationError(f"max_message_size must be an integer >= 1, got {max_message_size!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.synchronous: Synchronous = synchronous
        self.lock_duration = float(lock_duration)
        self.max_delivery_count = max_delivery_count
        self.poll_interval = float(poll_interval)
        self.capabilities = Capabilities(
            system="sqlite",
            native_sessions=True,
            session_state=True,
            max_batch_count=100,
            max_batch_bytes=4 * max_message_size,
            max_message_size=max_message_size,
            scheduled_messages=True,
            abandon_delay=True,
        )
        self._store = _Store(
            self.path, synchronous=synchronous, busy_timeout=float(busy_timeout), clock=clock
        )
        self._inline = clock is not None
        self._jobs: list[_Job] = []
        self._busy = False
        self._max_batch = 64
        self._queues: dict[str, tuple[_Q, _Q]] = {}
        self._signals = _Signals()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> SqliteProvider:
        """Build from `Settings` (``sqlite.*``)."""
        section = settings.sqlite
        return cls(
            section.path,
            synchronous=section.synchronous,
            busy_timeout=section.busy_timeout,
            lock_duration=section.lock_duration,
            max_delivery_count=section.max_delivery_count,
            poll_interval=section.poll_interval,
        )

    def __repr__(self) -> str:
        return f"SqliteProvider(path={self.path!r}, synchronous={self.synchronous!r})"

    # -- plumbing ---------------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any, write: bool | None = True) -> T:
        """Run ``fn(*args)`` as one transaction on the connection (see "On trio")."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise QueueError("the SQLite provider is closed")
        if self._inline:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                return self._store.transact(fn, args, write)
            finally:
                await trio.lowlevel.cancel_shielded_checkpoint()
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, args, write)
        result: T = (await self._run_job(job)).unwrap()
        return result

    async def _run_job(self, job: _Job) -> outcome.Outcome[Any]:
        """Group commit: calls queue up while a batch runs; one task at a time (the lead) runs
        the queued calls as the next batch, in one thread hop (`_Store.run_batch`), until its
        own call is done, then hands the lead to the first call still queued. A call cancelled
        while queued is removed (nothing done); once in a batch it is waited for (shielded)."""
        jobs = self._jobs
        jobs.append(job)
        if self._busy:
            try:
                await job.event.wait()
            except trio.Cancelled:
                if job.state == "queued" and not job.lead:
                    jobs.remove(job)
                    raise
                with trio.CancelScope(shield=True):
                    await job.event.wait()
            if not job.lead:
                assert job.outcome is not None
                return job.outcome
        with trio.CancelScope(shield=True):  # the lead serves others too: never abandoned midway
            self._busy = True
            try:
                while job.state != "done":
                    batch = jobs[: self._max_batch]
                    del jobs[: len(batch)]
                    for queued in batch:
                        queued.state = "running"
                    await trio.to_thread.run_sync(self._store.run_batch, batch, abandon_on_cancel=False)
                    for queued in batch:
                        queued.state = "done"
                        if queued is not job:
                            queued.event.set()
            finally:
                if jobs:
                    jobs[0].lead = True  # stays busy: the next lead takes over
                    jobs[0].event.set()
                else:
                    self._busy = False
        assert job.outcome is not None
        return job.outcome

    async def _queue(self, name: str) -> tuple[_Q, _Q]:
        found = self._queues.get(name)
        if found is None:
            self.validate_queue_name(name)
            found = await self._call(
                self._store.create_queue,
                name,
                True,
                self.lock_duration,
                self.max_delivery_count,
                False,
                False,
            )
            self._queues[name] = found
        return found

    async def _wait(self, event: trio.Event, until: float, data_version: int) -> None:
        """Return when ``event`` is set (a change in this process), at ``until`` (trio clock),
        or when a poll of ``PRAGMA data_version`` shows a commit by another process."""
        poll = _POLL_MIN
        while True:
            now = trio.current_time()
            if now >= until or self._closed:
                return
            with trio.move_on_at(min(until, now + poll)):
                await event.wait()
            if event.is_set() or self._closed or trio.current_time() >= until:
                return
            if await self._call(self._store.data_version, write=None) != data_version:
                return
            poll = min(poll * 2, self.poll_interval)

    @staticmethod
    def _on_trio(base: float, broker_now: float, at: float | None) -> float:
        """A broker time as a trio time, from a trio reading taken before the transaction."""
        if at is None:
            return math.inf
        return base + (at - broker_now)

    # -- administration ---------------------------------------------------------------------------
    async def create_queue(
        self,
        name: str,
        *,
        requires_session: bool = True,
        lock_duration: float | None = None,
        max_delivery_count: int | None = None,
        dead_letter_on_expiration: bool = False,
    ) -> QueueInfo:
        """Declare ``name`` (idempotent when the settings match; `ValidationError` otherwise).

        ``lock_duration`` and ``max_delivery_count`` default to the provider's; they are stored
        in the file, and every process uses the queue's own. ``dead_letter_on_expiration``
        moves expired (TTL) messages to the dead-letter queue (reason ``TTLExpiredException``).
        """
        self.validate_queue_name(name)
        lock = self.lock_duration if lock_duration is None else lock_duration
        if not (isinstance(lock, (int, float)) and math.isfinite(lock) and lock > 0):
            raise ValidationError(f"lock_duration must be > 0, got {lock_duration!r}")
        mdc = self.max_delivery_count if max_delivery_count is None else max_delivery_count
        if not isinstance(mdc, int) or mdc < 1:
            raise ValidationError(f"max_delivery_count must be an integer >= 1, got {max_delivery_count!r}")
        found = await self._call(
            self._store.create_queue,
            name,
            requires_session,
            float(lock),
            mdc,
            dead_letter_on_expiration,
            True,
        )
        self._queues[name] = found
        return self._info(found[0])

    @staticmethod
    def _info(queue: _Q) -> QueueInfo:
        return QueueInfo(
            name=queue.name,
            requires_session=queue.requires_session,
            lock_duration=queue.lock_duration,
            max_delivery_count=queue.max_delivery_count,
            dead_letter_queue=queue.name + _DLQ_SUFFIX,
        )

    # -- Provider API -------------------------------------------------------------------------------
    async def describe(self, queue: str) -> QueueInfo:
        """How ``queue`` is set up (creating it, as a session queue, on first use).

        Raises `ConfigurationError` when the file cannot be used (not ours, newer schema,
        missing directory, read-only)."""
        self.validate_queue_name(queue)
        return self._info((await self._queue(queue))[0])

    async def send(self, queue: str, messages: Sequence[Message]) -> None:
        """Store ``messages`` in one transaction: all or none. Everything is validated before any
        I/O: `ValidationError` (bad queue name, not a `Message`, no session id on a session
        queue, more than ``max_batch_count`` messages), `MessageTooLarge`.

        Cancellation: a send cancelled before it reached the connection stores nothing; once
        its transaction started it stores everything (then ``Cancelled`` is raised).
        """
        self.validate_queue_name(queue)
        caps = self.capabilities
        if len(messages) > caps.max_batch_count:
            raise ValidationError(
                f"a batch holds at most {caps.max_batch_count} messages, got {len(messages)}"
            )
        total = 0
        for message in messages:
            if not isinstance(message, Message):
                raise ValidationError(f"expected a Message, got {type(message).__name__}")
            size = message_size(message)
            if size > caps.max_message_size:
                raise MessageTooLarge(size, caps.max_message_size)
            total += size
            if message.session_id is not None:
                validate_session_id(message.session_id)
        if total > caps.max_batch_bytes:
            raise MessageTooLarge(total, caps.max_batch_bytes, what="batch")
        q, _dlq = await self._queue(queue)
        if q.requires_session:
            for message in messages:
                if message.session_id is None:
                    raise ValidationError(
                        f"queue {queue!r} requires sessions: message {message.message_id!r} has no session id"
                    )
        encode = self._store.encoder.encode
        rows = [
            (
                message.session_id if q.requires_session else None,
                encode(message),
                message.time_to_live,
                message.scheduled_enqueue_time,
            )
            for message in messages
        ]
        if not rows:
            await trio.lowlevel.checkpoint()
            return
        await self._call(self._store.send, q, rows)
        signals = self._signals
        if q.requires_session:
            for session in {row[0] for row in rows}:
                signals.notify((q.id, session))
        signals.notify((q.id, None))

    async def accept_session(self, queue: str, *, timeout: float) -> Receiver | None:
        """The session whose first available message is oldest among sessions nobody holds
        (in any process), locked for the queue's ``lock_duration``; None after ``timeout``
        seconds. Cancellable: a call cancelled while waiting accepts nothing; one cancelled
        while its claiming transaction runs may have claimed a session, which is then held
        until its lock expires."""
        q, dlq = await self._queue(queue)
        if not q.requires_session:
            raise NotSupported(f"queue {queue!r} has no sessions: use open_receiver")
        deadline = trio.current_time() + max(timeout, 0.0)
        key = (q.id, None)
        while True:
            event = self._signals.enter(key)
            try:
                holder = self._store.token()
                base = trio.current_time()
                session, now, until, version = await self._call(self._store.accept, q, dlq.id, holder)
                if session is not None:
                    assert until is not None
                    return _SessionReceiver(self, q, dlq, session, holder, self._on_trio(base, now, until))
                wake = min(deadline, self._on_trio(base, now, until))
                if trio.current_time() >= deadline:
                    return None
                await self._wait(event, wake, version)
            finally:
                self._signals.leave(key, event)

    async def open_receiver(self, queue: str, *, dead_letter: bool = False) -> Receiver:
        """A receiver for a non-session queue, or for ``queue``'s dead-letter queue."""
        q, dlq = await self._queue(queue)
        if dead_letter:
            return _QueueReceiver(self, dlq, q, dlq.id, queue)
        if q.requires_session:
            raise NotSupported(f"queue {queue!r} requires sessions: use accept_session")
        return _QueueReceiver(self, q, None, dlq.id, queue)

    async def peek_dead_letters(self, queue: str, max_messages: int = 32) -> list[ReceivedMessage]:
        """Up to ``max_messages`` dead-lettered messages, oldest first, unlocked, left in place."""
        q, dlq = await self._queue(queue)
        if max_messages < 1:
            return []
        return await self._call(self._store.peek, q, dlq, max_messages)

    async def queue_stats(self, queue: str) -> QueueStats:
        """Exact depth figures, across every process: ``active`` (waiting for delivery,
        abandon-delayed included), ``in_flight`` (locked), ``scheduled``, ``dead_letter``,
        ``oldest_message_age`` (seconds since the oldest stored message was enqueued)."""
        q, dlq = await self._queue(queue)
        active, in_flight, scheduled, dead, oldest, now = await self._call(self._store.stats, q, dlq)
        return QueueStats(
            queue=queue,
            active=active,
            in_flight=in_flight,
            scheduled=scheduled,
            dead_letter=dead,
            oldest_message_age=max(now - oldest, 0.0) if oldest is not None else None,
        )

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead-lettered message of ``queue`` (locked ones too); returns how many."""
        _q, dlq = await self._queue(queue)
        return await self._call(self._store.purge, dlq)

    async def aclose(self) -> None:
        """Close the connection once running calls finished; later calls raise `QueueError`.
        Idempotent. Waiting receives return. Stored messages stay in the file."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._signals.notify_all()
        with trio.CancelScope(shield=True):
            if self._inline:
                self._store.close()
                await trio.lowlevel.checkpoint()
            else:
                await self._run_job(_Job(self._store.close, (), None))


class _SessionReceiver(Receiver):
    """The holder of one session's lock (in every process: the lock is in the file)."""

    def __init__(
        self, provider: SqliteProvider, queue: _Q, dlq: _Q, session: str, holder: str, until: float
    ) -> None:
        self._provider = provider
        self._q = queue
        self._dlq = dlq.id
        self._holder = holder
        self._until = until
        self._lost = False
        self._closed = False
        self.queue = queue.name
        self.session_id = session

    def __repr__(self) -> str:
        return f"<sqlite session receiver queue={self.queue!r} session={self.session_id!r}>"

    @property
    def locked_until(self) -> float | None:
        return -math.inf if self._lost or self._closed else self._until

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise SessionLockLost(f"session {self.session_id!r}: the receiver was closed")
        try:
            return await self._provider._call(fn, self._q, self._dlq, self.session_id, self._holder, *args)
        except SessionLockLost:
            self._lost = True
            raise

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        """Up to ``max_messages`` of this session's messages, in sequence order, waiting at most
        ``timeout`` seconds for the first. `SessionLockLost` once the lock is gone.

        Cancellation: a call cancelled while waiting takes nothing; one cancelled while its
        transaction runs may have locked messages it does not return: they are delivered
        again (counted) when the session is released or its lock expires."""
        if max_messages < 1:
            raise ValidationError(f"max_messages must be >= 1, got {max_messages!r}")
        provider = self._provider
        deadline = trio.current_time() + max(timeout, 0.0)
        assert self.session_id is not None
        key = (self._q.id, self.session_id)
        while True:
            event = provider._signals.enter(key)
            try:
                base = trio.current_time()
                got = await self._call(provider._store.session_receive, max_messages)
                if got.lock_until is not None:
                    self._until = provider._on_trio(base, got.now, got.lock_until)
                if got.messages:
                    for message in got.messages:
                        message.locked_until = self._until
                    return got.messages
                if trio.current_time() >= deadline:
                    return []
                await provider._wait(
                    event, min(deadline, provider._on_trio(base, got.now, got.next_at)), got.data_version
                )
            finally:
                provider._signals.leave(key, event)

    async def _settle(
        self,
        message: ReceivedMessage,
        action: str,
        delay: float | None = None,
        reason: str | None = None,
        description: str | None = None,
    ) -> None:
        await self._call(
            self._provider._store.session_settle, message.receipt, action, delay, reason, description
        )

    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message. `InvalidReceipt` if it was settled already or redelivered,
        `SessionLockLost` if the session lock is gone; nothing changes then. Cancellation: see
        `SqliteProvider` ("On trio"): completed as a whole, or not at all."""
        await self._settle(message, "complete")

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        """Hand the message back: it is this session's next message again (after ``delay``
        seconds, during which nothing later in the session is delivered either). Its next
        delivery counts one more; past ``max_delivery_count`` it is dead-lettered instead."""
        if delay is not None and not (
            isinstance(delay, (int, float)) and math.isfinite(delay) and delay >= 0
        ):
            raise ValidationError(f"abandon delay must be a number >= 0, got {delay!r}")
        await self._settle(message, "abandon", delay)
        self._notify()

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        """Move the message to the dead-letter queue with ``reason`` and ``description``: the
        copy and the removal are one transaction."""
        await self._settle(message, "dead_letter", None, reason, description)
        self._provider._signals.notify((self._dlq, None))

    def _notify(self) -> None:
        signals = self._provider._signals
        signals.notify((self._q.id, self.session_id))
        signals.notify((self._q.id, None))

    async def renew_lock(self) -> float:
        """Extend the session lock by the queue's ``lock_duration``; the new deadline (trio
        clock). `SessionLockLost` if it expired or another receiver holds the session."""
        base = trio.current_time()
        until, now = await self._call(self._provider._store.renew)
        self._until = self._provider._on_trio(base, now, until)
        return self._until

    async def get_state(self) -> bytes | None:
        return await self._call(self._provider._store.get_state)

    async def set_state(self, state: bytes | None) -> None:
        if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
            raise ValidationError(f"session state must be bytes or None, got {type(state).__name__}")
        await self._call(self._provider._store.set_state, bytes(state) if state is not None else None)

    async def aclose(self) -> None:
        """Release the session: unsettled messages become deliverable again at once (their
        delivery was counted). Idempotent; never raises for a lost lock; shielded, so a
        cancelled close still releases (waiting at most ``busy_timeout`` for the file)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        provider = self._provider
        if provider._closed:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):
            try:
                released = await provider._call(
                    provider._store.release, self._q, self._dlq, self.session_id, self._holder
                )
            except QueueError:
                released = False  # the lock expires on its own
        if released:
            self._notify()


class _QueueReceiver(Receiver):
    """A receiver on a non-session queue or a dead-letter queue: one lock per message."""

    def __init__(self, provider: SqliteProvider, queue: _Q, parent: _Q | None, dlq: int, name: str) -> None:
        self._provider = provider
        self._q = queue
        self._parent = parent
        self._dlq = dlq
        self._closed = False
        self.queue = name
        self.session_id = None

    def __repr__(self) -> str:
        kind = "dead-letter" if self._parent is not None else "queue"
        return f"<sqlite {kind} receiver queue={self.queue!r}>"

    @property
    def locked_until(self) -> float | None:
        return None

    def _check(self) -> None:
        if self._closed:
            raise QueueError(f"the receiver on queue {self.queue!r} is closed")

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        """Up to ``max_messages`` available messages, oldest first, each locked for the queue's
        ``lock_duration``. Cancellation as for a session receive."""
        if max_messages < 1:
            raise ValidationError(f"max_messages must be >= 1, got {max_messages!r}")
        self._check()
        provider = self._provider
        deadline = trio.current_time() + max(timeout, 0.0)
        key = (self._q.id, None)
        while True:
            event = provider._signals.enter(key)
            try:
                base = trio.current_time()
                got = await provider._call(
                    provider._store.queue_receive, self._q, self._parent, self._dlq, max_messages
                )
                if got.messages:
                    for message in got.messages:
                        message.locked_until = provider._on_trio(base, got.now, message.locked_until)
                    return got.messages
                if trio.current_time() >= deadline:
                    return []
                await provider._wait(
                    event, min(deadline, provider._on_trio(base, got.now, got.next_at)), got.data_version
                )
                self._check()
            finally:
                provider._signals.leave(key, event)

    async def _settle(
        self,
        message: ReceivedMessage,
        action: str,
        delay: float | None = None,
        reason: str | None = None,
        description: str | None = None,
    ) -> None:
        self._check()
        provider = self._provider
        await provider._call(
            provider._store.queue_settle,
            self._q,
            self._parent,
            self._dlq,
            message.receipt,
            action,
            delay,
            reason,
            description,
        )

    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message. `InvalidReceipt` once its lock expired or it was settled."""
        await self._settle(message, "complete")

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        """Make the message deliverable again (after ``delay``); counted at its next delivery."""
        if delay is not None and not (
            isinstance(delay, (int, float)) and math.isfinite(delay) and delay >= 0
        ):
            raise ValidationError(f"abandon delay must be a number >= 0, got {delay!r}")
        await self._settle(message, "abandon", delay)
        self._provider._signals.notify((self._q.id, None))

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        if self._parent is not None:
            await trio.lowlevel.checkpoint()
            raise NotSupported("a dead-lettered message cannot be dead-lettered again")
        await self._settle(message, "dead_letter", None, reason, description)
        self._provider._signals.notify((self._dlq, None))

    async def renew_lock(self) -> float:
        await trio.lowlevel.checkpoint()
        raise NotSupported("this receiver holds no session: use renew_message_lock")

    async def renew_message_lock(self, message: ReceivedMessage) -> float:
        """Extend one message's lock by the queue's ``lock_duration``; `MessageLockLost` if it
        expired (or the message was settled)."""
        self._check()
        provider = self._provider
        base = trio.current_time()
        until, now = await provider._call(provider._store.renew_message, self._q, self._dlq, message.receipt)
        deadline = provider._on_trio(base, now, until)
        message.locked_until = deadline
        return deadline

    async def aclose(self) -> None:
        """Close the receiver. Messages it holds stay locked until their lock expires; settle
        or abandon them first. Idempotent."""
        self._closed = True
        await trio.lowlevel.checkpoint()
