"""Secret references (``keyvault://``, ``secretsmanager://``): read at start-up, re-read
periodically and after a refused credential, and followed by the providers without a restart
and without dropping a session.

Key Vault runs against an SDK-shaped fake (``azure.keyvault.secrets.SecretClient`` patched),
Service Bus against the fake namespace (which refuses a key once it is rotated away), Secrets
Manager and SQS against moto's server on 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import trio

from queue_runtime import MessageContext, SessionActor
from queue_runtime.config import Settings, load_settings
from queue_runtime.entrypoint import serve_worker
from queue_runtime.errors import AuthenticationFailed, ConfigurationError
from queue_runtime.providers import create_provider
from queue_runtime.redaction import redact
from queue_runtime.secrets import SecretResolver

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: fakes and the sqs_server helper

from fakes.servicebus import FakeNamespace
from sqs_server import CREDENTIALS, REGION, moto_sqs  # noqa: F401  (moto_sqs: a fixture, used by name)

KEY1 = "KEYoneROTATIONtest0fake0key0aaaaaaaaaaaaaaa="
KEY2 = "KEYtwoROTATIONtest0fake0key0bbbbbbbbbbbbbbb="
HOST = "fake.servicebus.windows.net"
CONN1 = f"Endpoint=sb://{HOST}/;SharedAccessKeyName=root;SharedAccessKey={KEY1}"
CONN2 = f"Endpoint=sb://{HOST}/;SharedAccessKeyName=root;SharedAccessKey={KEY2}"


# --------------------------------------------------------------------------------------------
# Key Vault: an SDK-shaped fake of azure.keyvault.secrets.SecretClient


class FakeVault:
    """The secrets of fake vaults, by (vault URL, name); thread-safe (read from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.secrets: dict[tuple[str, str], list[str]] = {}
        self.reads = 0
        self.failure: Callable[[], BaseException] | None = None
        self.credentials: list[Any] = []

    def set(self, vault: str, name: str, value: str) -> None:
        with self._lock:
            self.secrets.setdefault((f"https://{vault}.vault.azure.net", name), []).append(value)

    def get(self, vault_url: str, name: str, version: str | None) -> SimpleNamespace:
        from azure.core.exceptions import ResourceNotFoundError

        with self._lock:
            self.reads += 1
            if self.failure is not None:
                raise self.failure()
            versions = self.secrets.get((vault_url, name))
            if not versions:
                raise ResourceNotFoundError(
                    f"A secret with (name/id) {name} was not found in this key vault."
                )
            index = int(version) - 1 if version is not None else len(versions) - 1
            return SimpleNamespace(
                name=name, value=versions[index], properties=SimpleNamespace(version=str(index + 1))
            )


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> FakeVault:
    """A fake vault behind ``azure.keyvault.secrets.SecretClient`` (and a credential that never
    asks anyone for a token)."""
    import azure.identity
    import azure.keyvault.secrets

    fake = FakeVault()

    class SecretClient:
        def __init__(self, vault_url: str, credential: Any, **_: Any) -> None:
            self.vault_url = vault_url
            fake.credentials.append(credential)

        def get_secret(self, name: str, version: str | None = None, **_: Any) -> SimpleNamespace:
            return fake.get(self.vault_url, name, version)

        def close(self) -> None:
            pass

    class DefaultAzureCredential:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        def close(self) -> None:
            pass

    monkeypatch.setattr(azure.keyvault.secrets, "SecretClient", SecretClient)
    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", DefaultAzureCredential)
    return fake


def azure_settings(**overrides: Any) -> Settings:
    overrides.setdefault("azure", {"connection_string": "keyvault://myvault/sb-conn"})
    return load_settings(env={}, provider="azure", queue="orders", **overrides)


async def test_a_keyvault_reference_is_read_then_reread(vault: FakeVault) -> None:
    vault.set("myvault", "sb-conn", CONN1)
    settings = azure_settings(azure={"connection_string": "keyvault://myvault/sb-conn", "client_id": "mi-1"})
    assert settings.redacted()["azure"]["connection_string"] == "keyvault://myvault/sb-conn"
    with pytest.raises(ConfigurationError, match="is a secret reference"):
        create_provider(settings)
    resolver = SecretResolver(settings)
    resolved = await resolver.load()
    assert resolved.azure.connection_string is not None
    assert resolved.azure.connection_string.get_secret_value() == CONN1
    assert resolved.sources == settings.sources
    assert vault.credentials[0].kwargs == {"managed_identity_client_id": "mi-1"}
    assert redact(f"the key is {KEY1}") == "the key is ***"  # read values are masked at once

    assert await resolver.refresh() is False  # unchanged
    vault.set("myvault", "sb-conn", CONN2)
    assert await resolver.refresh() is True
    assert resolver.settings.azure.connection_string.get_secret_value() == CONN2  # type: ignore[union-attr]

    # A failed re-read keeps the value in use and is counted.
    from azure.core.exceptions import ClientAuthenticationError

    vault.failure = lambda: ClientAuthenticationError("ManagedIdentityCredential: no token")
    assert await resolver.refresh() is False
    assert resolver.failures == 1
    assert resolver.settings.azure.connection_string.get_secret_value() == CONN2  # type: ignore[union-attr]

    # After an authentication failure: one read at once, then at most one per interval.
    vault.failure = None
    reads = vault.reads
    await resolver.refresh_after_failure()
    await resolver.refresh_after_failure()
    assert vault.reads == reads + 1
    await resolver.aclose()


async def test_keyvault_problems_at_start_up_are_one_clear_error(vault: FakeVault) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        await SecretResolver(azure_settings()).load()
    from azure.core.exceptions import ClientAuthenticationError

    vault.failure = lambda: ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")
    with pytest.raises(AuthenticationFailed, match="Key Vault Secrets User"):
        await SecretResolver(azure_settings()).load()
    with pytest.raises(ConfigurationError, match="malformed secret reference"):
        load_settings(env={"AZURE_SERVICE_BUS_CONNECTION_STRING": "keyvault://x"})


# --------------------------------------------------------------------------------------------
# A Service Bus worker across a rotation of its keyvault:// connection string


class Recorder(SessionActor[bytes]):
    """Records (session, seq, actor instance) for every message, in handling order."""

    seen: ClassVar[list[tuple[str, int, int]]] = []

    async def handle(self, body: bytes, ctx: MessageContext) -> None:
        type(self).seen.append((self.session_id, int(body), id(self)))


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNamespace]:
    """A fake namespace behind the SDK's ``from_connection_string`` constructors."""
    import azure.servicebus.aio
    import azure.servicebus.aio.management

    ns = FakeNamespace(host=HOST)
    ns.create_queue("orders", requires_session=True, lock_duration=30.0)
    client_class, admin_class = ns.sdk_classes()
    monkeypatch.setattr(azure.servicebus.aio, "ServiceBusClient", client_class)
    monkeypatch.setattr(azure.servicebus.aio.management, "ServiceBusAdministrationClient", admin_class)
    yield ns


def put(ns: FakeNamespace, session: str, seq: int) -> None:
    from azure.servicebus import ServiceBusMessage

    with ns.lock:
        ns._enqueue(ns.queues["orders"], ServiceBusMessage(str(seq).encode(), session_id=session))


async def test_a_service_bus_worker_keeps_processing_across_a_key_rotation(
    vault: FakeVault, namespace: FakeNamespace
) -> None:
    vault.set("myvault", "sb-conn", CONN1)
    namespace.rotate_key("unused", KEY1)  # from now on the namespace checks keys: KEY1 only
    actor = type("Rotating", (Recorder,), {"seen": []})
    settings = azure_settings(
        receive_timeout=0.5,
        session_idle_timeout=20.0,  # s1 stays held across the rotation: it must not be dropped
        **{"secrets.refresh_interval": 3600.0},  # only the refused key triggers the re-read
    )
    async with trio.open_nursery() as nursery:
        supervisor = await nursery.start(
            partial(serve_worker, actor, settings, install_signal_handlers=False)
        )
        for seq in range(5):
            put(namespace, "s1", seq)
            put(namespace, "s2", seq)
        await until(lambda: len(actor.seen) == 10)

        # Rotation: the vault gets the new connection string, the namespace regenerates the
        # key. New links with the old key are refused from now on.
        vault.set("myvault", "sb-conn", CONN2)
        namespace.rotate_key(KEY1, KEY2)
        await until(lambda: namespace.auth_failures >= 1 and CONN2 in namespace.connection_strings)
        await trio.sleep(0.6)  # accepts opened before the rotation have timed out
        for seq in range(5, 10):
            put(namespace, "s1", seq)  # the held session, on its link of the old key
        for seq in range(5):
            put(namespace, "s3", seq)  # a new session: only a link of the new key can take it
        await until(lambda: len(actor.seen) == 20)
        stats = supervisor.stats()
        supervisor.stop()

    by_session: dict[str, list[int]] = {}
    for session, seq, _ in actor.seen:
        by_session.setdefault(session, []).append(seq)
    assert by_session == {"s1": list(range(10)), "s2": list(range(5)), "s3": list(range(5))}
    assert len({instance for session, _, instance in actor.seen if session == "s1"}) == 1  # not dropped
    assert stats.lock_lost == 0 and stats.dead_lettered == 0 and stats.completed == 20
    assert namespace.connection_strings[0] == CONN1 and CONN2 in namespace.connection_strings
    with pytest.raises(Exception, match="SharedAccessKey is not valid"):
        namespace.authorize(CONN1)  # the fake refuses the old key for good


# --------------------------------------------------------------------------------------------
# Secrets Manager on moto's server, and an SQS worker across a rotation


def boto(endpoint: str, service: str) -> Any:
    import boto3

    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )


@pytest.fixture
def aws_env(moto_sqs: str, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_sqs)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_sqs)
    # The standard chain's credentials (a role, in production) read the store.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_sqs


def _secret_name(prefix: str) -> str:
    import uuid

    return f"{prefix}/{uuid.uuid4().hex[:10]}"


async def test_a_secretsmanager_reference_is_read_from_moto_and_reread(aws_env: str) -> None:
    sm = boto(aws_env, "secretsmanager")
    plain = _secret_name("queue-runtime")
    document = _secret_name("queue-runtime")
    arn = sm.create_secret(Name=plain, SecretString="first-secret-value")["ARN"]
    sm.create_secret(Name=document, SecretString=json.dumps({"secret_access_key": "json-secret-one"}))
    settings = load_settings(
        env={},
        provider="aws",
        queue="orders.fifo",
        aws={
            "region": REGION,
            "access_key_id": "testing",
            "secret_access_key": f"secretsmanager://{document}#secret_access_key",
            "session_token": f"secretsmanager://{arn}",
        },
    )
    resolver = SecretResolver(settings)
    try:
        resolved = await resolver.load()
        assert resolved.aws.secret_access_key.get_secret_value() == "json-secret-one"  # type: ignore[union-attr]
        assert resolved.aws.session_token.get_secret_value() == "first-secret-value"  # type: ignore[union-attr]
        sm.put_secret_value(SecretId=plain, SecretString="second-secret-value")
        assert await resolver.refresh() is True
        assert resolver.settings.aws.session_token.get_secret_value() == "second-secret-value"  # type: ignore[union-attr]
        assert redact("token second-secret-value") == "token ***"
    finally:
        await resolver.aclose()
    missing = load_settings(
        env={}, provider="aws", aws={"region": REGION, "session_token": "secretsmanager://nope"}
    )
    with pytest.raises(ConfigurationError, match="does not exist"):
        await SecretResolver(missing).load()


def _fifo_queue(endpoint: str, name: str) -> None:
    sqs = boto(endpoint, "sqs")
    dlq = sqs.create_queue(
        QueueName=f"{name.removesuffix('.fifo')}-dlq.fifo", Attributes={"FifoQueue": "true"}
    )
    arn = sqs.get_queue_attributes(QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"])["Attributes"]
    policy = json.dumps({"deadLetterTargetArn": arn["QueueArn"], "maxReceiveCount": "5"})
    sqs.create_queue(QueueName=name, Attributes={"FifoQueue": "true", "RedrivePolicy": policy})


async def test_an_sqs_worker_picks_up_a_rotated_secretsmanager_key(aws_env: str) -> None:
    import uuid

    sm = boto(aws_env, "secretsmanager")
    name = _secret_name("sqs-key")
    sm.create_secret(Name=name, SecretString="rotated-key-version-one")
    queue = f"rot-{uuid.uuid4().hex[:8]}.fifo"
    _fifo_queue(aws_env, queue)
    sqs = boto(aws_env, "sqs")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]

    def send(seq: int) -> None:
        sqs.send_message(QueueUrl=url, MessageBody=str(seq), MessageGroupId="g-1",
                         MessageDeduplicationId=f"{seq}-{uuid.uuid4().hex}")  # fmt: skip

    actor = type("SqsRotating", (Recorder,), {"seen": []})
    settings = load_settings(
        env={},
        provider="aws",
        queue=queue,
        receive_timeout=1,
        session_idle_timeout=20.0,
        aws={"region": REGION, "access_key_id": "testing", "secret_access_key": f"secretsmanager://{name}"},
        **{"secrets.refresh_interval": 0.3},
    )
    async with trio.open_nursery() as nursery:
        supervisor = await nursery.start(
            partial(serve_worker, actor, settings, install_signal_handlers=False)
        )
        provider: Any = supervisor.provider
        assert provider._secret_access_key == "rotated-key-version-one"
        for seq in range(3):
            send(seq)
        await until(lambda: len(actor.seen) == 3)
        sm.put_secret_value(SecretId=name, SecretString="rotated-key-version-two")
        await until(lambda: provider._secret_access_key == "rotated-key-version-two", timeout=10)
        for seq in range(3, 6):
            send(seq)
        await until(lambda: len(actor.seen) == 6)
        stats = supervisor.stats()
        supervisor.stop()
    assert [seq for _, seq, _ in actor.seen] == list(range(6))
    assert len({instance for *_, instance in actor.seen}) == 1  # the group's actor was not dropped
    assert stats.lock_lost == 0 and stats.completed == 6
