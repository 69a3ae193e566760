"""Three ``queue-runtime worker`` processes and two producer processes on one SQLite file, one
worker killed with ``kill -9`` mid-run.

The workers run the drills' recorder actor (``drills.recorder``: every ``handle()`` call is a
start and an end line with the pid and CLOCK_MONOTONIC timestamps) and the records are checked
by ``drills.checks``: every session's messages handled in order (no call of message k+1 starts
before message k was first done), never two calls of one session at once (in one process or
two), nothing lost. Each message is handled once, except the ones the killed worker held:
those come back (after its session locks expire) to the other workers, in order, with their
delivery counted. The survivors drain on SIGTERM and exit 0, and the queue ends empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from drills.checks import check_calls
from drills.recorder import read_calls
from worker_process import REPO, WorkerProcess, clean_env

pytestmark = pytest.mark.slow

GROUPS_PER_PRODUCER = 20
PER_GROUP = 30
LOCK_SECONDS = 3  # how soon the killed worker's sessions come back

PRODUCER = textwrap.dedent(
    """
    import sys
    import trio
    from queue_runtime import Message
    from queue_runtime.client import open_client
    from drills.recorder import Step

    groups = sys.argv[1].split(",")
    per_group = int(sys.argv[2])

    async def main():
        async with open_client(queue="steps") as client:
            for seq in range(per_group):  # round robin: every batch holds one step of each group
                await client.send_batch("steps", [Message.json(Step(g, seq), session_id=g) for g in groups])
                await trio.sleep(0.02)  # keep sending while the workers run

    trio.run(main)
    """
)


def test_three_workers_two_producers_one_killed(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    env = {
        "QUEUE_SQLITE_PATH": str(tmp_path / "queue.db"),
        "QUEUE_SQLITE_LOCK_DURATION_SECONDS": str(LOCK_SECONDS),
        "DRILL_RECORD_DIR": str(records),
        "DRILL_HANDLE_MS": "5:25",
        "PYTHONPATH": str(REPO),
    }
    groups = {
        producer: [f"p{producer}-g{index}" for index in range(GROUPS_PER_PRODUCER)] for producer in range(2)
    }
    sent = {group: PER_GROUP for names in groups.values() for group in names}
    total = len(sent) * PER_GROUP
    workers = [
        # At most 15 of the 40 sessions each: all three workers must take part.
        WorkerProcess(
            ["drills.recorder:Recorder", "-q", "steps", "--idle-timeout", "1", "--max-sessions", "15"],
            env=env,
        )
        for _ in range(3)
    ]
    producers: list[subprocess.Popen[str]] = []
    killed: dict[int, int] = {}
    exited: dict[int, int] = {}
    try:
        for worker in workers:
            worker.wait_for("accepting sessions on steps (sqlite)", timeout=60)
        producers = [
            subprocess.Popen(
                [sys.executable, "-c", PRODUCER, ",".join(names), str(PER_GROUP)],
                cwd=REPO,
                env=clean_env(env),
                stderr=subprocess.PIPE,
                text=True,
            )
            for names in groups.values()
        ]
        victim = workers[0]
        victim_log = records / f"{victim.pid}.log"
        deadline = time.monotonic() + 60
        # Kill it mid-run: once it has handled a good share of messages, while producers send.
        while not (victim_log.exists() and victim_log.read_text().count("\nE ") >= total // 10):
            assert time.monotonic() < deadline, "the first worker handled too little to be killed mid-run"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        killed[victim.pid] = time.monotonic_ns()
        victim.wait(timeout=10)
        for producer in producers:
            _, err = producer.communicate(timeout=60)
            assert producer.returncode == 0, err
        # Everything done, the killed worker's messages included (after its locks expired).
        deadline = time.monotonic() + 60
        while True:
            done = {(c.group, c.seq) for c in read_calls(records) if c.outcome == "done"}
            if len(done) == total:
                break
            assert time.monotonic() < deadline, f"{total - len(done)} messages never handled"
            time.sleep(0.2)
        for worker in workers[1:]:
            worker.terminate()
        for worker in workers[1:]:
            assert worker.wait(timeout=30) == 0, worker.log
            exited[worker.pid] = time.monotonic_ns()
            assert "Traceback" not in worker.log
    finally:
        for worker in workers:
            worker.kill()
        for producer in producers:
            if producer.poll() is None:
                producer.kill()
                producer.wait()

    calls = read_calls(records)
    assert {c.pid for c in calls} == {w.pid for w in workers}, "every worker took part"
    violations = check_calls(calls, sent, killed=killed, exited=exited, origin=min(c.start for c in calls))
    assert not violations, "\n".join(map(str, violations[:20]))
    # Once each, except what the killed worker held: survivors handle every message at most once,
    # and a message handled twice was first handled (or started) by the killed worker.
    survivors = Counter((c.group, c.seq) for c in calls if c.pid not in killed)
    assert max(survivors.values()) == 1
    by_message: defaultdict[tuple[str, int], list[int]] = defaultdict(list)
    for c in calls:
        by_message[(c.group, c.seq)].append(c.pid)
    again = {key: pids for key, pids in by_message.items() if len(pids) > 1}
    assert all(victim.pid in pids for pids in again.values()), again
    redelivered = [c for c in calls if c.delivery_count > 1]
    assert redelivered, "the killed worker held nothing in flight: the kill tested nothing"
    assert all(c.pid not in killed for c in redelivered)
    victim_groups = {c.group for c in calls if c.pid in killed}
    assert {c.group for c in redelivered} <= victim_groups
    # The queue ends empty: nothing in flight, nothing dead-lettered.
    stats = subprocess.run(
        [str(Path(sys.executable).with_name("queue-runtime")), "stats", "-q", "steps", "--json"],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert (figures["depth"], figures["in_flight"], figures["scheduled"], figures["dead_letter"]) == (
        0,
        0,
        0,
        0,
    )
