"""Writes ``docs/benchmarks.md`` from ``benchmarks/results/*.json`` (run by ``python -m benchmarks``).

The tables are the ones the benchmarks printed; the prose around them is here, and the few
figures it quotes are read from the same JSON, so the page never disagrees with the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._common import DOCS_DIR, RESULTS_DIR, machine, versions

ORDER = ("throughput", "memory", "latency", "sqs", "telemetry_cost", "scaling", "sqlite", "concurrency")


def _load(results: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ORDER:
        path = results / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _row(rows: list[dict[str, Any]], key: str, value: Any) -> dict[str, Any] | None:
    return next((r for r in rows if r.get(key) == value), None)


def render(results: Path = RESULTS_DIR) -> str:
    data = _load(results)
    m = machine()
    v = versions()
    sizes = sorted({d.get("size", "?") for d in data.values()})
    lines = [
        "# Benchmarks",
        "",
        "What the runtime costs compared with the loop you would write yourself, and where the limits",
        "are. Every figure below was measured in one run of `just bench` on the machine described",
        "here; regenerate this page with the same command (tables and plot are rewritten from",
        "`benchmarks/results/*.json`). Benchmarks are not tests: `just test` only runs each one once",
        "at a tiny size (`tests/test_benchmarks.py`) so they never rot.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {m['cpu']}, {m['nproc']} cores (`nproc`); RAM {m['ram_gib']} GiB; {m['platform']}",
        f"- Python {v['python']}, trio {v['trio']}, msgspec {v['msgspec']}, aiobotocore {v['aiobotocore']},"
        f" moto {v['moto']}, opentelemetry-sdk {v['opentelemetry-sdk']}",
        "- Measured (each section's results file; sections run apart may come from other runs or"
        " machines): " + ", ".join(f"{name} {d.get('measured_at', '?')}" for name, d in data.items()),
        f"- Sizes in this page: {', '.join(sizes)}. The machine was shared with other jobs while",
        "  measuring, so absolute rates are noisy; ratios come from interleaved tries in one process",
        "  and are the figures to read.",
        "",
        "## Commands",
        "",
        "```",
        "just bench                                  # everything, full sizes; rewrites this page",
        "uv run --all-extras python -m benchmarks --size quick --only throughput memory",
        "uv run --all-extras queue-runtime bench --tiny --no-docs   # smoke run, same entry point",
        "uv run --all-extras python -m benchmarks.memory --child 100000   # one memory size, JSON out",
        "uv run --all-extras python -m benchmarks --size full --only sqlite   # section 7 alone",
        "uv run --all-extras python -m benchmarks --size full --only concurrency   # section 8 alone",
        "```",
        "",
    ]
    sections = {
        "throughput": _throughput,
        "memory": _memory,
        "latency": _latency,
        "sqs": _sqs,
        "telemetry_cost": _telemetry,
        "scaling": _scaling,
        "sqlite": _sqlite,
        "concurrency": _concurrency,
    }
    for name in ORDER:
        if name in data:
            lines.extend(sections[name](data[name]))
            lines.append("")
    lines.extend(_notes(data))
    return "\n".join(lines).rstrip() + "\n"


def _throughput(d: dict[str, Any]) -> list[str]:
    at200 = _row(d["rows"], "sessions", 200)
    quote = (
        f"At 200 sessions the runtime reaches **{at200['ratio']:.2f}x** the hand-written pipeline's rate."
        if at200
        else ""
    )
    return [
        "## 1. In-memory throughput: runtime vs hand-written trio pipeline",
        "",
        "`benchmarks/throughput.py`, `benchmarks/inmemory.py`. Runtime: a producer task sends batches",
        "of 100 `Message`s (uuid4 ids, round robin over the sessions) to an `InMemoryProvider`; the",
        "`Supervisor` (`max_concurrent_sessions` = sessions, defaults otherwise) accepts each session,",
        "runs one actor per session, msgspec-decodes the body, awaits the handler and completes the",
        "message with the broker. Hand-written: a producer task puts batches of 100",
        "`(session, body)` pairs on a bounded trio channel, a router starts one task per session and",
        "forwards each body over that session's bounded channel, the task decodes with msgspec,",
        "awaits the same handler and counts. Both clocks start before the first message is produced",
        "and stop at the last message done (for the runtime: completed with the broker); each try",
        "is its own `trio.run`; tries alternate (runtime, hand-written, ...). The rates are the",
        "median tries; the ratio is the median of the ratios of adjacent pairs (a runtime try and",
        "the hand-written try right after it), which cancels the slow drifts in speed of this shared",
        "machine, and the last column gives the lowest and highest pair ratio: read the spread too.",
        "",
        d["table"],
        "",
        quote,
    ]


def _memory(d: dict[str, Any]) -> list[str]:
    return [
        "## 2. Memory per active session",
        "",
        "`benchmarks/memory.py`: one fresh subprocess per size. N messages for N sessions are stored",
        "first; then a supervisor with `max_concurrent_sessions = N` starts, RSS is read once it is",
        "idle and again once all N handlers block on one shared event at the same time. The",
        "difference over N is what one active session costs: actor, session task, receiver,",
        "delivered message, context, runtime bookkeeping (the stored messages are not counted).",
        "The broker's lock duration is 1 h here so that no lock expires during a slow ramp-up: this",
        "measures memory, not renewal throughput (the shared renewer runs all the same).",
        "",
        d["table"],
    ]


def _latency(d: dict[str, Any]) -> list[str]:
    return [
        "## 3. Latency at low load",
        "",
        "`benchmarks/latency.py`: one message every "
        f"{d['send_interval_s'] * 1000:g} ms over {d['sessions']} active sessions (in memory).",
        '"completed" is when the runtime reports the completion, right after the broker\'s `complete`',
        "returned.",
        "",
        d["table"],
    ]


def _sqs(d: dict[str, Any]) -> list[str]:
    cpu = d["cpu_ratio_runtime_over_hand_written"]
    calls = d["calls_ratio_runtime_over_hand_written"]
    return [
        "## 4. SQS end to end (moto server)",
        "",
        "`benchmarks/sqs.py`: one moto server process (`drills/moto.py`'s `StrictMotoServer`: moto",
        "with the fixes that make its FIFO receive behave as SQS's, its long poll included); a fresh",
        "FIFO queue per try; a boto3 producer",
        f"thread keeps at most {d['backlog']} messages waiting over {d['groups']} groups; long poll",
        f"{d['long_poll_s']} s on both sides. Client CPU is `time.thread_time()` of the consumer's trio",
        "thread (producer thread and moto excluded); API calls are counted by the provider's own",
        "counter and by an aiobotocore `before-call` hook for the hand-written loop; start-up and",
        "shutdown are included for both.",
        "",
        d["table"],
        "",
        f"Client CPU per message, runtime / hand-written: **{cpu:.2f}**;"
        f" API calls per message, runtime / hand-written: **{calls:.2f}**.",
        *_sqs_latency(d),
    ]


def _sqs_latency(d: dict[str, Any]) -> list[str]:
    rows = [r for r in d.get("latency", []) if r["delay_ms_each_way"] > 0]
    if not rows:
        return []
    lines = [
        "",
        "### At network latency",
        "",
        "The same tries with `drills/proxy.py` (the fault drills' HTTP proxy, faults off, `--delay`)",
        "between each consumer and moto: every consumer call waits the delay before it is forwarded",
        "and again before its answer is; the producer talks to moto directly. Same rounds: every",
        "latency and both sides once per round.",
        "",
        d["latency_table"],
        "",
    ]
    for r in rows:
        checks = [
            ("msg/s", r["rate_ratio"], r["rate_ratio"] >= 1.0, ">= 1.0"),
            ("client CPU/msg", r["cpu_ratio"], r["cpu_ratio"] <= 1.15, "<= 1.15"),
            ("API calls/msg", r["calls_ratio"], r["calls_ratio"] <= 1.0, "<= 1.0"),
        ]
        lines.append(
            f"- {r['delay_ms_each_way']} ms each way: "
            + "; ".join(
                f"{name} {value:.3f}x the hand-written loop"
                f" (target {target}: {'met' if ok else '**not met**'})"
                for name, value, ok, target in checks
            )
            + "."
        )
    lines += [
        "",
        "Both sides are bound by round trips here, not CPU: SQS withholds a group while any of its",
        "messages is in flight, so the hand-written loop moves each batch with a receive and then a",
        "delete, two round trips. The runtime (`overlap_deletes`, on by default against AWS) sends",
        "its next receive right behind the deletes, without waiting for their answer: SQS answers",
        "it once they have landed, so a batch costs about one round trip and the same two calls.",
        "Plain moto cannot show this: its long poll decides the blocked groups once, at its start,",
        "so a receive that arrives before the delete waits out the whole poll (which is why",
        "`overlap_deletes` is off by default for endpoints other than AWS's).",
    ]
    return lines


def _telemetry(d: dict[str, Any]) -> list[str]:
    return [
        "## 5. Telemetry cost",
        "",
        "`benchmarks/telemetry_cost.py`: the throughput benchmark's runtime side, each try of each mode in",
        "a fresh subprocess, tries interleaved (off, metrics, ..., off, metrics, ...): no SDK; SDK",
        "`MeterProvider` with an `InMemoryMetricReader`; SDK `TracerProvider` with the parent-based",
        "1 % ratio sampler (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`,",
        "`OTEL_TRACES_SAMPLER_ARG=0.01`); both (what a production worker runs); always-on tracing.",
        "Tracing modes export through a `BatchSpanProcessor` to an exporter that drops the spans.",
        "Besides wall-clock msg/s the table gives messages per CPU-second of the process (the",
        "exporter thread included): on a shared machine that is the steadier figure.",
        "",
        d["table"],
        "",
        "Before the per-message work moved to the runtime's own tallies and unsampled messages",
        "stopped reaching the SDK (issue 15), the same benchmark gave metrics 0.30x, tracing at",
        "1 % 0.14x and always-on 0.11x.",
        *_tracing_ceiling(d),
    ]


def _tracing_ceiling(d: dict[str, Any]) -> list[str]:
    c = d.get("tracing_ceiling")
    if not c:
        return []
    return [
        "",
        "**The floor under always-on tracing**, measured in the same run: the tracing child also times",
        "bare SDK spans (`tracer.start_span(name, attributes=the guide's seven).end()`, same provider,",
        "same processor) with nothing of the runtime around them. Always-on exported"
        f" {c['spans_per_message']} spans per message (a process and a complete span per message, a",
        "receive span per receive call, a session span per session: what the operations guide and",
        f"DESIGN.md require); at {c['sdk_cpu_us_per_message'] / c['spans_per_message']:.1f} us each that is"
        f" {c['sdk_cpu_us_per_message']} us of SDK work per message, on top of the runtime's"
        f" {c['off_cpu_us_per_message']} us",
        f"with no SDK. So even a runtime that cost nothing for tracing would reach at most **{c['ratio']}x**",
        "with always-on tracing: the target of 0.35x is above what the Python SDK allows for these",
        "spans here, whatever the runtime does. Sampling is the tool for this: at 1 % the rate is in",
        "the table above.",
    ]


def _scaling(d: dict[str, Any]) -> list[str]:
    plot = Path(d.get("plot", "")).name or "benchmarks-scaling.png"
    return [
        "## 6. Scaling curve",
        "",
        "`benchmarks/scaling.py`: the runtime side of the throughput benchmark, with a handler that",
        "does no I/O and one that awaits a 1 ms sleep.",
        "",
        f"![throughput vs sessions and per_session_concurrency]({plot})",
        "",
        d["table"],
    ]


def _sqlite(d: dict[str, Any]) -> list[str]:
    one, two, hand = d["rows"]
    return [
        "## 7. SQLite end to end (worker processes on one file)",
        "",
        "`benchmarks/sqlite.py`: a fresh database file per try (WAL, `synchronous=NORMAL`), filled",
        f"before the clock starts with the messages round robin over {d['sessions']} sessions. Runtime:",
        "1 or 2 `queue-runtime` worker processes (`SqliteProvider` + `Supervisor`,",
        "`max_concurrent_sessions` = sessions, prefetch 10, one `complete` per message). Hand-written:",
        "one process, a trio loop that claims the oldest unclaimed session's next 10 messages in one",
        "`BEGIN IMMEDIATE` transaction, decodes and awaits the same handler for each in order, and",
        "deletes each in its own transaction once handled (the runtime's per-message settlement),",
        "its SQLite calls on a worker thread like the provider's. The children start and open the",
        'file first; the clock runs from "go" until no message is left. Client CPU is',
        "`time.process_time()` of the consumer processes (all their threads), summed. Tries alternate;",
        "medians; the ratios are medians of per-round ratios."
        + (f" Measured on: {d['machine']}." if d.get("machine") else ""),
        "",
        d["table"],
        "",
        f"One worker: **{one['msgs_per_s']:,.0f} msg/s** (target >= 2,000:"
        f" {'met' if one['msgs_per_s'] >= 2000 else '**not met**'}), **{one['rate_ratio']:.2f}x** the"
        f" hand-written loop's rate (target >= 0.8: {'met' if one['rate_ratio'] >= 0.8 else '**not met**'}),"
        f" {one['cpu_us_per_msg']:.0f} us of client CPU per message against {hand['cpu_us_per_msg']:.0f}."
        f" Two workers: {two['msgs_per_s']:,.0f} msg/s, {two['cpu_us_per_msg']:.0f} us per message.",
    ]


def _concurrency(d: dict[str, Any]) -> list[str]:
    cpu = d["cpu"]
    io = d["io"]
    queue = d["queue"]
    c1 = cpu[0]["msgs_per_s"]
    others = [r for r in cpu if r["c"] > 1]
    cpu_ok = all(r["vs_c1"] >= 0.8 for r in others)
    io16 = next((r for r in io if r["c"] == 16), None)
    io32 = next((r for r in io if r["c"] == 32), None)
    lines = [
        "## 8. Concurrent handling: per_session_concurrency and non-session queues",
        "",
        "`benchmarks/concurrency.py`: the runtime side of the throughput benchmark at 2 sessions, and a",
        "non-session queue against a hand-written consumer (64 tasks that each receive one message,",
        "decode it, await the handler and complete it, on the same `InMemoryProvider`). Every case",
        "runs once per round, rounds repeated; medians; CPU time per message is",
        '`time.process_time()` over the try. "bare trio" is 2 x c tasks doing nothing but',
        "`await trio.sleep(0.001)` in a loop: what trio gets out of that many 1 ms waits here.",
        "",
        d["table"],
        "",
        f"CPU-only handler: c = {', '.join(str(r['c']) for r in others)} reach"
        f" {', '.join(format(r['vs_c1'], '.2f') + 'x' for r in others)} the c = 1 rate ({c1:,} msg/s)"
        f" (target >= 0.8x each: {'met' if cpu_ok else '**not met**'}).",
    ]
    if io16 is not None:
        met = io16["vs_ideal"] >= 0.6
        lines.append(
            f"1 ms handler, c = 16: {io16['msgs_per_s']:,} msg/s, {io16['vs_ideal']:.2f}x the ideal"
            f" {io16['ideal_msgs_per_s']:,} (target >= 0.6x: {'met' if met else '**not met**'}); the CPU"
            f" was busy {io16['cpu_busy']:.0%} of the time ({io16['cpu_us_per_msg']:.1f} us per message),"
            f" so it is {'' if io16['cpu_busy'] >= 0.9 else 'not '}CPU-bound;"
            f" bare trio with {2 * io16['c']} sleeping tasks reaches"
            f" {io16['sleepers_msgs_per_s']:,} per s, and the runtime {io16['vs_sleepers']:.2f}x that."
        )
        if "handlers_running" in io16:
            lines.append(
                f"What bounds it: the runtime kept {io16['handlers_running']:.1f} of its"
                f" {2 * io16['c']} handlers running on average, and a handler's 1 ms sleep took"
                f" {io16['ms_per_call']:.2f} ms ({io16['sleepers_ms_per_call']:.2f} ms for bare trio):"
                " trio sleeps until the next deadline with `epoll_wait`, whose timeout is whole"
                " milliseconds rounded up, so a task whose deadline falls just after a wake-up"
                " waits up to another millisecond. The ideal 2 x c / 1 ms assumes 1 ms per call;"
                " no trio program here gets it."
            )
    if io16 is not None and io32 is not None:
        lines.append(
            f"c = 32: {io32['msgs_per_s']:,} msg/s (not lower than c = 16:"
            f" {'met' if io32['msgs_per_s'] >= io16['msgs_per_s'] else '**not met**'})."
        )
    lines.append(
        f"Non-session queue, {queue['slots']} handlers: {queue['ratio']:.2f}x the hand-written consumer"
        f" (pairs {queue['pair_ratio_min']:.2f}-{queue['pair_ratio_max']:.2f}; target >= 0.8x:"
        f" {'met' if queue['ratio'] >= 0.8 else '**not met**'}), {queue['runtime_cpu_us']:.1f} us of CPU per"
        f" message against {queue['baseline_cpu_us']:.1f}."
    )
    return lines


def _notes(data: dict[str, dict[str, Any]]) -> list[str]:
    """What limits what, with the figures that show it."""
    out = ["## What limits what", ""]
    if "throughput" in data:
        rows = data["throughput"]["rows"]
        at200 = _row(rows, "sessions", 200)
        ratios = ", ".join(f"{r['sessions']}: {r['ratio']:.2f}" for r in rows)
        below = [str(r["sessions"]) for r in rows if r["sessions"] >= 100 and r["ratio"] < 0.8]
        must = at200 is not None and at200["ratio"] >= 0.8
        status = (
            "met."
            if not below
            else f"**not met** at {', '.join(below)} sessions (at 200, the figure the issue requires,"
            + (" it is met)." if must else " it is not).")
        )
        at10k = _row(rows, "sessions", 10_000)
        if at10k is not None:
            status += " Issue 18's target at 10,000 sessions (>= 0.75) is " + (
                "met." if at10k["ratio"] >= 0.75 else "**not met**."
            )
        out += [
            f"- **In-memory throughput (ratio by sessions: {ratios}).** The target (>= 0.8 from 100",
            "  sessions, parity as the aim) is " + status,
            "  Where the time goes, counted with valgrind (instructions per message, marginal between",
            "  6,000 and 14,000 messages, commands in `benchmarks/counts.py`; hand-written 85k at",
            "  every session count): the runtime needs ~60k at 10 sessions, where a receive brings",
            "  many messages, and ~95k at 200 sessions (~102k before this round). The difference is",
            "  the wait: with batches of 100 sent round robin over 200 sessions a session's receive",
            "  brings ~1.3 messages, so ~0.8 times per message a session parks and is woken, and trio's",
            "  own task switch is about half of what a wait costs (valgrind counts a clock read as a",
            "  system call, and a wait reads the clock, so these overstate it somewhat). Counted with a",
            "  trio instrument (`python -m benchmarks.counts steps 200 20000`), the runtime makes 0.83",
            "  task steps per message at 200 sessions and the hand-written pipeline 2.05: its router",
            "  yields at each `send`, so it pays two task switches for every message whatever the",
            "  session count, while the runtime's cost is in its own work per message and per wait.",
            "  In the steady state of a 20,000-message try (valgrind between 12,000 and 22,000",
            "  messages) the runtime needed 107k instructions per message before this round and ~101k",
            "  after it (100.6k to 102.7k over four runs: the count depends on how tasks interleave),",
            "  against 85k: an instruction ratio of ~0.84, close to the time ratio measured here.",
            "  Timings on this shared 2-core box drift by up to 2x within minutes",
            "  (hence pair ratios), so the 200-session ratio moves by a few hundredths from run to run.",
            "  What changed the round before issue 18 (each its own commit): the first attempt of",
            "  an ordered session's message with nothing observing takes a short path (decode, context,",
            "  handle, complete), everything else goes through the full one; a send locks a message",
            "  for a holder waiting in receive as it goes, instead of queueing it and taking it off the",
            "  queue again; a parked receive leaves fewer objects for the garbage collector (each",
            "  young-generation collection walked ~2,400 objects, ~12 per parked session). Before it:",
            "  the broker hands new messages straight to a session receive that waits (as trio's",
            "  channels hand a value to a waiting receiver);",
            "  the ordered loop receives and completes inline; the per-message telemetry hooks are",
            "  skipped while nothing would see them; `MessageContext` is read from the delivery;",
            "  `Message` ids are a per-process random prefix and a counter (uuid4 format). What is",
            "  left at 200 sessions is per-wait work in the broker and the session loop (the receive's",
            "  checks and cancellation point, the wait record and its alarm entry, the delivery) on top",
            "  of trio's switch, and per-message work the hand-written pipeline does not do (a",
            "  `Message` per send, the broker's copy and the consumer's copy, the lock, complete). At",
            "  10,000 sessions (4 messages each) starting sessions dominates (none ends inside the",
            "  timed part: the idle timeout is 5 s): each is accepted, gets a task and its cancel",
            "  scopes, renewer entries, broker timers and a first receive.",
            "  What grew with the session count (issue 18, item 3) was the cyclic garbage collector,",
            "  not the message path: marginal opcodes per message (`benchmarks/counts.py opcodes`)",
            "  are lower at 10,000 sessions than at 200. Every live session kept ~41 GC-tracked",
            "  objects while idle (51 in `handle()`), and every message stored in the in-memory",
            "  broker was in a reference cycle with its session record, so CPython 3.11's full",
            "  collections (one whenever long-lived objects grow by a quarter) walked all of them:",
            "  45 % of a 10,000-session timed run. The issue 18 round removed the per-session bound methods",
            "  and sets made up front, the two phase markers, a second renewer entry per session and",
            "  the instance dict (`__slots__`), compacts the renewer's heap, and makes the broker's",
            "  records name their session by id (no cycle, not tracked): 29 objects per idle session,",
            "  39 in `handle()`, 4 per message stored for a new session and 0 for a known one; GC",
            "  33 % of that run; ratio at 10,000 sessions 0.55 -> 0.64-0.66 and at 200 0.85 -> 0.89-0.90",
            "  (interleaved pairs against the code before, same machine); 0.75 at 10,000 was not met then.",
            "  With the collector off on both sides the ratio was already ~0.60 before these changes:",
            "  what is left is per-session setup spread over many calls, no single culprit. After that",
            "  round the ordered loop runs in the session's lock scope (one cancel scope per session, not",
            "  two; `run` tells a stop's cancellation from a lock loss by `_lost` and hands the",
            "  interrupted message back under a fresh lock scope, so nothing observable changed), and the",
            "  do-nothing span keeps no bound method alive: 6 tracked objects fewer per live session.",
            "  Ratio at 10,000 sessions ~0.65 -> ~0.74, at 12,000 ~0.59 -> ~0.69, at 8,000 ~0.65 -> ~0.66",
            "  (the spread is where the full collections fall: 5 -> 4 at 10,000, 4 -> 4 at 8,000), at",
            "  200 unchanged (~0.91); interleaved pairs against the code before. Then two per-message",
            "  costs that grew with the session count: the cache of checked session ids (bound 4,096)",
            "  was cleared over and over at 10,000 sessions sent round robin, so every `Message` paid",
            "  the regular expression again (bound now 65,536), and the broker converted a send's",
            "  enqueue time to wall time again whenever a receive came from another send than the last",
            "  (it keeps the last 1,024): ~0.5 us of CPU per message less at 10,000 sessions (22.4 ->",
            "  21.9 us, interleaved A/B).",
        ]
    if "memory" in data:
        rows = data["memory"]["rows"]
        figures = ", ".join(f"{r['sessions']:,}: {r['kib_per_session']:.1f} KiB" for r in rows)
        out += [
            f"- **Memory ({figures}).** Target <= 8 KiB per active session at 100,000 (issue 18;",
            "  12 KiB before): see the table. What one session holds (not broken down here): its trio",
            "  task and coroutine frames, the actor instance, the receiver and the broker's session",
            "  record, the delivered message, the `MessageContext`. Lock renewal is one shared task",
            "  (a heap) for all sessions, so it adds no task per session. The ramp-up column is the",
            "  time until all N handlers run; a py-spy profile of a 30k run pointed at allocation",
            "  sites (cyclic GC passes over a growing heap) and trio scheduling. A limit seen on the",
            "  way: an earlier 100k run with the default 60 s lock, while the box was heavily loaded",
            "  by other jobs, took ~10 min to ramp up and lost locks on the way (100k sessions need",
            "  ~3,300 renewals/s at half-life; the renewer is one task running 32 renewals at once).",
            "  Size `max_concurrent_sessions` and the lock duration together.",
        ]
    if "latency" in data:
        rows = data["latency"]["rows"]
        out += [
            f"- **Latency.** send -> `handle()` p50 {rows[0]['p50_us']:.0f} us covers the broker's send,",
            "  waking the session's waiting receive (trio reschedules the task), the receive itself,",
            "  decoding and building the `MessageContext`. Return -> completed p50"
            f" {rows[1]['p50_us']:.0f} us is the broker's `complete` (a cancellation check, no trip",
            "  through trio's scheduler since this round) plus the counters and telemetry.",
            "  p99 and max include whatever else ran on the shared box at",
            "  the time; they were not investigated further.",
        ]
    if "sqs" in data:
        d = data["sqs"]
        runtime, hand = d["rows"]
        cpu_met = d["cpu_ratio_runtime_over_hand_written"] <= 1.25

        def per_try(row: dict[str, Any], operation: str) -> float:
            return float(row["calls_by_operation_per_try"].get(operation, 0))

        calls_met = d["calls_ratio_runtime_over_hand_written"] <= 1.0
        out += [
            "- **SQS.** msgs/s is moto's speed, not the clients': moto's FIFO receive costs about 1 ms",
            "  per queued message and its dev server opens a connection per call. Targets: CPU/msg",
            "  <= 1.25x the hand-written loop is " + ("met" if cpu_met else "**not met**") + "; no more",
            "  API calls per message is " + ("met" if calls_met else "**not met**") + ". Per try the runtime"
            f" makes {per_try(runtime, 'ReceiveMessage'):g} `ReceiveMessage` and"
            f" {per_try(runtime, 'DeleteMessageBatch'):g} `DeleteMessageBatch` against"
            f" {per_try(hand, 'ReceiveMessage'):g} and {per_try(hand, 'DeleteMessageBatch'):g},",
            "  plus `GetQueueUrl` and `GetQueueAttributes` once at start-up. Deletes are queued by",
            "  `complete()` and sent in batches of 10; before each receive the provider waits up to",
            "  20 ms for the sessions fed by the previous receive to settle, so one receive is followed",
            "  by one delete call, as in the hand-written loop (before that change: about two). The",
            "  last few extra receives (3 or 4 per 600 messages) were polls sent while another task's",
            "  delete call was still in flight: SQS withholds those groups until the delete lands, so",
            "  the poll came back empty (moto: after the whole long poll) and another fetched them. A",
            "  poll now waits for the queue's delete calls in flight (at most one call). The",
            "  runtime side's profile is dominated by the HTTP calls (botocore serialise/sign/parse,",
            "  httpx, and a TCP connect per call: moto's server closes the connection after each",
            "  response), so the CPU ratio follows the call ratio.",
            "  At network latency (section 4, proxy rows) both consumers are bound by round trips,",
            "  not CPU: per poll, one `ReceiveMessage` and one `DeleteMessageBatch`. The hand-written",
            "  loop sends them one after the other, so its rate is about 10 messages per (2 round trips",
            "  + the server's time). The runtime (`overlap_deletes`, on by default against AWS) sends",
            "  the receive right behind the deletes without waiting for their answer: SQS answers it",
            "  once they have landed, about one round trip per batch, with the same calls. It waits",
            "  for them (as without the knob) while an unclaimed session waits: a receive answered",
            "  before the deletes land then brings only groups the worker must release, each receive",
            "  counting toward their maxReceiveCount (the multi-worker test caught groups driven to",
            "  the dead-letter queue that way). The runtime keeps one `ReceiveMessage` in flight per",
            "  queue and provider by design (a FIFO queue withholds a group while its messages are in",
            "  flight, so a second poll comes back without them). The knobs that matter at high latency:",
            "  worker processes (each has its own poll in flight, so N workers overlap N round",
            "  trips; the only way to more than ~10 messages per 2 round trips on one FIFO queue);",
            "  `max_concurrent_sessions` (default 64: enough groups held to fill each 10-message",
            "  receive); the provider's `wait_time` (long poll, default 20 s: only what an empty",
            "  poll costs); `visibility_timeout` (30 s default; a receive whose answer took longer",
            "  than the provider's `EXTEND_AFTER`, 1 s, costs one more call to extend its batch: not",
            "  at 25 ms each way, but on a long poll that waited or at multi-second latency).",
            "  Deletes are batched up to 10 and sent before the next poll (there is no batching",
            "  window to tune: `SETTLE_WINDOW` is the provider's fixed 20 ms wait for the sessions",
            "  fed by the last receive to settle, small against a 50 ms round trip). `prefetch`",
            "  does not change the SQS call pattern (a session's receive is served from the shared",
            "  poll's buffer). These figures are on moto with the drills' fixes (`StrictMotoServer`),",
            "  whose long poll sees deletes that land during it, as SQS's does; on plain moto an",
            "  overlapping receive waits out the whole long poll (measured: 18 msg/s against 95 at",
            "  10 ms), hence `overlap_deletes` off by default for endpoints other than AWS's.",
        ]
    if "sqlite" in data:
        one, two, _hand = data["sqlite"]["rows"]
        out += [
            "- **SQLite.** Every write goes through one file lock, so the rate is bounded by",
            "  transactions per second, not by workers. The provider does group commit: calls that",
            "  arrive while a batch runs (with many sessions, most settlements) go to the thread together",
            "  and commit in one transaction, a savepoint each; every call still returns only after its",
            "  commit. Before that (one thread hop and one commit per call) one worker reached 0.42x the",
            "  hand-written loop (2,960 against 7,717 msg/s, 261 us against 113 us of CPU per message,",
            "  quick size). The hand-written loop commits every delete alone, as written; it could batch",
            "  its deletes too, and would then be faster again. A second worker process does not add",
            f"  throughput here ({two['msgs_per_s']:,.0f} against {one['msgs_per_s']:,.0f} msg/s): both",
            "  contend for the one write lock (`BEGIN IMMEDIATE`, busy handler), their batches get",
            "  smaller, and on this 2-core box they share the cores with the parent. Add worker",
            "  processes for handlers that wait on I/O or burn CPU, not for the broker's sake.",
        ]
    if "telemetry_cost" in data:
        rows = data["telemetry_cost"]["rows"]
        rel = {r["mode"]: r.get("cpu_relative_to_off", r["relative_to_off"]) for r in rows}
        out += [
            f"- **Telemetry** (per CPU-second). Metrics on: {rel.get('metrics', 0):.2f}x the rate with no"
            f" SDK; tracing at a parent-based 1 % ratio: {rel.get('sampled', 0):.2f}x; both:"
            f" {rel.get('production', 0):.2f}x; always-on tracing: {rel.get('tracing', 0):.2f}x.",
            "  Per message the runtime adds to its own tallies (three histogram records, a few counters);",
            "  the SDK reads them at collection. An unsampled message gets no SDK span at all. A",
            "  sampled one gets three (receive, process, complete): the Python SDK spends 12-18 us per",
            "  span (creation, attribute validation, export queue), more than the in-memory runtime",
            "  spends on a whole message (~10 us): the SDK alone caps always-on tracing at"
            f" {data['telemetry_cost'].get('tracing_ceiling', {}).get('ratio', '?')}x here (section 5).",
        ]
    if "scaling" in data:
        d = data["scaling"]
        by_s = d["by_sessions"]
        by_c = d["by_concurrency"]
        cpu_peak = max(by_s, key=lambda r: r["cpu_msgs_per_s"])
        io_peak = max(by_s, key=lambda r: r["io_msgs_per_s"])
        c1 = by_c[0]
        c_best = max(by_c, key=lambda r: r["io_msgs_per_s"])
        out += [
            "- **Scaling.** With the handler that does no I/O the runtime is CPU-bound: the best rate",
            f"  ({cpu_peak['cpu_msgs_per_s']:,} msg/s) is at {cpu_peak['sessions']:,} session(s); with more",
            "  sessions each message wakes a different session task, and at thousands of sessions",
            "  (a few messages each) accepting and starting sessions is a large share. With the 1 ms",
            "  handler one session is bound by the handler (at most ~1,000 msg/s in order), more",
            f"  sessions overlap the waits up to the CPU limit (best {io_peak['io_msgs_per_s']:,} msg/s at"
            f" {io_peak['sessions']:,} sessions).",
            f"  `per_session_concurrency` (at {c1['sessions']} sessions): with the 1 ms handler it goes from"
            f" {c1['io_msgs_per_s']:,} msg/s at 1 to {c_best['io_msgs_per_s']:,} msg/s at"
            f" {c_best['per_session_concurrency']} (it gives up order within a session); with the CPU-only",
            "  handler it costs about what c = 1 costs (section 8).",
        ]
    if "concurrency" in data:
        out += [
            "- **Concurrent handling (section 8).** A session with `per_session_concurrency` c > 1 (and a",
            "  non-session queue, c = `max_concurrent_sessions`) runs c slot tasks over the session's one",
            "  mailbox: a slot takes the next message and handles it on the ordered loop's path (one cancel",
            "  scope per slot, not per message; no channel hand-off); a slot that finds the mailbox empty",
            "  receives up to c + prefetch messages for all while the others park, and a woken slot wakes",
            "  the next only while messages are left, so a handler that never awaits drains the mailbox",
            "  in one task, as the ordered loop does. Before this (one channel hand-off, two task",
            "  switches and a cancel scope per message) c = 2 ran at 0.2x c = 1. With the 1 ms handler the",
            "  limit is trio's timers, not the runtime: bare trio with 2 x c tasks that only sleep 1 ms",
            "  reaches about 0.6x of 2 x c / 1 ms on this machine (the poll's timeout is rounded to whole",
            "  milliseconds, so a 1 ms sleep lasts 1-2 ms), and the runtime reaches most of that. A",
            "  non-session queue keeps a cancel scope per message: each message has its own lock, and",
            "  losing it cancels that handler alone.",
        ]
    return out


def write_report(results: Path = RESULTS_DIR, path: Path = DOCS_DIR / "benchmarks.md") -> Path:
    path.write_text(render(results))
    return path
