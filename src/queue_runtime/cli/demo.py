"""``queue-runtime demo``: a realistic run on the in-memory broker, in real time.

Many orders (sessions) each send a stream of events; a few are poison (an undecodable body, a
negative amount, a message already delivered too often, one that always fails) and a few are
flaky (fail once or twice, then succeed on an in-place retry). The demo actor records the
order in which it completed each session's events; at the end the demo checks every session
against the send order, counts the dead-letter queue by reason, and exits 0 only when every
session was in order and ``completed + dead-lettered == sent`` (and the DLQ holds exactly the
planned poison, by reason).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Final

import msgspec
import trio

from ..actor import DeadLetter, MessageContext, SessionActor
from ..errors import QueueError
from .common import CommandError

__all__ = ["DemoActor", "DemoEvent", "DemoPlan", "Ledger", "make_plan", "register", "run_demo"]

QUEUE: Final = "demo-orders"
#: Bounds of the demo's size: it holds every planned body in memory (about 200 bytes each).
MAX_SESSIONS: Final = 100_000
MAX_EVENTS: Final = 100_000
MAX_MESSAGES: Final = 2_000_000
#: The runtime's poison limit in the demo (the broker's own is higher, so the runtime decides).
MAX_DELIVERY_COUNT: Final = 3
#: ``handle()`` calls per message in the demo (the first and two in-place retries).
MAX_ATTEMPTS: Final = 3


class DemoEvent(msgspec.Struct):
    """One order event. ``fail_times``: how many ``handle()`` calls raise before one succeeds
    (the flaky downstream); ``seq``: the event's position in its order, for the ordering check."""

    order_id: str
    seq: int
    kind: str
    amount: int = 0
    fail_times: int = 0


class Ledger:
    """What the demo actors saw: per session, the ``seq`` of every completed event in the
    order ``handle()`` returned, and how often two calls of one session overlapped (must be 0)."""

    def __init__(self, latency: float = 0.0, seed: int = 0) -> None:
        self.latency = latency
        self.done: dict[str, list[int]] = {}
        self.running: Counter[str] = Counter()
        self.overlaps = 0
        self.rng = random.Random(seed)


class DemoActor(SessionActor[DemoEvent]):
    """One order: checks amounts, calls a (simulated, flaky) payment service, keeps a total."""

    ledger: ClassVar[Ledger] = Ledger()

    async def on_start(self) -> None:
        self.total = 0

    async def handle(self, event: DemoEvent, ctx: MessageContext) -> None:
        ledger = self.ledger
        ledger.running[self.session_id] += 1
        if ledger.running[self.session_id] > 1:
            ledger.overlaps += 1
        try:
            # A little I/O latency, as a real handler has (trio.sleep(0) at least: a checkpoint).
            await trio.sleep(ledger.rng.uniform(0, ledger.latency) if ledger.latency else 0)
            if event.amount < 0:
                raise DeadLetter("NegativeAmount", "amount must be >= 0")
            if ctx.attempt <= event.fail_times:
                raise ConnectionError("payment service unavailable (simulated)")
            self.total += event.amount
            ledger.done.setdefault(self.session_id, []).append(event.seq)
        finally:
            ledger.running[self.session_id] -= 1


class DemoPlan(msgspec.Struct, kw_only=True):
    """What will be sent, and what must come out.

    ``bodies[session]`` is the session's bodies in send order; ``expected[session]`` the seqs
    that must complete, in order; ``dead_letters`` the planned DLQ count by reason;
    ``redelivered`` the sessions whose first message is delivered ``MAX_DELIVERY_COUNT`` times
    before the workers start (so it arrives as poison)."""

    bodies: dict[str, list[bytes]]
    expected: dict[str, list[int]]
    dead_letters: dict[str, int]
    redelivered: list[str]
    flaky: int
    retries: int
    """In-place retries the runtime must make: each flaky message's failures, and
    ``MAX_ATTEMPTS - 1`` for each message that always fails."""

    @property
    def total(self) -> int:
        return sum(len(bodies) for bodies in self.bodies.values())


def make_plan(sessions: int, events: int, seed: int) -> DemoPlan:
    """A deterministic plan for ``seed``: about 1 in 2,000 messages of each poison kind (at
    least one each) and 2 % flaky."""
    rng = random.Random(seed)
    names = [f"order-{index:04d}" for index in range(1, sessions + 1)]
    total = sessions * events
    per_kind = max(1, total // 2000)
    redelivered = rng.sample(names, min(len(names), max(1, per_kind // 2)))
    # Each poisoned message is poisoned one way only: never a redelivered session's first one.
    slots = [(name, seq) for name in names for seq in range(events) if seq or name not in redelivered]
    chosen = rng.sample(slots, min(len(slots), per_kind * 3))
    negative = set(chosen[:per_kind])
    undecodable = set(chosen[per_kind : 2 * per_kind])
    hopeless = set(chosen[2 * per_kind :])  # fails on every attempt: MaxAttemptsExceeded
    bodies: dict[str, list[bytes]] = {}
    expected: dict[str, list[int]] = {}
    flaky = retries = 0
    dead = Counter[str]()
    for name in names:
        bodies[name] = []
        expected[name] = []
        for seq in range(events):
            slot = (name, seq)
            kind = "created" if seq == 0 else "shipped" if seq == events - 1 else "item_added"
            amount = rng.randint(1, 100) if kind == "item_added" else 0
            fail_times = 0
            if slot in undecodable:
                bodies[name].append(b'{"order_id": "' + name.encode() + b'", "seq": oops')
                dead["DeserializationFailed"] += 1
                continue
            if seq == 0 and name in redelivered:
                dead["MaxDeliveryCountExceeded"] += 1
            elif slot in negative:
                amount = -rng.randint(1, 100)
                dead["NegativeAmount"] += 1
            elif slot in hopeless:
                fail_times = 1_000
                dead["MaxAttemptsExceeded"] += 1
                retries += MAX_ATTEMPTS - 1
            else:
                if rng.random() < 0.02:
                    fail_times = rng.choice((1, 2))
                    flaky += 1
                    retries += fail_times
                expected[name].append(seq)
            event = DemoEvent(order_id=name, seq=seq, kind=kind, amount=amount, fail_times=fail_times)
            bodies[name].append(msgspec.json.encode(event))
    return DemoPlan(
        bodies=bodies,
        expected=expected,
        dead_letters=dict(dead),
        redelivered=redelivered,
        flaky=flaky,
        retries=retries,
    )


class Outcome(msgspec.Struct, kw_only=True):
    """The demo's verdict (also what the summary shows)."""

    sent: int
    completed: int
    dead_lettered: int
    dlq_reasons: dict[str, int]
    planned_reasons: dict[str, int]
    sessions: int
    in_order: int
    out_of_order: list[str]
    overlaps: int
    retries: int
    planned_retries: int
    flaky: int
    elapsed: float
    sessions_started: int
    finished: bool

    @property
    def ok(self) -> bool:
        return (
            self.finished
            and self.in_order == self.sessions
            and self.overlaps == 0
            and self.completed + self.dead_lettered == self.sent
            and self.dlq_reasons == self.planned_reasons
            and self.retries == self.planned_retries
        )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="a realistic run on the in-memory broker, with ordering checked per session",
        description=(
            "Run a supervisor on the in-memory broker: SESSIONS orders x EVENTS events, with a few "
            "poison messages (dead-lettered by reason) and flaky ones (retried in place). Shows live "
            "progress and a summary; exits 0 when every session's events completed in send order "
            "and completed + dead-lettered == sent."
        ),
    )
    parser.add_argument(
        "--sessions",
        type=_positive("--sessions", MAX_SESSIONS),
        default=200,
        help=f"orders (default 200, at most {MAX_SESSIONS:,})",
    )
    parser.add_argument(
        "--events",
        type=_positive("--events", MAX_EVENTS),
        default=50,
        help=f"events per order (default 50, at most {MAX_EVENTS:,};"
        f" sessions x events at most {MAX_MESSAGES:,})",
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed for the plan (default 7)")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.06,
        metavar="SECONDS",
        help="max simulated handler latency, uniform from 0 (default 0.06)",
    )
    parser.add_argument(
        "--max-sessions", type=_positive("--max-sessions", MAX_SESSIONS), default=64, help="default 64"
    )
    parser.add_argument(
        "--no-live", action="store_true", help="plain progress lines instead of a live display"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.set_defaults(handler=run_demo)


def _positive(flag: str, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:,}, got {value:,}")
        return value

    parse.__name__ = "integer"
    return parse


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` command: 0 when ordering held and the counts add up, else 1."""
    if not (args.latency >= 0 and args.latency < 10):
        raise CommandError(f"--latency must be between 0 and 10 seconds, got {args.latency!r}", 2)
    if not (args.timeout > 0 and args.timeout <= 86_400):
        raise CommandError(
            f"--timeout must be more than 0 and at most 86400 seconds, got {args.timeout!r}", 2
        )
    if args.sessions * args.events > MAX_MESSAGES:
        raise CommandError(
            f"--sessions {args.sessions:,} x --events {args.events:,} is"
            f" {args.sessions * args.events:,} messages; the demo runs at most {MAX_MESSAGES:,}",
            2,
        )
    plan = make_plan(args.sessions, args.events, args.seed)
    live = sys.stdout.isatty() and not args.no_live
    # Runtime logs would tear the live display; dead-letters are in the summary instead.
    runtime_logger = logging.getLogger("queue_runtime")
    previous_level = runtime_logger.level
    runtime_logger.setLevel(logging.CRITICAL)
    try:
        outcome = trio.run(_demo, plan, args, live)
    except QueueError as error:
        raise CommandError(f"demo failed: {type(error).__name__}: {error}", 1) from error
    finally:
        runtime_logger.setLevel(previous_level)
    _print_summary(outcome, plan)
    return 0 if outcome.ok else 1


async def _demo(plan: DemoPlan, args: argparse.Namespace, live: bool) -> Outcome:
    from ..client import QueueClient
    from ..config import SupervisorConfig
    from ..message import Message
    from ..providers.memory import InMemoryProvider
    from ..retry import RetryPolicy
    from ..supervisor import Supervisor

    ledger = Ledger(latency=args.latency, seed=args.seed)
    actor = type("DemoActor", (DemoActor,), {"ledger": ledger})
    config = SupervisorConfig(
        queue=QUEUE,
        max_concurrent_sessions=args.max_sessions,
        session_idle_timeout=0.2,  # short: each order is one burst, free the slot quickly
        prefetch=10,
        retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, initial_backoff=0.02, multiplier=2.0, max_backoff=0.2),
        max_delivery_count=MAX_DELIVERY_COUNT,
        shutdown_grace=5.0,
    )
    async with InMemoryProvider(lock_duration=30.0, max_delivery_count=10) as provider:
        client = QueueClient(provider)

        def message(session: str, body: bytes) -> Message:
            return Message(body=body, session_id=session, content_type="application/json")

        # Poison by redelivery: another consumer received these and gave them back, again and
        # again (a crash loop), before our workers start.
        await client.send_batch(
            QUEUE, [message(session, plan.bodies[session][0]) for session in plan.redelivered]
        )
        for _ in range(MAX_DELIVERY_COUNT):
            await _deliver_and_give_back(provider, set(plan.redelivered))

        supervisor = Supervisor(provider, actor, config)
        started = time.monotonic()
        finished = False
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.serve)
            nursery.start_soon(_produce, client, plan, message)
            progress = _Progress(plan.total, live)
            with progress:
                with trio.move_on_after(args.timeout):
                    while True:
                        stats = supervisor.stats()
                        settled = stats.completed + stats.dead_lettered
                        progress.update(settled, stats, time.monotonic() - started)
                        if settled >= plan.total:
                            finished = True
                            break
                        await trio.sleep(0.1 if live else 0.05)
            elapsed = time.monotonic() - started
            supervisor.stop()
        stats = supervisor.stats()
        dead = await provider.peek_dead_letters(QUEUE, max_messages=plan.total + 1)
    reasons = Counter(str(item.dead_letter_reason) for item in dead)
    out_of_order = [
        session for session, seqs in plan.expected.items() if ledger.done.get(session, []) != seqs
    ]
    return Outcome(
        sent=plan.total,
        completed=stats.completed,
        dead_lettered=len(dead),
        dlq_reasons=dict(reasons),
        planned_reasons=plan.dead_letters,
        sessions=len(plan.expected),
        in_order=len(plan.expected) - len(out_of_order),
        out_of_order=out_of_order,
        overlaps=ledger.overlaps,
        retries=stats.retries,
        planned_retries=plan.retries,
        flaky=plan.flaky,
        elapsed=elapsed,
        sessions_started=stats.sessions_started,
        finished=finished,
    )


async def _deliver_and_give_back(provider: Any, sessions: set[str]) -> None:
    """Accept each of ``sessions`` (the only ones with messages), receive its message and
    abandon it: one more delivery each. Receivers stay open until all are taken, so the
    broker hands out each session once."""
    async with contextlib.AsyncExitStack() as stack:
        seen: set[str] = set()
        while seen != sessions:
            receiver = await provider.accept_session(QUEUE, timeout=1.0)
            if receiver is None or receiver.session_id not in sessions - seen:
                raise CommandError("demo set-up: the broker did not hand out the planned sessions", 1)
            await stack.enter_async_context(receiver)
            seen.add(receiver.session_id)
            (received,) = await receiver.receive(1, timeout=1.0)
            await receiver.abandon(received)


async def _produce(client: Any, plan: DemoPlan, message: Callable[[str, bytes], Any]) -> None:
    """Send round by round (event k of every order, then k+1), as orders progress in parallel."""
    rounds = max(len(bodies) for bodies in plan.bodies.values())
    for seq in range(rounds):
        batch = [
            message(session, bodies[seq])
            for session, bodies in plan.bodies.items()
            if seq < len(bodies) and not (seq == 0 and session in plan.redelivered)
        ]
        await client.send_batch(QUEUE, batch)


class _Progress:
    """A rich progress bar on a TTY, else a plain line about once a second."""

    def __init__(self, total: int, live: bool) -> None:
        self.total = total
        self.live = live
        self._last_line = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[rate]:>5.0f} msg/s"),
                TextColumn("{task.fields[active]:>2} active"),
                TextColumn("{task.fields[retries]} retries"),
                TextColumn("{task.fields[dead]} DLQ"),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "demo", total=self.total, rate=0.0, active=0, retries=0, dead=0
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc_info)

    def update(self, settled: int, stats: Any, elapsed: float) -> None:
        rate = settled / elapsed if elapsed > 0 else 0.0
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=settled,
                rate=rate,
                active=stats.active_sessions,
                retries=stats.retries,
                dead=stats.dead_lettered,
            )
            return
        if elapsed - self._last_line >= 1.0 or settled >= self.total:
            self._last_line = elapsed
            print(
                f"[{elapsed:5.1f}s] settled {settled}/{self.total} ({rate:.0f} msg/s)"
                f" active sessions {stats.active_sessions}, retries {stats.retries},"
                f" dead-lettered {stats.dead_lettered}",
                flush=True,
            )


def _print_summary(outcome: Outcome, plan: DemoPlan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=100 if not sys.stdout.isatty() else None, highlight=False)
    throughput = outcome.sent / outcome.elapsed if outcome.elapsed > 0 else 0.0
    table = Table(title="queue-runtime demo (in-memory broker)", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("messages sent", str(outcome.sent))
    table.add_row("completed", str(outcome.completed))
    table.add_row("dead-lettered", str(outcome.dead_lettered))
    table.add_row("elapsed", f"{outcome.elapsed:.2f} s")
    table.add_row("throughput", f"{throughput:,.0f} msgs/s")
    table.add_row("sessions", f"{outcome.sessions} ({outcome.sessions_started} activations)")
    ordering = f"{outcome.in_order}/{outcome.sessions} sessions in order"
    table.add_row(
        "ordering verified", ordering if outcome.in_order == outcome.sessions else f"[red]{ordering}"
    )
    table.add_row("overlapping handle() calls", str(outcome.overlaps))
    retried = f"{outcome.retries} ({outcome.flaky} flaky messages"
    if outcome.retries == outcome.planned_retries:
        retried += f", {outcome.planned_retries} retries planned)"
    else:
        retried += f", [red]{outcome.planned_retries} retries planned[/red])"
    table.add_row("retries (in place)", retried)
    for reason in sorted(set(outcome.dlq_reasons) | set(outcome.planned_reasons)):
        got = outcome.dlq_reasons.get(reason, 0)
        planned = outcome.planned_reasons.get(reason, 0)
        table.add_row(f"DLQ {reason}", f"{got}" + ("" if got == planned else f" [red](planned {planned})"))
    console.print(table)
    balance = outcome.completed + outcome.dead_lettered
    console.print(
        f"completed + dead-lettered = {balance} of {outcome.sent} sent"
        + ("" if outcome.finished else " [red](timed out before every message settled)")
    )
    if outcome.out_of_order:
        console.print(f"[red]out of order: {', '.join(outcome.out_of_order[:10])}")
    console.print("[green]OK[/green]" if outcome.ok else "[red]FAILED[/red]")
