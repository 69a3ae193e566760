"""The drills' checks on recorded ``handle()`` calls, per message group.

* ``lost``: a message with no call that returned (``done``);
* ``gap``: a call of seq k+1 that started before the first ``done`` end of seq k;
* ``overlap``: two calls of one group whose intervals intersect, in one process or two. A call
  with no end line ends when its process was killed (``killed``); one without an end line
  whose process was not killed is itself a violation (``unfinished``) and ends when its
  process exited (or with the last record, if that is unknown);
* ``unknown``: a call for a message that was never sent.

Times are CLOCK_MONOTONIC nanoseconds; reports give seconds from ``origin``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .recorder import Call


@dataclass(frozen=True)
class Violation:
    kind: str
    group: str | None
    detail: str

    def as_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "group": self.group, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.kind}{f' {self.group}' if self.group else ''}: {self.detail}"


@dataclass(frozen=True)
class Interval:
    call: Call
    start: int
    end: int
    closed_by: str  # "end" (its end line), "kill", "exit" or "unknown"


def _seconds(ns: int, origin: int) -> str:
    return f"{(ns - origin) / 1e9:.3f}"


def describe(interval: Interval, origin: int) -> str:
    c = interval.call
    ending = c.outcome if interval.closed_by == "end" else f"no end line, {interval.closed_by}"
    return (
        f"pid {c.pid} seq {c.seq} (message {c.message_id[:12]}, delivery {c.delivery_count},"
        f" attempt {c.attempt}) {_seconds(interval.start, origin)}-{_seconds(interval.end, origin)} s"
        f" [{ending}]"
    )


def intervals(
    calls: Iterable[Call], *, killed: Mapping[int, int], exited: Mapping[int, int]
) -> tuple[list[Interval], list[Call]]:
    """Each call's interval, and the calls left open by a process that was not killed."""
    calls = list(calls)
    last = max((c.end or c.start for c in calls), default=0)
    out: list[Interval] = []
    unfinished: list[Call] = []
    for c in calls:
        if c.end is not None:
            out.append(Interval(c, c.start, c.end, "end"))
        elif c.pid in killed:
            out.append(Interval(c, c.start, max(c.start, killed[c.pid]), "kill"))
        else:
            unfinished.append(c)
            if c.pid in exited:
                out.append(Interval(c, c.start, max(c.start, exited[c.pid]), "exit"))
            else:
                out.append(Interval(c, c.start, max(c.start, last), "unknown"))
    return out, unfinished


def check_calls(
    calls: Iterable[Call],
    sent: Mapping[str, int],
    *,
    killed: Mapping[int, int] | None = None,
    exited: Mapping[int, int] | None = None,
    origin: int = 0,
) -> list[Violation]:
    """The violations in ``calls`` for ``sent`` (group -> number of messages, seqs 0..n-1)."""
    spans, unfinished = intervals(calls, killed=killed or {}, exited=exited or {})
    violations = [
        Violation(
            "unfinished",
            c.group,
            f"pid {c.pid} seq {c.seq} started at {_seconds(c.start, origin)} s and has no end line,"
            " though its process was not killed",
        )
        for c in unfinished
    ]
    by_group: dict[str, list[Interval]] = defaultdict(list)
    for span in spans:
        by_group[span.call.group].append(span)

    for group in sorted(set(by_group) - set(sent)):
        violations.append(Violation("unknown", group, f"{len(by_group[group])} calls for a group never sent"))

    for group, count in sorted(sent.items()):
        group_spans = sorted(by_group.get(group, []), key=lambda s: (s.start, s.end))
        first_done: dict[int, int] = {}
        for span in group_spans:
            c = span.call
            if not 0 <= c.seq < count:
                violations.append(Violation("unknown", group, f"a call for seq {c.seq}, never sent"))
            elif c.outcome == "done":
                first_done[c.seq] = min(first_done.get(c.seq, span.end), span.end)
        for seq in range(count):
            if seq not in first_done:
                tries = sum(1 for s in group_spans if s.call.seq == seq)
                violations.append(
                    Violation("lost", group, f"seq {seq} never handled to done ({tries} calls)")
                )
        for span in group_spans:
            seq = span.call.seq
            if 0 < seq < count and not (seq - 1 in first_done and first_done[seq - 1] <= span.start):
                before = first_done.get(seq - 1)
                when = f"at {_seconds(before, origin)} s" if before is not None else "never"
                violations.append(
                    Violation(
                        "gap", group, f"{describe(span, origin)} started; seq {seq - 1} first done {when}"
                    )
                )
        # Sweep in start order: a call starting before the latest end so far overlaps that call.
        latest: Interval | None = None
        for span in group_spans:
            if latest is not None and span.start < latest.end:
                overlap_ms = (min(latest.end, span.end) - span.start) / 1e6
                violations.append(
                    Violation(
                        "overlap",
                        group,
                        f"{describe(latest, origin)} and {describe(span, origin)}"
                        f" overlap by {overlap_ms:.1f} ms",
                    )
                )
            if latest is None or span.end > latest.end:
                latest = span
    return violations


__all__ = ["Interval", "Violation", "check_calls", "describe", "intervals"]
