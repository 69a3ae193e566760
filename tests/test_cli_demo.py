"""``queue-runtime demo``: the summary, the plan's invariants, and that the verdict can fail."""

from __future__ import annotations

import re
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_runtime.cli import demo as demo_module
from queue_runtime.cli import main
from queue_runtime.cli.demo import MAX_ATTEMPTS, DemoEvent, make_plan


def test_small_demo_prints_summary_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--sessions", "20", "--events", "10", "--no-live", "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "20/20 sessions in order" in out
    assert "completed + dead-lettered = 200 of 200 sent" in out
    plan = make_plan(20, 10, 3)
    # Every planned reason is in the table with its count from the dead-letter queue.
    for reason, count in plan.dead_letters.items():
        assert re.search(rf"DLQ {reason}\s*│\s*{count}\s", out), (reason, out)
    assert set(plan.dead_letters) == {
        "DeserializationFailed",
        "NegativeAmount",
        "MaxAttemptsExceeded",
        "MaxDeliveryCountExceeded",
    }
    assert re.search(r"messages sent\s*│\s*200\s", out)
    # Exactly the planned in-place retries: flaky messages' failures, two per hopeless message.
    assert re.search(
        rf"retries \(in place\)\s*│\s*{plan.retries} \(\d+ flaky messages, {plan.retries} retries", out
    )
    assert "msgs/s" in out
    # Plain progress lines (no TTY): the last one shows everything settled.
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert progress and "settled 200/200" in progress[-1]
    assert out.rstrip().endswith("OK")


def test_demo_fails_when_an_actor_breaks_order(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An actor that records events in the wrong order must make the demo fail (exit 1).
    original = demo_module.DemoActor.handle

    async def swapped(self: demo_module.DemoActor, event: DemoEvent, ctx: object) -> None:
        await original(self, event, ctx)  # type: ignore[arg-type]
        done = self.ledger.done.get(self.session_id, [])
        if self.session_id == "order-0002" and len(done) == 3:
            done[1], done[2] = done[2], done[1]

    monkeypatch.setattr(demo_module.DemoActor, "handle", swapped)
    code = main(["demo", "--sessions", "5", "--events", "6", "--no-live"])
    out = capsys.readouterr().out
    assert code == 1
    assert "4/5 sessions in order" in out and "out of order: order-0002" in out
    assert out.rstrip().endswith("FAILED")


@pytest.mark.parametrize("args", [["--sessions", "0"], ["--events", "x"], ["--latency", "-1"]])
def test_demo_bad_values_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("queue-runtime: error:") and "Traceback" not in err


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 40), st.integers(0, 2**32))
def test_plan_accounts_for_every_message(sessions: int, events: int, seed: int) -> None:
    plan = make_plan(sessions, events, seed)
    assert plan.total == sessions * events
    dead = sum(plan.dead_letters.values())
    assert sum(len(seqs) for seqs in plan.expected.values()) + dead == plan.total
    assert plan == make_plan(sessions, events, seed)  # deterministic per seed
    decoded_dead: Counter[str] = Counter()
    retries = 0
    for session, bodies in plan.bodies.items():
        expected = plan.expected[session]
        assert expected == sorted(expected)
        for seq, body in enumerate(bodies):
            try:
                event = msgspec.json.decode(body, type=DemoEvent)
            except msgspec.DecodeError:
                decoded_dead["DeserializationFailed"] += 1
                assert seq not in expected
                continue
            assert (event.order_id, event.seq) == (session, seq)
            if seq in expected:
                assert event.amount >= 0 and event.fail_times < MAX_ATTEMPTS
                retries += event.fail_times
            elif event.amount < 0:
                decoded_dead["NegativeAmount"] += 1
            elif event.fail_times >= MAX_ATTEMPTS:
                decoded_dead["MaxAttemptsExceeded"] += 1
                retries += MAX_ATTEMPTS - 1
            else:
                assert seq == 0 and session in plan.redelivered
                decoded_dead["MaxDeliveryCountExceeded"] += 1
    assert dict(decoded_dead) == plan.dead_letters
    assert retries == plan.retries
