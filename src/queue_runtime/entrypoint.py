"""`run()`: the worker entrypoint, and `serve_worker()`, which the CLI shares.

``run(OrderActor, queue="orders")`` loads configuration (defaults < config file < environment
< keyword arguments), builds the provider, and serves until SIGINT or SIGTERM. The first
signal starts a graceful drain (see `Supervisor.stop`); a second one stops at once, settling
nothing. After a clean drain ``run()`` returns and the process exits 0.

Errors a user can fix (configuration, a missing queue, rejected credentials) are printed as
one line on stderr, never a traceback: exit code 2 for configuration, 1 for the rest.
"""

from __future__ import annotations

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

__all__ = ["run", "serve_worker"]


def run(
    actor: type[SessionActor[Any]],
    *,
    config_file: str | PathLike[str] | None = None,
    **overrides: Any,
) -> None:
    """Serve ``actor`` until a signal asks it to stop; return after a clean drain.

    ``overrides`` are configuration keys (``queue="orders"``, ``max_concurrent_sessions=8``,
    ``provider="aws"``...) and win over the environment and the config file.
    """
    from .config import load_settings

    try:
        settings = load_settings(config_file, **overrides)
        settings.supervisor_config()
    except QueueError as error:
        _fail(error, 2)
    _configure_logging(settings)
    try:
        trio.run(serve_worker, actor, settings)
    except QueueError as error:
        _fail(error, 2 if isinstance(error, ConfigurationError) else 1)


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
    metrics_host: str = "0.0.0.0",
    queue_stats_interval: float = 15.0,
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> SupervisorStats:
    """Run one supervisor for ``actor`` with ``settings`` until drained; return its stats.

    With ``install_signal_handlers``, SIGINT/SIGTERM trigger the graceful drain and a second
    signal cancels at once. ``provider`` defaults to the one the settings name; it is closed
    on return either way (the one passed in is the caller's to close).

    When ``settings.telemetry.metrics_port`` is set (``--metrics-port`` /
    ``QUEUE_METRICS_PORT``), Prometheus is set up (`telemetry.setup_prometheus`, needs the
    ``otel`` extra) and ``/metrics``, ``/healthz``, ``/readyz`` are served on ``metrics_host``
    from before the queue is checked until the drain ends (``/readyz`` is 200 only while the
    supervisor accepts work), and the queue-depth gauges are refreshed every
    ``queue_stats_interval`` seconds. A port that cannot be bound raises `ConfigurationError`
    before anything is received.

    Cancellation: cancelling this call cancels the supervisor (nothing is settled, sessions
    are handed back) and the endpoints, then closes an owned provider, shielded.
    """
    from .providers import create_provider

    config = settings.supervisor_config()
    metrics_port = settings.telemetry.metrics_port
    if metrics_port is not None:
        from .telemetry import setup_prometheus

        setup_prometheus()  # before the supervisor creates its instruments
    owned = provider is None
    provider = provider if provider is not None else create_provider(settings)
    try:
        supervisor = Supervisor(provider, actor, config)
        async with trio.open_nursery() as nursery:
            if install_signal_handlers:
                nursery.start_soon(_watch_signals, supervisor, nursery.cancel_scope)
            if metrics_port is not None:
                # Up before the queue check, so liveness answers (and readiness says 503)
                # while start-up retries a slow broker.
                await _start_endpoints(nursery, supervisor, metrics_host, metrics_port)

            drained = False

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                nonlocal drained
                await supervisor.serve(task_status=task_status)
                drained = True
                nursery.cancel_scope.cancel()  # drained: stop the signal watcher and endpoints

            await nursery.start(serve)
            if metrics_port is not None:
                # After the queue check: a missing queue is one start-up error, not also a
                # stats warning.
                from .telemetry import refresh_queue_stats

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


async def _watch_signals(supervisor: Supervisor, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                supervisor.telemetry.log(
                    20,
                    f"received {signal.Signals(signum).name}: draining (send again to stop at once)",
                    operation="shutdown",
                )
                supervisor.stop()
            else:
                supervisor.telemetry.log(30, "second signal: stopping at once", operation="shutdown")
                scope.cancel()
                return


async def _start_endpoints(nursery: trio.Nursery, supervisor: Supervisor, host: str, port: int) -> int:
    """Serve the worker endpoints in ``nursery``; returns the bound port."""
    from .health import serve_endpoints

    def ready() -> bool:
        return supervisor.ready

    try:
        bound: int = await nursery.start(partial(serve_endpoints, port, host=host, ready=ready))
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
