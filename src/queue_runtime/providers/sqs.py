"""AWS SQS provider: FIFO message groups as sessions, natively on trio.

One aiobotocore client per provider, on aiobotocore's httpx backend
(``AioConfig(http_session_cls=HttpxSession)``), which uses anyio primitives and so runs under
``trio.run`` with no asyncio loop. The SDK retries at most once (``max_attempts=2``,
standard mode) so that our own retry policy and circuit breaker decide.

Sessions (FIFO queues, ``.fifo``)
    A session is a ``MessageGroupId``. SQS has no "accept session": whoever waits polls.
    ``accept_session`` and a group receiver's ``receive`` both call the provider's shared
    poll for the queue: one ``ReceiveMessage`` in flight per queue (the others wait for it to
    finish), long poll <= 20 s, 10 messages, ``ReceiveRequestAttemptId`` reused when the
    previous receive got no answer (network error, cancellation). The batch is demultiplexed
    by group: a group held by one of this provider's receivers goes to that receiver's
    buffer, in order; a new group becomes a pending session, handed to the next
    ``accept_session``. A pending session's visibility is extended while it waits (at
    half-life), and it is released (visibility 0) for other workers once unclaimed for
    ``max_pending_age``.

Back-pressure: more active groups than a worker takes
    A group received but not taken is never released at once: the next receive, a moment
    later, would bring it straight back, and every receive counts toward the queue's
    ``maxReceiveCount`` (SQS's redrive would move it to the dead-letter queue unhandled). So
    every new group of a receive is kept as a pending session, and once
    ``max_pending_sessions`` wait (at most one receive's groups past that), the poll is held
    back: no receive goes out until one is claimed or released. A held session that has
    nothing left to hand out meanwhile is asked to end (``release_requested``: the runtime
    stops its actor as idle without waiting out the idle timeout), so its slot takes a waiting
    group; the rest of its group comes back with a later receive. Each message is so received
    about once, and a worker holds at most ``max_concurrent_sessions`` +
    ``max_pending_sessions`` + 9 groups, leaving the others to other workers.

The lock
    A group's lock is the visibility of its in-flight messages. Each message's visibility
    deadline is tracked on trio's clock from a moment SQS cannot have started it before: the
    time the receive (or the last visibility change) was *sent*. So the local deadline is never
    later than SQS's, however slow the network. When a receive's answer took long (a long poll
    that waited, or a slow link: more than `EXTEND_AFTER` or a quarter of the visibility
    timeout), that bound would waste much of the lock, so the batch's visibility is extended at
    once with one ``ChangeMessageVisibilityBatch`` and timed from that call; a message SQS no
    longer holds for us (it lapsed on the way) is dropped, never handed out, and so are the
    messages after it in its group (SQS times each message on its own, so k can lapse just
    before k+1: handing out k+1 would break the group's order). SQS accepts a
    delete with a stale receipt without error, so a message whose local deadline has passed is
    a lost lock: it is never completed. A delete SQS refuses, or sends only after the deadline,
    is a lost lock too: the receiver is marked lost (``locked_until`` reads ``-inf``), and its
    next call raises `SessionLockLost`.
    ``renew_lock`` first sends the pending deletes (and waits for a delete call of its
    messages another task has in flight), then extends every message the receiver still holds
    (buffered, handed out, completed but not deleted because a delete call failed) with
    ``ChangeMessageVisibilityBatch``, within the 12-hour cap.

One holder per group
    A provider has at most one live receiver per group. When the holder of a group lets its
    visibility lapse and SQS delivers the group again, the holder is marked lost, and the group
    becomes a pending session that no ``accept_session`` takes until the old receiver is
    closed: the old holder's actor ends before a new one starts on the group.

Completion
    ``complete`` checks the local deadline, then queues the delete. Pending deletes (all the
    receivers of a queue) are sent in ``DeleteMessageBatch`` calls of up to 10: when 10 are
    pending, when one of them nears its deadline, before any poll of that queue, on
    ``renew_lock``, on a receiver's ``aclose`` and on the provider's ``aclose``. Before a poll:
    with ``overlap_deletes`` (the default against AWS), the deletes go out and the receive
    right behind them, without waiting for their answer (SQS withholds a group only until its
    deletes land, and its long poll returns once they have: a round trip saved per batch);
    without it, and while an unclaimed session waits (the worker takes no new group then, and
    a receive answered before the deletes land would bring only other groups, to wait unclaimed
    and hold the poll back, not the held groups' next messages), the poll waits for those
    deletes, and
    for the delete calls other tasks have in flight on its queue, before it receives (for
    servers whose long poll does not see deletes that land during it, such as moto's: there an
    early receive waits out the whole poll).
    A crash between
    ``complete`` and the flush redelivers those messages (at-least-once; order still holds,
    since the later messages of the group were not deleted either).

Abandon
    Releasing message k releases every later in-flight message of the group held by the
    receiver too (visibility 0), so the group is redelivered from k, in order. Later
    ``abandon`` calls for those are no-ops.

Cancellation: every public method may be cancelled. A cancelled receive loses nothing (the
messages reappear after their visibility timeout, or at once with the reused attempt id);
``aclose`` shields its clean-up for at most ``close_timeout`` seconds.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import math
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import trio

from ..errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    InvalidReceipt,
    MessageLockLost,
    MessageTooLarge,
    NotSupported,
    QueueError,
    SessionLockLost,
    Timeout,
    ValidationError,
)
from ..message import Message, ReceivedMessage
from . import _sqs_codec as codec
from ._sqs_errors import RECEIPT, error_code, map_entry_failure, map_error
from .base import Capabilities, Provider, QueueInfo, QueueStats, Receiver

if TYPE_CHECKING:
    from ..config import Settings
    from ..secrets import CredentialSource

__all__ = ["SqsProvider"]

log = logging.getLogger("queue_runtime.providers.sqs")

MAX_VISIBILITY: Final = 43_200  # 12 hours, SQS's cap on a message's total invisibility
MAX_WAIT: Final = 20  # SQS's longest long poll
BATCH: Final = codec.MAX_BATCH_COUNT


class _State(enum.Enum):
    BUFFERED = "buffered"  # received, not handed out yet
    OUT = "out"  # handed to the consumer, unsettled
    DELETING = "deleting"  # completed, delete queued (still in flight on SQS)
    DONE = "done"  # deleted, released or dropped


@dataclass(eq=False, slots=True)
class _Record:
    """One in-flight SQS message as we hold it."""

    raw: dict[str, Any]
    message: ReceivedMessage
    receipt: str
    group: str | None
    deadline: float
    received_at: float
    state: _State = _State.BUFFERED
    owner: _ReceiverBase | None = None


@dataclass
class _QueueMeta:
    name: str
    url: str
    fifo: bool
    content_dedup: bool
    visibility: int
    max_receive_count: int | None
    redrive_target: str | None
    attributes: dict[str, str]


@dataclass(eq=False)
class _Pending:
    records: list[_Record]
    created: float


@dataclass(eq=False)
class _QueueState:
    """Receiving state of one queue, shared by the provider's receivers of that queue."""

    meta: _QueueMeta
    polling: bool = False
    poll_done: trio.Event = field(default_factory=trio.Event)
    attempt_id: str | None = None
    attempt_started: float = 0.0
    pending: dict[str, _Pending] = field(default_factory=dict)
    receivers: dict[str, SqsSessionReceiver] = field(default_factory=dict)
    # Receivers marked lost but not closed yet: their groups are not handed out again until then.
    ending: dict[str, SqsSessionReceiver] = field(default_factory=dict)
    deletes: list[_Record] = field(default_factory=list)
    settled: trio.Event = field(default_factory=trio.Event)
    # DeleteMessageBatch calls in flight on this queue, and an event set when none are left.
    deleting: int = 0
    deletes_landed: trio.Event = field(default_factory=trio.Event)
    # Set when an unclaimed group leaves `pending` (claimed, released, lapsed) or an old holder
    # closes: wakes a poll held back by a full `pending` (see `SqsProvider._hold_back`).
    room: trio.Event = field(default_factory=trio.Event)


#: A receive answered later than this after it was sent (or after a quarter of the visibility
#: timeout, if less) has its batch's visibility extended at once: the messages' deadlines are
#: timed from the request, which after a long poll's wait leaves too little of the lock.
EXTEND_AFTER: Final = 1.0

#: How long a poll waits for the messages of the previous batch that other sessions are still
#: handling to be completed, so their deletes leave in one DeleteMessageBatch with the
#: poller's (as a hand-written "receive 10, process, delete the batch" loop does) rather than
#: one delete call per poll. Short: it delays only the poll, never a handler.
SETTLE_WINDOW: Final = 0.02


#: The shortest wait of a held-back poll (see `SqsProvider._hold_back`).
HOLD_BACK_MIN_WAIT: Final = 0.1


#: One botocore session per profile for the process: a session loads and caches the service
#: model and endpoint rules (about a second per new session) and the resolved credential chain.
_SESSIONS: dict[str | None, Any] = {}


def _name_of(queue: str) -> str:
    """A queue name from a name or a queue URL (``https://sqs.../123456789012/orders.fifo``)."""
    return queue.rstrip("/").rsplit("/", 1)[-1] if "://" in queue else queue


def _chunks(items: Sequence[_Record], size: int = BATCH) -> Iterable[Sequence[_Record]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_aws(endpoint: str | None) -> bool:
    """Whether ``endpoint`` (None: botocore's default) is an AWS SQS endpoint."""
    if endpoint is None:
        return True
    host = urllib.parse.urlsplit(endpoint if "//" in endpoint else f"//{endpoint}").hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def _secret_value(value: object) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return str(getter()) if callable(getter) else str(value)


class SqsProvider(Provider):
    """The AWS SQS adapter (see the module docstring for the model).

    Credentials and region follow botocore's standard chain unless given here; the endpoint
    is ``endpoint_url``, else ``AWS_ENDPOINT_URL_SQS``, else ``AWS_ENDPOINT_URL``, else AWS.
    ``visibility_timeout`` (seconds, whole, >= 1) is asked for on every receive; None uses
    the queue's own setting. ``wait_time`` is the long-poll cap (<= 20 s).
    ``dead_letter_queue`` overrides the queue's RedrivePolicy target.

    ``api_calls`` counts SQS API calls by operation name (for tests and diagnostics);
    ``delete_failures`` counts deletes SQS refused during a flush.

    ``max_pending_sessions``: how many groups received but not taken yet (all sessions busy) a
    worker keeps waiting, invisible to other workers; once reached, it receives nothing more
    until one is taken (see "Back-pressure" in the module docstring). ``max_pending_age``:
    seconds a group may wait so before it is released for other workers (each release and
    receive again counts toward the queue's ``maxReceiveCount``).

    ``overlap_deletes``: send a poll's receive while the deletes sent just before it are in
    flight (one round trip per batch instead of two; see "Completion" in the module
    docstring). None (the default) turns it on when the endpoint is AWS's (no endpoint
    configured, or an ``amazonaws.com`` / ``api.aws`` host), whose long poll returns as soon as
    the deletes free a group, and off for other endpoints: emulators such as moto decide a
    long poll's blocked groups once, at its start, so there an overlapping receive waits out
    the whole poll. Turn it on for an emulator that behaves like SQS.

    ``credentials`` (a `queue_runtime.secrets.SecretResolver`) makes the provider follow
    rotated keys (``aws.access_key_id``, ``aws.secret_access_key``, ``aws.session_token``):
    after SQS refused a credential it asks for a re-read, and once the keys changed (then, or
    at a periodic re-read) the next call uses a new client with them; the refused error is
    then transient, so callers retry. The old client is closed with the provider.
    """

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        visibility_timeout: float | None = 30.0,
        wait_time: float = 20.0,
        dead_letter_queue: str | None = None,
        max_pending_sessions: int = 10,
        max_pending_age: float = 60.0,
        connect_timeout: float = 5.0,
        close_timeout: float = 10.0,
        credentials: CredentialSource | None = None,
        overlap_deletes: bool | None = None,
    ) -> None:
        if visibility_timeout is not None and visibility_timeout <= 0:
            visibility_timeout = None  # 0 = "use the queue's own setting"
        if visibility_timeout is not None and not 1 <= visibility_timeout <= MAX_VISIBILITY:
            raise ConfigurationError(
                f"visibility_timeout must be 1-{MAX_VISIBILITY} seconds, got {visibility_timeout!r}"
            )
        if not 0 <= wait_time <= MAX_WAIT:
            raise ConfigurationError(f"wait_time must be between 0 and {MAX_WAIT} seconds, got {wait_time!r}")
        if max_pending_sessions < 1:
            raise ConfigurationError("max_pending_sessions must be >= 1")
        if dead_letter_queue is not None:
            self.validate_queue_name(_name_of(dead_letter_queue))
        self._region = region
        self._endpoint_url = endpoint_url
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._session_token = session_token
        self._profile = profile
        self._visibility = math.ceil(visibility_timeout) if visibility_timeout is not None else None
        self._wait_time = int(wait_time)
        self._dead_letter_queue = dead_letter_queue
        self._stats_dlq_warned: set[str] = set()
        self._max_pending = max_pending_sessions
        self._max_pending_age = max_pending_age
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._client: Any = None
        self._client_cm: Any = None
        self._client_lock = trio.Lock()
        self._closed = False
        self._meta: dict[str, _QueueMeta] = {}
        self._states: dict[str, _QueueState] = {}
        self.api_calls: collections.Counter[str] = collections.Counter()
        self.delete_failures = 0
        self._credentials = credentials
        self._retired: list[Any] = []  # client context managers of rotated-away keys
        self.overlap_deletes = _is_aws(self._endpoint()) if overlap_deletes is None else overlap_deletes

    capabilities = Capabilities(
        system="aws_sqs",
        native_sessions=False,
        session_state=False,
        max_batch_count=codec.MAX_BATCH_COUNT,
        max_batch_bytes=codec.MAX_MESSAGE_SIZE,
        max_message_size=codec.MAX_MESSAGE_SIZE,
        max_properties=codec.MAX_PROPERTIES,
        # Only DelaySeconds (<= 900 s) on standard queues; FIFO queues have no per-message delay.
        scheduled_messages=False,
        abandon_delay=True,
        max_lock_duration=float(MAX_VISIBILITY),
    )

    @classmethod
    def from_settings(cls, settings: Settings, *, credentials: CredentialSource | None = None) -> SqsProvider:
        """Build from `Settings` (``aws.*``, ``visibility_timeout``, ``dlq_name``)."""
        aws = getattr(settings, "aws", None)
        visibility = getattr(settings, "visibility_timeout", None)
        receive_timeout = getattr(settings, "receive_timeout", None)
        return cls(
            region=getattr(aws, "region", None),
            endpoint_url=getattr(aws, "endpoint_url", None),
            access_key_id=getattr(aws, "access_key_id", None),
            secret_access_key=_secret_value(getattr(aws, "secret_access_key", None)),
            session_token=_secret_value(getattr(aws, "session_token", None)),
            profile=getattr(aws, "profile", None),
            visibility_timeout=float(visibility) if visibility else None,
            wait_time=min(float(receive_timeout), MAX_WAIT) if receive_timeout is not None else MAX_WAIT,
            dead_letter_queue=getattr(settings, "dlq_name", None),
            credentials=credentials,
            overlap_deletes=getattr(aws, "overlap_deletes", None),
        )

    def __repr__(self) -> str:
        # Never the keys: only whether they were given.
        return (
            f"SqsProvider(region={self._region!r}, endpoint_url={self._endpoint_url!r},"
            f" credentials={'explicit' if self._access_key_id else 'default chain'})"
        )

    # -- the client --------------------------------------------------------------------------
    @property
    def visibility_timeout(self) -> int | None:
        return self._visibility

    def _config(self) -> Any:
        from aiobotocore.config import AioConfig
        from aiobotocore.httpxsession import HttpxSession

        return AioConfig(
            http_session_cls=HttpxSession,
            connect_timeout=self._connect_timeout,
            read_timeout=MAX_WAIT + 15,  # longer than the longest long poll
            retries={"max_attempts": 2, "mode": "standard"},
        )

    def _keys(self) -> tuple[str | None, str | None, str | None] | None:
        """The credential source's current keys when they differ from those in use, else None."""
        if self._credentials is None:
            return None
        aws = self._credentials.settings.aws
        keys = (aws.access_key_id, _secret_value(aws.secret_access_key), _secret_value(aws.session_token))
        return keys if keys != (self._access_key_id, self._secret_access_key, self._session_token) else None

    async def _get_client(self) -> Any:
        if self._client is not None and self._credentials is None:
            return self._client
        if self._closed:
            raise ConfigurationError("the SQS provider is closed")
        if self._client is not None and self._keys() is None:
            return self._client
        async with self._client_lock:
            keys = self._keys()
            if keys is not None:
                # Rotated: calls from now on use a new client; in-flight ones finish on the old.
                self._access_key_id, self._secret_access_key, self._session_token = keys
                if self._client_cm is not None:
                    self._retired.append(self._client_cm)
                self._client = self._client_cm = None
            if self._client is None:
                try:
                    self._client = await self._open_client()
                except QueueError:
                    raise
                except Exception as exc:
                    raise map_error(exc, operation="connect") from None
        return self._client

    async def _open_client(self) -> Any:
        from aiobotocore.session import AioSession

        session = _SESSIONS.get(self._profile)
        if session is None:
            session = AioSession(profile=self._profile) if self._profile else AioSession()
            _SESSIONS[self._profile] = session
        config = self._config()
        # The session's default config decides which async primitives its credential
        # providers use: set it so refreshable credentials use anyio locks, not asyncio's.
        session.set_default_client_config(config)
        endpoint = self._endpoint()
        cm = session.create_client(
            "sqs",
            region_name=self._region,
            endpoint_url=endpoint,
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            aws_session_token=self._session_token,
            config=config,
        )
        client = await cm.__aenter__()
        client.meta.events.register("before-call.sqs", self._count_call)
        self._client_cm = cm
        return client

    def _endpoint(self) -> str | None:
        return (
            self._endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_SQS")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def _count_call(self, model: Any = None, **_: Any) -> None:
        self.api_calls[getattr(model, "name", "unknown")] += 1

    async def _call(self, operation: str, queue: str | None, **kwargs: Any) -> dict[str, Any]:
        """One SQS API call with errors mapped. Cancellation propagates untouched."""
        client = await self._get_client()
        try:
            response: dict[str, Any] = await getattr(client, operation)(**kwargs)
        except QueueError:
            raise
        except Exception as exc:
            error = map_error(exc, operation=operation, queue=queue)
        else:
            return response
        if isinstance(error, AuthenticationFailed) and self._credentials is not None:
            # Rotated keys? Re-read the secrets; when they changed, the next call uses them.
            await self._credentials.refresh_after_failure()
            if self._keys() is not None:
                error.transient = True
        raise error from None

    # -- queue metadata ----------------------------------------------------------------------
    async def _queue_meta(self, queue: str, *, refresh: bool = False) -> _QueueMeta:
        name = _name_of(queue)
        self.validate_queue_name(name)
        cached = self._meta.get(name)
        if cached is not None and not refresh:
            return cached
        if "://" in queue:
            url = queue
        elif cached is not None:
            url = cached.url
        else:
            url = str((await self._call("get_queue_url", name, QueueName=name))["QueueUrl"])
        attributes: dict[str, str] = (
            await self._call("get_queue_attributes", name, QueueUrl=url, AttributeNames=["All"])
        ).get("Attributes", {})
        redrive_target: str | None = None
        max_receive_count: int | None = None
        policy = attributes.get("RedrivePolicy")
        if policy:
            import json

            try:
                parsed = json.loads(policy)
                redrive_target = str(parsed["deadLetterTargetArn"]).rsplit(":", 1)[-1]
                max_receive_count = int(parsed["maxReceiveCount"])
            except (ValueError, KeyError, TypeError):
                log.warning("queue %s has a RedrivePolicy we cannot read", name)
        meta = _QueueMeta(
            name=name,
            url=url,
            fifo=attributes.get("FifoQueue", "false").lower() == "true" or name.endswith(".fifo"),
            content_dedup=attributes.get("ContentBasedDeduplication", "false").lower() == "true",
            visibility=int(attributes.get("VisibilityTimeout", "30") or 30),
            max_receive_count=max_receive_count,
            redrive_target=redrive_target,
            attributes=attributes,
        )
        self._meta[name] = meta
        state = self._states.get(name)
        if state is not None:
            state.meta = meta
        return meta

    def _lock_seconds(self, meta: _QueueMeta) -> int:
        return self._visibility if self._visibility is not None else max(meta.visibility, 1)

    def _dlq_name(self, meta: _QueueMeta) -> str:
        name = self._dead_letter_queue or meta.redrive_target
        if not name:
            raise ConfigurationError(
                f"queue {meta.name!r} has no dead-letter queue: set QUEUE_DLQ_NAME (dlq_name) or give the"
                " queue a RedrivePolicy"
            )
        return name

    async def _dlq_meta(self, meta: _QueueMeta) -> _QueueMeta:
        return await self._queue_meta(self._dlq_name(meta))

    def _state(self, meta: _QueueMeta) -> _QueueState:
        state = self._states.get(meta.name)
        if state is None:
            state = self._states[meta.name] = _QueueState(meta=meta)
        return state

    # -- Provider API ------------------------------------------------------------------------
    def message_size(self, message: Message) -> int:
        """Body (as sent: text, or base64) plus every attribute's name, type and value."""
        return codec.encoded_size(message)

    async def describe(self, queue: str) -> QueueInfo:
        meta = await self._queue_meta(queue, refresh=True)
        dlq = self._dead_letter_queue or meta.redrive_target
        if dlq is None:
            log.warning(
                "queue %s has no dead-letter queue: dead-lettering will fail until QUEUE_DLQ_NAME or a"
                " RedrivePolicy is set",
                meta.name,
            )
        return QueueInfo(
            name=meta.name,
            requires_session=meta.fifo,
            lock_duration=float(self._lock_seconds(meta)),
            max_delivery_count=meta.max_receive_count,
            dead_letter_queue=_name_of(dlq) if dlq else None,
        )

    async def queue_stats(self, queue: str) -> QueueStats:
        """``GetQueueAttributes``: ``ApproximateNumberOfMessages`` (``active``),
        ``...NotVisible`` (``in_flight``), ``...Delayed`` (``scheduled``), and visible plus
        not-visible of the dead-letter queue (``QUEUE_DLQ_NAME`` or the redrive target; None
        without one, or when it cannot be read: one WARNING, the other figures still come).
        Approximate, as SQS says. ``oldest_message_age`` is None: SQS tells it only through
        CloudWatch (``ApproximateAgeOfOldestMessage``), not through its API."""
        meta = await self._queue_meta(queue)
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        attributes = (
            await self._call("get_queue_attributes", meta.name, QueueUrl=meta.url, AttributeNames=names)
        )["Attributes"]
        dead: int | None = None
        dlq_name = self._dead_letter_queue or meta.redrive_target
        if dlq_name:
            try:
                dlq = await self._queue_meta(dlq_name)
                dlq_attributes = (
                    await self._call(
                        "get_queue_attributes", dlq.name, QueueUrl=dlq.url, AttributeNames=names[:2]
                    )
                )["Attributes"]
                dead = sum(int(dlq_attributes.get(n, 0)) for n in names[:2])
            except QueueError as exc:
                # The queue's own depth (the depth alert's input) is still worth reporting.
                if exc.transient or dlq_name in self._stats_dlq_warned:
                    log.debug("dead-letter depth of %s unavailable: %s", meta.name, exc.error_type)
                else:
                    self._stats_dlq_warned.add(dlq_name)
                    log.warning(
                        "no dead-letter depth for %s: %s (queue_dead_letter_depth stays absent)",
                        meta.name,
                        exc,
                    )
        return QueueStats(
            queue=meta.name,
            active=int(attributes.get(names[0], 0)),
            in_flight=int(attributes.get(names[1], 0)),
            scheduled=int(attributes.get(names[2], 0)),
            dead_letter=dead,
        )

    def _entry(self, message: Message, index: int, *, fifo: bool) -> tuple[dict[str, Any], int]:
        if fifo:
            if message.session_id is None:
                raise ValidationError(
                    f"message {message.message_id!r} has no session id: FIFO queues need one (MessageGroupId)"
                )
            if message.scheduled_enqueue_time is not None:
                raise ValidationError(
                    "SQS FIFO queues have no per-message delay: scheduled_enqueue_time is not supported there"
                )
        if message.session_id is not None:
            self.validate_session_id(message.session_id)
        body, attributes = codec.encode(message)
        size = codec.check_size(body, attributes)
        entry: dict[str, Any] = {"Id": str(index), "MessageBody": body, "MessageAttributes": attributes}
        if fifo:
            entry["MessageGroupId"] = message.session_id
        if message.scheduled_enqueue_time is not None:
            delay = (message.scheduled_enqueue_time - datetime.now(UTC)).total_seconds()
            if delay > codec.MAX_DELAY_SECONDS:
                raise ValidationError(
                    f"scheduled_enqueue_time is {delay:.0f} s ahead; SQS delays a message at most"
                    f" {codec.MAX_DELAY_SECONDS} s"
                )
            if delay > 0:
                entry["DelaySeconds"] = math.ceil(delay)
        return entry, size

    async def send(self, queue: str, messages: Sequence[Message]) -> None:
        """Send up to 10 messages in one ``SendMessageBatch``. Everything is validated first.

        SQS batches are not atomic: if some entries fail, the others were sent and the error
        raised names how many failed (transient if SQS says it was not the sender's fault).
        """
        name = _name_of(queue)
        self.validate_queue_name(name)
        if not messages:
            return
        if len(messages) > BATCH:
            raise ValidationError(
                f"{len(messages)} messages in one send; SQS takes at most {BATCH} per batch"
            )
        fifo = name.endswith(".fifo")
        entries: list[dict[str, Any]] = []
        total = 0
        for index, message in enumerate(messages):
            entry, size = self._entry(message, index, fifo=fifo)
            entries.append(entry)
            total += size
        if total > codec.MAX_MESSAGE_SIZE:
            raise MessageTooLarge(total, codec.MAX_MESSAGE_SIZE, what="SQS batch")
        meta = await self._queue_meta(queue)
        if meta.fifo and not meta.content_dedup:
            for entry, message in zip(entries, messages, strict=True):
                entry["MessageDeduplicationId"] = message.message_id
        response = await self._call("send_message_batch", meta.name, QueueUrl=meta.url, Entries=entries)
        failed: list[dict[str, Any]] = response.get("Failed") or []
        if failed:
            first = map_entry_failure(failed[0], where=f"SQS send to {meta.name!r}")
            raise (
                type(first)(
                    f"{len(failed)} of {len(entries)} messages were not sent: {first.message}",
                    transient=first.transient,
                )
                if not isinstance(first, MessageTooLarge)
                else first
            )

    async def accept_session(self, queue: str, *, timeout: float) -> Receiver | None:
        """The next message group with messages that no receiver of this provider holds.

        Polls in the calling task (or waits for the poll another task runs). Returns None
        after ``timeout`` seconds. Raises `NotSupported` on a standard queue.
        """
        meta = await self._queue_meta(queue)
        if not meta.fifo:
            raise NotSupported(
                f"queue {meta.name!r} is a standard SQS queue: it has no sessions (use a .fifo queue,"
                " or open_receiver for concurrent processing)"
            )
        state = self._state(meta)
        deadline = trio.current_time() + max(timeout, 0.0)
        polled = False
        while True:
            await self._tidy_pending(state)
            receiver = self._claim(state)
            if receiver is not None:
                return receiver
            remaining = deadline - trio.current_time()
            if polled and remaining <= 0:
                return None
            await self._poll(state, remaining)
            polled = True

    async def open_receiver(self, queue: str, *, dead_letter: bool = False) -> Receiver:
        meta = await self._queue_meta(queue)
        if dead_letter:
            dlq = await self._dlq_meta(meta)
            return SqsQueueReceiver(self, dlq, source=meta, dead_letter=True)
        if meta.fifo:
            raise NotSupported(
                f"queue {meta.name!r} is a FIFO queue: its messages are read by session (accept_session)"
            )
        return SqsQueueReceiver(self, meta, source=meta, dead_letter=False)

    async def peek_dead_letters(self, queue: str, max_messages: int = 32) -> list[ReceivedMessage]:
        """Receive from the DLQ with a short visibility, then make them visible again at once.

        Each peek counts as a receive on the DLQ (its ApproximateReceiveCount grows). On a FIFO
        DLQ a group's messages past the first batch stay hidden until the peek ends.
        """
        meta = await self._queue_meta(queue)
        dlq = await self._dlq_meta(meta)
        seen: dict[str, tuple[dict[str, Any], ReceivedMessage]] = {}
        receipts: list[str] = []
        try:
            while len(seen) < max_messages:
                response = await self._call(
                    "receive_message",
                    dlq.name,
                    QueueUrl=dlq.url,
                    MaxNumberOfMessages=min(BATCH, max_messages - len(seen)),
                    WaitTimeSeconds=0,
                    VisibilityTimeout=10,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
                batch: list[dict[str, Any]] = response.get("Messages") or []
                if not batch:
                    break
                fresh = 0
                for raw in batch:
                    receipts.append(str(raw["ReceiptHandle"]))
                    key = str(raw.get("MessageId"))
                    if key not in seen:
                        fresh += 1
                        received, _ = codec.decode(raw, locked_until=None, receipt="")
                        seen[key] = (raw, received)
                if not fresh:
                    break
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout):
                await self._change_visibility_raw(dlq, receipts, 0)

        def order(item: tuple[dict[str, Any], ReceivedMessage]) -> tuple[int, int]:
            system = item[0].get("Attributes") or {}
            return int(system.get("SentTimestamp", 0)), int(system.get("SequenceNumber", 0) or 0)

        return [received for _, received in sorted(seen.values(), key=order)][:max_messages]

    async def aclose(self) -> None:
        """Flush pending deletes, release unclaimed sessions, close the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout):
            for state in list(self._states.values()):
                with contextlib.suppress(QueueError):
                    while state.deletes:  # a forced flush sends what was queued when it began
                        await self._flush(state, force=True)
                records = [r for pending in state.pending.values() for r in pending.records]
                state.pending.clear()
                with contextlib.suppress(QueueError):
                    await self._release(state.meta, records)
        client_cm, self._client_cm, self._client = self._client_cm, None, None
        retired, self._retired = self._retired, []
        for cm in [client_cm, *retired]:
            if cm is None:
                continue
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._close_timeout),
                contextlib.suppress(Exception),
            ):
                await cm.__aexit__(None, None, None)

    # -- shared receiving machinery ----------------------------------------------------------
    async def _receive_raw(
        self, meta: _QueueMeta, *, max_messages: int, wait: int, attempt_id: str | None = None
    ) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "QueueUrl": meta.url,
            "MaxNumberOfMessages": max(1, min(BATCH, max_messages)),
            "WaitTimeSeconds": max(0, min(MAX_WAIT, wait)),
            "VisibilityTimeout": self._lock_seconds(meta),
            "AttributeNames": ["All"],
            "MessageAttributeNames": ["All"],
        }
        if attempt_id is not None:
            kwargs["ReceiveRequestAttemptId"] = attempt_id
        response = await self._call("receive_message", meta.name, **kwargs)
        messages: list[dict[str, Any]] = response.get("Messages") or []
        return messages

    def _records(
        self, meta: _QueueMeta, raws: list[dict[str, Any]], started: float
    ) -> tuple[list[_Record], list[_Record]]:
        """Decode a receive result: (live records, expired ones to delete)."""
        deadline = started + self._lock_seconds(meta)
        now_epoch = time.time()
        live: list[_Record] = []
        expired: list[_Record] = []
        for raw in raws:
            received, expires = codec.decode(raw, locked_until=deadline)
            record = _Record(
                raw=raw,
                message=received,
                receipt=received.receipt,
                group=str((raw.get("Attributes") or {}).get("MessageGroupId") or "") or None,
                deadline=deadline,
                received_at=started,
            )
            (expired if expires is not None and expires <= now_epoch else live).append(record)
        return live, expired

    async def _anchored(
        self, meta: _QueueMeta, raws: list[dict[str, Any]], requested: float
    ) -> tuple[list[_Record], list[_Record]]:
        """`_records` with deadlines SQS cannot have passed before ours: timed from
        ``requested`` (when the receive was sent), or, when the answer came late (see
        `EXTEND_AFTER`), from a visibility change sent at once. Messages that change finds no
        longer in flight lapsed on the way: they are dropped (SQS delivers them again), and so
        are the later messages of their group in the batch (made visible again at once), since
        the group restarts from the lapsed one."""
        vt = self._lock_seconds(meta)
        if not raws or trio.current_time() - requested <= min(EXTEND_AFTER, vt / 4):
            return self._records(meta, raws, requested)
        live, expired = self._records(meta, raws, requested)
        if not live:
            return live, expired
        extended = trio.current_time()
        try:
            failed = await self._change_visibility(meta, live, [vt] * len(live))
        except QueueError as exc:
            # Keep the deadlines timed from the request: safe, if short (lapsed ones are dropped
            # by the caller's next look).
            log.info("could not extend the visibility of a late receive on %s: %s", meta.name, exc)
            now = trio.current_time()
            return [r for r in live if r.deadline > now], expired
        kept: list[_Record] = []
        behind: list[_Record] = []  # extended, but after a lapsed message of their group
        broken: set[str | None] = set()  # groups with a lapsed message in this batch
        for index, record in enumerate(live):
            if index in failed or record.group in broken:
                # SQS times each message on its own, so k can lapse a moment before k+1: the
                # group restarts from k, and nothing after it may be handed out before it.
                record.state = _State.DONE
                broken.add(record.group)
                if index not in failed:
                    behind.append(record)
                continue
            record.deadline = extended + vt
            record.received_at = requested
            record.message.locked_until = record.deadline
            kept.append(record)
        if behind:
            with contextlib.suppress(QueueError):  # else they reappear when the extension ends
                await self._change_visibility(meta, behind, [0] * len(behind))
        if failed:
            log.info(
                "%d messages of a late receive on %s lapsed on the way: SQS will deliver them again",
                len(failed),
                meta.name,
            )
        return kept, expired

    async def _poll(self, state: _QueueState, remaining: float) -> None:
        """Run one demultiplexing receive for ``state``'s queue, or wait for the running one.

        Returns after the poll (whoever ran it) finished, or after ``remaining`` seconds.
        """
        if state.polling:
            with trio.move_on_after(max(remaining, 0.0)):
                await state.poll_done.wait()
            return
        state.polling = True
        state.poll_done = trio.Event()
        try:
            if len(state.pending) >= self._max_pending:
                await self._hold_back(state, remaining)
                return
            await self._await_settled(state)
            # Held groups get no more messages from SQS while any of theirs is in flight: the
            # deletes go first, and the receive after them, or (overlapping) right behind them.
            if not self.overlap_deletes or state.pending:
                # (With unclaimed sessions waiting, the worker is taking no new group: a receive
                # that SQS answers before the deletes land brings only other groups, which
                # wait unclaimed too, and none of the held groups' next messages.)
                await self._flush_before_receive(state)
                await self._await_deletes(state)
                await self._receive_and_dispatch(state, remaining)
            elif not state.deletes:
                await self._receive_and_dispatch(state, remaining)
            else:
                failure: QueueError | None = None
                async with trio.open_nursery() as deleting:
                    deleting.start_soon(self._flush_before_receive, state)
                    await trio.lowlevel.checkpoint()  # (it sends first)
                    try:
                        await self._receive_and_dispatch(state, remaining)
                    except QueueError as exc:
                        failure = exc  # raised as itself once the deletes have their answer
                if failure is not None:
                    raise failure
        finally:
            state.polling = False
            state.poll_done.set()

    async def _hold_back(self, state: _QueueState, remaining: float) -> None:
        """The poll while ``max_pending_sessions`` groups wait unclaimed: no receive.

        A receive would bring groups this worker cannot take now; released, they would come
        straight back with the next receive, each receive counting toward their
        ``maxReceiveCount`` (SQS's redrive then moves them to the dead-letter queue unhandled).
        So it sends the queued deletes, extends the waiting groups' visibility when due, and
        waits until one of them is claimed or released, the next extension is due, or
        ``remaining`` seconds pass. Sessions get nothing new meanwhile: those with nothing left
        are asked to end (`SqsSessionReceiver.receive`), and their slots take waiting groups.
        """
        await self._flush_before_receive(state)
        await self._tidy_pending(state)
        if len(state.pending) < self._max_pending:
            return  # some lapsed or were released: the next poll receives
        state.room = room = trio.Event()
        until_due = min(self._pending_due(p, state.meta) for p in state.pending.values())
        # (At least a moment: an extension that just failed is still due, and is not retried
        # in a loop.)
        wait = min(max(remaining, 0.0), max(HOLD_BACK_MIN_WAIT, until_due - trio.current_time()))
        with trio.move_on_after(wait):
            await room.wait()

    async def _flush_before_receive(self, state: _QueueState) -> None:
        try:
            await self._flush(state, force=True)
        except QueueError as exc:
            log.warning("deleting completed messages of %s failed before a receive: %s", state.meta.name, exc)

    async def _receive_and_dispatch(self, state: _QueueState, remaining: float) -> None:
        """The receive of `_poll`, and the hand-out of what it got."""
        vt = self._lock_seconds(state.meta)
        if state.attempt_id is None or trio.current_time() - state.attempt_started > vt / 2:
            # A retried attempt returns the original messages with their original
            # visibility clock: reuse it only while that clock has time left.
            state.attempt_id = uuid.uuid4().hex
            state.attempt_started = trio.current_time()
            reused = False
        else:
            reused = True
        wait = await self._poll_wait(state, remaining)
        # SQS starts the visibility clock when it picks the messages, never before this
        # (a reused attempt returns the messages with their original clock).
        requested = state.attempt_started if reused else trio.current_time()
        try:
            raws = await self._receive_raw(
                state.meta,
                max_messages=BATCH,
                wait=wait,
                attempt_id=state.attempt_id if state.meta.fifo else None,
            )
        except QueueError as exc:
            # Reused only after a network failure, where SQS may have received for us.
            if not isinstance(exc, (ConnectionFailed, Timeout)):
                state.attempt_id = None
            raise
        except trio.Cancelled:
            # Cancelled by our caller's deadline, not a failure: the next poll starts afresh
            # (a reused id could hand back an empty result for 5 minutes).
            state.attempt_id = None
            raise
        state.attempt_id = None
        if not raws and wait == 0 and remaining > 0:
            # SQS waits in whole seconds: rather than spin on short polls for the
            # fraction left, let the caller's time run out here.
            await trio.sleep(min(remaining, 1.0))
        live, expired = await self._anchored(state.meta, raws, requested)
        for record in expired:
            record.state = _State.DELETING
            state.deletes.append(record)
        await self._dispatch(state, live)

    async def _await_settled(self, state: _QueueState) -> None:
        """Wait up to `SETTLE_WINDOW` while messages this queue's sessions received are still
        unsettled (buffered or being handled, or in a group no session has claimed yet; woken
        at each completion)."""

        def unsettled() -> bool:
            # Unclaimed groups count: right after a receive most groups are not accepted yet,
            # and a poll that ignored them flushed the first completion alone.
            return bool(state.pending) or any(
                record.state is _State.OUT or record.state is _State.BUFFERED
                for receiver in state.receivers.values()
                for record in receiver._held.values()
            )

        if not unsettled():
            return
        with trio.move_on_after(SETTLE_WINDOW):
            while unsettled():
                state.settled = trio.Event()
                await state.settled.wait()

    async def _await_deletes(self, state: _QueueState) -> None:
        """Wait for the DeleteMessageBatch calls other tasks have in flight on this queue.

        SQS withholds a group while any of its messages is in flight, so a receive that
        reaches SQS before those deletes returns without their groups: an empty or partial
        batch, and one more receive to fetch them (moto even withholds them for the whole long
        poll). The wait is one API call at most, bounded by the client's timeouts; cancellable.
        """
        while state.deleting:
            await state.deletes_landed.wait()

    async def _poll_wait(self, state: _QueueState, remaining: float) -> int:
        """The long-poll wait (whole seconds) for the next receive. With unclaimed sessions
        waiting, it ends in time to extend their visibility; if that is due within a second,
        wait for it and extend them first (a short poll in a loop would spin)."""
        await self._tidy_pending(state)
        wait = min(self._wait_time, int(max(remaining, 0.0)))
        if not state.pending or wait == 0:
            return wait
        if any(group in state.ending for group in state.pending):
            wait = min(wait, 1)  # look again soon: it is claimable once the old holder closed
        until_due = (
            min(self._pending_due(p, state.meta) for p in state.pending.values()) - trio.current_time()
        )
        if until_due < 1:
            await trio.sleep(max(0.0, min(until_due, remaining)))
            await self._tidy_pending(state)
            if not state.pending:
                return max(0, min(wait, int(remaining)))
            until_due = (
                min(self._pending_due(p, state.meta) for p in state.pending.values()) - trio.current_time()
            )
        return max(0, min(wait, int(until_due)))

    async def _dispatch(self, state: _QueueState, records: list[_Record]) -> None:
        overflow: list[_Record] = []
        now = trio.current_time()  # nothing below waits: one clock read for the batch
        for record in records:
            group = record.group or ""
            receiver = state.receivers.get(group)
            if receiver is not None and receiver._lapsed(now):
                # SQS redelivered the group because the holder let its visibility lapse: the
                # holder has lost it, and the group starts over as a new session.
                receiver._mark_lost()
                receiver = None
            if receiver is not None:
                if not receiver._accept(record):
                    overflow.append(record)
                continue
            pending = state.pending.get(group)
            if pending is not None and min(r.deadline for r in pending.records) <= now:
                # Its visibility lapsed and SQS redelivered the group: the new receipts replace it.
                pending.records = [record]
                pending.created = now
            elif pending is not None:
                pending.records.append(record)
            else:
                # Kept even past max_pending_sessions (by at most one batch: the next poll
                # holds back): released, it would be received again at once, and each receive
                # counts toward its maxReceiveCount.
                state.pending[group] = _Pending(records=[record], created=now)
        if overflow:
            with contextlib.suppress(QueueError):
                await self._release(state.meta, overflow)

    async def _tidy_pending(self, state: _QueueState) -> None:
        """Keep unclaimed sessions invisible while they wait (renewing at half-life, so a
        waiting group is not redelivered and its receive count does not grow), drop the ones
        that lapsed anyway, and release (visibility 0) those unclaimed for longer than
        ``max_pending_age`` so other workers may take them."""
        now = trio.current_time()
        stale: list[_Record] = []
        renew: list[_Record] = []
        left = len(state.pending)
        for group, pending in list(state.pending.items()):
            if min(r.deadline for r in pending.records) <= now:
                del state.pending[group]  # lapsed: already visible to everyone again
            elif now - pending.created >= self._max_pending_age:
                del state.pending[group]
                stale.extend(pending.records)
            elif now >= self._pending_due(pending, state.meta):
                renew.extend(pending.records)
        if len(state.pending) < left:
            state.room.set()
        if stale:
            log.debug("releasing %d unclaimed messages of %s", len(stale), state.meta.name)
            with contextlib.suppress(QueueError):
                await self._release(state.meta, stale)
        if renew:
            vt = self._lock_seconds(state.meta)
            started = trio.current_time()
            try:
                failed = await self._change_visibility(state.meta, renew, [vt] * len(renew))
            except QueueError as exc:
                log.info("could not extend unclaimed sessions of %s: %s", state.meta.name, exc)
                return
            for index, record in enumerate(renew):
                if index in failed:
                    record.deadline = started  # treat as lapsed: dropped at the next tidy
                else:
                    record.deadline = started + vt
                    record.message.locked_until = record.deadline

    def _crowded(self, state: _QueueState) -> bool:
        """Whether the poll is held back (``max_pending_sessions`` groups wait unclaimed) with
        a waiting group that a free session slot could take now."""
        return len(state.pending) >= self._max_pending and any(g not in state.ending for g in state.pending)

    def _pending_due(self, pending: _Pending, meta: _QueueMeta) -> float:
        """When an unclaimed session's visibility should be extended (at half-life)."""
        return min(r.deadline for r in pending.records) - self._lock_seconds(meta) / 2

    def _claim(self, state: _QueueState) -> SqsSessionReceiver | None:
        now = trio.current_time()
        for group in list(state.pending):
            if group in state.ending:
                continue  # its old holder is still ending: one live receiver per group
            pending = state.pending.pop(group)
            if min(r.deadline for r in pending.records) <= now:
                state.room.set()
                continue  # lapsed: SQS may already have given it to someone else
            state.room.set()
            receiver = SqsSessionReceiver(self, state, group)
            for record in pending.records:
                receiver._accept(record)
            state.receivers[group] = receiver
            return receiver
        return None

    # -- settlement machinery ----------------------------------------------------------------
    def _flush_due(self, state: _QueueState) -> bool | None:
        """Whether queued deletes are due (a full batch, or one nearing its deadline): None
        if not, else whether the flush must send them all (``force``)."""
        if not state.deletes:
            return None
        now = trio.current_time()
        soon = min(r.deadline for r in state.deletes) - now < self._lock_seconds(state.meta) / 3
        return soon if len(state.deletes) >= BATCH or soon else None

    async def _flush_due_deletes(self, state: _QueueState, force: bool) -> None:
        try:
            await self._flush(state, force=force)
        except QueueError as exc:
            # The deletes stay queued and are retried by the next flush.
            log.warning("deleting completed messages of %s failed (will retry): %s", state.meta.name, exc)

    async def _flush(self, state: _QueueState, *, force: bool) -> None:
        """Send queued deletes in batches of 10 (all of them if ``force``, else full batches).

        On a failed call the batch goes back to the queue and the error is raised; entries SQS
        refuses one by one are logged and counted (``delete_failures``), not retried.
        """
        # A forced flush sends what is queued now; deletes queued while its calls are in
        # flight wait for the next flush (a lone straggler would cost a call of its own).
        budget = len(state.deletes) if force else 0
        while state.deletes and (budget > 0 or len(state.deletes) >= BATCH):
            budget -= min(BATCH, len(state.deletes))
            batch = state.deletes[:BATCH]
            del state.deletes[:BATCH]
            entries = [{"Id": str(i), "ReceiptHandle": r.receipt} for i, r in enumerate(batch)]
            now = trio.current_time()
            late = [r for r in batch if r.deadline <= now]
            if late:
                log.warning(
                    "%d completed messages of %s are deleted after their visibility deadline: SQS may"
                    " redeliver them",
                    len(late),
                    state.meta.name,
                )
            state.deleting += 1
            try:
                response = await self._call(
                    "delete_message_batch", state.meta.name, QueueUrl=state.meta.url, Entries=entries
                )
            except BaseException:
                state.deletes[0:0] = batch
                raise
            finally:
                state.deleting -= 1
                if not state.deleting:
                    # A fresh event for the next wait; whoever waits on this one wakes now.
                    landed, state.deletes_landed = state.deletes_landed, trio.Event()
                    landed.set()
            refused: list[_Record] = []
            for entry in response.get("Failed") or []:
                record = batch[int(entry["Id"])]
                self.delete_failures += 1
                refused.append(record)
                log.warning(
                    "SQS refused to delete message %s of %s (%s): it will be redelivered",
                    record.message.message_id,
                    state.meta.name,
                    entry.get("Code"),
                )
            for record in (*late, *refused):
                # Its group may be redelivered from this message: whoever holds it has lost it.
                if isinstance(record.owner, SqsSessionReceiver):
                    record.owner._mark_lost()
            for record in batch:
                record.state = _State.DONE
                if record.owner is not None:
                    record.owner._forget(record)

    async def _change_visibility(
        self, meta: _QueueMeta, records: Sequence[_Record], seconds: Sequence[int]
    ) -> dict[int, dict[str, Any]]:
        """ChangeMessageVisibilityBatch in chunks of 10; returns the failed entries by index."""
        failed: dict[int, dict[str, Any]] = {}
        for start in range(0, len(records), BATCH):
            chunk = records[start : start + BATCH]
            entries = [
                {"Id": str(start + i), "ReceiptHandle": r.receipt, "VisibilityTimeout": seconds[start + i]}
                for i, r in enumerate(chunk)
            ]
            response = await self._call(
                "change_message_visibility_batch", meta.name, QueueUrl=meta.url, Entries=entries
            )
            for entry in response.get("Failed") or []:
                failed[int(entry["Id"])] = entry
        return failed

    async def _change_visibility_raw(self, meta: _QueueMeta, receipts: list[str], seconds: int) -> None:
        for start in range(0, len(receipts), BATCH):
            entries = [
                {"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": seconds}
                for i, receipt in enumerate(receipts[start : start + BATCH])
            ]
            with contextlib.suppress(QueueError):
                await self._call(
                    "change_message_visibility_batch", meta.name, QueueUrl=meta.url, Entries=entries
                )

    async def _release(self, meta: _QueueMeta, records: Sequence[_Record], first_delay: int = 0) -> None:
        """Make ``records`` visible again (the first one after ``first_delay`` seconds)."""
        now = trio.current_time()
        live = [r for r in records if r.deadline > now]
        for record in records:
            record.state = _State.DONE
        if not live:
            return
        seconds = [first_delay if i == 0 and live[0] is records[0] else 0 for i in range(len(live))]
        failed = await self._change_visibility(meta, live, seconds)
        for index, entry in failed.items():
            log.info(
                "could not release message %s of %s (%s); it reappears when its visibility ends",
                live[index].message.message_id,
                meta.name,
                entry.get("Code"),
            )

    async def _dead_letter(
        self, meta: _QueueMeta, record: _Record, reason: str, description: str | None
    ) -> None:
        """Send the DLQ copy, then delete the original. If the send fails, nothing is deleted."""
        dlq = await self._dlq_meta(meta)
        body, attributes = codec.dead_letter_attributes(
            record.raw, reason=reason, description=description, source=meta.name
        )
        kwargs: dict[str, Any] = {"QueueUrl": dlq.url, "MessageBody": body, "MessageAttributes": attributes}
        if dlq.fifo:
            kwargs["MessageGroupId"] = record.group or record.message.session_id or "dead-letter"
            if not dlq.content_dedup:
                # Same id on a retried dead-letter: SQS's 5-minute dedup keeps one copy.
                kwargs["MessageDeduplicationId"] = str(
                    record.raw.get("MessageId") or record.message.message_id
                )
        await self._call("send_message", dlq.name, **kwargs)
        await self._call("delete_message", meta.name, QueueUrl=meta.url, ReceiptHandle=record.receipt)


class _ReceiverBase(Receiver):
    """What session and queue receivers share: the records they hold and their settlement."""

    def __init__(self, provider: SqsProvider, meta: _QueueMeta) -> None:
        self._provider = provider
        self._meta = meta
        self.queue = meta.name
        self._held: dict[str, _Record] = {}  # receipt -> record, in arrival order
        # Receipts recently released or settled, so a repeated abandon is a no-op (bounded).
        self._released: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._closed = False

    def _forget(self, record: _Record) -> None:
        self._held.pop(record.receipt, None)

    def _remember_released(self, records: Iterable[_Record]) -> None:
        for record in records:
            self._held.pop(record.receipt, None)
            self._released[record.receipt] = None
        while len(self._released) > 1000:
            self._released.popitem(last=False)

    def _lost_error(self, what: str) -> QueueError:
        return MessageLockLost(what)

    def _record_for(self, message: ReceivedMessage, operation: str) -> _Record:
        record = self._held.get(message.receipt)
        if record is None or record.state is not _State.OUT:
            raise InvalidReceipt(
                f"cannot {operation} message {message.message_id!r}: it was already settled or handed back"
            )
        if record.deadline <= trio.current_time():
            raise self._lost_error(
                f"cannot {operation} message {message.message_id!r}: its visibility timeout passed"
                " (SQS will redeliver it)"
            )
        return record

    async def _queue_delete(self, record: _Record, state: _QueueState) -> None:
        record.state = _State.DELETING
        state.deletes.append(record)
        state.settled.set()  # a poll may be waiting for this batch to settle
        force = self._provider._flush_due(state)
        if force is not None:  # (checked here: no coroutine per completion)
            await self._provider._flush_due_deletes(state, force)

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        record = self._record_for(message, "dead-letter")
        await self._provider._dead_letter(self._meta, record, reason, description)
        record.state = _State.DONE
        self._remember_released([record])

    async def _settle_deletes(self, state: _QueueState) -> None:
        """Flush the queue's pending deletes, and return once none of this receiver's completed
        messages is pending or in another task's delete call (if that call fails or is
        cancelled they come back to the queue, and are sent here). Raises a failed flush's
        `QueueError`; each round sends or waits for one call, so it ends."""
        provider = self._provider
        await provider._flush(state, force=True)
        while any(r.state is _State.DELETING for r in self._held.values()):
            await provider._await_deletes(state)
            await provider._flush(state, force=True)

    async def _close_held(self, state: _QueueState) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self._provider._close_timeout):
            try:
                await self._settle_deletes(state)
            except QueueError as exc:
                log.warning("deleting completed messages of %s on close failed: %s", self.queue, exc)
            held = [r for r in self._held.values() if r.state in (_State.BUFFERED, _State.OUT)]
            self._remember_released(held)
            try:
                await self._provider._release(self._meta, held)
            except QueueError as exc:
                log.info(
                    "releasing held messages of %s on close failed (they reappear later): %s", self.queue, exc
                )


class SqsSessionReceiver(_ReceiverBase):
    """One message group of a FIFO queue, as a session.

    Messages come out in group order. ``locked_until`` is the earliest visibility deadline of
    the messages held (or the last renewal's deadline when none are held).
    """

    def __init__(self, provider: SqsProvider, state: _QueueState, group: str) -> None:
        super().__init__(provider, state.meta)
        self._state = state
        self.session_id = group
        self._buffer: collections.deque[_Record] = collections.deque()
        self._max_buffer = 2 * BATCH
        self._lost = False
        self._idle_deadline = trio.current_time() + provider._lock_seconds(state.meta)
        self._watcher: Callable[[BaseException | None], None] | None = None

    def __repr__(self) -> str:
        return (
            f"SqsSessionReceiver(queue={self.queue!r}, session_id={self.session_id!r}"
            f", held={len(self._held)})"
        )

    def watch_lock(self, callback: Callable[[BaseException | None], None] | None) -> None:
        self._watcher = callback

    def _accept(self, record: _Record) -> bool:
        """Take a record the poll received for this group; False if the buffer is full. Tells
        the watcher when the record's deadline is earlier than the lock's was (a poll that
        started before the last renewal)."""
        if self._closed or len(self._buffer) >= self._max_buffer:
            return False
        watcher = self._watcher
        earlier = watcher is not None and not self._lost and record.deadline < (self.locked_until or math.inf)
        record.owner = self
        record.state = _State.BUFFERED
        self._held[record.receipt] = record
        self._buffer.append(record)
        if earlier and watcher is not None:
            watcher(None)
        return True

    def _active(self) -> list[_Record]:
        return [r for r in self._held.values() if r.state is not _State.DONE]

    def _earliest(self) -> float:
        """The earliest deadline of the records held (not done); ``inf`` when none."""
        # Read on every receive, completion and dispatch: one pass, no list.
        earliest = math.inf
        done = _State.DONE
        for record in self._held.values():
            if record.deadline < earliest and record.state is not done:
                earliest = record.deadline
        return earliest

    @property
    def locked_until(self) -> float | None:
        if self._lost:
            return -math.inf  # no lock left
        earliest = self._earliest()
        return earliest if earliest != math.inf else self._idle_deadline

    def _lost_error(self, what: str) -> QueueError:
        return SessionLockLost(what)

    def _mark_lost(self) -> SessionLockLost:
        """Record that the group's visibility is gone (whoever found out: this receiver's
        session, or another task's delete or poll) and tell the watcher, once."""
        error = SessionLockLost(
            f"session {self.session_id!r} of {self.queue!r}: the visibility of its messages lapsed"
            " (SQS may redeliver them)"
        )
        if not self._lost:
            self._lost = True
            # New messages of the group become a new session, handed out once this one closed.
            group = self.session_id or ""
            if self._state.receivers.get(group) is self:
                del self._state.receivers[group]
                if not self._closed:
                    self._state.ending[group] = self
            if self._watcher is not None:
                self._watcher(error)
        return error

    def _lapsed(self, now: float) -> bool:
        return self._earliest() <= now

    def _check_lock(self, now: float | None = None) -> None:
        """Raise `SessionLockLost` if lost, or if a held message's deadline passed by ``now``
        (default: the current time)."""
        if self._lost:
            raise SessionLockLost(f"session {self.session_id!r} of {self.queue!r} lost its lock")
        if self._earliest() <= (trio.current_time() if now is None else now):
            raise self._mark_lost()

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        """Buffered messages of this group, else poll (shared with the other receivers) until
        the group gets messages or ``timeout`` passes. Raises `SessionLockLost` once lost."""
        if max_messages < 1:
            raise ValidationError("max_messages must be >= 1")
        now = trio.current_time()  # one clock read per turn, for the lock check and the wait
        deadline = now + max(timeout, 0.0)
        polled = False
        while True:
            if self._closed:
                return []
            self._check_lock(now)
            if self._buffer:
                self.release_requested = False
                out: list[ReceivedMessage] = []
                while self._buffer and len(out) < max_messages:
                    record = self._buffer.popleft()
                    record.state = _State.OUT
                    out.append(record.message)
                return out
            remaining = deadline - now
            if polled and remaining <= 0:
                return []
            state = self._state
            if not self.release_requested and self._provider._crowded(state):
                # Groups wait unclaimed and the poll is held back: this session can get nothing
                # new, and its slot would take one of them.
                self.release_requested = True
                return []
            if state.polling:
                # Another task's poll is running: wait for it as `_poll` would, one await
                # level less at each wait and wake-up.
                with trio.CancelScope(deadline=deadline):
                    await state.poll_done.wait()
            else:
                await self._provider._poll(state, remaining)
            polled = True
            now = trio.current_time()

    async def complete(self, message: ReceivedMessage) -> None:
        """Queue the delete after checking the local visibility deadline (see the module doc:
        deletes are batched). Raises `SessionLockLost` if the deadline passed (nothing deleted)
        or if a delete it sent at once was refused or late, `InvalidReceipt` if the message was
        already settled or released."""
        if self._lost:
            raise SessionLockLost(f"session {self.session_id!r} of {self.queue!r} lost its lock")
        try:
            record = self._record_for(message, "complete")
        except SessionLockLost:
            raise self._mark_lost() from None
        await self._queue_delete(record, self._state)
        if self._lost:  # the delete sent just now (or another of ours) was refused or late
            raise SessionLockLost(f"session {self.session_id!r} of {self.queue!r} lost its lock")

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        """Release the message and every later one of the group this receiver holds, so the
        group is redelivered from this message, in order. A no-op for one already released."""
        if message.receipt in self._released:
            return
        record = self._held.get(message.receipt)
        if record is None or record.state is not _State.OUT:
            raise InvalidReceipt(f"cannot abandon message {message.message_id!r}: it was already settled")
        if self._lost:
            raise SessionLockLost(f"session {self.session_id!r} of {self.queue!r} lost its lock")
        order = list(self._held.values())
        later = [r for r in order[order.index(record) + 1 :] if r.state in (_State.BUFFERED, _State.OUT)]
        self._buffer = collections.deque(r for r in self._buffer if r not in later)
        to_release = [record, *later]
        self._remember_released(to_release)
        # Delete what was completed before it first, so the group restarts right at k.
        with contextlib.suppress(QueueError):
            await self._provider._flush(self._state, force=True)
        first_delay = min(math.ceil(delay), MAX_VISIBILITY) if delay and delay > 0 else 0
        await self._provider._release(self._meta, to_release, first_delay)

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        if self._lost:
            raise SessionLockLost(f"session {self.session_id!r} of {self.queue!r} lost its lock")
        try:
            await super().dead_letter(message, reason, description)
        except SessionLockLost:
            raise self._mark_lost() from None

    async def renew_lock(self) -> float:
        """Send the completed messages' deletes (waiting for one another task has in flight),
        then extend every held message (buffered, handed out, awaiting a retried delete) by the
        visibility timeout, within SQS's 12-hour cap. Returns the new earliest deadline. Raises
        `SessionLockLost` if any had lapsed or SQS refuses one; transient errors otherwise."""
        self._check_lock()
        try:
            # Not while a delete of ours is landing: renewing a deleted message fails, which
            # would read as a lost lock.
            await self._settle_deletes(self._state)
        except QueueError as exc:
            if not exc.transient:
                raise
            log.warning("deleting completed messages of %s failed during renewal: %s", self.queue, exc)
        self._check_lock()  # a delete just refused, or the wait outlived a deadline
        vt = self._provider._lock_seconds(self._meta)
        started = trio.current_time()
        records = self._active()
        if not records:
            self._idle_deadline = started + vt
            return self._idle_deadline
        seconds: list[int] = []
        for record in records:
            left = int(MAX_VISIBILITY - (started - record.received_at))
            if left < 1:
                raise self._mark_lost()
            seconds.append(min(vt, left))
        failed = await self._provider._change_visibility(self._meta, records, seconds)
        lost = False
        for index, record in enumerate(records):
            entry = failed.get(index)
            if entry is None:
                record.deadline = started + seconds[index]
                record.message.locked_until = record.deadline
                continue
            code = str(entry.get("Code") or "")
            if code in RECEIPT or code.startswith("InvalidParameter"):
                lost = True
            else:
                error = map_entry_failure(entry, where=f"SQS renew on {self.queue!r}")
                if not lost:
                    raise error
        if lost:
            raise self._mark_lost()
        until = self.locked_until
        assert until is not None
        return until

    async def aclose(self) -> None:
        """Delete what was completed, release everything else held (visibility 0), and free
        the group for other receivers. Idempotent; shielded and bounded when cancelled."""
        if self._closed:
            return
        self._closed = True
        self._watcher = None
        self._buffer.clear()
        group = self.session_id or ""
        if self._state.receivers.get(group) is self:
            del self._state.receivers[group]
        try:
            await self._close_held(self._state)
        finally:
            if self._state.ending.get(group) is self:
                del self._state.ending[group]
                self._state.room.set()  # its group may wait unclaimed: it can be taken now


class SqsQueueReceiver(_ReceiverBase):
    """A receiver for a standard queue (messages handled concurrently) or a dead-letter queue.

    Each message has its own lock (``renew_message_lock``); ``locked_until`` is None.
    """

    session_id = None

    def __init__(
        self, provider: SqsProvider, meta: _QueueMeta, *, source: _QueueMeta, dead_letter: bool
    ) -> None:
        super().__init__(provider, meta)
        self._source = source
        self._is_dead_letter = dead_letter
        self._queue_state = provider._state(meta)

    def __repr__(self) -> str:
        return (
            f"SqsQueueReceiver(queue={self.queue!r}, dead_letter={self._is_dead_letter},"
            f" held={len(self._held)})"
        )

    @property
    def locked_until(self) -> float | None:
        return None

    async def receive(self, max_messages: int = 1, timeout: float = 0.0) -> list[ReceivedMessage]:
        if max_messages < 1:
            raise ValidationError("max_messages must be >= 1")
        if self._closed:
            return []
        state = self._queue_state
        try:
            await self._provider._flush(state, force=True)
        except QueueError as exc:
            log.warning("deleting completed messages of %s failed before a receive: %s", self.queue, exc)
        deadline = trio.current_time() + max(timeout, 0.0)
        while True:
            remaining = deadline - trio.current_time()
            requested = trio.current_time()
            raws = await self._provider._receive_raw(
                self._meta,
                max_messages=max_messages,
                wait=min(self._provider._wait_time, int(max(remaining, 0))),
            )
            live, expired = await self._provider._anchored(self._meta, raws, requested)
            for record in expired:
                record.state = _State.DELETING
                state.deletes.append(record)
            if live:
                for record in live:
                    record.owner = self
                    record.state = _State.OUT
                    self._held[record.receipt] = record
                return [r.message for r in live]
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return []
            if remaining < 1:
                await trio.sleep(remaining)  # SQS waits in whole seconds

    async def complete(self, message: ReceivedMessage) -> None:
        record = self._record_for(message, "complete")
        await self._queue_delete(record, self._queue_state)

    async def abandon(self, message: ReceivedMessage, *, delay: float | None = None) -> None:
        if message.receipt in self._released:
            return
        record = self._record_for(message, "abandon")
        self._remember_released([record])
        first_delay = min(math.ceil(delay), MAX_VISIBILITY) if delay and delay > 0 else 0
        await self._provider._release(self._meta, [record], first_delay)

    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str | None = None
    ) -> None:
        if self._is_dead_letter:
            raise NotSupported("messages in a dead-letter queue cannot be dead-lettered again")
        await super().dead_letter(message, reason, description)

    async def renew_lock(self) -> float:
        raise NotSupported("a queue receiver has no session lock: use renew_message_lock")

    async def renew_message_lock(self, message: ReceivedMessage) -> float:
        record = self._record_for(message, "renew the lock of")
        vt = self._provider._lock_seconds(self._meta)
        started = trio.current_time()
        seconds = min(vt, int(MAX_VISIBILITY - (started - record.received_at)))
        if seconds < 1:
            raise MessageLockLost(f"message {message.message_id!r} reached SQS's 12-hour visibility cap")
        try:
            await self._provider._call(
                "change_message_visibility",
                self.queue,
                QueueUrl=self._meta.url,
                ReceiptHandle=record.receipt,
                VisibilityTimeout=seconds,
            )
        except QueueError as exc:
            if isinstance(exc, InvalidReceipt) or error_code(exc) in RECEIPT:
                raise MessageLockLost(f"message {message.message_id!r}: SQS refused the renewal") from None
            raise
        record.deadline = started + seconds
        record.message.locked_until = record.deadline
        return record.deadline

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close_held(self._queue_state)
