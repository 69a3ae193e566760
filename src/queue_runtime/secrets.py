"""Secret references: secret-valued settings read from Azure Key Vault or AWS Secrets Manager,
at start-up and again while the worker runs, so a rotated secret is used without a restart.

A secret-valued setting (``azure.connection_string``, ``aws.secret_access_key``,
``aws.session_token``) may hold a reference instead of the value, in the config file or in its
environment variable:

* ``keyvault://VAULT/NAME[/VERSION]``: Azure Key Vault through ``azure-keyvault-secrets`` and
  azure-identity's ``DefaultAzureCredential`` (managed identity, workload identity, the
  ``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/``AZURE_CLIENT_SECRET`` variables, the Azure CLI);
  ``azure.client_id`` picks a user-assigned identity. The ``azure`` extra.
* ``secretsmanager://NAME-or-ARN[#KEY]``: AWS Secrets Manager through aiobotocore on its httpx
  backend, natively on trio, with the standard AWS credential chain (a role, a profile, the
  variables) and ``aws.region`` (an ARN names its own region); ``#KEY`` picks a field of a JSON
  secret. ``AWS_ENDPOINT_URL_SECRETS_MANAGER`` (else ``AWS_ENDPOINT_URL``) points it at a local
  server. The ``aws`` extra.

`SecretResolver` reads every reference of one `Settings`:

* `SecretResolver.load` at start-up: any failure is raised (the worker does not start);
* `SecretResolver.run` re-reads them every ``secrets.refresh_interval`` (15 min by default);
* `SecretResolver.refresh_after_failure` re-reads them at once when a provider's credential
  was refused (`AuthenticationFailed`): providers built with ``credentials=resolver`` call it,
  then build their next connection with the new value. Live sessions keep the connection they
  were accepted on until they end, so none is dropped.

A failed re-read keeps the values in use, logs a WARNING (redacted) and adds one to the counter
``queue_secret_refresh_failures_total{queue,setting,store}``, which the
``QueueAuthenticationRefreshFailures`` alert watches. Values read are `Secret` objects, so they
are registered for redaction (`queue_runtime.redaction`) the moment they are read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio
from opentelemetry import metrics

from .config import SecretReference, Settings, parse_secret_reference
from .errors import AuthenticationFailed, ConfigurationError, ConnectionFailed, QueueError, Timeout
from .redaction import redact

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter

__all__ = [
    "CredentialSource",
    "KeyVaultStore",
    "SecretReference",
    "SecretResolver",
    "SecretStore",
    "SecretsManagerStore",
    "parse_secret_reference",
    "record_refresh_failure",
]

logger = logging.getLogger("queue_runtime.secrets")

#: A forced re-read (after an authentication failure) at most this often: a credential that is
#: plainly wrong must not turn every retry of the broker call into a request to the store.
MIN_FORCED_INTERVAL: Final = 10.0
#: Longest wait for one read from a store.
READ_TIMEOUT: Final = 30.0


class CredentialSource(Protocol):
    """What a provider needs to follow rotated credentials: the latest resolved settings (no
    I/O) and a way to ask for a re-read after its credential was refused."""

    @property
    def settings(self) -> Settings: ...

    async def refresh_after_failure(self) -> None: ...


class SecretStore(Protocol):
    """Reads one kind of reference (``keyvault`` or ``secretsmanager``)."""

    async def read(self, reference: SecretReference) -> str:
        """The secret's current value. Raises `ConfigurationError` (no such secret, missing
        extra), `AuthenticationFailed` (access refused), `ConnectionFailed` / `Timeout`."""
        ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Azure Key Vault


class KeyVaultStore:
    """Azure Key Vault through ``azure.keyvault.secrets.SecretClient`` (the synchronous client,
    one per vault, called in a worker thread so trio is never blocked) and
    ``azure.identity.DefaultAzureCredential``. ``client_id`` picks a user-assigned managed
    identity. ``client_factory(vault_url, credential)`` replaces the SDK client (tests)."""

    def __init__(
        self,
        *,
        client_id: str | None = None,
        credential: Any = None,
        client_factory: Callable[[str, Any], Any] | None = None,
    ) -> None:
        self._client_id = client_id
        self._credential = credential
        self._owned_credential: Any = None
        self._client_factory = client_factory
        self._clients: dict[str, Any] = {}

    def _client(self, vault_url: str) -> Any:
        client = self._clients.get(vault_url)
        if client is not None:
            return client
        factory = self._client_factory
        if factory is None:
            try:
                from azure.keyvault.secrets import SecretClient
            except ImportError as error:
                raise ConfigurationError(
                    "keyvault:// references need azure-keyvault-secrets: pip install 'queue-runtime[azure]'"
                ) from error
            factory = SecretClient
        credential = self._credential
        if credential is None and self._client_factory is None:
            from azure.identity import DefaultAzureCredential

            kwargs = {"managed_identity_client_id": self._client_id} if self._client_id else {}
            credential = self._owned_credential = self._owned_credential or DefaultAzureCredential(**kwargs)
        client = self._clients[vault_url] = factory(vault_url, credential)
        return client

    async def read(self, reference: SecretReference) -> str:
        assert reference.vault_url is not None
        client = self._client(reference.vault_url)

        def get() -> Any:
            return client.get_secret(reference.name, version=reference.version)

        try:
            with trio.fail_after(READ_TIMEOUT):
                secret = await trio.to_thread.run_sync(get, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise Timeout(f"reading {reference} took longer than {READ_TIMEOUT:g} s") from None
        except Exception as error:
            raise _map_keyvault_error(error, reference) from None
        value = getattr(secret, "value", None)
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"secret {reference} has no value (is it disabled or empty?)")
        return value

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for handle in [*clients, self._owned_credential]:
            close = getattr(handle, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await trio.to_thread.run_sync(close, abandon_on_cancel=True)
        self._owned_credential = None


def _map_keyvault_error(error: BaseException, reference: SecretReference) -> QueueError:
    where = f"reading {reference} from Key Vault"
    detail = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    if isinstance(error, QueueError):
        return error
    try:
        from azure.core import exceptions as core
    except ImportError:  # pragma: no cover - the fake client in tests raises azure errors too
        return ConnectionFailed(f"{where} failed: {detail}")
    if isinstance(error, core.ResourceNotFoundError):
        return ConfigurationError(f"{where} failed: the secret or the vault does not exist")
    if isinstance(error, core.ClientAuthenticationError) or (
        isinstance(error, core.HttpResponseError) and getattr(error, "status_code", None) in (401, 403)
    ):
        return AuthenticationFailed(
            f"{where} failed: access refused ({detail}); the identity needs the 'Key Vault Secrets User' role"
        )
    if isinstance(error, (core.ServiceRequestError, core.ServiceResponseError, OSError)):
        return ConnectionFailed(f"{where} failed: {detail}")
    return QueueError(f"{where} failed: {detail}", transient=True)


# --------------------------------------------------------------------------------------------
# AWS Secrets Manager


class SecretsManagerStore:
    """AWS Secrets Manager's ``GetSecretValue`` through aiobotocore (httpx backend: anyio, so
    natively on trio). Credentials: the standard chain (``profile``, role, variables) unless
    ``access_key_id`` and ``secret_access_key`` are given; region ``region`` (or the one an
    ARN names); endpoint ``endpoint_url``, else ``AWS_ENDPOINT_URL_SECRETS_MANAGER``, else
    ``AWS_ENDPOINT_URL``, else AWS."""

    def __init__(
        self,
        *,
        region: str | None = None,
        profile: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self._region = region
        self._profile = profile
        self._keys = (access_key_id, secret_access_key, session_token) if secret_access_key else None
        self._endpoint_url = endpoint_url
        self._clients: dict[str | None, tuple[Any, Any]] = {}  # region -> (context manager, client)

    async def _client(self, region: str | None) -> Any:
        entry = self._clients.get(region)
        if entry is not None:
            return entry[1]
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.httpxsession import HttpxSession
            from aiobotocore.session import AioSession
        except ImportError as error:
            raise ConfigurationError(
                "secretsmanager:// references need aiobotocore: pip install 'queue-runtime[aws]'"
            ) from error
        session = AioSession(profile=self._profile) if self._profile else AioSession()
        config = AioConfig(
            http_session_cls=HttpxSession,
            connect_timeout=5,
            read_timeout=15,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        session.set_default_client_config(config)  # anyio locks for refreshable credentials
        endpoint = (
            self._endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_SECRETS_MANAGER")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        keys = self._keys or (None, None, None)
        cm = session.create_client(
            "secretsmanager",
            region_name=region,
            endpoint_url=endpoint,
            aws_access_key_id=keys[0],
            aws_secret_access_key=keys[1],
            aws_session_token=keys[2],
            config=config,
        )
        client = await cm.__aenter__()
        self._clients[region] = (cm, client)
        return client

    async def read(self, reference: SecretReference) -> str:
        region = self._region
        if reference.name.startswith("arn:"):
            fields = reference.name.split(":")
            region = fields[3] if len(fields) > 3 and fields[3] else region
        try:
            with trio.fail_after(READ_TIMEOUT):
                client = await self._client(region)
                response = await client.get_secret_value(SecretId=reference.name)
        except trio.TooSlowError:
            raise Timeout(f"reading {reference} took longer than {READ_TIMEOUT:g} s") from None
        except QueueError:
            raise
        except Exception as error:
            raise _map_aws_error(error, reference) from None
        value = response.get("SecretString")
        if value is None and response.get("SecretBinary") is not None:
            try:
                value = bytes(response["SecretBinary"]).decode("utf-8")
            except (UnicodeDecodeError, TypeError):
                raise ConfigurationError(f"secret {reference} is binary, not text") from None
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"secret {reference} has no value")
        if reference.json_key is None:
            return value
        try:
            document = json.loads(value)
        except ValueError:
            raise ConfigurationError(f"secret {reference}: the secret is not a JSON object") from None
        field = document.get(reference.json_key) if isinstance(document, dict) else None
        if not isinstance(field, str) or not field:
            raise ConfigurationError(
                f"secret {reference}: the JSON secret has no text field {reference.json_key!r}"
            )
        return field

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for cm, _ in clients:
            with trio.CancelScope(shield=True), trio.move_on_after(5), contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)


_AWS_AUTH_CODES: Final = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "DecryptionFailure",
    }
)


def _map_aws_error(error: BaseException, reference: SecretReference) -> QueueError:
    where = f"reading {reference} from Secrets Manager"
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - read() reported the missing extra already
        return ConnectionFailed(f"{where} failed: {type(error).__name__}")
    if isinstance(error, bx.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code == "ResourceNotFoundException":
            return ConfigurationError(
                f"{where} failed: the secret does not exist (check the name and region)"
            )
        if code in _AWS_AUTH_CODES:
            return AuthenticationFailed(f"{where} failed: access refused ({code})")
        return QueueError(f"{where} failed: {code or type(error).__name__}", transient=True)
    if isinstance(error, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return AuthenticationFailed(f"{where} failed: no usable AWS credentials ({type(error).__name__})")
    if isinstance(error, bx.NoRegionError):
        return ConfigurationError(f"{where} failed: no AWS region (set AWS_REGION or aws.region)")
    return ConnectionFailed(f"{where} failed: cannot reach Secrets Manager ({type(error).__name__})")


# --------------------------------------------------------------------------------------------
# the resolver


_failures_counter: Counter | None = None


def _failures() -> Counter:
    global _failures_counter
    if _failures_counter is None:
        # Unit "1": Prometheus exporters show it as queue_secret_refresh_failures_total.
        _failures_counter = metrics.get_meter("queue_runtime").create_counter(
            "queue_secret_refresh_failures",
            unit="1",
            description="Re-reads of a secret reference that failed (the previous value stays in use).",
        )
    return _failures_counter


def record_refresh_failure(queue: str, setting: str, store: str) -> None:
    """``queue_secret_refresh_failures_total{queue,setting,store}`` += 1."""
    _failures().add(1, {"queue": queue, "setting": setting, "store": store})


def default_stores(settings: Settings) -> dict[str, SecretStore]:
    """The stores a `SecretResolver` uses unless given others: Key Vault with
    ``azure.client_id``, Secrets Manager with the ``aws.*`` settings that are not references."""
    aws = settings.aws

    def plain(secret: Any) -> str | None:
        return None if secret is None or secret.is_reference else str(secret.get_secret_value())

    return {
        "keyvault": KeyVaultStore(client_id=settings.azure.client_id),
        "secretsmanager": SecretsManagerStore(
            region=aws.region,
            profile=aws.profile,
            access_key_id=aws.access_key_id if plain(aws.secret_access_key) else None,
            secret_access_key=plain(aws.secret_access_key),
            session_token=plain(aws.session_token),
        ),
    }


class SecretResolver:
    """The secret references of one `Settings`, read and kept fresh (see the module docstring).

    ``settings`` is the latest resolved configuration (the references replaced by the values
    read); before `load` it is the configuration as given. ``stores`` maps ``"keyvault"`` /
    ``"secretsmanager"`` to a `SecretStore` (default: `default_stores`). Implements
    `CredentialSource` for providers.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stores: Mapping[str, SecretStore] | None = None,
        min_forced_interval: float = MIN_FORCED_INTERVAL,
    ) -> None:
        self._given = settings
        self._settings = settings
        self.references: dict[str, SecretReference] = {
            key: parse_secret_reference(secret.get_secret_value())
            for key, secret in settings.secret_settings().items()
            if secret.is_reference
        }
        self._stores: dict[str, SecretStore] | None = dict(stores) if stores is not None else None
        self._values: dict[str, str] = {}
        self._lock = trio.Lock()
        self._last_forced = -math.inf
        self.min_forced_interval = min_forced_interval
        #: Re-reads done, and those that failed (for tests and diagnostics).
        self.refreshes = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"SecretResolver(references={sorted(str(r) for r in self.references.values())})"

    @property
    def settings(self) -> Settings:
        """The latest resolved settings (no I/O)."""
        return self._settings

    @property
    def interval(self) -> float:
        """Seconds between periodic re-reads (``secrets.refresh_interval``)."""
        return self._given.secrets.refresh_interval

    def _store(self, reference: SecretReference) -> SecretStore:
        if self._stores is None:
            self._stores = default_stores(self._given)
        store = self._stores.get(reference.store)
        if store is None:
            raise ConfigurationError(f"no secret store for {reference.store}:// references")
        return store

    async def _read_all(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for key, reference in self.references.items():
            values[key] = await self._store(reference).read(reference)
        return values

    async def load(self) -> Settings:
        """Read every reference; return (and keep) the resolved settings. Transient failures
        are tried three times; then, and for anything permanent, the error is raised."""
        if not self.references:
            return self._settings
        async with self._lock:
            for attempt in range(3):
                try:
                    values = await self._read_all()
                    break
                except QueueError as error:
                    if not error.transient or attempt == 2:
                        raise
                    await trio.sleep(0.5 * 2**attempt)
            self._apply(values)
        return self._settings

    def _apply(self, values: dict[str, str]) -> list[str]:
        """Put ``values`` in place; the keys whose value changed."""
        changed = [key for key, value in values.items() if self._values.get(key) != value]
        if changed:
            self._values.update(values)
            self._settings = self._given.with_secrets(self._values)
        return changed

    async def refresh(self, *, why: str = "periodic") -> bool:
        """Read every reference again; True when a value changed (the new settings are in
        `settings` at once). A failure is logged, counted and swallowed: the values in use
        stay."""
        if not self.references:
            return False
        async with self._lock:
            self.refreshes += 1
            try:
                values = await self._read_all()
            except QueueError as error:
                self._failed(error, why)
                return False
            changed = self._apply(values)
        for key in changed:
            logger.info(
                "secret %s changed in %s (%s re-read): new connections use the new value",
                key, self.references[key], why,
                extra={"operation": "refresh_secret", "queue_name": self._given.queue},
            )  # fmt: skip
        return bool(changed)

    def _failed(self, error: QueueError, why: str) -> None:
        self.failures += 1
        for key, reference in self.references.items():
            record_refresh_failure(self._given.queue or "", key, reference.store)
        logger.warning(
            "re-reading secret references (%s) failed, the values in use stay: %s: %s",
            why, type(error).__name__, redact(str(error)),
            extra={"operation": "refresh_secret", "queue_name": self._given.queue,
                   "error_type": error.error_type},
        )  # fmt: skip

    async def refresh_after_failure(self) -> None:
        """Re-read at once because a credential was refused; returns when done. At most once
        per ``min_forced_interval`` seconds: a caller that comes sooner waits for a re-read in
        progress, if any, and returns."""
        if not self.references:
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        if now - self._last_forced < self.min_forced_interval:
            async with self._lock:  # wait for the re-read in progress
                pass
            return
        self._last_forced = now
        await self.refresh(why="after an authentication failure")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-read every ``secrets.refresh_interval`` seconds until cancelled."""
        task_status.started()
        if not self.references:
            await trio.sleep_forever()
        while True:
            await trio.sleep(self.interval)
            await self.refresh()

    async def aclose(self) -> None:
        """Close the stores' clients. Idempotent."""
        stores, self._stores = self._stores, None
        for store in (stores or {}).values():
            with trio.CancelScope(shield=True):
                await store.aclose()
