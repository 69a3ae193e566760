"""`run()`: the worker entrypoint, and `serve_worker()`, which the CLI shares.

``run(OrderActor, queue="orders")`` loads configuration (defaults < config file < environment
< keyword arguments), builds the provider, and serves until SIGINT or SIGTERM. The first
signal starts a graceful drain (see `Supervisor.stop`); after a clean drain ``run()`` returns
and the process exits 0. A second signal stops at once, settling nothing, and the process exits
128 + that signal's number, as other workers do: 130 for SIGINT, 143 for SIGTERM
(`serve_worker` raises `StoppedAtOnce`, which carries the code).

Errors a user can fix (configuration, a missing queue, rejected credentials) are printed as
one line on stderr, never a traceback: exit code 2 for configuration, 1 for the rest.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from functools import partial
from os import PathLike
from typing import TYPE_CHECKING, Any

import trio

from .actor import SessionActor
from .errors import ConfigurationError, QueueError
from .supervisor import Supervisor, SupervisorStats

if TYPE_CHECKING:
    from .config import Settings
    from .providers.base import Provider

__all__ = ["StoppedAtOnce", "run", "serve_worker"]


class StoppedAtOnce(Exception):
    """`serve_worker` stopped at once on a second SIGINT/SIGTERM, before the drain finished.

    Running ``handle()`` calls were cancelled and nothing more was settled (their messages come
    back when their locks expire); an owned provider was closed as on a normal return. Raised
    only when ``serve_worker`` installed its signal handlers; cancelling ``serve_worker`` from
    outside still raises `trio.Cancelled`.

    ``signum`` is the second signal, ``exit_code`` the conventional ``128 + signum`` (130 for
    SIGINT, 143 for SIGTERM) that `run` and ``queue-runtime worker`` exit with, ``stats`` the
    supervisor's counts when it stopped. ``str()`` is one line for a log.
    """

    def __init__(self, signum: int, stats: SupervisorStats) -> None:
        self.signum = signal.Signals(signum)
        self.stats = stats
        super().__init__(f"stopped at once on a second {self.signum.name}: exit code {self.exit_code}")

    @property
    def exit_code(self) -> int:
        """``128 + signum``: the exit status of a process stopped by that signal."""
        return 128 + int(self.signum)


def run(
    actor: type[SessionActor[Any]],
    *,
    config_file: str | PathLike[str] | None = None,
    **overrides: Any,
) -> None:
    """Serve ``actor`` until a signal asks it to stop; return after a clean drain.

    ``overrides`` are configuration keys (``queue="orders"``, ``max_concurrent_sessions=8``,
    ``provider="aws"``...) and win over the environment and the config file.

    A second SIGINT/SIGTERM stops at once: one WARNING line is logged and ``SystemExit`` is
    raised with 128 + that signal's number (130 for SIGINT, 143 for SIGTERM).

    With the ``otel`` extra, the standard ``OTEL_*`` variables choose where spans and metrics
    are exported (`queue_runtime.exporting.setup_exporting`; a bad one is a configuration
    error, exit 2); the last ones are flushed on return, for at most 5 s.
    """
    from .config import load_settings

    try:
        settings = load_settings(config_file, **overrides)
        settings.supervisor_config()
    except QueueError as error:
        _fail(error, 2)
    _configure_logging(settings)
    from .exporting import setup_exporting

    try:
        exporting = setup_exporting(prometheus=settings.telemetry.metrics_port is not None)
    except QueueError as error:
        _fail(error, 2)
    try:
        trio.run(serve_worker, actor, settings)
    except StoppedAtOnce as stop:
        logging.getLogger("queue_runtime.worker").warning(
            str(stop), extra={"queue_name": settings.queue, "operation": "shutdown"}
        )
        raise SystemExit(stop.exit_code) from None
    except QueueError as error:
        _fail(error, 2 if isinstance(error, ConfigurationError) else 1)
    finally:
        exporting.shutdown()  # the last spans and metrics, at most exporting.SHUTDOWN_TIMEOUT s


def _fail(error: QueueError, code: int) -> Any:
    from .telemetry import redact

    # One line, redacted like logs: an SDK's error text may echo a connection string.
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"queue-runtime: error: {redact(text)}", file=sys.stderr)
    raise SystemExit(code)


def _configure_logging(settings: Settings) -> None:
    from . import telemetry

    configure = getattr(telemetry, "configure_logging", None)
    if configure is not None:
        configure(getattr(settings, "log_level", "INFO"), getattr(settings, "log_format", "text"))


async def serve_worker(
    actor: type[SessionActor[Any]],
    settings: Settings,
    *,
    provider: Provider | None = None,
    install_signal_handlers: bool = True,
    on_started: Callable[[Supervisor], None] | None = None,
    metrics_host: str | None = None,
    queue_stats_interval: float = 15.0,
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> SupervisorStats:
    """Run one supervisor for ``actor`` with ``settings`` until drained; return its stats.

    With ``install_signal_handlers``, SIGINT/SIGTERM trigger the graceful drain; a second
    signal before the drain finished cancels at once and raises `StoppedAtOnce` (with the
    signal, its exit code and the stats) instead of returning. ``provider`` defaults to the one
    the settings name; it is closed on return either way (the one passed in is the caller's to
    close).

    When ``settings.telemetry.metrics_port`` is set (``--metrics-port`` /
    ``QUEUE_METRICS_PORT``), Prometheus is set up (`telemetry.setup_prometheus`, needs the
    ``otel`` extra) and ``/metrics``, ``/healthz``, ``/readyz``, ``/sessions`` are served on ``metrics_host``
    (default ``settings.telemetry.metrics_host``, 127.0.0.1) from before the queue is checked
    until the drain ends (``/readyz`` is 200 only while the supervisor accepts work), and the
    queue-depth gauges are refreshed every ``queue_stats_interval`` seconds (also without a port
    when an SDK meter provider is set, e.g. for OTLP export). A port that cannot be bound raises
    `ConfigurationError` before anything is received.

    Secret references in ``settings`` (``keyvault://``, ``secretsmanager://``) are read before
    the provider is built (a failure stops start-up), then re-read every
    ``secrets.refresh_interval`` and at once when the broker refuses a credential; the
    provider uses a changed value for its next connection, without a restart and without
    dropping a session (`queue_runtime.secrets`). With ``provider`` given, the caller owns
    its credentials and nothing is re-read.

    A queue without sessions (a standard SQS queue, a Service Bus queue without sessions) is
    served with messages handled concurrently, in no order, and a WARNING says so.

    Cancellation: cancelling this call cancels the supervisor (nothing is settled, sessions
    are handed back) and the endpoints, then closes an owned provider, shielded.
    """
    from .providers import create_provider
    from .secrets import SecretResolver

    config = settings.supervisor_config()
    metrics_port = settings.telemetry.metrics_port
    host = metrics_host if metrics_host is not None else settings.telemetry.metrics_host
    if metrics_port is not None:
        from .telemetry import setup_prometheus

        setup_prometheus()  # before the supervisor creates its instruments
    owned = provider is None
    resolver: SecretResolver | None = None
    if provider is None:
        resolver = SecretResolver(settings)
        try:
            if resolver.references:
                settings = await resolver.load()
            provider = create_provider(settings, credentials=resolver if resolver.references else None)
        except BaseException:
            await resolver.aclose()
            raise
    try:
        supervisor = Supervisor(provider, actor, config)
        async with trio.open_nursery() as nursery:
            stopped_by: signal.Signals | None = None

            async def watch_signals() -> None:
                nonlocal stopped_by
                stopped_by = await _watch_signals(supervisor)
                nursery.cancel_scope.cancel()  # second signal: stop at once

            if install_signal_handlers:
                nursery.start_soon(watch_signals)
            if resolver is not None and resolver.references:
                nursery.start_soon(resolver.run)
            if metrics_port is not None:
                # Up before the queue check, so liveness answers (and readiness says 503)
                # while start-up retries a slow broker.
                await _start_endpoints(nursery, supervisor, host, metrics_port)

            drained = False

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                nonlocal drained
                await supervisor.serve(task_status=task_status)
                drained = True
                nursery.cancel_scope.cancel()  # drained: stop the signal watcher and endpoints

            await nursery.start(serve)
            info = supervisor.queue_info
            if info is not None and not info.requires_session:
                supervisor.telemetry.log(
                    logging.WARNING, _no_sessions(config.queue, provider.system), operation="receive"
                )
            from .telemetry import metrics_enabled, refresh_queue_stats

            if metrics_port is not None or metrics_enabled():
                # After the queue check: a missing queue is one start-up error, not also a
                # stats warning. Whoever reads the metrics (/metrics, an OTLP exporter, the
                # application's own SDK) gets the depth gauges too.

                await nursery.start(
                    partial(
                        refresh_queue_stats,
                        provider,
                        config.queue,
                        queue_stats_interval,
                        telemetry=supervisor.telemetry,
                    )
                )
            if on_started is not None:
                on_started(supervisor)
            task_status.started(supervisor)
        if drained:
            supervisor.telemetry.log(
                20, "drained: running work settled, the rest handed back", operation="shutdown"
            )
        else:
            supervisor.telemetry.log(
                30,
                "stopped before the drain finished: running handle() calls were cancelled and their"
                " messages left to the broker",
                operation="shutdown",
            )
            if stopped_by is not None:
                raise StoppedAtOnce(stopped_by, supervisor.stats())
        return supervisor.stats()
    except BaseExceptionGroup as group:
        # The nursery wraps even a lone start-up error (QueueNotFound, a port in use) in a
        # group; callers and run() expect the error itself.
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None
    finally:
        if owned:
            with trio.CancelScope(shield=True):
                await provider.aclose()
        if resolver is not None:
            await resolver.aclose()


def _no_sessions(queue: str, system: str) -> str:
    """The start-up WARNING for a queue without sessions (`config validate` notes the same)."""
    what = "a standard SQS queue" if system == "aws_sqs" else "a queue without sessions"
    return (
        f"queue {queue!r} is {what}: it has no sessions, so messages are handled concurrently,"
        " in no order (use a session queue, on SQS a .fifo queue, for per-session order)"
    )


async def _watch_signals(supervisor: Supervisor) -> signal.Signals:
    """Drain on the first SIGINT/SIGTERM; return the second one (the caller stops at once)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        draining = False
        async for signum in signals:
            received = signal.Signals(signum)
            if draining:
                supervisor.telemetry.log(
                    30, f"second signal: stopping at once ({received.name})", operation="shutdown"
                )
                return received
            draining = True
            supervisor.telemetry.log(
                20, f"received {received.name}: draining (send again to stop at once)", operation="shutdown"
            )
            supervisor.stop()
    raise AssertionError("unreachable: a signal receiver never ends")  # pragma: no cover


async def _start_endpoints(nursery: trio.Nursery, supervisor: Supervisor, host: str, port: int) -> int:
    """Serve the worker endpoints in ``nursery``; returns the bound port."""
    from .health import serve_endpoints
    from .introspection import render_sessions

    def ready() -> bool:
        return supervisor.ready

    def sessions(limit: int) -> bytes:
        return render_sessions(supervisor.snapshot(), limit)

    try:
        bound: int = await nursery.start(
            partial(serve_endpoints, port, host=host, ready=ready, sessions=sessions)
        )
    except OSError as error:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port}: {error.strerror or error}"
        ) from None
    return bound


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The only exception inside ``group`` (nested groups flattened), else None."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    return leaves[0] if len(leaves) == 1 else None
