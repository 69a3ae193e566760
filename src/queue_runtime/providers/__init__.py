"""Provider adapters: one per broker, all behind `providers.base.Provider`.

* ``memory`` — `providers.memory.InMemoryProvider`: an in-process broker with peek-lock,
  lock expiry, delivery counts, a broker-side dead-letter queue, TTL, scheduled messages,
  session locks and state, and fault injection. The embedded default: the demo, the tests and
  users' own tests. No extra needed.
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

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Provider

__all__ = ["create_provider"]

# provider name -> (module in this package, class name, pip extra, the extra's SDK modules).
# The SDK modules are imported up front because an adapter may import its SDK only when it
# connects: a missing extra must be reported here, at start-up, not at the first call.
_CLOUD: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "aws": ("sqs", "SqsProvider", "aws", ("aiobotocore.session", "aiobotocore.httpxsession")),
    "azure": ("servicebus", "ServiceBusProvider", "azure", ("azure.servicebus.aio",)),
}


def create_provider(settings: Settings) -> Provider:
    """Build the provider `Settings.provider` names, configured from ``settings``.

    Nothing is connected yet: a provider opens its connections when entered (``async with``)
    or on first use, as its own docs say. Raises `ConfigurationError` for an unknown provider,
    or when the provider's extra is not installed
    (``provider 'aws' needs the aws extra: pip install 'queue-runtime[aws]'``).
    """
    if settings.provider == "memory":
        from .memory import InMemoryProvider

        return InMemoryProvider(
            lock_duration=settings.memory.lock_duration,
            max_delivery_count=settings.memory.max_delivery_count,
            max_queue_messages=settings.memory.max_queue_messages,
        )
    if settings.provider not in _CLOUD:
        valid = ", ".join(repr(name) for name in ("memory", *_CLOUD))
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
    provider: Provider = provider_class.from_settings(settings)
    return provider
