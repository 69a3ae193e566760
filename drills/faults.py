"""Fault drills: several ``queue-runtime worker`` processes on one SQS FIFO queue while things
go wrong, every ``handle()`` call recorded and checked per message group.

Each drill run starts a `StrictMotoServer`, creates a FIFO queue (short visibility timeout, a
FIFO DLQ with a generous ``maxReceiveCount``), sends G groups x K messages round-robin, starts
W workers running `drills.recorder.Recorder`, injects its scenario's fault, waits until every
message was handled and the queue is empty (or a deadline), SIGTERMs every worker and checks:

* per group (`drills.checks`): nothing lost, no gap, no two ``handle()`` calls overlapping in
  time (within or across processes; a call of a worker killed with -9 ends at the kill);
* the queue and its DLQ are empty (the server's approximate counts);
* every worker exits 0 after SIGTERM, and no worker log holds a "Traceback".

Scenarios: ``kill9`` (kill -9 a worker mid-run, start a replacement), ``freeze-short`` and
``freeze-long`` (SIGSTOP the server for 0.5x and 2.5x the visibility timeout while handlers
run), ``slow`` (through `drills.proxy`: a share of calls delayed 0.5-3 s each way, past the
renewal point at half the visibility timeout, and some connections dropped before or after
forwarding), ``throttle`` (through the proxy: 20% of calls answered with SQS's throttling
error), ``crowded`` (no fault: 8 times the groups with an eighth of the messages each, 2
sessions per worker and ``maxReceiveCount`` 3, so that far more groups are active than the
workers take at once; a group released and received again over and over would reach the DLQ
unhandled).

``python -m drills.faults --rounds N [--scenario NAME ...] [--workers 2 3] [--quick]
[--server strict|moto] [--json PATH]`` prints one line per run and its violations, writes the results as JSON
(default ``drills/results/faults.json``, for a full run; earlier full runs are kept as
``faults-COMMIT.json``) and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .checks import Violation, check_calls
from .moto import CREDENTIALS, REGION, MotoServer, StrictMotoServer
from .proxy import ProxyProcess
from .recorder import HANDLE_MS_ENV, HANDLE_TAIL_ENV, RECORD_DIR_ENV, Call, handled, read_calls

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "drills" / "results" / "faults.json"
QUEUE_RUNTIME = str(Path(sys.executable).with_name("queue-runtime"))
SERVERS: dict[str, type[MotoServer]] = {"strict": StrictMotoServer, "moto": MotoServer}
SCENARIOS = ("kill9", "freeze-short", "freeze-long", "slow", "throttle", "crowded")
#: The queue's redrive: generous, as faults redeliver; low where only crowding could redeliver.
MAX_RECEIVE_COUNT = {"crowded": 3}
PROXIED = {
    # 0.5-3 s each way: a delayed renewal (due at half the visibility timeout) often reaches the
    # server after the visibility lapsed, and its answer comes later still.
    "slow": [
        "--delay-range",
        "0.5:3.0",
        "--delay-share",
        "0.3",
        "--drop-before",
        "0.03",
        "--drop-after",
        "0.03",
    ],
    "throttle": ["--throttle", "0.2"],
}


@dataclass(frozen=True)
class Plan:
    """The sizes of one drill run."""

    groups: int
    per_group: int
    visibility: int  # seconds: the queue's and the workers' visibility timeout
    handle_ms: tuple[int, int]
    tail: tuple[float, int, int] | None  # (share, low ms, high ms) of slow handler calls
    max_sessions: int  # per worker, fewer than the groups so that groups move between workers
    deadline: float  # seconds from the workers being ready to every message handled
    fault_at: float  # share of messages handled when kill9/freeze strike

    @property
    def messages(self) -> int:
        return self.groups * self.per_group

    def crowded(self) -> Plan:
        """The ``crowded`` scenario's sizes: 8 times the groups, an eighth of the messages each
        (at least 2), 2 sessions per worker."""
        return dataclasses.replace(
            self, groups=8 * self.groups, per_group=max(2, self.per_group // 8), max_sessions=2
        )


#: Handlers sleep 30-200 ms, and one call in five 1-3 s: that tail keeps a group's messages in
#: flight past the renewal point (half the visibility timeout), so renewals happen and can be
#: late, and a fault often finds a handler running. Six groups round-robin put about two
#: messages of a group in each receive batch of ten: the holder has a next message to start
#: when its lock is already gone.
FULL = Plan(
    groups=6,
    per_group=24,
    visibility=4,
    handle_ms=(30, 200),
    tail=(0.2, 1000, 3000),
    max_sessions=3,
    deadline=150,
    fault_at=0.3,
)
QUICK = Plan(
    groups=4,
    per_group=6,
    visibility=4,
    handle_ms=(30, 200),
    tail=(0.2, 1000, 3000),
    max_sessions=2,
    deadline=90,
    fault_at=0.3,
)


@dataclass
class RunResult:
    scenario: str
    workers: int
    round: int
    seed: int
    messages: int
    groups: int
    per_group: int
    visibility_timeout: int
    handle_calls: int = 0
    redeliveries: int = 0
    cancelled: int = 0
    errors: int = 0
    handled: int = 0
    violations: list[dict[str, str | None]] = field(default_factory=list)
    violation_counts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    proxy: dict[str, int] = field(default_factory=dict)
    work_dir: str | None = None

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.violation_counts.items())) or "none"
        return (
            f"{self.scenario:<13} W={self.workers} messages {self.messages:>4}  calls {self.handle_calls:>4}"
            f"  redeliveries {self.redeliveries:>3}  cancelled {self.cancelled:>3}"
            f"  {self.duration_s:6.1f} s  violations: {counts}"
        )


class Worker:
    """``queue-runtime worker`` in a subprocess, stdout and stderr to ``log``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "AWS_", "AZURE_"))}
        self.process = subprocess.Popen(
            [QUEUE_RUNTIME, "worker", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**clean, **env},
            cwd=REPO,
        )
        self.killed_at: int | None = None  # monotonic ns, after kill -9
        self.exited_at: int | None = None
        self.terminated = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.pid} exited ({self.process.returncode}) before {text!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.pid}: no {text!r} within {timeout} s")
            time.sleep(0.05)

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and self.exited_at is None:
            self.exited_at = time.monotonic_ns()
        return code

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.killed_at = self.exited_at = time.monotonic_ns()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.poll()
        return code

    def close(self) -> None:
        """Clean-up: kill if still running (this process only), close the log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.poll()
        self._log.close()


class Drill:
    """One run of one scenario (see the module docstring)."""

    def __init__(
        self,
        scenario: str,
        workers: int,
        plan: Plan,
        *,
        seed: int = 0,
        round_: int = 1,
        keep: str = "never",
        src: Path | None = None,
        server: str = "strict",
        log: Callable[[str], None] | None = None,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
        if scenario == "crowded":
            plan = plan.crowded()
        self.scenario = scenario
        self.workers = workers
        self.plan = plan
        self.seed = seed
        self.keep = keep
        self.src = src
        self.server = server
        self._say = log or (lambda _: None)
        self.result = RunResult(
            scenario=scenario,
            workers=workers,
            round=round_,
            seed=seed,
            messages=plan.messages,
            groups=plan.groups,
            per_group=plan.per_group,
            visibility_timeout=plan.visibility,
        )
        self.work = Path(tempfile.mkdtemp(prefix=f"drill-{scenario}-"))
        self.records = self.work / "records"
        self.records.mkdir()
        self.origin = time.monotonic_ns()
        self._workers: list[Worker] = []
        self._server: MotoServer | None = None
        self._proxy: ProxyProcess | None = None
        self._sqs: Any = None
        self._queue = f"drill-{uuid.uuid4().hex[:10]}.fifo"
        self._url = self._dlq_url = ""

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.monotonic()
        extra: list[Violation] = []
        try:
            self._setup()
            self._start_workers()
            if self._proxy is not None:
                self._proxy.resume_faults()
                self._event("proxy faults on")
            self._strike()
            if not self._wait_finished():
                got = len(handled(read_calls(self.records)))
                extra.append(
                    Violation(
                        "deadline", None, f"{got} of {self.plan.messages} messages handled by the deadline"
                    )
                )
            extra += self._stop_workers()
            if self._proxy is not None:
                self.result.proxy = self._proxy.stop()
            extra += self._check_queues()
        except Exception as error:  # a worker that never started, a server that died: report it
            self._event(f"drill failed: {type(error).__name__}: {error}")
            extra.append(Violation("drill", None, f"{type(error).__name__}: {error}"))
        finally:
            for worker in self._workers:
                worker.close()
            if self._proxy is not None:
                self._proxy.stop()
            if self._server is not None:
                self._server.stop()
        calls = read_calls(self.records)
        extra += self._check_logs()
        violations = extra + self._check_calls(calls)
        self._summarise(calls, violations, time.monotonic() - started)
        if self.keep == "always" or (self.keep == "failed" and violations):
            self.result.work_dir = str(self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        return self.result

    def _event(self, text: str) -> None:
        stamp = (time.monotonic_ns() - self.origin) / 1e9
        self.result.events.append(f"{stamp:.3f} s {text}")
        self._say(f"  {stamp:7.3f} s {text}")

    def _setup(self) -> None:
        self._server = SERVERS[self.server](trail=self.work / "server.log")
        self._sqs = self._server.client(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3})
        self._event(f"moto server pid {self._server.pid} on {self._server.url}")
        dlq = self._sqs.create_queue(
            QueueName=self._queue.replace(".fifo", "-dlq.fifo"), Attributes={"FifoQueue": "true"}
        )
        self._dlq_url = dlq["QueueUrl"]
        arn = self._sqs.get_queue_attributes(QueueUrl=self._dlq_url, AttributeNames=["QueueArn"])
        redrive = {
            "deadLetterTargetArn": arn["Attributes"]["QueueArn"],
            "maxReceiveCount": str(MAX_RECEIVE_COUNT.get(self.scenario, 50)),
        }
        self._url = self._sqs.create_queue(
            QueueName=self._queue,
            Attributes={
                "FifoQueue": "true",
                "VisibilityTimeout": str(self.plan.visibility),
                "RedrivePolicy": json.dumps(redrive),
            },
        )["QueueUrl"]
        entries = [
            {
                "Id": f"{g}-{s}",
                "MessageBody": json.dumps({"group": f"g{g:02d}", "seq": s}),
                "MessageGroupId": f"g{g:02d}",
                "MessageDeduplicationId": uuid.uuid4().hex,
            }
            for s in range(self.plan.per_group)
            for g in range(self.plan.groups)
        ]
        for start in range(0, len(entries), 10):
            response = self._sqs.send_message_batch(QueueUrl=self._url, Entries=entries[start : start + 10])
            if response.get("Failed"):
                raise RuntimeError(f"send failed: {response['Failed']}")
        if self.scenario in PROXIED:
            args = [*PROXIED[self.scenario], "--paused", "--seed", str(self.seed)]
            self._proxy = ProxyProcess(self._server.url, args, log=self.work / "proxy.log")
            self._event(
                f"proxy pid {self._proxy.pid} on {self._proxy.url}: {' '.join(PROXIED[self.scenario])}"
            )

    def _env(self) -> dict[str, str]:
        assert self._server is not None
        endpoint = self._proxy.url if self._proxy is not None else self._server.url
        low, high = self.plan.handle_ms
        return {
            "QUEUE_PROVIDER": "aws",
            "AWS_ENDPOINT_URL_SQS": endpoint,
            "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
            "AWS_REGION": REGION,
            "QUEUE_VISIBILITY_TIMEOUT_SECONDS": str(self.plan.visibility),
            "QUEUE_RECEIVE_TIMEOUT_SECONDS": "1",
            # What AWS users run by default: the strict server's long poll sees deletes that
            # land during it, as SQS's does.
            "QUEUE_SQS_OVERLAP_DELETES": "true",
            RECORD_DIR_ENV: str(self.records),
            HANDLE_MS_ENV: f"{low}:{high}",
            **({HANDLE_TAIL_ENV: ":".join(map(str, self.plan.tail))} if self.plan.tail else {}),
            **({"PYTHONPATH": str(self.src)} if self.src is not None else {}),
        }

    def _spawn(self) -> Worker:
        args = [
            "drills.recorder:Recorder",
            "--queue",
            self._queue,
            "--max-sessions",
            str(self.plan.max_sessions),
        ]
        args += ["--idle-timeout", "1", "--shutdown-grace", "20"]
        worker = Worker(args, self._env(), self.work / f"worker-{len(self._workers) + 1}.log")
        self._workers.append(worker)
        return worker

    def _start_workers(self) -> None:
        started = [self._spawn() for _ in range(self.workers)]
        for worker in started:
            worker.wait_for(f"accepting sessions on {self._queue}", timeout=60)
        self._event(f"{self.workers} workers ready: pids {', '.join(str(w.pid) for w in started)}")

    def _progress(self) -> int:
        return len(handled(read_calls(self.records)))

    def _wait_progress(self, share: float) -> None:
        deadline = time.monotonic() + self.plan.deadline
        while self._progress() < share * self.plan.messages and time.monotonic() < deadline:
            time.sleep(0.05)

    def _strike(self) -> None:
        if self.scenario == "kill9":
            self._wait_progress(self.plan.fault_at)
            victim = self._busiest()
            victim.kill9()
            self._event(f"kill -9 worker pid {victim.pid} ({self._progress()} handled)")
            replacement = self._spawn()
            replacement.wait_for(f"accepting sessions on {self._queue}", timeout=60)
            self._event(f"replacement worker pid {replacement.pid} ready")
        elif self.scenario.startswith("freeze"):
            assert self._server is not None
            factor = 0.5 if self.scenario == "freeze-short" else 2.5
            seconds = factor * self.plan.visibility
            self._wait_progress(self.plan.fault_at)
            self._wait_long_call(1.0)
            self._server.freeze()
            self._event(f"SIGSTOP moto server for {seconds:.1f} s ({self._progress()} handled)")
            time.sleep(seconds)
            self._server.thaw()
            self._event("SIGCONT moto server")

    def _wait_long_call(self, age: float, timeout: float = 10.0) -> None:
        """Until some handler has been running for ``age`` seconds (or ``timeout``): a fault
        then strikes a holder with a slow call in progress, whose lock needs renewing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.monotonic_ns()
            if any(c.end is None and now - c.start >= age * 1e9 for c in read_calls(self.records)):
                return
            time.sleep(0.05)

    def _busiest(self) -> Worker:
        """The live worker with the most calls in progress (the first one if none)."""
        open_calls = Counter(c.pid for c in read_calls(self.records) if c.end is None)
        live = [w for w in self._workers if w.poll() is None]
        return max(live, key=lambda w: open_calls[w.pid])

    def _depth(self, url: str) -> int:
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        attributes = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return sum(int(attributes.get(n, 0)) for n in names)

    def _wait_finished(self) -> bool:
        """Until every message was handled and the queue is empty; False at the deadline."""
        deadline = time.monotonic() + self.plan.deadline
        while time.monotonic() < deadline:
            for worker in self._workers:
                if worker.killed_at is None and worker.exited_at is None and worker.poll() is not None:
                    self._event(f"worker pid {worker.pid} exited on its own ({worker.process.returncode})")
            if self._progress() >= self.plan.messages and self._depth(self._url) == 0:
                self._event("every message handled, queue empty")
                return True
            time.sleep(0.2)
        self._event("deadline")
        return False

    def _stop_workers(self) -> list[Violation]:
        violations = []
        live = [w for w in self._workers if w.killed_at is None]
        early = {w.pid: w.process.returncode for w in live if w.poll() is not None}
        for worker in live:
            worker.terminate()
        self._event(f"SIGTERM {len([w for w in live if w.terminated])} workers")
        for worker in live:
            code = worker.wait(timeout=60)
            self.result.exit_codes[str(worker.pid)] = code
            if worker.pid in early:
                violations.append(
                    Violation(
                        "exit", None, f"worker pid {worker.pid} exited ({early[worker.pid]}) before SIGTERM"
                    )
                )
            elif code != 0:
                what = (
                    "did not exit within 60 s of SIGTERM" if code is None else f"exited {code} after SIGTERM"
                )
                violations.append(Violation("exit", None, f"worker pid {worker.pid} {what}"))
        for worker in self._workers:
            if worker.killed_at is not None:
                self.result.exit_codes[str(worker.pid)] = -signal.SIGKILL
        self._event("workers stopped")
        return violations

    def _check_queues(self) -> list[Violation]:
        violations = []
        for name, url in (("queue", self._url), ("DLQ", self._dlq_url)):
            depth = self._depth(url)
            if depth:
                violations.append(Violation("queue", None, f"the {name} holds {depth} messages at the end"))
        return violations

    def _check_logs(self) -> list[Violation]:
        violations = []
        for worker in self._workers:
            log = worker.log
            at = log.find("Traceback")
            if at >= 0:
                excerpt = " | ".join(log[at:].splitlines()[-3:])[:400]
                violations.append(Violation("traceback", None, f"worker pid {worker.pid}: {excerpt}"))
        return violations

    def _check_calls(self, calls: list[Call]) -> list[Violation]:
        killed = {w.pid: w.killed_at for w in self._workers if w.killed_at is not None}
        exited = {w.pid: w.exited_at for w in self._workers if w.exited_at is not None}
        sent = {f"g{g:02d}": self.plan.per_group for g in range(self.plan.groups)}
        return check_calls(calls, sent, killed=killed, exited=exited, origin=self.origin)

    def _summarise(self, calls: list[Call], violations: list[Violation], seconds: float) -> None:
        r = self.result
        r.handle_calls = len(calls)
        r.handled = len(handled(calls))
        r.redeliveries = max(0, len(calls) - self.plan.messages)
        r.cancelled = sum(1 for c in calls if c.outcome == "cancelled")
        r.errors = sum(1 for c in calls if c.outcome == "error")
        r.violations = [v.as_dict() for v in violations[:MAX_LISTED]]
        r.violation_counts = dict(Counter(v.kind for v in violations))
        r.duration_s = round(seconds, 2)


#: Violations listed per run (all are counted).
MAX_LISTED = 40


def run_drills(
    scenarios: Sequence[str],
    workers: Sequence[int],
    plan: Plan,
    *,
    rounds: int = 1,
    seed: int = 0,
    keep: str = "never",
    src: Path | None = None,
    verbose: bool = False,
    server: str = "strict",
) -> list[RunResult]:
    results = []
    for round_ in range(1, rounds + 1):
        for scenario in scenarios:
            for count in workers:
                run_seed = seed + 1000 * round_ + 10 * SCENARIOS.index(scenario) + count
                print(f"-- round {round_}: {scenario}, {count} workers (seed {run_seed})", flush=True)
                drill = Drill(
                    scenario,
                    count,
                    plan,
                    seed=run_seed,
                    round_=round_,
                    keep=keep,
                    src=src,
                    server=server,
                    log=(lambda text: print(text, flush=True)) if verbose else None,
                )
                result = drill.run()
                results.append(result)
                print(result.line(), flush=True)
                for violation in result.violations[:10]:
                    print(
                        f"     {violation['kind']} {violation['group'] or ''}: {violation['detail']}",
                        flush=True,
                    )
                if len(result.violations) > 10:
                    print(f"     ... {sum(result.violation_counts.values()) - 10} more", flush=True)
                if result.work_dir:
                    print(f"     logs and records kept in {result.work_dir}", flush=True)
    return results


def summary(results: Sequence[RunResult]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for r in results:
        row = table.setdefault(
            f"{r.scenario} W={r.workers}",
            {
                "runs": 0,
                "runs_with_violations": 0,
                "violations": Counter(),
                "handle_calls": 0,
                "redeliveries": 0,
            },
        )
        row["runs"] += 1
        row["runs_with_violations"] += bool(r.violation_counts)
        row["violations"].update(r.violation_counts)
        row["handle_calls"] += r.handle_calls
        row["redeliveries"] += r.redeliveries
    for row in table.values():
        row["violations"] = dict(row["violations"])
    return table


def _code_version(src: Path | None) -> str:
    """Which queue_runtime the workers ran: ``--src DIR``, or this tree's commit (``+dirty``
    when src/ has uncommitted changes)."""
    if src is not None:
        return f"src from {src}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=REPO).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _ms_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"LOW:HIGH milliseconds, got {text!r}") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"LOW:HIGH with 0 <= LOW <= HIGH, got {text!r}")
    return bounds


def _tail(text: str) -> tuple[float, int, int] | bool:
    if text in ("0", "none"):
        return False
    share, _, bounds = text.partition(":")
    try:
        low, high = _ms_range(bounds)
        value = float(share)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"SHARE:LOW:HIGH, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"SHARE between 0 and 1, got {text!r}")
    return value, low, high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m drills.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="times to run every scenario (default 1)")
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, metavar="NAME", help="default: all")
    parser.add_argument(
        "--workers", nargs="+", type=int, choices=[2, 3], help="default: 2 and 3 (--quick: 2)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (the test suite's round)")
    parser.add_argument(
        "--json", type=Path, help=f"results file (default {RESULTS.relative_to(REPO)} unless --quick)"
    )
    parser.add_argument("--groups", type=int, metavar="G", help="message groups (overrides the size)")
    parser.add_argument("--per-group", type=int, metavar="K", help="messages per group (overrides the size)")
    parser.add_argument("--visibility", type=int, metavar="SECONDS", help="visibility timeout (overrides)")
    parser.add_argument("--max-sessions", type=int, metavar="N", help="sessions per worker (overrides)")
    parser.add_argument("--handle-ms", type=_ms_range, metavar="LOW:HIGH", help="handler sleep (overrides)")
    parser.add_argument(
        "--tail", type=_tail, metavar="SHARE:LOW:HIGH", help="slow handler calls, ms ('0': none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed of the proxy's fault decisions")
    parser.add_argument(
        "--keep",
        choices=["never", "failed", "always"],
        default="never",
        help="keep runs' work directories (worker logs, call records): never (default), failed, always",
    )
    parser.add_argument(
        "--src",
        type=Path,
        metavar="DIR",
        help="workers import queue_runtime from DIR (e.g. `git archive COMMIT src | tar -x`), not this tree",
    )
    parser.add_argument(
        "--server",
        choices=sorted(SERVERS),
        default="strict",
        help="strict (default): moto with SQS's FIFO and receipt-handle rules restored; "
        "moto: moto with only the lapse fix, to compare (drills/moto.py)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run's timeline")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {
        "groups": args.groups,
        "per_group": args.per_group,
        "visibility": args.visibility,
        "max_sessions": args.max_sessions,
        "handle_ms": args.handle_ms,
        "tail": args.tail,
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if args.tail is False:
        plan = dataclasses.replace(plan, tail=None)
    workers = args.workers or ([2] if args.quick else [2, 3])
    started = time.monotonic()
    results = run_drills(
        args.scenario or SCENARIOS,
        workers,
        plan,
        rounds=args.rounds,
        seed=args.seed,
        keep=args.keep,
        src=args.src.resolve() if args.src else None,
        verbose=args.verbose,
        server=args.server,
    )
    elapsed = time.monotonic() - started
    table = summary(results)
    print(f"\n{len(results)} runs in {elapsed:.0f} s")
    for name, row in table.items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(row["violations"].items())) or "none"
        failed = row["runs_with_violations"]
        print(f"  {name:<18} runs {row['runs']:>3}  with violations {failed:>3}  ({counts})")
    path = args.json or (None if args.quick else RESULTS)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m drills.faults " + " ".join(argv if argv is not None else sys.argv[1:]),
            "code": _code_version(args.src),
            "server": args.server,
            "plan": asdict(plan),
            "rounds": args.rounds,
            "seconds": round(elapsed, 1),
            "summary": table,
            "runs": [asdict(r) for r in results],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {path}")
    return 1 if any(r.violation_counts for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
