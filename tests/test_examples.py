"""The examples run as documented, through the real runtime (ActorHarness)."""

from __future__ import annotations

from typing import Any

from examples.orders import OrderActor, OrderEvent
from examples.webhooks import PullRequestActor, PullRequestEvent, ci
from queue_runtime import RetryPolicy
from queue_runtime.testing import ActorHarness


async def test_orders_example_keeps_each_order_in_order(autojump_clock: Any) -> None:
    async with ActorHarness(OrderActor) as harness:
        for order in ("o-1", "o-2"):
            for kind, amount in [("created", 0), ("item_added", 5), ("item_added", 7), ("paid", 0)]:
                await harness.send(OrderEvent(order, kind, amount), session_id=order)
        await harness.send(OrderEvent("o-2", "item_added", -1), session_id="o-2")
        await harness.send(OrderEvent("o-1", "created"), session_id="o-1")  # invalid transition
        await harness.run_until_idle()
        assert harness.actor("o-1").history == ["created", "item_added", "item_added", "paid"]
        assert harness.actor("o-1").total == 12
        assert harness.actor("o-2").total == 12
        reasons = sorted(d.reason for d in harness.dead_lettered)
    assert reasons == ["InvalidTransition", "NegativeAmount"]
    assert sorted(reason for _, reason in harness.stop_reasons) == ["shutdown", "shutdown"]


async def test_webhooks_example_retries_flaky_ci_without_reordering(autojump_clock: Any) -> None:
    ci.failures_left = {"sha-1": 2}
    ci.builds.clear()
    policy = RetryPolicy(max_attempts=3, initial_backoff=1.0, jitter=0.0)
    async with ActorHarness(PullRequestActor, retry=policy) as harness:
        pr = "acme/api#7"
        first = await harness.send(PullRequestEvent("acme/api", 7, "opened", "sha-1"), session_id=pr)
        await harness.send(PullRequestEvent("acme/api", 7, "synchronize", "sha-2"), session_id=pr)
        await harness.send(PullRequestEvent("acme/api", 7, "labeled", label="ready"), session_id=pr)
        await harness.send(PullRequestEvent("acme/api", 8, "labeled", label="x"), session_id="acme/api#8")
        await harness.run_until_idle()
        actor = harness.actor(pr)
        assert (actor.head_sha, actor.labels) == ("sha-2", {"ready"})
        assert [c.outcome for c in harness.attempts(first)] == ["raised", "raised", "returned"]
    assert ci.builds == [(pr, "sha-1"), (pr, "sha-2")]
    assert [d.reason for d in harness.dead_lettered] == ["PullRequestNotOpen"]


def test_the_concurrency_example_in_docs_actors_md_runs_as_written() -> None:
    """The ``per_session_concurrency`` example of docs/actors.md, run as it stands there
    (in a fresh interpreter: it calls ``trio.run`` itself); its own asserts check the timing."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "actors.md").read_text(encoding="utf-8")
    section = text[text.index("## Concurrency within a session") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    done = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
