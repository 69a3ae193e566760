"""Provider adapters: one per broker, all behind `providers.base.Provider`.

* ``memory`` — `providers.memory.InMemoryProvider`: an in-process broker with peek-lock,
  lock expiry, delivery counts, a broker-side dead-letter queue, TTL, scheduled messages,
  session locks and state, and fault injection. The embedded default: the demo, the tests and
  users' own tests. No extra needed.
* ``sqlite`` — `providers.sqlite.SqliteProvider`: the same model in a durable SQLite file
  (stdlib ``sqlite3``) shared by the worker and producer processes of one host. The default
  when no provider is configured (``./queue-runtime.db``). No extra needed.
* ``aws`` — `providers.sqs.SqsProvider`: SQS FIFO queues through aiobotocore (httpx backend,
  native on trio); a session is a ``MessageGroupId``. Needs ``queue-runtime[aws]``.
* ``azure`` — `providers.servicebus.ServiceBusProvider`: Azure Service Bus native sessions
  through the asyncio ``azure-servicebus`` SDK on a private loop thread. Needs
  ``queue-runtime[azure]``.

`create_provider` picks one from `Settings.provider`: the provider is configuration, never code.
The cloud adapters are imported only when chosen, so a memory-only install never imports
their SDKs.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..config import Settings
    from ..secrets import CredentialSource
    from .base import Provider

__all__ = ["create_provider", "open_provider"]

# provider name -> (module in this package, class name, pip extra, the extra's SDK modules).
# The SDK modules are imported up front because an adapter may import its SDK only when it
# connects: a missing extra must be reported here, at start-up, not at the first call.
_CLOUD: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "aws": ("sqs", "SqsProvider", "aws", ("aiobotocore.session", "aiobotocore.httpxsession")),
    "azure": ("servicebus", "ServiceBusProvider", "azure", ("azure.servicebus.aio",)),
}


def create_provider(settings: Settings, *, credentials: CredentialSource | None = None) -> Provider:
    """Build the provider `Settings.provider` names, configured from ``settings``.

    Nothing is connected yet: a provider opens its connections when entered (``async with``)
    or on first use, as its own docs say. Raises `ConfigurationError` for an unknown provider,
    or when the provider's extra is not installed
    (``provider 'aws' needs the aws extra: pip install 'queue-runtime[aws]'``).

    The provider's secret settings must be values, not references: `open_provider` reads the
    references first. With ``credentials`` (a `queue_runtime.secrets.SecretResolver`) the
    cloud providers follow rotation: after a refused credential they ask it to re-read the
    secrets, and each new connection uses its latest values.
    """
    unresolved = _unresolved(settings)
    if unresolved:
        raise ConfigurationError(
            f"{unresolved} is a secret reference: read it first (queue_runtime.providers.open_provider"
            " or queue_runtime.secrets.SecretResolver)"
        )
    if settings.provider == "memory":
        from .memory import InMemoryProvider

        return InMemoryProvider(
            lock_duration=settings.memory.lock_duration,
            max_delivery_count=settings.memory.max_delivery_count,
            max_queue_messages=settings.memory.max_queue_messages,
        )
    if settings.provider == "sqlite":
        from .sqlite import SqliteProvider

        return SqliteProvider.from_settings(settings)
    if settings.provider not in _CLOUD:
        valid = ", ".join(repr(name) for name in ("sqlite", "memory", *_CLOUD))
        raise ConfigurationError(f"unknown provider {settings.provider!r}: use one of {valid}")
    module_name, class_name, extra, sdk_modules = _CLOUD[settings.provider]
    try:
        for sdk_module in sdk_modules:
            importlib.import_module(sdk_module)
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as error:
        missing = error.name or ""  # the module that failed, e.g. "aiobotocore"
        # Our own module missing is a packaging bug, not a missing extra: let it surface.
        if missing == __name__ or missing.startswith(f"{__name__}."):
            raise
        raise ConfigurationError(
            f"provider {settings.provider!r} needs the {extra} extra: pip install 'queue-runtime[{extra}]'"
        ) from error
    provider_class = getattr(module, class_name)
    provider: Provider = (
        provider_class.from_settings(settings)
        if credentials is None
        else provider_class.from_settings(settings, credentials=credentials)
    )
    return provider


# The secret settings each provider reads.
_PROVIDER_SECRETS = {
    "aws": ("aws.secret_access_key", "aws.session_token"),
    "azure": ("azure.connection_string",),
}


def _unresolved(settings: Settings) -> str | None:
    """The first secret setting of the chosen provider that still holds a reference."""
    for key, secret in settings.secret_settings().items():
        if key in _PROVIDER_SECRETS.get(settings.provider, ()) and secret.is_reference:
            return key
    return None


@contextlib.asynccontextmanager
async def open_provider(settings: Settings) -> AsyncIterator[Provider]:
    """The provider `create_provider` builds, entered, with its secret references read first
    (`queue_runtime.secrets.SecretResolver`; a credential refused later makes it re-read them).
    The provider and the secret stores' clients are closed on exit. For one-off work (the
    operator commands, `queue_runtime.client.open_client`); a worker also re-reads them
    periodically (`queue_runtime.entrypoint.serve_worker`).

    Raises `ConfigurationError` (bad reference, missing extra, no such secret),
    `AuthenticationFailed` or `ConnectionFailed` when a reference cannot be read.
    """
    from ..secrets import SecretResolver

    resolver = SecretResolver(settings)
    try:
        if resolver.references:
            settings = await resolver.load()
        provider = create_provider(settings, credentials=resolver if resolver.references else None)
        async with provider:
            yield provider
    finally:
        await resolver.aclose()
