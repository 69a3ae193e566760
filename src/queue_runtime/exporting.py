"""Exporting: the stock worker's OpenTelemetry SDK, configured by the standard ``OTEL_*`` variables.

`run()` and ``queue-runtime worker`` call `export_telemetry` around the whole worker; a program
that calls `serve_worker` itself installs its own SDK (this module is not needed then).

What it reads (names and meanings from the OpenTelemetry specification; the SDK and the
official ``opentelemetry-exporter-otlp-proto-http`` exporter read most of them themselves):

* ``OTEL_SDK_DISABLED=true``: install nothing (the SDK would record nothing anyway).
* ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: comma lists of ``otlp``, ``console``,
  ``none`` (and ``prometheus`` for metrics, meaning the worker's own ``/metrics`` only).
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces`` and ``/v1/metrics`` appended), or the
  signal's own ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT`` (used as is);
  ``..._HEADERS``, ``..._TIMEOUT``, ``..._COMPRESSION``, ``..._CERTIFICATE`` and
  ``..._PROTOCOL`` (``http/protobuf``, the default, or ``grpc`` when
  ``opentelemetry-exporter-otlp-proto-grpc`` is installed).
* ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` (`Resource.create`; ``service.name``
  defaults to ``queue-runtime`` instead of the SDK's ``unknown_service``).
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (the SDK's `TracerProvider` reads them;
  default ``parentbased_always_on``), ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL`` /
  ``..._TIMEOUT``.

**The default rule.** The specification's default exporter is ``otlp``, but a worker started
without a collector would then log export failures forever and pay for spans nobody reads. So a
signal is exported over OTLP when its exporter variable names ``otlp``, or, when that variable
is unset, when an OTLP endpoint variable for it (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the
signal's own) is set. Otherwise no tracer provider is installed (tracing costs nothing) and
metrics are served on ``/metrics`` only (when ``--metrics-port`` is set, whatever the
variables say).

Guarantees:

* **One line for bad configuration.** An unknown exporter, protocol or sampler, a malformed
  number, header list or endpoint, or a missing exporter package raises `ConfigurationError`
  naming the variable, before anything is installed.
* **One SDK per signal.** Metrics: one `MeterProvider` with the Prometheus reader behind
  ``/metrics`` (when served) and a `PeriodicExportingMetricReader` per push exporter, so
  ``/metrics`` and OTLP show the same instruments. Traces: one `TracerProvider` with one
  `BatchSpanProcessor` per exporter (bounded queue: ``OTEL_BSP_MAX_QUEUE_SIZE``, default 2048
  spans; when full, new spans are dropped, never waited for). Providers that the application
  installed before (its own SDK, ``opentelemetry-instrument``) are kept and get our
  instruments and spans; the ``OTEL_*`` exporter settings are then theirs to apply.
* **Export never blocks the work.** Spans and metrics are exported from the SDK's own threads;
  a slow or dead collector costs dropped telemetry and a WARNING now and then, not throughput.
  The SDK's export-failure warnings are throttled to one per kind per minute.
* **Bounded shutdown.** `Exporting.shutdown` flushes both providers (the last spans, a final
  metrics export) in at most `SHUTDOWN_TIMEOUT` seconds (5 s); past that, it gives up, logs one
  WARNING and lets the process exit. It never raises.
* **Secrets.** Header values (``OTEL_EXPORTER_OTLP_HEADERS`` and the signal ones often carry API
  keys) are registered with `queue_runtime.redaction` and never logged; endpoints are logged
  without user information.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics, trace

from .errors import ConfigurationError
from .redaction import register_secret

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "SHUTDOWN_TIMEOUT",
    "ExportSettings",
    "Exporting",
    "export_telemetry",
    "read_export_settings",
    "setup_exporting",
]

log = logging.getLogger("queue_runtime.exporting")

#: Longest `Exporting.shutdown` waits for the last export (seconds).
SHUTDOWN_TIMEOUT: Final = 5.0
#: ``service.name`` when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` sets one.
DEFAULT_SERVICE_NAME: Final = "queue-runtime"

_TRACES_EXPORTERS: Final = ("otlp", "console", "none")
_METRICS_EXPORTERS: Final = ("otlp", "console", "prometheus", "none")
_PROTOCOLS: Final = ("http/protobuf", "grpc")
_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
#: Durations the SDK reads (the OTLP timeouts in seconds, the others in milliseconds).
_DURATIONS: Final = (
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_METRIC_EXPORT_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
)
_GRPC_PACKAGE: Final = "opentelemetry-exporter-otlp-proto-grpc"
_EXTRA: Final = "pip install 'queue-runtime[otel]'"


@dataclass(frozen=True)
class ExportSettings:
    """What the ``OTEL_*`` environment asks of the worker (`read_export_settings`).

    ``traces`` / ``metrics`` are the push exporters to install (``"otlp"``, ``"console"``);
    empty means none. ``prometheus`` is whether ``OTEL_METRICS_EXPORTER`` named
    ``prometheus``. Endpoints are the resolved OTLP URLs (None when that signal has no OTLP
    exporter)."""

    disabled: bool = False
    traces: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    prometheus: bool = False
    traces_protocol: str = "http/protobuf"
    metrics_protocol: str = "http/protobuf"
    traces_endpoint: str | None = None
    metrics_endpoint: str | None = None
    sampler: str = "parentbased_always_on"
    sampler_arg: float | None = None


def read_export_settings(environ: Mapping[str, str] | None = None) -> ExportSettings:
    """Read and check the ``OTEL_*`` variables of ``environ`` (default `os.environ`).

    Pure apart from registering header values as secrets. Raises `ConfigurationError` (one
    line naming the variable) for an unknown exporter, protocol or sampler, or a malformed
    number, endpoint or header list."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ExportSettings(disabled=True)

    _register_headers(env)
    for name in _DURATIONS:
        _number(env, name, minimum=0.0, strict=name == "OTEL_METRIC_EXPORT_INTERVAL")
    for name in ("OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
        _integer(env, name)

    traces = _exporters(env, "OTEL_TRACES_EXPORTER", _TRACES_EXPORTERS, "TRACES")
    metric_names = _exporters(env, "OTEL_METRICS_EXPORTER", _METRICS_EXPORTERS, "METRICS")
    metric_push = tuple(name for name in metric_names if name != "prometheus")

    traces_protocol = _protocol(env, "TRACES")
    metrics_protocol = _protocol(env, "METRICS")
    traces_endpoint = _endpoint(env, "TRACES", traces_protocol) if "otlp" in traces else None
    metrics_endpoint = _endpoint(env, "METRICS", metrics_protocol) if "otlp" in metric_push else None

    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if sampler not in _SAMPLERS:
        raise ConfigurationError(
            f"OTEL_TRACES_SAMPLER: unknown sampler {sampler[:40]!r}: use one of {', '.join(_SAMPLERS)}"
        )
    sampler_arg = None
    if sampler.endswith("traceidratio"):
        sampler_arg = _number(env, "OTEL_TRACES_SAMPLER_ARG", minimum=0.0, maximum=1.0)
    return ExportSettings(
        traces=traces,
        metrics=metric_push,
        prometheus="prometheus" in metric_names,
        traces_protocol=traces_protocol,
        metrics_protocol=metrics_protocol,
        traces_endpoint=traces_endpoint,
        metrics_endpoint=metrics_endpoint,
        sampler=sampler,
        sampler_arg=sampler_arg,
    )


def _exporters(env: Mapping[str, str], name: str, allowed: tuple[str, ...], signal: str) -> tuple[str, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        # Unset: OTLP only when an endpoint says where the collector is (see the module docstring).
        has_endpoint = (
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
            or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
        )
        return ("otlp",) if has_endpoint else ()
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    for exporter in names:
        if exporter not in allowed:
            raise ConfigurationError(
                f"{name}: unknown exporter {exporter[:40]!r}: use one of {', '.join(allowed)}"
            )
    if "none" in names and len(set(names)) > 1:
        raise ConfigurationError(f"{name}: 'none' cannot be combined with other exporters, got {raw[:80]!r}")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def _protocol(env: Mapping[str, str], signal: str) -> str:
    name = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    raw = env.get(name, "").strip()
    if not raw:
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
        raw = env.get(name, "").strip()
    protocol = raw.lower() or "http/protobuf"
    if protocol == "http/json":
        raise ConfigurationError(
            f"{name}: http/json is not supported by the Python OTLP exporter: use http/protobuf or grpc"
        )
    if protocol not in _PROTOCOLS:
        raise ConfigurationError(f"{name}: unknown protocol {raw[:40]!r}: use http/protobuf or grpc")
    return protocol


def _endpoint(env: Mapping[str, str], signal: str, protocol: str) -> str:
    """The URL the OTLP exporter of ``signal`` sends to (the exporters' own resolution)."""
    own = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    if value := env.get(own, "").strip():
        name, url = own, value
    else:
        name = "OTEL_EXPORTER_OTLP_ENDPOINT"
        default = "http://localhost:4318" if protocol == "http/protobuf" else "http://localhost:4317"
        base = env.get(name, "").strip() or default
        url = base if protocol == "grpc" else f"{base.removesuffix('/')}/v1/{signal.lower()}"
        value = base
    parsed = urllib.parse.urlsplit(url)
    host_port = protocol == "grpc" and "://" not in value and ":" in value  # grpc takes host:port
    if (parsed.scheme not in ("http", "https") or not parsed.hostname) and not host_port:
        raise ConfigurationError(
            f"{name}: not an http(s) URL: {_shown_url(value)!r} (e.g. http://collector:4318)"
        )
    return url


def _shown_url(url: str) -> str:
    """``url`` without user information (``user:password@``), for logs and error lines."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.username is None and parsed.password is None:
        return url[:200]
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))[:200]


def _register_headers(env: Mapping[str, str]) -> None:
    """Register every OTLP header value (raw and URL-decoded, and each word of it, so
    ``Bearer TOKEN`` masks TOKEN alone too) for redaction; check the ``name=value`` form."""
    for variable in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                     "OTEL_EXPORTER_OTLP_METRICS_HEADERS"):  # fmt: skip
        raw = env.get(variable, "")
        for item in raw.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                # Show the key part only: the value may be the secret.
                raise ConfigurationError(
                    f"{variable}: expected name=value pairs separated by commas, got an item without"
                    f" '=' ({len(item)} characters)"
                )
            for form in {value.strip(), urllib.parse.unquote(value).strip()}:
                register_secret(form)
                for word in form.split():
                    register_secret(word)


def _number(
    env: Mapping[str, str], name: str, *, minimum: float, maximum: float | None = None, strict: bool = False
) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    low_ok = value > minimum if strict else value >= minimum
    if not (math.isfinite(value) and low_ok and (maximum is None or value <= maximum)):
        bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else (
            f"{'>' if strict else '>='} {minimum:g}"
        )  # fmt: skip
        raise ConfigurationError(f"{name}: must be a number {bound}, got {raw[:40]!r}")
    return value


def _integer(env: Mapping[str, str], name: str) -> None:
    raw = env.get(name, "").strip()
    if raw and not (raw.isdigit() and int(raw) > 0):
        raise ConfigurationError(f"{name}: must be a positive integer, got {raw[:40]!r}")


# -- installing --------------------------------------------------------------------------------


class Exporting:
    """What `setup_exporting` installed; `shutdown` flushes and closes it (bounded)."""

    def __init__(
        self,
        settings: ExportSettings,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        exporters: tuple[Any, ...] = (),
    ) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._exporters = exporters
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"Exporting(traces={self.settings.traces if self.tracer_provider else ()!r},"
            f" metrics={self.settings.metrics if self.meter_provider else ()!r})"
        )

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Flush the last spans and export the metrics one final time, then close the exporters;
        return whether that finished within ``timeout`` seconds.

        Runs the SDKs' (blocking) shutdowns in daemon threads and waits at most ``timeout``:
        a collector that is down or slow cannot hold the process. Past the deadline the
        exporters are told to stop retrying, their later complaints are silenced, one WARNING
        says what was dropped, and it returns False. Idempotent; never raises. Call it from
        plain (non-trio) code after the worker stopped: it blocks."""
        if self._closed:
            return True
        self._closed = True
        deadline = time.monotonic() + timeout
        closing: list[threading.Thread] = []
        if self.tracer_provider is not None:
            closing.append(_thread(self.tracer_provider.shutdown))
        if self.meter_provider is not None:
            provider = self.meter_provider
            closing.append(_thread(lambda: provider.shutdown(timeout_millis=timeout * 1000)))
        for thread in closing:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = [thread for thread in closing if thread.is_alive()]
        if not late:
            return True
        for exporter in self._exporters:
            try:
                exporter.shutdown()  # stops retry back-off at once
            except Exception:
                pass
        # What the abandoned threads say from now on (maybe during interpreter exit) is noise.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL + 1)
        urls = (self.settings.traces_endpoint, self.settings.metrics_endpoint)
        where = ", ".join(sorted({_shown_url(url) for url in urls if url}))
        log.warning(
            "telemetry export did not finish within %g s%s: unsent spans and metrics were dropped",
            timeout,
            f" (is the collector at {where} reachable?)" if where else "",
            extra={"operation": "shutdown"},
        )
        return False


def _thread(target: Any) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except Exception:  # an SDK failing at shutdown must not print a thread traceback
            log.debug("telemetry shutdown failed", exc_info=True)

    thread = threading.Thread(target=run, name="queue-runtime-telemetry-shutdown", daemon=True)
    thread.start()
    return thread


def setup_exporting(*, prometheus: bool = False) -> Exporting:
    """Install the SDK providers that the ``OTEL_*`` variables ask for (see the module
    docstring) and return what was installed.

    ``prometheus``: the worker serves ``/metrics``, so the meter provider installed here (if
    any) also gets the Prometheus reader behind it (`telemetry.prometheus_reader`). When no
    push exporter is asked for, no meter provider is installed here and
    `telemetry.setup_prometheus` installs the usual Prometheus-only one.

    Raises `ConfigurationError` (one line) before installing anything when the variables are
    wrong or a needed package is missing. Logs one INFO line per exported signal."""
    settings = read_export_settings()  # the SDK and the exporters read os.environ too
    if settings.disabled:
        log.info(
            "OTEL_SDK_DISABLED=true: no spans and no metrics are recorded%s",
            " (/metrics serves none of ours)" if prometheus else "",
            extra={"operation": "start"},
        )
        return Exporting(settings)
    if settings.prometheus and not prometheus:
        log.warning(
            "OTEL_METRICS_EXPORTER names prometheus, but /metrics is not served: set --metrics-port"
            " (QUEUE_METRICS_PORT)",
            extra={"operation": "start"},
        )
    if not settings.traces and not settings.metrics:
        return Exporting(settings)

    # Every import and constructor argument is checked before any global is set.
    span_exporters = [_span_exporter(name, settings) for name in settings.traces]
    metric_exporters = [_metric_exporter(name, settings) for name in settings.metrics]
    resource = _resource()
    _throttle_sdk_warnings()

    tracer_provider = None
    if span_exporters:
        if _has_tracer_provider():
            log.info(
                "a tracer provider is installed already: spans go to its processors, OTEL_TRACES_EXPORTER"
                " is not applied",
                extra={"operation": "start"},
            )
            span_exporters = []
        else:
            tracer_provider = _tracer_provider(resource, span_exporters)
            log.info(
                "exporting traces: %s; sampler %s",
                _describe(settings.traces, settings.traces_protocol, settings.traces_endpoint),
                _sampler(settings),
                extra={"operation": "start"},
            )
    meter_provider = None
    if metric_exporters:
        from opentelemetry.sdk.metrics import MeterProvider

        if isinstance(metrics.get_meter_provider(), MeterProvider):
            log.info(
                "a meter provider is installed already: metrics go to its readers, OTEL_METRICS_EXPORTER"
                " is not applied",
                extra={"operation": "start"},
            )
            metric_exporters = []
        else:
            meter_provider = _meter_provider(resource, metric_exporters, prometheus=prometheus)
            interval = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip() or 60000) / 1000
            log.info(
                "exporting metrics: %s, every %g s%s",
                _describe(settings.metrics, settings.metrics_protocol, settings.metrics_endpoint),
                interval,
                "; and on /metrics" if prometheus else "",
                extra={"operation": "start"},
            )
    return Exporting(
        settings,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        exporters=(*span_exporters, *metric_exporters),
    )


@contextmanager
def export_telemetry(*, prometheus: bool = False) -> Iterator[Exporting]:
    """`setup_exporting`, then `Exporting.shutdown` (bounded, `SHUTDOWN_TIMEOUT`) on the way out,
    however the block ends. Wrap the worker's ``trio.run`` in it."""
    exporting = setup_exporting(prometheus=prometheus)
    try:
        yield exporting
    finally:
        exporting.shutdown()


def _describe(exporters: tuple[str, ...], protocol: str, endpoint: str | None) -> str:
    parts = []
    for name in exporters:
        if name == "otlp":
            parts.append(f"OTLP {protocol} to {_shown_url(endpoint or '')}")
        else:
            parts.append("console (stdout)")
    return " and ".join(parts)


def _sampler(settings: ExportSettings) -> str:
    """The sampler the SDK built from the environment, as its variables name it."""
    if settings.sampler_arg is None:
        return settings.sampler + (" 1.0" if settings.sampler.endswith("traceidratio") else "")
    return f"{settings.sampler} {settings.sampler_arg:g}"


def _has_tracer_provider() -> bool:
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _resource() -> Resource:
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    except ImportError as exc:
        raise ConfigurationError(f"exporting telemetry needs the otel extra: {_EXTRA}") from exc
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _span_exporter(name: str, settings: ExportSettings) -> Any:
    try:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        if settings.traces_protocol == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise ConfigurationError(_grpc_missing("TRACES")) from None
            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    except ImportError as exc:
        raise ConfigurationError(f"exporting spans needs the otel extra: {_EXTRA}") from exc


def _metric_exporter(name: str, settings: ExportSettings) -> Any:
    try:
        if name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            return ConsoleMetricExporter()
        if settings.metrics_protocol == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            except ImportError:
                raise ConfigurationError(_grpc_missing("METRICS")) from None
            return OTLPMetricExporter()
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        return HttpMetricExporter()
    except ImportError as exc:
        raise ConfigurationError(f"exporting metrics needs the otel extra: {_EXTRA}") from exc


def _grpc_missing(signal: str) -> str:
    return (
        f"OTLP over gRPC (OTEL_EXPORTER_OTLP_PROTOCOL or OTEL_EXPORTER_OTLP_{signal}_PROTOCOL=grpc) needs"
        f" the gRPC exporter: pip install {_GRPC_PACKAGE} (or use http/protobuf, the default)"
    )


def _tracer_provider(resource: Resource, exporters: list[Any]) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # No sampler argument: the SDK reads OTEL_TRACES_SAMPLER / _ARG (checked above), default
    # parentbased_always_on. Our own bounded shutdown replaces the SDK's atexit one.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _meter_provider(resource: Resource, exporters: list[Any], *, prometheus: bool) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from .telemetry import prometheus_reader

    readers: list[MetricReader] = [PeriodicExportingMetricReader(exporter) for exporter in exporters]
    if prometheus:
        readers.insert(0, prometheus_reader())
    provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
    metrics.set_meter_provider(provider)
    return provider


# -- the SDK's own warnings ----------------------------------------------------------------------

#: Loggers of the SDK and exporters that warn per failed export or dropped span.
_SDK_LOGGERS: Final = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)


class _Throttle(logging.Filter):
    """Lets one record per (logger, message template) through per ``interval`` seconds; the
    next one that passes says how many were suppressed. A collector that is down makes the SDK
    warn per export attempt and, once its queue is full, per dropped span."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (-math.inf, 0))
            if now - last < self.interval:
                self._last[key] = (last, suppressed + 1)
                return False
            self._last[key] = (now, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like this in the last {self.interval:g} s)"
        return True


_throttle = _Throttle()


def _throttle_sdk_warnings() -> None:
    for name in _SDK_LOGGERS:
        sdk_logger = logging.getLogger(name)
        if _throttle not in sdk_logger.filters:
            sdk_logger.addFilter(_throttle)
