"""Configuration: the supervisor's knobs and the layered settings loader.

`SupervisorConfig` holds what the runtime needs; each default is chosen for a production
worker and its reason is stated beside it.
"""

from __future__ import annotations

import difflib
import functools
import hmac
import math
import os
import re
import reprlib
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
import msgspec.inspect as mi
import yaml

from .errors import ConfigurationError, ValidationError
from .message import validate_queue_name
from .redaction import looks_like_a_credential, register_secret
from .retry import RetryPolicy

__all__ = [
    "CONFIG_FILE_ENV",
    "ENVIRONMENT",
    "MAX_CONFIG_FILE_BYTES",
    "SECRET_REFERENCE_SCHEMES",
    "AwsSettings",
    "AzureSettings",
    "MemorySettings",
    "RetryPolicy",
    "Secret",
    "SecretReference",
    "SecretsSettings",
    "Settings",
    "SupervisorConfig",
    "TelemetrySettings",
    "WorkerSettings",
    "load_settings",
    "parse_secret_reference",
]


def _check_number(
    name: str, value: object, *, minimum: float, integer: bool = False, allow_equal: bool = True
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    if not _finite(value) or value < minimum or (not allow_equal and value == minimum):
        op = ">=" if allow_equal else ">"
        raise ConfigurationError(f"{name} must be {op} {minimum}, got {value!r}")


def _finite(value: float) -> bool:
    """`math.isfinite`, also for integers too large for a float (they are not finite here)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class SupervisorConfig(msgspec.Struct, kw_only=True):
    """What one `Supervisor` does and its bounds.

    * ``max_concurrent_sessions`` = 64: actors alive at once. Each idle actor holds a session
      (and on Service Bus its lock), so this bounds what one worker can starve others of;
      64 keeps a 2-core worker busy on I/O-bound handlers without hoarding sessions.
    * ``per_session_concurrency`` = 1: strict order. Above 1, up to N ``handle()`` calls of
      one session run at once and ordering within the session is relaxed.
    * ``session_idle_timeout`` = 5 s: an actor with no message for this long stops and frees
      its slot (and the lock) so another worker may take the session. Short, because an idle
      actor blocks a slot; long enough to ride out a producer's small gaps.
    * ``prefetch`` = 10: messages of a session received ahead of the one being handled (one
      SQS batch). Prefetched messages are handed back at shutdown, and brokers count that as
      a delivery, so keep it small.
    * ``max_lock_renewal`` = 300 s: how long a single message's lock is renewed while its
      ``handle()`` runs (the SDKs' default). A handler stuck longer loses the lock.
    * ``retry``: in-place retries of ``handle()`` (see `RetryPolicy`).
    * ``max_delivery_count`` = None: use the queue's own broker-side limit. When set, a message
      delivered more often is dead-lettered before ``handle()`` is called.
    * ``shutdown_grace`` = 30 s: how long running ``handle()`` calls may finish after a stop
      request (Kubernetes' default termination grace is 30 s).
    * ``receive_timeout`` = 20 s: the long-poll wait when accepting a session
      (``QUEUE_RECEIVE_TIMEOUT_SECONDS``); SQS caps a long poll at 20 s.
    """

    queue: str
    max_concurrent_sessions: int = 64
    per_session_concurrency: int = 1
    session_idle_timeout: float = 5.0
    prefetch: int = 10
    max_lock_renewal: float = 300.0
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    max_delivery_count: int | None = None
    shutdown_grace: float = 30.0
    receive_timeout: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not self.queue:
            raise ConfigurationError(f"queue must be a non-empty string, got {self.queue!r}")
        _check_number("max_concurrent_sessions", self.max_concurrent_sessions, minimum=1, integer=True)
        _check_number("per_session_concurrency", self.per_session_concurrency, minimum=1, integer=True)
        _check_number("session_idle_timeout", self.session_idle_timeout, minimum=0, allow_equal=False)
        _check_number("prefetch", self.prefetch, minimum=0, integer=True)
        _check_number("max_lock_renewal", self.max_lock_renewal, minimum=0)
        _check_number("shutdown_grace", self.shutdown_grace, minimum=0)
        _check_number("receive_timeout", self.receive_timeout, minimum=0)
        if self.max_delivery_count is not None:
            _check_number("max_delivery_count", self.max_delivery_count, minimum=1, integer=True)
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {type(self.retry).__name__}")


# --------------------------------------------------------------------------------------------
# Layered settings: defaults < config file < environment < keyword arguments.
# --------------------------------------------------------------------------------------------

_MASK: Final = "**********"

#: Schemes of secret references: ``keyvault://VAULT/NAME`` (Azure Key Vault) and
#: ``secretsmanager://NAME-or-ARN`` (AWS Secrets Manager); see `queue_runtime.secrets`.
SECRET_REFERENCE_SCHEMES: Final = ("keyvault", "secretsmanager")
_REFERENCE = re.compile(r"^(?:keyvault|secretsmanager)://", re.IGNORECASE)
_VAULT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{1,22}[A-Za-z0-9])$")
_VAULT_HOST = re.compile(r"^[A-Za-z0-9-]{3,24}(?:\.[A-Za-z0-9-]+)+(?::[0-9]{1,5})?$")
_KEYVAULT_SECRET = re.compile(r"^[A-Za-z0-9-]{1,127}$")
_KEYVAULT_VERSION = re.compile(r"^[A-Za-z0-9]{1,64}$")
_AWS_SECRET_ID = re.compile(r"^[A-Za-z0-9/_+=.@:-]{1,2048}$")


class SecretReference(msgspec.Struct, frozen=True, kw_only=True):
    """Where a secret lives: parsed from ``keyvault://VAULT/NAME[/VERSION]`` or
    ``secretsmanager://NAME-or-ARN[#KEY]`` (see `parse_secret_reference`). Not a secret."""

    text: str
    store: Literal["keyvault", "secretsmanager"]
    #: Key Vault: the vault URL (``https://VAULT.vault.azure.net``); Secrets Manager: None.
    vault_url: str | None = None
    #: Key Vault: the secret's name; Secrets Manager: the secret's name or ARN.
    name: str
    #: Key Vault: a pinned version (None = the current one, what rotation needs).
    version: str | None = None
    #: Secrets Manager: the field of a JSON secret to use (None = the whole secret string).
    json_key: str | None = None

    def __str__(self) -> str:
        return self.text


def parse_secret_reference(text: str) -> SecretReference:
    """Parse a secret reference; raise `ConfigurationError` (one line) when it is malformed.

    * ``keyvault://VAULT/NAME`` or ``keyvault://VAULT/NAME/VERSION``: VAULT is the vault's name
      (``https://VAULT.vault.azure.net``) or its host name (``myvault.vault.azure.cn``...);
      NAME the secret's name (letters, digits, ``-``).
    * ``secretsmanager://NAME-or-ARN`` or ``secretsmanager://NAME-or-ARN#KEY``: the secret's
      name or ARN; ``#KEY`` picks one field of a JSON secret (``{"secret_access_key": ...}``).
    """
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SECRET_REFERENCE_SCHEMES:
        raise ConfigurationError(
            f"malformed secret reference {_show(text)}: use keyvault://VAULT/NAME or secretsmanager://NAME-or-ARN"
        )
    if scheme == "keyvault":
        parts = rest.removesuffix("/").split("/")
        vault = parts[0]
        if (
            len(parts) not in (2, 3)
            or not (_VAULT_NAME.match(vault) or _VAULT_HOST.match(vault))
            or not _KEYVAULT_SECRET.match(parts[1])
            or (len(parts) == 3 and not _KEYVAULT_VERSION.match(parts[2]))
        ):
            raise ConfigurationError(
                f"malformed secret reference {_show(text)}: use keyvault://VAULT/NAME[/VERSION] (VAULT a"
                " vault name or host, NAME letters, digits and '-')"
            )
        host = vault if "." in vault else f"{vault}.vault.azure.net"
        return SecretReference(
            text=text,
            store="keyvault",
            vault_url=f"https://{host.lower()}",
            name=parts[1],
            version=parts[2] if len(parts) == 3 else None,
        )
    name, hash_sign, key = rest.partition("#")
    if not _AWS_SECRET_ID.match(name) or (hash_sign and not key) or len(key) > 256:
        raise ConfigurationError(
            f"malformed secret reference {_show(text)}: use secretsmanager://NAME-or-ARN[#KEY]"
        )
    return SecretReference(text=text, store="secretsmanager", name=name, json_key=key or None)


#: Largest config file read: a real one is a few hundred bytes, and PyYAML needs about a
#: second per 30 KiB of the worst input, so this also bounds the time a hostile file costs.
MAX_CONFIG_FILE_BYTES: Final = 64 * 1024
# Credential variables azure-identity's EnvironmentCredential reads: not settings of ours, but
# their values are secrets, so they are registered for redaction when settings are loaded.
_IDENTITY_SECRETS: Final = ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_PASSWORD")


class Secret:
    """A credential that never shows itself.

    ``repr()`` and ``str()`` are ``Secret('**********')``; `get_secret_value` returns the value.
    Two secrets are equal when their values are (compared in constant time). msgspec cannot
    encode a `Secret` without an explicit hook, so it cannot leak through a stray
    ``msgspec.json.encode``; `Settings.redacted` shows it as ``"**********"``.

    Creating a `Secret` registers its value with `queue_runtime.redaction`, so the value is
    masked wherever text leaves the process (logs, CLI output, dead-letter descriptions, spans).

    A value that is a secret *reference* (``keyvault://VAULT/NAME``,
    ``secretsmanager://NAME-or-ARN``, see `is_reference`) names where the secret lives: it is
    not a credential, `Settings.redacted` shows it, and `queue_runtime.secrets` replaces it
    with the value it points to.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise ConfigurationError(f"a secret must be a string, got a value of type {type(value).__name__}")
        self._value = value
        if not _REFERENCE.match(value):
            register_secret(value)

    @property
    def is_reference(self) -> bool:
        """Whether the value is a ``keyvault://`` or ``secretsmanager://`` reference."""
        return bool(_REFERENCE.match(self._value))

    def get_secret_value(self) -> str:
        """The credential itself: pass it to the SDK, never to a log or an error."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


_NonEmpty = msgspec.Meta(min_length=1)
Provider = Literal["sqlite", "memory", "aws", "azure"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]


class _Section(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every settings section: checks (and normalises) each field against its
    annotation on creation, so a section built by hand is as valid as one built by
    `load_settings`."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in _struct_fields(type(self)):
            if isinstance(field.type, mi.StructType):
                continue
            value = getattr(self, field.name)
            try:
                converted = _convert(value, field.type, text=False)
            except _Invalid as invalid:
                key = self._prefix + field.name
                raise ConfigurationError(f"{key} {invalid.sentence()}") from None
            if converted is not value:
                # Normalise what was given by hand: a plain str secret becomes a Secret, an int
                # in a float field a float, "warning" the canonical "WARNING".
                msgspec.structs.force_setattr(self, field.name, converted)


class WorkerSettings(_Section, frozen=True, kw_only=True):
    """The `SupervisorConfig` knobs, same names and defaults (their reasons are documented on
    `SupervisorConfig`). ``queue`` and ``receive_timeout`` are top-level `Settings` keys because
    producers and operators use them too."""

    _prefix: ClassVar[str] = "worker."

    max_concurrent_sessions: Annotated[int, msgspec.Meta(ge=1)] = 64
    per_session_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 1
    session_idle_timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    prefetch: Annotated[int, msgspec.Meta(ge=0)] = 10
    max_lock_renewal: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    max_delivery_count: Annotated[int, msgspec.Meta(ge=1)] | None = None
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 30.0


class AwsSettings(_Section, frozen=True, kw_only=True):
    """SQS connection. Everything is optional: unset values fall back to botocore's standard
    credential chain (environment, shared config/profile, container and instance roles)."""

    _prefix: ClassVar[str] = "aws."

    region: Annotated[str, _NonEmpty] | None = None
    endpoint_url: Annotated[str, msgspec.Meta(pattern=r"^https?://\S+$")] | None = None
    access_key_id: Annotated[str, _NonEmpty] | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    profile: Annotated[str, _NonEmpty] | None = None
    # Send a poll's receive while its deletes are in flight; None: on for AWS endpoints only
    # (`queue_runtime.providers.sqs.SqsProvider`, ``overlap_deletes``).
    overlap_deletes: bool | None = None


class AzureSettings(_Section, frozen=True, kw_only=True):
    """Service Bus connection: a connection string, or a namespace plus azure-identity's
    credential chain (``client_id`` picks a user-assigned managed identity)."""

    _prefix: ClassVar[str] = "azure."

    connection_string: Secret | None = None
    fully_qualified_namespace: Annotated[str, _NonEmpty] | None = None
    client_id: Annotated[str, _NonEmpty] | None = None
    tenant_id: Annotated[str, _NonEmpty] | None = None


class MemorySettings(_Section, frozen=True, kw_only=True):
    """The in-memory broker's queue settings (the ones a cloud queue is created with)."""

    _prefix: ClassVar[str] = "memory."

    lock_duration: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    max_delivery_count: Annotated[int, msgspec.Meta(ge=1)] = 10
    max_queue_messages: Annotated[int, msgspec.Meta(ge=1)] = 100_000


class SqliteSettings(_Section, frozen=True, kw_only=True):
    """The SQLite broker (``providers.sqlite``): the default provider, a durable file shared
    by the processes of one host. ``path`` is relative to the working directory.
    ``synchronous``: ``NORMAL`` survives a process crash, ``FULL`` also a power loss (an fsync
    per transaction). ``busy_timeout``: how long a transaction waits for another process's
    lock. ``lock_duration`` and ``max_delivery_count`` apply to queues the file does not have
    yet (Service Bus's defaults). ``poll_interval``: the longest a waiting receiver takes to
    notice another process's send. See ``docs/providers/sqlite.md``."""

    _prefix: ClassVar[str] = "sqlite."

    path: Annotated[str, _NonEmpty] = "queue-runtime.db"
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    busy_timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    lock_duration: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    max_delivery_count: Annotated[int, msgspec.Meta(ge=1)] = 10
    poll_interval: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.1


class TelemetrySettings(_Section, frozen=True, kw_only=True):
    """Where metrics are exposed. ``metrics_port`` None = no Prometheus endpoint.
    ``metrics_host`` = 127.0.0.1: the endpoints (``/metrics``, ``/healthz``, ``/readyz``,
    ``/sessions``) answer this host only unless asked otherwise (``0.0.0.0`` in a container
    whose probes and scraper come from outside); see ``docs/security.md``."""

    _prefix: ClassVar[str] = "telemetry."

    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    metrics_host: Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=r"^[^\s/]+$")] = (
        "127.0.0.1"
    )


class SecretsSettings(_Section, frozen=True, kw_only=True):
    """Secret references (``keyvault://VAULT/NAME``, ``secretsmanager://NAME-or-ARN``) are
    read at start-up and again every ``refresh_interval`` seconds (and at once after the
    broker refused a credential), so a rotated secret is picked up without a restart.
    15 minutes: rotation is rare and each read is a request to the store (billed on both
    clouds); an authentication failure triggers a read at once anyway."""

    _prefix: ClassVar[str] = "secrets."

    refresh_interval: Annotated[float, msgspec.Meta(gt=0)] = 900.0


class Settings(_Section, frozen=True, kw_only=True, dict=True):
    """The whole configuration, typed. Build it with `load_settings` (which also fills
    `sources`), or directly for tests. Every value is checked on creation.

    See ``docs/configuration.md`` for every key, its environment variable and its default.
    """

    provider: Provider = "sqlite"
    queue: Annotated[str, _NonEmpty] | None = None
    dlq_name: Annotated[str, _NonEmpty] | None = None
    receive_timeout: Annotated[float, msgspec.Meta(ge=0)] = 20.0
    visibility_timeout: Annotated[float, msgspec.Meta(ge=0, le=43200)] = 300.0
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "text"
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    aws: AwsSettings = msgspec.field(default_factory=AwsSettings)
    azure: AzureSettings = msgspec.field(default_factory=AzureSettings)
    memory: MemorySettings = msgspec.field(default_factory=MemorySettings)
    sqlite: SqliteSettings = msgspec.field(default_factory=SqliteSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)
    secrets: SecretsSettings = msgspec.field(default_factory=SecretsSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        system = _SYSTEMS[self.provider]
        for key in ("queue", "dlq_name"):
            name = getattr(self, key)
            # An SQS queue may also be given by URL (`validate_queue_name` checks its shape).
            if name is None:
                continue
            try:
                validate_queue_name(name, system)
            except ValidationError as error:
                raise ConfigurationError(f"{key} is not a valid queue name ({error.message})") from None

    @property
    def sources(self) -> dict[str, str]:
        """Where each effective value came from, by dotted key: ``"default"``,
        ``"file:<path>"``, ``"env:<NAME>"`` or ``"argument"``.

        Not part of equality or serialisation. For a `Settings` built directly (not by
        `load_settings`) a value equal to its default reads ``"default"``, others ``"argument"``.
        """
        recorded: dict[str, str] | None = self.__dict__.get("_sources")
        if recorded is not None:
            return dict(recorded)
        values = _flatten_values(self)
        return {
            key: "default" if values[key] == spec.default else "argument" for key, spec in _leaves().items()
        }

    def secret_settings(self) -> dict[str, Secret]:
        """Every secret-valued setting that is set, by dotted key (``azure.connection_string``,
        ``aws.secret_access_key``, ``aws.session_token``)."""
        values = _flatten_values(self)
        return {
            key: value
            for key, leaf in _leaves().items()
            if leaf.secret and isinstance((value := values[key]), Secret)
        }

    def with_secrets(self, values: Mapping[str, str]) -> Settings:
        """A copy with the secret settings named in ``values`` (dotted keys) replaced, sources
        kept: how resolved and rotated secret references are put in place."""
        sections: dict[str, dict[str, object]] = {}
        for key, value in values.items():
            section, _, name = key.rpartition(".")
            if key not in _leaves() or not _leaves()[key].secret or not section:
                raise ConfigurationError(f"{key!r} is not a secret setting")
            sections.setdefault(section, {})[name] = Secret(value)
        changed = msgspec.structs.replace(
            self,
            **{
                name: msgspec.structs.replace(getattr(self, name), **fields)
                for name, fields in sections.items()
            },
        )
        recorded = self.__dict__.get("_sources")
        if recorded is not None:
            changed.__dict__["_sources"] = dict(recorded)
        return changed

    def redacted(self) -> dict[str, Any]:
        """Every effective value as plain JSON-able data; each secret as ``"**********"``
        (an unset secret as None). This is what ``queue-runtime config show`` prints."""
        result: dict[str, Any] = msgspec.to_builtins(self, enc_hook=_redact_hook)
        return result

    def supervisor_config(self) -> SupervisorConfig:
        """The `SupervisorConfig` for this configuration.

        Raises `ConfigurationError` if ``queue`` is unset, or naming the key and its source if
        `SupervisorConfig` refuses a value.
        """
        if self.queue is None:
            raise ConfigurationError(
                "queue is not set: pass queue=..., set QUEUE_NAME, or set 'queue' in the config file"
            )
        worker = {field.name: getattr(self.worker, field.name) for field in _struct_fields(WorkerSettings)}
        try:
            return SupervisorConfig(queue=self.queue, receive_timeout=self.receive_timeout, **worker)
        except ConfigurationError as error:
            raise _with_source(error, self.sources, candidates=_SUPERVISOR_KEYS) from None


_SYSTEMS: Final[dict[str, str]] = {
    "sqlite": "sqlite",
    "memory": "memory",
    "aws": "aws_sqs",
    "azure": "azure_service_bus",
}

# Environment variables, in priority order per key (the first one set and non-empty wins).
# Names from the operations guide and the standard AWS/Azure SDK variables; the other
# QUEUE_* names follow the same pattern, with the unit in the name.
ENVIRONMENT: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "provider": ("QUEUE_PROVIDER",),
        "queue": ("QUEUE_NAME",),
        "dlq_name": ("QUEUE_DLQ_NAME",),
        "receive_timeout": ("QUEUE_RECEIVE_TIMEOUT_SECONDS",),
        "visibility_timeout": ("QUEUE_VISIBILITY_TIMEOUT_SECONDS",),
        "log_level": ("QUEUE_LOG_LEVEL",),
        "log_format": ("QUEUE_LOG_FORMAT",),
        "worker.max_concurrent_sessions": ("QUEUE_MAX_CONCURRENT_SESSIONS",),
        "worker.per_session_concurrency": ("QUEUE_PER_SESSION_CONCURRENCY",),
        "worker.session_idle_timeout": ("QUEUE_SESSION_IDLE_TIMEOUT_SECONDS",),
        "worker.prefetch": ("QUEUE_PREFETCH",),
        "worker.max_lock_renewal": ("QUEUE_MAX_LOCK_RENEWAL_SECONDS",),
        "worker.max_delivery_count": ("QUEUE_MAX_DELIVERY_COUNT",),
        "worker.shutdown_grace": ("QUEUE_SHUTDOWN_GRACE_SECONDS",),
        "worker.retry.max_attempts": ("QUEUE_MAX_RETRY_ATTEMPTS",),
        "worker.retry.initial_backoff": ("QUEUE_RETRY_BACKOFF_MS",),
        "aws.region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
        "aws.endpoint_url": ("AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL"),
        "aws.access_key_id": ("AWS_ACCESS_KEY_ID",),
        "aws.secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
        "aws.session_token": ("AWS_SESSION_TOKEN",),
        "aws.profile": ("AWS_PROFILE",),
        "aws.overlap_deletes": ("QUEUE_SQS_OVERLAP_DELETES",),
        "azure.connection_string": ("AZURE_SERVICE_BUS_CONNECTION_STRING",),
        "azure.fully_qualified_namespace": ("SERVICE_BUS_NAMESPACE", "AZURE_SERVICE_BUS_NAMESPACE"),
        "azure.client_id": ("AZURE_CLIENT_ID",),
        "azure.tenant_id": ("AZURE_TENANT_ID",),
        "sqlite.path": ("QUEUE_SQLITE_PATH",),
        "sqlite.synchronous": ("QUEUE_SQLITE_SYNCHRONOUS",),
        "sqlite.busy_timeout": ("QUEUE_SQLITE_BUSY_TIMEOUT_SECONDS",),
        "sqlite.lock_duration": ("QUEUE_SQLITE_LOCK_DURATION_SECONDS",),
        "sqlite.max_delivery_count": ("QUEUE_SQLITE_MAX_DELIVERY_COUNT",),
        "sqlite.poll_interval": ("QUEUE_SQLITE_POLL_INTERVAL_SECONDS",),
        "telemetry.metrics_port": ("QUEUE_METRICS_PORT",),
        "telemetry.metrics_host": ("QUEUE_METRICS_HOST",),
        "secrets.refresh_interval": ("QUEUE_SECRETS_REFRESH_INTERVAL_SECONDS",),
    }
)
CONFIG_FILE_ENV: Final = "QUEUE_CONFIG_FILE"
_MILLISECONDS: Final = frozenset({"QUEUE_RETRY_BACKOFF_MS"})
_FLAGS: Final = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}
_DISCOVERED_FILES: Final = ("config.toml", "config.yaml", "config.yml")
_SECTIONS: Final = ("worker", "aws", "azure", "memory", "sqlite", "telemetry", "secrets")
_SUPERVISOR_KEYS: Final = ("queue", "receive_timeout", "worker.")


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build `Settings` from defaults < config file < environment < keyword ``overrides``.

    * File: ``config_file``, else ``$QUEUE_CONFIG_FILE``, else ``./config.toml``,
      ``./config.yaml`` or ``./config.yml`` (the first present). TOML or YAML by extension,
      with the same nested shape as `Settings`. Unknown keys are errors.
    * Environment: ``env`` (default ``os.environ``); see `ENVIRONMENT`. Empty values count as
      unset. ``QUEUE_RETRY_BACKOFF_MS`` is in milliseconds.
    * Overrides: any top-level key (``queue=...``), any worker key (``max_concurrent_sessions=8``,
      ``retry=RetryPolicy(...)``), a section as a dict or struct (``aws={"region": ...}``,
      merged key by key), or a dotted key (``**{"memory.lock_duration": 5}``). None is ignored,
      so CLI options that were not given do not override anything.

    Every problem raises one `ConfigurationError` line naming the dotted key, its source and
    the bad value (never a secret's value). `Settings.sources` records each value's origin.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    for name in _IDENTITY_SECRETS:
        register_secret(environ.get(name))
    layered: dict[str, tuple[object, str]] = {}

    path, origin = _find_config_file(config_file, environ)
    if path is not None:
        source = f"file:{path}"
        _flatten_mapping(_read_config_file(path, origin), "", source, layered, what=source)

    for key, names in ENVIRONMENT.items():
        for name in names:
            text = environ.get(name)
            if text is not None and text.strip():
                layered[key] = (text.strip(), f"env:{name}")
                break

    for name, value in overrides.items():
        if value is not None:
            _add_override(name, value, layered)

    typed: dict[str, object] = {}
    sources: dict[str, str] = {}
    leaves = _leaves()
    for key, spec in leaves.items():
        if key not in layered:
            sources[key] = "default"
            continue
        raw, source = layered[key]
        sources[key] = source
        typed[key] = _typed_value(key, spec, raw, source)

    settings = _build(Settings, "", typed, sources)
    assert isinstance(settings, Settings)
    settings.__dict__["_sources"] = sources
    return settings


# ---- leaves: every dotted key with its type and default -------------------------------------


class _Leaf(msgspec.Struct, frozen=True):
    type: mi.Type
    default: object
    secret: bool


@functools.cache
def _struct_fields(cls: type[msgspec.Struct]) -> tuple[mi.Field, ...]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info.fields


def _field_default(field: mi.Field) -> object:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


def _is_secret(t: mi.Type) -> bool:
    if isinstance(t, mi.UnionType):
        return any(_is_secret(member) for member in t.types)
    return isinstance(t, mi.CustomType) and t.cls is Secret


@functools.cache
def _leaves() -> dict[str, _Leaf]:
    leaves: dict[str, _Leaf] = {}

    def walk(cls: type[msgspec.Struct], prefix: str) -> None:
        for field in _struct_fields(cls):
            if isinstance(field.type, mi.StructType):
                walk(field.type.cls, f"{prefix}{field.name}.")
            else:
                leaves[prefix + field.name] = _Leaf(field.type, _field_default(field), _is_secret(field.type))

    walk(Settings, "")
    return leaves


@functools.cache
def _section_paths() -> frozenset[str]:
    """Every dotted path that names a section: ``worker``, ``worker.retry``, ``aws``..."""
    paths: set[str] = set()
    for key in _leaves():
        parts = key.split(".")
        paths.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return frozenset(paths)


def _flatten_values(settings: Settings) -> dict[str, object]:
    values: dict[str, object] = {}
    for key in _leaves():
        value: object = settings
        for part in key.split("."):
            value = getattr(value, part)
        values[key] = value
    return values


def _redact_hook(value: object) -> object:
    if isinstance(value, Secret):
        # A reference names where the secret lives; it is shown so operators can check it.
        return value.get_secret_value() if value.is_reference else _MASK
    raise NotImplementedError(f"cannot show a value of type {type(value).__name__}")


# ---- conversion and checks -------------------------------------------------------------------


# The operations guide's level names that Python's logging spells differently.
_ALIASES: Final = {"warn": "warning", "fatal": "critical"}


class _Invalid(Exception):
    """A value that does not fit. ``problem`` replaces "must be <expected>, got <shown>" when
    the value must not be shown at all."""

    def __init__(self, expected: str, shown: str, problem: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.shown = shown
        self.problem = problem

    def sentence(self) -> str:
        return self.problem or f"must be {self.expected}, got {self.shown}"


# Bounded: a hostile file's bad value (a list of a million items) is described, not rendered.
_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def _show(value: object, *, secret: bool = False) -> str:
    """A bad value for an error line: never a secret, one line, bounded."""
    if secret:
        return f"a value of type {type(value).__name__}" if not isinstance(value, str) else "a bad value"
    if isinstance(value, str) and looks_like_a_credential(value):
        return "a value that holds a credential (not shown)"
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(t: mi.IntType | mi.FloatType) -> str:
    parts = []
    if t.ge is not None:
        parts.append(f">= {t.ge}")
    if t.gt is not None:
        parts.append(f"> {t.gt}")
    if t.le is not None:
        parts.append(f"<= {t.le}")
    if t.lt is not None:
        parts.append(f"< {t.lt}")
    return (" " + " and ".join(parts)) if parts else ""


def _in_bounds(value: float, t: mi.IntType | mi.FloatType) -> bool:
    return not (
        (t.ge is not None and value < t.ge)
        or (t.gt is not None and value <= t.gt)
        or (t.le is not None and value > t.le)
        or (t.lt is not None and value >= t.lt)
    )


def _describe(t: mi.Type) -> str:
    if isinstance(t, mi.UnionType):
        return " or ".join(_describe(member) for member in t.types if not isinstance(member, mi.NoneType))
    if isinstance(t, mi.IntType):
        return "an integer" + _bounds(t)
    if isinstance(t, mi.FloatType):
        return "a number" + _bounds(t)
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(repr(v) for v in t.values)
    if isinstance(t, mi.StrType):
        if t.pattern is not None and "http" in t.pattern:
            return "an http:// or https:// URL"
        return "a non-empty string"
    if isinstance(t, mi.CustomType) and t.cls is Secret:
        return "a non-empty string"
    if isinstance(t, mi.StructType):
        return f"a {t.cls.__name__}"
    if isinstance(t, mi.BoolType):
        return "true or false"
    return f"a {type(t).__name__}"  # pragma: no cover - every field type is handled above


def _convert(value: object, t: mi.Type, *, text: bool) -> object:
    """Check ``value`` against ``t`` and return it in its exact type; raise `_Invalid`.

    ``text`` means the value came from the environment: numbers are parsed from strings.
    """
    secret = _is_secret(t)

    def invalid() -> _Invalid:
        return _Invalid(_describe(t), _show(value, secret=secret))

    if isinstance(t, mi.UnionType):
        if value is None and any(isinstance(member, mi.NoneType) for member in t.types):
            return None
        (member,) = (m for m in t.types if not isinstance(m, mi.NoneType))
        return _convert(value, member, text=text)
    if isinstance(t, mi.BoolType):
        if text and isinstance(value, str):
            flag = _FLAGS.get(value.strip().lower())
            if flag is None:
                raise invalid()
            return flag
        if not isinstance(value, bool):
            raise invalid()
        return value
    if isinstance(t, mi.IntType):
        number: object = value
        if text and isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                raise invalid() from None
        if isinstance(number, bool) or not isinstance(number, int) or not _in_bounds(number, t):
            raise invalid()
        return number
    if isinstance(t, mi.FloatType):
        number = value
        if text and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise invalid() from None
        if (
            isinstance(number, bool)
            or not isinstance(number, (int, float))
            or not _finite(number)
            or not _in_bounds(number, t)
        ):
            raise invalid()
        return float(number)
    if isinstance(t, mi.LiteralType):
        if isinstance(value, str):
            wanted = value.strip().lower()
            wanted = _ALIASES.get(wanted, wanted) if "WARNING" in t.values else wanted
            for allowed in t.values:
                if isinstance(allowed, str) and allowed.lower() == wanted:
                    return allowed
        raise invalid()
    if isinstance(t, mi.StrType):
        if isinstance(value, str) and looks_like_a_credential(value):
            raise _Invalid(
                _describe(t),
                "",
                "looks like a connection string or holds a credential (value not shown): it is not a"
                " secret setting and would be shown; give secrets in the secret settings"
                " (azure.connection_string, aws.secret_access_key, aws.session_token), which are masked",
            )
        if not isinstance(value, str) or not value or (t.pattern and not re.match(t.pattern, value)):
            raise invalid()
        return value
    if isinstance(t, mi.CustomType) and t.cls is Secret:
        given = value.get_secret_value() if isinstance(value, Secret) else value
        if isinstance(given, str) and _REFERENCE.match(given):
            try:
                parse_secret_reference(given)
            except ConfigurationError as error:
                raise _Invalid(_describe(t), "", f"holds a {error.message}") from None
        if isinstance(value, Secret) and value.get_secret_value():
            return value
        if isinstance(value, str) and value:
            return Secret(value)
        raise invalid()
    if isinstance(t, mi.StructType):
        if not isinstance(value, t.cls):
            raise invalid()
        return value
    raise invalid()  # pragma: no cover - every field type is handled above


def _typed_value(key: str, leaf: _Leaf, raw: object, source: str) -> object:
    text = source.startswith("env:")
    t = leaf.type
    try:
        if source.removeprefix("env:") in _MILLISECONDS:
            try:
                milliseconds = _convert(raw, mi.FloatType(ge=0), text=True)
            except _Invalid as invalid:
                raise _Invalid("a number of milliseconds >= 0", invalid.shown, invalid.problem) from None
            assert isinstance(milliseconds, float)
            return _convert(milliseconds / 1000, t, text=False)
        return _convert(raw, t, text=text)
    except _Invalid as invalid:
        raise ConfigurationError(f"{key} from {source} {invalid.sentence()}") from None


def _with_source(
    error: ConfigurationError, sources: Mapping[str, str], *, candidates: Sequence[str] = ("",)
) -> ConfigurationError:
    """Rewrite a ``"<key> must ..."`` error from a struct's ``__post_init__`` as
    ``"<dotted key> from <source> must ..."``. The key may be given relative to its section."""
    message = error.message
    best: tuple[int, str] | None = None
    for key in sources:
        if not any(key.startswith(c) or key == c for c in candidates):
            continue
        parts = key.split(".")
        for start in range(len(parts)):
            relative = ".".join(parts[start:])
            if message.startswith(relative + " ") and (best is None or len(relative) > best[0]):
                best = (len(relative), key)
    if best is None:
        return ConfigurationError(message)
    length, key = best
    return ConfigurationError(f"{key} from {sources[key]}{message[length:]}")


def _build(
    cls: type[msgspec.Struct], prefix: str, typed: Mapping[str, object], sources: Mapping[str, str]
) -> object:
    kwargs: dict[str, object] = {}
    for field in _struct_fields(cls):
        key = prefix + field.name
        if isinstance(field.type, mi.StructType):
            kwargs[field.name] = _build(field.type.cls, key + ".", typed, sources)
        elif key in typed:
            kwargs[field.name] = typed[key]
    try:
        return cls(**kwargs)
    except ConfigurationError as error:
        candidates = (prefix,) if prefix else ("",)
        raise _with_source(error, sources, candidates=candidates) from None


# ---- layers ---------------------------------------------------------------------------------


def _unknown_key(key: str, where: str, *, flat: bool = False) -> ConfigurationError:
    known = list(_leaves()) + sorted(_section_paths())
    if flat:  # keyword arguments: suggest the short worker names they are usually given as
        known = [k.removeprefix("worker.") for k in known if k.count(".") <= 1] + known
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigurationError(f"unknown configuration key {key!r} in {where}{hint}")


def _flatten_mapping(
    data: Mapping[Any, Any], prefix: str, source: str, out: dict[str, tuple[object, str]], *, what: str
) -> None:
    leaves = _leaves()
    sections = _section_paths()
    for name, value in data.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"configuration key {name!r} in {what} is not a string")
        key = prefix + name
        if key in sections:
            if value is None:
                continue  # YAML "worker:" with every key commented out
            if isinstance(value, msgspec.Struct):
                value = {field.name: getattr(value, field.name) for field in _struct_fields(type(value))}
            if not isinstance(value, Mapping):
                raise ConfigurationError(
                    f"{key} from {source} must be a table of keys, got {type(value).__name__}"
                )
            _flatten_mapping(value, key + ".", source, out, what=what)
        elif key in leaves:
            if value is not None or source != "argument":
                out[key] = (value, source)
        else:
            raise _unknown_key(key, what)


def _add_override(name: str, value: object, out: dict[str, tuple[object, str]]) -> None:
    leaves = _leaves()
    sections = _section_paths()
    if name in leaves or name in sections:
        key = name
    elif f"worker.{name}" in leaves or f"worker.{name}" in sections:
        key = f"worker.{name}"
    else:
        raise _unknown_key(name, "the keyword arguments", flat=True)
    _flatten_mapping({key: value}, "", "argument", out, what="the keyword arguments")


def _find_config_file(
    config_file: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> tuple[Path | None, str]:
    if config_file is not None:
        return Path(config_file), "the config_file argument"
    named = environ.get(CONFIG_FILE_ENV, "").strip()
    if named:
        return Path(named), f"env:{CONFIG_FILE_ENV}"
    for candidate in _DISCOVERED_FILES:
        path = Path(candidate)
        if path.is_file():
            return path, "the current directory"
    return None, ""


def _read_config_file(path: Path, origin: str) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigurationError(
            f"config file {str(path)!r} (from {origin}) must end in .toml, .yaml or .yml"
        )
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {str(path)!r} (from {origin}) does not exist") from None
    except OSError as error:
        raise ConfigurationError(
            f"config file {str(path)!r} (from {origin}) cannot be read: {error.strerror}"
        ) from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigurationError(
            f"config file {str(path)!r} is over {MAX_CONFIG_FILE_BYTES // 1024} KiB: not a config file"
        )
    return _parse_config(raw, suffix, str(path))


def _parse_config(raw: bytes, suffix: str, name: str) -> Mapping[str, Any]:
    """The table of keys in ``raw`` (TOML or YAML by ``suffix``); one `ConfigurationError`
    line for anything else, never the file's text."""
    data: object
    try:
        if suffix == ".toml":
            try:
                data = tomllib.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ConfigurationError(f"malformed config file {name!r}: not UTF-8 text") from None
            except tomllib.TOMLDecodeError as error:
                # The message carries "(at line L, column C)" and never the file's text.
                detail = " ".join(str(error).split())
                raise ConfigurationError(f"malformed config file {name!r}: {detail}") from None
        else:
            deep = _flow_too_deep(raw)
            if deep is not None:
                raise ConfigurationError(
                    f"malformed config file {name!r}: brackets nested more than {_MAX_YAML_DEPTH} levels"
                    f" deep at line {deep}"
                )
            try:
                data = yaml.load(raw, Loader=_StrictLoader)  # a SafeLoader subclass
            except yaml.YAMLError as error:
                raise ConfigurationError(f"malformed config file {name!r}: {_yaml_problem(error)}") from None
            except ValueError as error:  # an integer of more than 4300 digits, a bad date
                problem = " ".join(str(error).split(":")[0].split())[:80]
                raise ConfigurationError(
                    f"malformed config file {name!r}: a value cannot be read ({problem})"
                ) from None
    except RecursionError:
        raise ConfigurationError(f"malformed config file {name!r}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            f"config file {name!r} must hold a table of keys at the top, got {type(data).__name__}"
        )
    return data


_MAX_YAML_DEPTH: Final = 32


def _flow_too_deep(raw: bytes) -> int | None:
    """The line where ``[``/``{`` brackets first nest deeper than `_MAX_YAML_DEPTH`, else None.

    Checked before PyYAML sees the text: its scanner takes quadratic time in the nesting of
    flow collections, even past the end of a document, where the loader's own depth check
    cannot stop it. Brackets inside quoted strings count too: no config file nests 32 deep.
    """
    depth = 0
    for match in _BRACKETS.finditer(raw):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > _MAX_YAML_DEPTH:
            return raw.count(b"\n", 0, match.start()) + 1
        depth = max(depth, 0)
    return None


_BRACKETS: Final = re.compile(rb"[\[\]{}]")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and duplicate keys.

    * An alias (``*name``, merge keys ``<<: *name`` included) is refused where it appears:
      aliases let a few hundred bytes stand for billions of values (an "alias bomb"), and a
      config file has no use for them.
    * A key given twice in one mapping is refused (YAML says keys are unique; PyYAML would
      silently keep the last one, hiding a typo or a merge mistake).
    * Nesting deeper than 32 levels is refused (a config file has 3).
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in config files", event.start_mark
            )
        if self._depth >= _MAX_YAML_DEPTH:
            # PyYAML's scanner slows down quadratically with nesting ("[[[[..."): stop early.
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {_MAX_YAML_DEPTH} levels deep", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:
                        continue  # an unhashable key: the base class reports it
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {_show(key)}", key_node.start_mark
                        )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's problem and position only: ``str(error)`` quotes the offending line,
    which may hold a secret."""
    problem = getattr(error, "problem", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())
