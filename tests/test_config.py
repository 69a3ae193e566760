"""Settings: layering, environment names, provenance, redaction, errors, and create_provider."""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import queue_runtime.providers as providers_module
from queue_runtime.config import (
    ENVIRONMENT,
    AwsSettings,
    RetryPolicy,
    Secret,
    Settings,
    SupervisorConfig,
    WorkerSettings,
    load_settings,
)
from queue_runtime.errors import ConfigurationError, QueueFull
from queue_runtime.message import Message
from queue_runtime.providers import create_provider

# Distinctive fake credentials: any error, repr or dump that contains one of these leaks.
FAKE_SECRET = "FAKE-s3cr3t-9f8e7d6c5b4a-DO-NOT-LEAK"
FAKE_TOKEN = "FAKE-t0ken-1a2b3c4d5e6f-DO-NOT-LEAK"
FAKE_CONNECTION = (
    "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=FAKE-k3y-77aa"
)
SECRETS = (FAKE_SECRET, FAKE_TOKEN, FAKE_CONNECTION, "FAKE-k3y-77aa")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_settings discovers ./config.toml: never pick one up from wherever pytest runs.
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(excinfo: pytest.ExceptionInfo[ConfigurationError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    assert "Traceback" not in message
    # Raised "from None": nothing chained that a CLI might print as a traceback.
    error = excinfo.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return message


# ---- shape ---------------------------------------------------------------------------------


def _kind(t: mi.Type) -> Any:
    """A field type without its constraints, to compare WorkerSettings with SupervisorConfig."""
    if isinstance(t, mi.UnionType):
        return frozenset(_kind(member) for member in t.types)
    if isinstance(t, mi.StructType):
        return t.cls
    return type(t)


def _fields(cls: type[msgspec.Struct]) -> dict[str, mi.Field]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return {field.name: field for field in info.fields}


def _default(field: mi.Field) -> Any:
    return field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default


def test_worker_fields_mirror_supervisor_config() -> None:
    supervisor = _fields(SupervisorConfig)
    worker = _fields(WorkerSettings)
    top = _fields(Settings)
    # queue and receive_timeout are top-level keys (producers use them too); the rest is [worker].
    assert set(worker) == set(supervisor) - {"queue", "receive_timeout"}
    for name, field in worker.items():
        assert _kind(field.type) == _kind(supervisor[name].type), name
        assert _default(field) == _default(supervisor[name]), name
    assert _default(top["receive_timeout"]) == _default(supervisor["receive_timeout"])
    assert Settings(queue="q").supervisor_config() == SupervisorConfig(queue="q")


_values = st.one_of(
    st.integers(min_value=-3, max_value=100),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(set(_fields(WorkerSettings)) - {"retry"})), value=_values)
def test_worker_settings_accept_exactly_what_supervisor_config_accepts(name: str, value: object) -> None:
    def accepted(build: Any) -> bool:
        try:
            build()
        except ConfigurationError:
            return False
        return True

    by_settings = accepted(lambda: WorkerSettings(**{name: value}))
    by_supervisor = accepted(lambda: SupervisorConfig(queue="q", **{name: value}))
    assert by_settings == by_supervisor, (name, value)


# ---- layering ------------------------------------------------------------------------------

# key -> (file path inside the document, env name, keyword argument builder, three distinct values)
LAYERED: dict[str, tuple[tuple[str, ...], str, Any, tuple[Any, Any, Any]]] = {
    "worker.max_concurrent_sessions": (
        ("worker", "max_concurrent_sessions"),
        "QUEUE_MAX_CONCURRENT_SESSIONS",
        lambda v: {"max_concurrent_sessions": v},
        (3, 5, 7),
    ),
    "queue": (("queue",), "QUEUE_NAME", lambda v: {"queue": v}, ("from-file", "from-env", "from-arg")),
    "worker.retry.max_attempts": (
        ("worker", "retry", "max_attempts"),
        "QUEUE_MAX_RETRY_ATTEMPTS",
        lambda v: {"retry": {"max_attempts": v}},
        (2, 4, 6),
    ),
    "aws.region": (("aws", "region"), "AWS_REGION", lambda v: {"aws": {"region": v}}, ("r-f", "r-e", "r-a")),
    "receive_timeout": (
        ("receive_timeout",),
        "QUEUE_RECEIVE_TIMEOUT_SECONDS",
        lambda v: {"receive_timeout": v},
        (1.5, 2.5, 3.5),
    ),
}


def _nested(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        doc = doc.setdefault(part, {})
    doc[path[-1]] = value


def _toml(doc: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {json.dumps(value)}")
        for key, value in data.items():
            if isinstance(value, dict):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", doc)
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(
    layers=st.dictionaries(
        st.sampled_from(sorted(LAYERED)),
        st.frozensets(st.sampled_from(["file", "env", "argument"])),
        min_size=1,
    ),
    fmt=st.sampled_from(["toml", "yaml"]),
)
def test_each_layer_wins_over_the_lower_ones(layers: dict[str, frozenset[str]], fmt: str) -> None:
    doc: dict[str, Any] = {}
    env: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for key, chosen in layers.items():
        path, env_name, argument, (file_value, env_value, arg_value) = LAYERED[key]
        if "file" in chosen:
            _nested(doc, path, file_value)
        if "env" in chosen:
            env[env_name] = str(env_value)
        if "argument" in chosen:
            overrides.update(argument(arg_value))
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / f"config.{fmt}"
        config.write_text(_toml(doc) if fmt == "toml" else json.dumps(doc))  # JSON is YAML
        loaded = load_settings(config, env=env, **overrides)
    flat = loaded.redacted()
    for key, (_, env_name, _, (file_value, env_value, arg_value)) in LAYERED.items():
        value: Any = flat
        for part in key.split("."):
            value = value[part]
        chosen = layers.get(key, frozenset())
        if "argument" in chosen:
            expected, source = arg_value, "argument"
        elif "env" in chosen:
            expected, source = env_value, f"env:{env_name}"
        elif "file" in chosen:
            expected, source = file_value, f"file:{config}"
        else:
            expected, source = _default_of(key), "default"
        assert value == expected, key
        assert loaded.sources[key] == source, key


def _default_of(key: str) -> Any:
    value: Any = Settings().redacted()
    for part in key.split("."):
        value = value[part]
    return value


def test_layering_example_from_the_docs(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.toml",
        """
provider = "memory"
queue = "orders"

[worker]
max_concurrent_sessions = 32
prefetch = 4

[worker.retry]
max_attempts = 5
""",
    )
    env = {"QUEUE_MAX_CONCURRENT_SESSIONS": "16", "QUEUE_RETRY_BACKOFF_MS": "250"}
    loaded = load_settings(config, env=env, max_concurrent_sessions=8, prefetch=None)
    assert loaded.worker.max_concurrent_sessions == 8  # argument > env > file
    assert loaded.worker.prefetch == 4  # None argument ignored: the file's value stays
    assert loaded.worker.retry.max_attempts == 5
    assert loaded.worker.retry.initial_backoff == 0.25
    assert loaded.queue == "orders"
    assert loaded.sources["worker.max_concurrent_sessions"] == "argument"
    assert loaded.sources["worker.prefetch"] == f"file:{config}"
    assert loaded.sources["worker.retry.initial_backoff"] == "env:QUEUE_RETRY_BACKOFF_MS"
    assert loaded.sources["worker.shutdown_grace"] == "default"


def test_section_dict_override_merges_key_by_key(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", '[aws]\nregion = "eu-west-1"\nprofile = "dev"\n')
    loaded = load_settings(config, env={}, aws={"profile": "prod", "endpoint_url": None})
    assert (loaded.aws.region, loaded.aws.profile, loaded.aws.endpoint_url) == ("eu-west-1", "prod", None)
    assert loaded.sources["aws.profile"] == "argument"
    assert loaded.sources["aws.region"] == f"file:{config}"
    assert loaded.sources["aws.endpoint_url"] == "default"


def test_retry_policy_override_sets_every_retry_key() -> None:
    policy = RetryPolicy(max_attempts=7, initial_backoff=0.5, multiplier=3.0, max_backoff=9.0, jitter=0.0)
    loaded = load_settings(env={"QUEUE_MAX_RETRY_ATTEMPTS": "2"}, retry=policy)
    assert loaded.worker.retry == policy
    assert {k: v for k, v in loaded.sources.items() if k.startswith("worker.retry.")} == {
        f"worker.retry.{name}": "argument" for name in RetryPolicy.__struct_fields__
    }


def test_section_struct_and_dotted_overrides() -> None:
    loaded = load_settings(env={}, aws=AwsSettings(region="us-east-2"), **{"memory.lock_duration": 5})
    assert loaded.aws.region == "us-east-2" and loaded.memory.lock_duration == 5.0
    assert loaded.sources["aws.region"] == "argument"
    assert loaded.sources["memory.lock_duration"] == "argument"
    # memory.max_delivery_count is reachable only through the section: the flat name is the worker's.
    loaded = load_settings(env={}, max_delivery_count=4, memory={"max_delivery_count": 2})
    assert (loaded.worker.max_delivery_count, loaded.memory.max_delivery_count) == (4, 2)


def test_empty_environment_values_count_as_unset() -> None:
    loaded = load_settings(env={"QUEUE_NAME": "", "QUEUE_MAX_RETRY_ATTEMPTS": "  ", "AWS_REGION": ""})
    assert loaded.queue is None and loaded.worker.retry.max_attempts == 3 and loaded.aws.region is None
    assert loaded.sources["queue"] == "default"


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUE_NAME", "from-process-env")
    assert load_settings().queue == "from-process-env"
    assert load_settings(env={}).queue is None


# ---- environment names -------------------------------------------------------------------

# (variable, text, dotted key, typed value). Every name in ENVIRONMENT must appear here.
ENV_CASES: list[tuple[str, str, str, Any]] = [
    ("QUEUE_PROVIDER", "aws", "provider", "aws"),
    ("QUEUE_NAME", "prod-task-tactician", "queue", "prod-task-tactician"),
    ("QUEUE_DLQ_NAME", "prod-task-tactician-dlq", "dlq_name", "prod-task-tactician-dlq"),
    ("QUEUE_RECEIVE_TIMEOUT_SECONDS", "30", "receive_timeout", 30.0),
    ("QUEUE_VISIBILITY_TIMEOUT_SECONDS", "120", "visibility_timeout", 120.0),
    ("QUEUE_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("QUEUE_LOG_FORMAT", "JSON", "log_format", "json"),
    ("QUEUE_MAX_CONCURRENT_SESSIONS", "12", "worker.max_concurrent_sessions", 12),
    ("QUEUE_PER_SESSION_CONCURRENCY", "2", "worker.per_session_concurrency", 2),
    ("QUEUE_SESSION_IDLE_TIMEOUT_SECONDS", "0.5", "worker.session_idle_timeout", 0.5),
    ("QUEUE_PREFETCH", "0", "worker.prefetch", 0),
    ("QUEUE_MAX_LOCK_RENEWAL_SECONDS", "600", "worker.max_lock_renewal", 600.0),
    ("QUEUE_MAX_DELIVERY_COUNT", "7", "worker.max_delivery_count", 7),
    ("QUEUE_SHUTDOWN_GRACE_SECONDS", "12.5", "worker.shutdown_grace", 12.5),
    ("QUEUE_MAX_RETRY_ATTEMPTS", "5", "worker.retry.max_attempts", 5),
    ("QUEUE_RETRY_BACKOFF_MS", "1000", "worker.retry.initial_backoff", 1.0),
    ("AWS_REGION", "us-west-2", "aws.region", "us-west-2"),
    ("AWS_DEFAULT_REGION", "eu-central-1", "aws.region", "eu-central-1"),
    ("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:5000", "aws.endpoint_url", "http://127.0.0.1:5000"),
    ("AWS_ENDPOINT_URL", "http://localhost:4566", "aws.endpoint_url", "http://localhost:4566"),
    ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE", "aws.access_key_id", "AKIDEXAMPLE"),
    ("AWS_SECRET_ACCESS_KEY", FAKE_SECRET, "aws.secret_access_key", Secret(FAKE_SECRET)),
    ("AWS_SESSION_TOKEN", FAKE_TOKEN, "aws.session_token", Secret(FAKE_TOKEN)),
    ("AWS_PROFILE", "staging", "aws.profile", "staging"),
    ("QUEUE_SQS_OVERLAP_DELETES", "off", "aws.overlap_deletes", False),
    (
        "AZURE_SERVICE_BUS_CONNECTION_STRING",
        FAKE_CONNECTION,
        "azure.connection_string",
        Secret(FAKE_CONNECTION),
    ),
    (
        "SERVICE_BUS_NAMESPACE",
        "a.servicebus.windows.net",
        "azure.fully_qualified_namespace",
        "a.servicebus.windows.net",
    ),
    (
        "AZURE_SERVICE_BUS_NAMESPACE",
        "b.servicebus.windows.net",
        "azure.fully_qualified_namespace",
        "b.servicebus.windows.net",
    ),
    ("AZURE_CLIENT_ID", "client-123", "azure.client_id", "client-123"),
    ("AZURE_TENANT_ID", "tenant-456", "azure.tenant_id", "tenant-456"),
    ("QUEUE_SQLITE_PATH", "/var/lib/app/queue.db", "sqlite.path", "/var/lib/app/queue.db"),
    ("QUEUE_SQLITE_SYNCHRONOUS", "full", "sqlite.synchronous", "FULL"),
    ("QUEUE_SQLITE_BUSY_TIMEOUT_SECONDS", "2.5", "sqlite.busy_timeout", 2.5),
    ("QUEUE_SQLITE_LOCK_DURATION_SECONDS", "30", "sqlite.lock_duration", 30.0),
    ("QUEUE_SQLITE_MAX_DELIVERY_COUNT", "4", "sqlite.max_delivery_count", 4),
    ("QUEUE_SQLITE_POLL_INTERVAL_SECONDS", "0.05", "sqlite.poll_interval", 0.05),
    ("QUEUE_METRICS_PORT", "9464", "telemetry.metrics_port", 9464),
    ("QUEUE_METRICS_HOST", "0.0.0.0", "telemetry.metrics_host", "0.0.0.0"),
    ("QUEUE_SECRETS_REFRESH_INTERVAL_SECONDS", "60", "secrets.refresh_interval", 60.0),
]


def _get(settings_: Settings, key: str) -> Any:
    value: Any = settings_
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("name", "text", "key", "expected"), ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_environment_variable_maps_to_its_key(name: str, text: str, key: str, expected: Any) -> None:
    loaded = load_settings(env={name: text})
    assert _get(loaded, key) == expected
    assert loaded.sources[key] == f"env:{name}"
    # Nothing else moved off its default.
    assert [k for k, s in loaded.sources.items() if s != "default"] == [key]


def test_every_environment_name_is_tested() -> None:
    table = {(name, key) for key, names in ENVIRONMENT.items() for name in names}
    assert table == {(name, key) for name, _, key, _ in ENV_CASES}
    guide = {
        "QUEUE_PROVIDER",
        "AZURE_SERVICE_BUS_CONNECTION_STRING",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL_SQS",
        "AWS_ENDPOINT_URL",
        "QUEUE_NAME",
        "QUEUE_DLQ_NAME",
        "QUEUE_RECEIVE_TIMEOUT_SECONDS",
        "QUEUE_VISIBILITY_TIMEOUT_SECONDS",
        "QUEUE_MAX_RETRY_ATTEMPTS",
        "QUEUE_RETRY_BACKOFF_MS",
    }
    assert guide <= {name for name, *_ in ENV_CASES}


@pytest.mark.parametrize(
    ("first", "second", "key"),
    [
        ("AWS_REGION", "AWS_DEFAULT_REGION", "aws.region"),
        ("AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL", "aws.endpoint_url"),
        ("SERVICE_BUS_NAMESPACE", "AZURE_SERVICE_BUS_NAMESPACE", "azure.fully_qualified_namespace"),
    ],
)
def test_first_environment_name_wins(first: str, second: str, key: str) -> None:
    values = {first: "http://first.example", second: "http://second.example"}
    loaded = load_settings(env=values)
    assert _get(loaded, key) == "http://first.example"
    assert loaded.sources[key] == f"env:{first}"


@pytest.mark.parametrize(("text", "seconds"), [("1000", 1.0), ("250", 0.25), ("0", 0.0), ("1500.5", 1.5005)])
def test_retry_backoff_is_milliseconds(text: str, seconds: float) -> None:
    loaded = load_settings(env={"QUEUE_RETRY_BACKOFF_MS": text, "QUEUE_NAME": "q"})
    assert loaded.worker.retry.initial_backoff == pytest.approx(seconds)
    assert loaded.supervisor_config().retry.initial_backoff == pytest.approx(seconds)


def test_receive_timeout_feeds_supervisor_config() -> None:
    loaded = load_settings(env={"QUEUE_RECEIVE_TIMEOUT_SECONDS": "7", "QUEUE_NAME": "orders"}, prefetch=2)
    config = loaded.supervisor_config()
    assert (config.queue, config.receive_timeout, config.prefetch) == ("orders", 7.0, 2)


def test_supervisor_config_needs_a_queue() -> None:
    with pytest.raises(ConfigurationError, match=r"queue is not set.*QUEUE_NAME"):
        load_settings(env={}).supervisor_config()


# ---- config files --------------------------------------------------------------------------


def test_yaml_file_has_the_same_shape(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.yml",
        "provider: aws\nqueue: orders.fifo\nworker:\n  prefetch: 3\n  retry:\n    jitter: 0\n"
        "aws:\n  region: eu-west-1\ntelemetry:\n  metrics_port: 9000\n",
    )
    loaded = load_settings(config, env={})
    assert (loaded.provider, loaded.queue, loaded.worker.prefetch) == ("aws", "orders.fifo", 3)
    assert (loaded.worker.retry.jitter, loaded.aws.region, loaded.telemetry.metrics_port) == (
        0.0,
        "eu-west-1",
        9000,
    )


def test_empty_yaml_sections_and_level_aliases(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "worker:\naws:\nlog_level: warn\n")
    loaded = load_settings(path, env={"QUEUE_LOG_FORMAT": " Json "})
    assert loaded.worker == WorkerSettings() and loaded.log_level == "WARNING" and loaded.log_format == "json"
    assert load_settings(env={"QUEUE_LOG_LEVEL": "FATAL"}).log_level == "CRITICAL"
    with pytest.raises(ConfigurationError, match=r"^log_level from env:QUEUE_LOG_LEVEL must be one of"):
        load_settings(env={"QUEUE_LOG_LEVEL": "TRACE"})


def test_file_discovery_order(tmp_path: Path) -> None:
    assert load_settings(env={}).sources["queue"] == "default"  # no file at all is fine
    write(tmp_path / "config.yaml", "queue: from-yaml\n")
    assert load_settings(env={}).queue == "from-yaml"
    write(tmp_path / "config.toml", 'queue = "from-toml"\n')
    assert load_settings(env={}).queue == "from-toml"
    named = write(tmp_path / "named.toml", 'queue = "from-env-file"\n')
    loaded = load_settings(env={"QUEUE_CONFIG_FILE": str(named)})
    assert loaded.queue == "from-env-file" and loaded.sources["queue"] == f"file:{named}"
    explicit = write(tmp_path / "explicit.yaml", "queue: from-argument-file\n")
    assert load_settings(explicit, env={"QUEUE_CONFIG_FILE": str(named)}).queue == "from-argument-file"


@pytest.mark.parametrize("how", ["argument", "env"])
def test_missing_named_file_is_an_error(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigurationError) as excinfo:
        if how == "argument":
            load_settings(missing, env={})
        else:
            load_settings(env={"QUEUE_CONFIG_FILE": str(missing)})
    message = one_line_error(excinfo)
    assert "nope.toml" in message and "does not exist" in message
    assert ("QUEUE_CONFIG_FILE" in message) == (how == "env")


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"must end in \.toml, \.yaml or \.yml"):
        load_settings(write(tmp_path / "config.ini", "[worker]\n"), env={})


@pytest.mark.parametrize(
    ("name", "text", "position"),
    [
        ("bad.toml", 'queue = "q"\n[worker]\nprefetch = = 3\n', "line 3, column 12"),
        ("bad.toml", f'queue = "q"\n[aws]\nsecret_access_key = "{FAKE_SECRET}\n', "line 3"),
        ("bad.yaml", f"queue: q\naws:\n  secret_access_key: [{FAKE_SECRET}\n  region: x\n", "line 4"),
        ("bad.yml", "queue: q\n  prefetch: 3\n", "line 2, column 11"),
        ("list.yaml", "- a\n- b\n", None),
    ],
)
def test_malformed_file_is_one_line_with_position(
    tmp_path: Path, name: str, text: str, position: str | None
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigurationError) as excinfo:
        load_settings(path, env={})
    message = one_line_error(excinfo)
    assert name in message
    if position is not None:
        assert message.startswith("malformed config file") and position in message, message
    else:
        assert "must hold a table" in message
    assert all(secret not in message for secret in SECRETS)


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ('queu = "q"\n', "'queu'", "'queue'"),
        (
            "[worker]\nmax_concurent_sessions = 3\n",
            "'worker.max_concurent_sessions'",
            "'worker.max_concurrent_sessions'",
        ),
        ("[worker.retry]\nmax_attempt = 3\n", "'worker.retry.max_attempt'", "'worker.retry.max_attempts'"),
        ("[worker]\nreceive_timeout = 3\n", "'worker.receive_timeout'", "'receive_timeout'"),
        ("[sqs]\nregion = 'x'\n", "'sqs'", None),
        (f"[aws]\nsecret_acess_key = '{FAKE_SECRET}'\n", "'aws.secret_acess_key'", "'aws.secret_access_key'"),
    ],
)
def test_unknown_file_keys_are_errors(tmp_path: Path, text: str, key: str, hint: str | None) -> None:
    path = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigurationError) as excinfo:
        load_settings(path, env={})
    message = one_line_error(excinfo)
    assert f"unknown configuration key {key}" in message and str(path) in message
    if hint is not None:
        assert f"did you mean {hint}" in message
    assert FAKE_SECRET not in message


def test_a_section_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", 'worker = "fast"\n')
    with pytest.raises(ConfigurationError, match=r"^worker from file:.* must be a table of keys, got str$"):
        load_settings(path, env={})


# ---- bad values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"QUEUE_MAX_CONCURRENT_SESSIONS": "abc"},
            "worker.max_concurrent_sessions from env:QUEUE_MAX_CONCURRENT_SESSIONS"
            " must be an integer >= 1, got 'abc'",
        ),
        ({"QUEUE_MAX_CONCURRENT_SESSIONS": "0"}, "must be an integer >= 1, got '0'"),
        (
            {"QUEUE_PREFETCH": "1.5"},
            "worker.prefetch from env:QUEUE_PREFETCH must be an integer >= 0, got '1.5'",
        ),
        ({"QUEUE_RECEIVE_TIMEOUT_SECONDS": "nan"}, "receive_timeout from env:QUEUE_RECEIVE_TIMEOUT_SECONDS"),
        ({"QUEUE_RECEIVE_TIMEOUT_SECONDS": "-1"}, "must be a number >= 0, got '-1'"),
        ({"QUEUE_VISIBILITY_TIMEOUT_SECONDS": "50000"}, "must be a number >= 0 and <= 43200, got '50000'"),
        ({"QUEUE_SESSION_IDLE_TIMEOUT_SECONDS": "0"}, "worker.session_idle_timeout from env:"),
        ({"QUEUE_METRICS_PORT": "70000"}, "telemetry.metrics_port from env:QUEUE_METRICS_PORT"),
        (
            {"QUEUE_MAX_RETRY_ATTEMPTS": "0"},
            "worker.retry.max_attempts from env:QUEUE_MAX_RETRY_ATTEMPTS must",
        ),
        ({"QUEUE_RETRY_BACKOFF_MS": "1s"}, "must be a number of milliseconds >= 0, got '1s'"),
        (
            {"AWS_ENDPOINT_URL": "localhost:4566"},
            "aws.endpoint_url from env:AWS_ENDPOINT_URL must be an http",
        ),
        ({"QUEUE_LOG_FORMAT": "xml"}, "log_format from env:QUEUE_LOG_FORMAT must be one of 'json', 'text'"),
        ({"QUEUE_NAME": "bad name!"}, "queue from env:QUEUE_NAME is not a valid queue name"),
    ],
)
def test_bad_environment_values(env: dict[str, str], expected: str) -> None:
    secrets = {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AZURE_SERVICE_BUS_CONNECTION_STRING": FAKE_CONNECTION}
    with pytest.raises(ConfigurationError) as excinfo:
        load_settings(env={**secrets, **env})
    message = one_line_error(excinfo)
    assert expected in message, message
    assert all(secret not in message for secret in SECRETS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[worker]\nmax_concurrent_sessions = "8"\n', "worker.max_concurrent_sessions from file:"),
        ("[worker]\nmax_concurrent_sessions = true\n", "must be an integer >= 1, got True"),
        ("[worker]\nmax_concurrent_sessions = 2.0\n", "must be an integer >= 1, got 2.0"),
        ("[worker.retry]\nmultiplier = 0.5\n", "worker.retry.multiplier from file:"),
        ("[worker.retry]\njitter = 2\n", "worker.retry.jitter from file:"),
        ("[memory]\nlock_duration = 0\n", "memory.lock_duration from file:"),
        ("[aws]\nregion = ''\n", "aws.region from file:"),
    ],
)
def test_bad_file_values(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigurationError) as excinfo:
        load_settings(path, env={})
    message = one_line_error(excinfo)
    assert expected in message, message
    assert str(path) in message


def test_bad_argument_values() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^worker\.per_session_concurrency from argument must be an"
    ):
        load_settings(env={}, per_session_concurrency=0)
    with pytest.raises(ConfigurationError, match=r"unknown configuration key 'max_concurent_sessions'.*"):
        load_settings(env={}, max_concurent_sessions=3)
    with pytest.raises(ConfigurationError, match=r"did you mean 'max_concurrent_sessions'"):
        load_settings(env={}, max_concurent_sessions=3)


@pytest.mark.parametrize("where", ["env", "file", "argument"])
def test_unknown_provider_lists_the_valid_ones(tmp_path: Path, where: str) -> None:
    path = write(tmp_path / "c.toml", 'provider = "gcp"\n' if where == "file" else "")
    env = {"QUEUE_PROVIDER": "gcp"} if where == "env" else {}
    overrides = {"provider": "gcp"} if where == "argument" else {}
    with pytest.raises(ConfigurationError) as excinfo:
        load_settings(path, env=env, **overrides)
    message = one_line_error(excinfo)
    assert message.startswith("provider from ") and message.endswith("got 'gcp'")
    assert all(repr(name) in message for name in ("memory", "aws", "azure"))


def test_queue_names_follow_the_chosen_provider() -> None:
    assert load_settings(env={"QUEUE_PROVIDER": "aws", "QUEUE_NAME": "orders.fifo"}).queue == "orders.fifo"
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/orders.fifo"
    assert load_settings(env={"QUEUE_PROVIDER": "aws", "QUEUE_NAME": url}).queue == url
    with pytest.raises(ConfigurationError, match=r"^dlq_name from argument is not a valid queue name"):
        load_settings(env={"QUEUE_PROVIDER": "aws"}, dlq_name="dead/letters")
    assert load_settings(
        env={"QUEUE_PROVIDER": "azure"}, dlq_name="orders/$deadletterqueue".replace("$", "")
    ).dlq_name


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^worker\.max_concurrent_sessions must be an integer >= 1, got 0$"
    ):
        WorkerSettings(max_concurrent_sessions=0)
    with pytest.raises(ConfigurationError, match=r"^aws\.secret_access_key must be a non-empty string"):
        AwsSettings(secret_access_key="")  # type: ignore[arg-type]
    # What is given by hand is normalised the way load_settings does it.
    hand = Settings(log_level="warning", receive_timeout=3, aws=AwsSettings(secret_access_key=FAKE_SECRET))  # type: ignore[arg-type]
    assert hand.aws.secret_access_key == Secret(FAKE_SECRET) and FAKE_SECRET not in repr(hand)
    assert hand.log_level == "WARNING" and type(hand.receive_timeout) is float


# ---- provenance and equality --------------------------------------------------------------


def test_sources_cover_every_key_and_stay_out_of_equality(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", "[memory]\nlock_duration = 5\n[telemetry]\nmetrics_port = 9100\n")
    loaded = load_settings(path, env={"QUEUE_NAME": "orders"}, log_level="warning")
    built = Settings(
        queue="orders",
        log_level="WARNING",
        memory=msgspec.structs.replace(Settings().memory, lock_duration=5.0),
        telemetry=msgspec.structs.replace(Settings().telemetry, metrics_port=9100),
    )
    assert loaded == built
    assert set(loaded.sources) == set(Settings().sources) >= {"worker.retry.jitter", "telemetry.metrics_port"}
    assert {k: v for k, v in loaded.sources.items() if v != "default"} == {
        "queue": "env:QUEUE_NAME",
        "log_level": "argument",
        "memory.lock_duration": f"file:{path}",
        "telemetry.metrics_port": f"file:{path}",
    }
    # Built directly: what differs from the default reads "argument".
    assert {k for k, v in built.sources.items() if v == "argument"} == {
        "queue",
        "log_level",
        "memory.lock_duration",
        "telemetry.metrics_port",
    }
    assert "sources" not in loaded.redacted() and "_sources" not in msgspec.json.encode(Settings()).decode()


# ---- secrets --------------------------------------------------------------------------------


def test_secret_never_shows_itself() -> None:
    secret = Secret(FAKE_SECRET)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret]), str({"k": secret})):
        assert FAKE_SECRET not in shown
    assert repr(secret) == str(secret) == "Secret('**********')"
    assert secret.get_secret_value() == FAKE_SECRET
    assert secret == Secret(FAKE_SECRET) and secret != Secret("other") and secret != FAKE_SECRET
    assert len({secret, Secret(FAKE_SECRET)}) == 1
    with pytest.raises(TypeError):
        msgspec.json.encode(secret)


def test_loaded_secrets_are_redacted_everywhere(tmp_path: Path) -> None:
    env = {
        "QUEUE_PROVIDER": "azure",
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_SESSION_TOKEN": FAKE_TOKEN,
        "AZURE_SERVICE_BUS_CONNECTION_STRING": FAKE_CONNECTION,
    }
    loaded = load_settings(env=env)
    assert loaded.aws.secret_access_key is not None
    assert loaded.aws.secret_access_key.get_secret_value() == FAKE_SECRET
    assert loaded.azure.connection_string == Secret(FAKE_CONNECTION)
    shown = loaded.redacted()
    assert shown["aws"]["secret_access_key"] == shown["aws"]["session_token"] == "**********"
    assert shown["azure"]["connection_string"] == "**********"
    assert shown["aws"]["access_key_id"] is None  # unset secrets and values stay None
    dumps = (repr(loaded), str(loaded), json.dumps(shown), repr(loaded.sources), repr(loaded.aws))
    for dump in dumps:
        assert all(secret not in dump for secret in SECRETS)
    with pytest.raises(TypeError):
        msgspec.json.encode(loaded)  # no accidental clear-text serialisation


@pytest.mark.parametrize(
    "bad",
    [
        {"aws": {"secret_access_key": [FAKE_SECRET]}},
        {"aws": {"session_token": {"value": FAKE_TOKEN}}},
        {"azure": {"connection_string": [FAKE_CONNECTION]}},
        {"azure": {"connection_strin": FAKE_CONNECTION}},
    ],
)
def test_errors_never_echo_a_secret(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        load_settings(env={"AWS_SECRET_ACCESS_KEY": FAKE_SECRET}, **bad)
    message = one_line_error(excinfo)
    assert all(secret not in message for secret in SECRETS), message
    assert "aws." in message or "azure." in message


def test_secret_from_file_is_wrapped_and_redacted(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", f"azure:\n  connection_string: '{FAKE_CONNECTION}'\n")
    loaded = load_settings(path, env={})
    assert loaded.azure.connection_string == Secret(FAKE_CONNECTION)
    assert loaded.sources["azure.connection_string"] == f"file:{path}"
    assert FAKE_CONNECTION not in json.dumps(loaded.redacted())
    path = write(tmp_path / "bad.yaml", "azure:\n  connection_string: 12345\n")
    with pytest.raises(ConfigurationError, match=r"got a value of type int$"):
        load_settings(path, env={})


# ---- create_provider -----------------------------------------------------------------------


async def test_memory_provider_uses_the_configured_values(autojump_clock: trio.testing.MockClock) -> None:
    loaded = load_settings(
        env={"QUEUE_PROVIDER": "memory"},
        memory={"lock_duration": 7, "max_delivery_count": 2, "max_queue_messages": 3},
    )
    async with create_provider(loaded) as provider:
        assert provider.system == "memory"
        await provider.send(
            "orders", [Message(body=b"a", session_id="s1"), Message(body=b"b", session_id="s1")]
        )
        receiver = await provider.accept_session("orders", timeout=1)
        assert receiver is not None and receiver.session_id == "s1"
        start = trio.current_time()
        locked_until = receiver.locked_until
        assert locked_until is not None and locked_until == pytest.approx(start + 7, abs=0.01)
        # max_delivery_count=2: the second abandon moves the message to the dead-letter queue.
        for delivery in (1, 2):
            (first,) = await receiver.receive(max_messages=1, timeout=1)
            assert first.message.body == b"a" and first.delivery_count == delivery
            await receiver.abandon(first)
        (second,) = await receiver.receive(max_messages=1, timeout=1)
        assert second.message.body == b"b"
        await receiver.complete(second)
        await receiver.aclose()
        dead = await provider.peek_dead_letters("orders")
        assert [d.message.body for d in dead] == [b"a"]
        # max_queue_messages=3 bounds the queue together with its dead-letter queue.
        await provider.send(
            "orders", [Message(body=b"c", session_id="s2"), Message(body=b"d", session_id="s2")]
        )
        with pytest.raises(QueueFull):
            await provider.send("orders", [Message(body=b"e", session_id="s2")])


def test_unknown_provider_in_create_provider() -> None:
    loaded = Settings()
    msgspec.structs.force_setattr(loaded, "provider", "gcp")
    with pytest.raises(
        ConfigurationError, match=r"unknown provider 'gcp': use one of 'sqlite', 'memory', 'aws', 'azure'"
    ):
        create_provider(loaded)


@pytest.mark.parametrize(("provider", "missing"), [("aws", "aiobotocore"), ("azure", "azure.servicebus")])
def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, provider: str, missing: str) -> None:
    real_import = importlib.import_module

    def failing_import(name: str, package: str | None = None) -> Any:
        if name.startswith(("queue_runtime.providers.", "aiobotocore", "azure")):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, package)

    monkeypatch.setattr(providers_module.importlib, "import_module", failing_import)
    with pytest.raises(ConfigurationError) as excinfo:
        create_provider(load_settings(env={"QUEUE_PROVIDER": provider}))
    assert str(excinfo.value) == (
        f"provider {provider!r} needs the {provider} extra: pip install 'queue-runtime[{provider}]'"
    )


@pytest.mark.parametrize(
    ("provider", "module", "sdk"),
    [("aws", "sqs", ("aiobotocore", "botocore")), ("azure", "servicebus", ("azure.servicebus", "azure"))],
)
def test_missing_sdk_through_the_real_adapter_module(
    monkeypatch: pytest.MonkeyPatch, provider: str, module: str, sdk: tuple[str, ...]
) -> None:
    path = Path(providers_module.__file__).with_name(f"{module}.py")
    if not path.exists():
        pytest.skip(f"providers/{module}.py is not written yet")
    # Make the SDK unimportable (None in sys.modules) and forget the adapter so it re-imports.
    for name in [n for n in sys.modules if n == f"queue_runtime.providers.{module}"]:
        monkeypatch.delitem(sys.modules, name)
    # Submodules too: once another test imported them, they would be found in sys.modules.
    for name in [n for n in sys.modules if any(n == s or n.startswith(f"{s}.") for s in sdk)] + list(sdk):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigurationError, match=rf"needs the {provider} extra"):
        create_provider(load_settings(env={"QUEUE_PROVIDER": provider}))


def test_our_own_missing_module_is_not_blamed_on_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def failing_import(name: str, package: str | None = None) -> Any:
        if name.startswith("queue_runtime."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, package)  # the SDK itself is installed here

    monkeypatch.setattr(providers_module.importlib, "import_module", failing_import)
    with pytest.raises(ModuleNotFoundError):
        create_provider(load_settings(env={"QUEUE_PROVIDER": "aws"}))


def test_no_stray_environment_leaks_into_tests() -> None:
    # The env= argument fully replaces os.environ: a developer's AWS_REGION cannot change results.
    os.environ.setdefault("AWS_REGION", "should-not-be-read")
    try:
        assert load_settings(env={}).aws.region is None
    finally:
        if os.environ.get("AWS_REGION") == "should-not-be-read":
            del os.environ["AWS_REGION"]
