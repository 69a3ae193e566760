"""GitHub-style webhooks, one actor per pull request: events of one PR are handled in order.

A flaky downstream (the "CI service") fails now and then; the runtime retries in place, so the
PR's later events wait instead of overtaking the failed one.

    queue-runtime worker examples.webhooks:PullRequestActor --queue webhooks
"""

from __future__ import annotations

import msgspec

from queue_runtime import DeadLetter, MessageContext, SessionActor, run


class PullRequestEvent(msgspec.Struct):
    repository: str
    number: int
    action: str  # "opened" | "synchronize" | "labeled" | "closed" | "reopened"
    head_sha: str = ""
    label: str | None = None


class CiService:
    """Stands in for a downstream HTTP API; tests make it fail on purpose."""

    def __init__(self) -> None:
        self.failures_left: dict[str, int] = {}
        self.builds: list[tuple[str, str]] = []

    async def start_build(self, pr: str, sha: str) -> None:
        left = self.failures_left.get(sha, 0)
        if left:
            self.failures_left[sha] = left - 1
            raise ConnectionError("CI service unavailable")
        self.builds.append((pr, sha))


ci = CiService()


class PullRequestActor(SessionActor[PullRequestEvent]):
    """Session id: ``"{repository}#{number}"``."""

    async def on_start(self) -> None:
        self.open = False
        self.head_sha = ""
        self.labels: set[str] = set()

    async def handle(self, event: PullRequestEvent, ctx: MessageContext) -> None:
        pr = f"{event.repository}#{event.number}"
        if pr != ctx.session_id:
            raise DeadLetter("WrongSession", f"{pr} delivered to {ctx.session_id}")
        if event.action in ("opened", "reopened"):
            self.open = True
        elif not self.open:
            raise DeadLetter("PullRequestNotOpen", f"{event.action} on a closed pull request")
        if event.action in ("opened", "reopened", "synchronize"):
            self.head_sha = event.head_sha
            await ci.start_build(pr, event.head_sha)  # raises sometimes: retried in place
        elif event.action == "labeled" and event.label:
            self.labels.add(event.label)
        elif event.action == "closed":
            self.open = False


if __name__ == "__main__":
    run(PullRequestActor, queue="webhooks")
