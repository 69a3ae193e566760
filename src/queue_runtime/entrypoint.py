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
    print(f"queue-runtime: error: {error}", file=sys.stderr)
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
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> SupervisorStats:
    """Run one supervisor for ``actor`` with ``settings`` until drained; return its stats.

    With ``install_signal_handlers``, SIGINT/SIGTERM trigger the graceful drain and a second
    signal cancels at once. ``provider`` defaults to the one the settings name; it is closed
    on return either way.
    """
    from .providers import create_provider

    config = settings.supervisor_config()
    owned = provider is None
    provider = provider if provider is not None else create_provider(settings)
    try:
        supervisor = Supervisor(provider, actor, config)
        async with trio.open_nursery() as nursery:
            if install_signal_handlers:
                nursery.start_soon(_watch_signals, supervisor, nursery.cancel_scope)

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                await supervisor.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop watching signals

            await nursery.start(serve)
            if on_started is not None:
                on_started(supervisor)
            task_status.started(supervisor)
        return supervisor.stats()
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
