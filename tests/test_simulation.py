"""The deterministic simulation (drills/simulation.py): its property, its checker, its replay.

* `test_simulation_keeps_the_contract`: 200 hypothesis scenarios (workers crashing, stopping
  and restarting, broker faults and stalls longer than the lock) must keep every invariant.
* `test_regression`: the minimal failing scenarios the simulation found, shrunk by hypothesis;
  when it finds a new one, add it to `REGRESSIONS` (the CLI prints it ready to paste).
* The checker is tested on synthetic records: it must see an overlap, a gap, a loss, a wrong
  dead-letter reason, and pass a clean record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from drills.simulation import (
    DeadLetterRecord,
    Event,
    Fault,
    Msg,
    Outage,
    RunResult,
    RunStats,
    Scenario,
    SimulationFailure,
    Stall,
    Trace,
    check,
    run_scenario,
    scenarios,
)

# -- the property -----------------------------------------------------------------------------------


@settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
def test_simulation_keeps_the_contract(scenario: Scenario) -> None:
    run_scenario(scenario).raise_for_violations()


# -- shrunk failing cases, kept as regression tests -------------------------------------------------

# (id, scenario): minimal failing cases the simulation found on the runtime before the fix for
# issue 14 (commit 7e41337), shrunk by hypothesis. Lock 10 s unless said.
REGRESSIONS: list[tuple[str, Scenario]] = [
    # renew_lock hangs longer than the lock: the handler runs on past its lock, the broker gives
    # the session out again and the same worker starts the redelivery beside it (c, f).
    (
        "renewal-stalls-handler-outlives-lock",
        Scenario(sessions=((Msg(duration=13.0),),), stalls=(Stall(at=0.0, duration=15.0),)),
    ),
    # renew_lock hangs while handle() is retried in place: retries go on after the lock expired,
    # beside the redelivery, with its delivery count going back (c, e, f).
    (
        "renewal-stalls-retries-outlive-lock",
        Scenario(sessions=((Msg(kind="always", duration=13.0),),), stalls=(Stall(at=0.0, duration=15.0),)),
    ),
    (
        "renewal-stalls-retry-backoff-outlives-lock",
        Scenario(sessions=((Msg(kind="always"),),), backoff=5.0, stalls=(Stall(at=0.0, duration=15.0),)),
    ),
    # Renewal answers late (it took effect): a retry starts exactly when the lock runs out (g).
    (
        "late-renewal-retry-at-lock-deadline",
        Scenario(
            sessions=((Msg(kind="always"),),),
            backoff=5.0,
            stalls=(Stall(at=0.0, duration=15.0, mode="late"),),
        ),
    ),
    # Every call answers late: complete() of m0 returns after the lock ran out (its renewal was
    # late too), and the prefetched m1 is started on the expired lock (g).
    (
        "late-complete-then-prefetched-start-on-expired-lock",
        Scenario(
            sessions=((Msg(duration=2.0), Msg()),),
            lock_duration=20.0,
            prefetch=1,
            chaos=80.0,
            stalls=(Stall(at=20.5, duration=30.0, operations=None, mode="late"),),
            outages=(Outage(at=0.5, kind="kill"),),
        ),
    ),
    # No fault at all: handle() fails when max_lock_renewal has run out, at the lock's deadline;
    # the retry starts on the expired lock beside the redelivery in the same worker (c, f).
    (
        "retry-at-max-lock-renewal-deadline",
        Scenario(sessions=((Msg(kind="flaky", fails=1, duration=20.0),),), max_lock_renewal=15.0),
    ),
    # Found on the first fix (afe2d64). Every call answers late: two receivers of s0 come back
    # at t=15, and the session accepted second started first and took the first one for the
    # older: sessions of one id now register in acceptance order (f).
    (
        "late-stall-newer-receiver-registered-first",
        Scenario(
            sessions=((Msg(),), (Msg(),)),
            receive_timeout=20.0,
            stalls=(Stall(at=0.0, duration=15.0, operations=None, mode="late"),),
        ),
    ),
    # A session ends while the broker stalls: handing back its prefetched message hangs past the
    # clean-up deadline, which skipped on_stop and the close: the receiver stayed open (f).
    (
        "stuck-hand-back-skipped-the-close",
        Scenario(
            sessions=((Msg(), Msg(), Msg(), Msg(), Msg(kind="flaky", fails=1), Msg()),),
            max_attempts=1,
            prefetch=1,
            faults=(
                *[Fault(at=0.0, op="renew_lock")] * 7,
                Fault(at=0.0, op="dead_letter"),
                Fault(at=0.0, op="dead_letter", times=5),
            ),
            stalls=(Stall(at=0.0, duration=15.0, operations=None),),
        ),
    ),
    # A receive took m0 and its answer was lost: receiving again on the same session handed out
    # m1 first. A failed receive (other than a throttle) now gives the session up (b).
    (
        "lost-receive-answer-then-receive-again",
        Scenario(
            sessions=((Msg(), Msg(), Msg()),),
            prefetch=0,
            faults=(Fault(at=0.0, op="receive", error="ConnectionFailed", after=True),),
        ),
    ),
]


@pytest.mark.parametrize("scenario", [s for _, s in REGRESSIONS], ids=[i for i, _ in REGRESSIONS])
def test_regression(scenario: Scenario) -> None:
    run_scenario(scenario).raise_for_violations()


# -- the run itself ---------------------------------------------------------------------------------

CHAOTIC = Scenario(
    sessions=(
        (Msg(), Msg(kind="flaky", fails=1, duration=4.0), Msg(kind="dead")),
        (Msg(duration=12.0), Msg()),
    ),
    workers=2,
    chaos=30.0,
    faults=(Fault(at=1.0, op="complete", error="Timeout", times=2), Fault(at=2.0, op="renew_lock", times=3)),
    stalls=(Stall(at=3.0, duration=4.0, operations=None, mode="late"),),
    outages=(Outage(at=5.0, worker=1, kind="kill", down_for=5.0),),
    seed=12345,
)


def test_a_scenario_replays_identically() -> None:
    first = run_scenario(CHAOTIC)
    run_scenario(Scenario(sessions=((Msg(),),) * 3, workers=3, seed=1))  # other tasks, other allocations
    again = run_scenario(CHAOTIC)
    assert [str(e) for e in first.trace.events] == [str(e) for e in again.trace.events]
    assert first.trace.dead_letters == again.trace.dead_letters
    assert first.stats.handle_calls > 5


def test_the_seed_changes_the_interleaving_not_the_outcome() -> None:
    scenario = Scenario(sessions=((Msg(), Msg()), (Msg(), Msg()), (Msg(),)), workers=3)
    runs = [run_scenario(dataclasses.replace(scenario, seed=seed)) for seed in range(6)]
    assert len({tuple(str(e) for e in r.trace.events) for r in runs}) > 1
    assert all(r.violations == [] for r in runs)


def test_scenario_repr_is_valid_python() -> None:
    namespace: dict[str, Any] = {
        "Scenario": Scenario,
        "Msg": Msg,
        "Fault": Fault,
        "Stall": Stall,
        "Outage": Outage,
    }
    assert eval(repr(CHAOTIC), namespace) == CHAOTIC
    assert repr(Scenario()) == "Scenario()"


def test_dead_letter_reasons_and_counts_of_a_quiet_run() -> None:
    scenario = Scenario(
        sessions=(
            (
                Msg(kind="always"),
                Msg(kind="dead"),
                Msg(kind="undecodable"),
                Msg(kind="flaky", fails=2),
                Msg(),
            ),
        ),
        max_attempts=3,
    )
    result = run_scenario(scenario)
    assert result.violations == []
    assert {(d.mid, d.reason) for d in result.trace.dead_letters} == {
        ("s0-m0", "MaxAttemptsExceeded"),
        ("s0-m1", "Script"),
        ("s0-m2", "DeserializationFailed"),
    }
    assert result.stats.handle_calls == 3 + 1 + 3 + 1


def test_a_violation_raises_with_a_readable_report() -> None:
    record = overlapping()
    result = RunResult(Scenario(), record.trace(), check(record.trace()), RunStats())
    with pytest.raises(SimulationFailure) as raised:
        result.raise_for_violations()
    text = str(raised.value)
    assert text.startswith("1 violation(s) in Scenario()")
    assert "(c) s0: two handle() calls at once: s0-m0 on w0 (h1) and s0-m0 on w1 (h2)" in text
    assert "=> #" in text
    assert type(raised.value).__name__ == "InvariantCViolated"
    assert raised.value.violations == result.violations


# -- the checker on synthetic records ---------------------------------------------------------------


class Record:
    """Builds a synthetic trace: one session s0 with ``n`` messages scripted ``ok`` unless told."""

    def __init__(self, n: int = 2, scripts: dict[int, Msg] | None = None) -> None:
        self.events: list[Event] = []
        self.t = 0.0
        self.scripts = {f"s0-m{k}": ("s0", k, (scripts or {}).get(k, Msg())) for k in range(n)}
        self.dead: list[DeadLetterRecord] = []
        self.leftover: list[str] = []
        self.hid = 0
        for k in range(n):
            self.add("send", worker="prod", session="s0", k=k, mid=f"s0-m{k}")

    def add(self, kind: str, **fields: Any) -> Event:
        event = Event(len(self.events) + 1, self.t, kind, **fields)
        self.events.append(event)
        return event

    def accept(self, rid: int = 1, worker: str = "w0") -> None:
        self.add("accept", worker=worker, session="s0", rid=rid)

    def close(self, rid: int = 1, worker: str = "w0") -> None:
        self.add("close", worker=worker, session="s0", rid=rid)

    def start(self, k: int, *, rid: int = 1, worker: str = "w0", dc: int = 1, attempt: int = 1,
              lock_left: float = 10.0, held: bool = True) -> int:  # fmt: skip
        self.hid += 1
        self.add("start", worker=worker, session="s0", k=k, mid=f"s0-m{k}", dc=dc, attempt=attempt, rid=rid,
                 hid=self.hid, lock_left=lock_left, held=held)  # fmt: skip
        return self.hid

    def end(self, hid: int, outcome: str = "done") -> None:
        start = next(e for e in self.events if e.kind == "start" and e.hid == hid)
        self.add("end", worker=start.worker, session="s0", k=start.k, mid=start.mid, dc=start.dc,
                 attempt=start.attempt, rid=start.rid, hid=hid, outcome=outcome)  # fmt: skip

    def settle(self, k: int, op: str = "complete", *, rid: int = 1, worker: str = "w0", dc: int = 1) -> None:
        fields = {
            "worker": worker,
            "session": "s0",
            "k": k,
            "mid": f"s0-m{k}",
            "dc": dc,
            "rid": rid,
            "op": op,
        }
        self.add("settle", **fields)
        self.add("settled", **fields)

    def handled(self, k: int, **kw: Any) -> None:
        self.end(self.start(k, **kw))
        self.settle(k, rid=kw.get("rid", 1), worker=kw.get("worker", "w0"), dc=kw.get("dc", 1))

    def trace(self) -> Trace:
        return Trace(
            events=self.events,
            scripts=self.scripts,
            sent=set(self.scripts),
            dead_letters=self.dead,
            leftover=self.leftover,
            max_attempts=3,
            broker_max_delivery=5,
        )

    def invariants(self) -> list[str]:
        return sorted({v.invariant for v in check(self.trace())})


def clean(n: int = 2) -> Record:
    record = Record(n)
    record.accept()
    for k in range(n):
        record.handled(k)
    record.close()
    return record


def test_checker_passes_a_clean_record() -> None:
    assert check(clean(3).trace()) == []


def overlapping() -> Record:
    record = Record(1)
    record.accept(rid=1, worker="w0")
    first = record.start(0, rid=1, worker="w0")
    record.t = 10.0
    record.accept(rid=2, worker="w1")
    second = record.start(0, rid=2, worker="w1", dc=2)
    record.t = 13.0
    record.end(first, "cancelled")
    record.end(second)
    record.settle(0, rid=2, worker="w1", dc=2)
    return record


def test_checker_sees_an_overlap() -> None:
    record = overlapping()
    [violation] = check(record.trace())
    assert violation.invariant == "c"
    assert "two handle() calls at once" in violation.title
    assert "3.000s" in violation.detail
    rendered = violation.render(record.trace())
    assert rendered.count("=> #") == 3  # both starts and the end of the first


def test_checker_sees_a_gap_and_an_order_regression() -> None:
    record = Record(2)
    record.accept()
    first = record.start(0)
    record.end(first, "raised")  # m0 not settled...
    record.handled(1)  # ...and m1 handled anyway
    record.handled(0)  # then m0 again: back to an earlier message
    record.close()
    titles = [v.title for v in check(record.trace()) if v.invariant == "b"]
    assert any("s0-m1 started before s0-m0 was settled" in t for t in titles)
    assert any("s0-m0 started after a later message s0-m1" in t for t in titles)


def test_checker_sees_losses() -> None:
    vanished = clean(2)
    vanished.events = [e for e in vanished.events if not (e.mid == "s0-m1" and e.kind.startswith("settle"))]
    assert [v.title for v in check(vanished.trace())] == [
        "s0-m1 vanished: not in the queue, not completed, not dead-lettered"
    ]
    stuck = clean(2)
    stuck.leftover = ["s0-m1"]
    assert "still in the queue" in check(stuck.trace())[0].title
    early = Record(1)
    early.accept()
    early.start(0)
    early.settle(0)  # completed while handle() still runs
    assert "before a handle() of it returned" in check(early.trace())[0].title


def test_checker_sees_wrong_dead_letter_reasons() -> None:
    record = Record(3, scripts={1: Msg(kind="dead"), 2: Msg(kind="always")})
    record.accept()
    record.handled(0)
    h = record.start(1)
    record.end(h, "raised DeadLetter")
    record.settle(1, "dead_letter")
    for attempt in (1, 2, 3):
        record.end(record.start(2, attempt=attempt), "raised")
    record.settle(2, "dead_letter")
    record.close()
    record.dead = [
        DeadLetterRecord("s0-m1", "MaxAttemptsExceeded", "ScriptFailure: x", 1),  # wants "Script"
        DeadLetterRecord("s0-m2", "MaxDeliveryCountExceeded", "", 2),  # the limit is 5
    ]
    found = check(record.trace())
    assert [v.invariant for v in found] == ["d", "d"]
    assert "calls for ['Script']" in found[0].title
    assert "after 2 deliveries" in found[1].title
    record.dead = [
        DeadLetterRecord("s0-m1", "Script", "asked", 1),
        DeadLetterRecord("s0-m2", "MaxAttemptsExceeded", "ScriptFailure: s0-m2 attempt 3", 1),
    ]
    assert check(record.trace()) == []


def test_checker_sees_bad_counts_and_holders() -> None:
    record = Record(2)
    record.accept(rid=1)
    record.handled(0, rid=1)
    record.accept(rid=2)  # a second receiver for s0 in w0 (the broker may hand one out)...
    record.end(record.start(1, rid=2, attempt=2, lock_left=-1.0), "done")  # ...used before r1 closed
    record.settle(1, rid=2)
    assert record.invariants() == ["e", "f", "g"]  # attempt 2 first; r1 still open; lock gone
    dead_on_arrival = Record(1)
    dead_on_arrival.accept(rid=1)  # never used (its lock was gone when it came), still open...
    dead_on_arrival.accept(rid=2)
    dead_on_arrival.handled(0, rid=2)  # ...so the newer one must wait for it too
    assert dead_on_arrival.invariants() == ["f"]
    waits = Record(1)
    waits.accept(rid=1)
    waits.accept(rid=2)
    waits.close(rid=1)  # the newer receiver waited for the older one: fine
    waits.handled(0, rid=2)
    assert waits.invariants() == []
    stale = Record(1)
    stale.accept(rid=1, worker="w0")
    stale.accept(rid=2, worker="w1")
    stale.handled(0, rid=1, worker="w0", held=False)  # the broker gave s0 to r2
    assert stale.invariants() == ["f"]
