"""botocore / httpx exceptions → `queue_runtime.errors` (private to the SQS provider).

Every mapped error is one line naming the operation, the queue and the cause, with the right
``transient`` flag. Messages never carry credentials: for authentication failures the
server's text (which can quote the signed request) is replaced by our own.
"""

from __future__ import annotations

from typing import Any, Final

from botocore import exceptions as bx

from ..errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    InvalidReceipt,
    QueueError,
    QueueNotFound,
    Throttled,
    Timeout,
    ValidationError,
)

try:  # httpx is aiobotocore[httpx]'s transport; its errors can surface unwrapped.
    import httpx
except ImportError:  # pragma: no cover - the aws extra installs it
    httpx = None  # type: ignore[assignment]

QUEUE_MISSING: Final = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
)
AUTH: Final = frozenset(
    {
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSecurity",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "KMS.AccessDeniedException",
    }
)
THROTTLED: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestThrottled",
        "OverLimit",
        "AWS.SimpleQueueService.RequestThrottled",
        "TooManyRequestsException",
        "KmsThrottled",
        "KMS.ThrottlingException",
    }
)
RECEIPT: Final = frozenset({"ReceiptHandleIsInvalid", "InvalidReceiptHandle", "MessageNotInflight"})
TRANSIENT_SERVER: Final = frozenset(
    {"InternalError", "InternalFailure", "ServiceUnavailable", "AWS.SimpleQueueService.ServiceUnavailable"}
)
TOO_LARGE: Final = frozenset({"InvalidMessageContents.TooLarge", "BatchRequestTooLong"})

CREDENTIALS_HINT: Final = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE,"
    " aws.access_key_id/aws.secret_access_key in the config file, or an instance/container role)"
)


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ("" otherwise), preferring the query-compatible
    code where the JSON protocol reports both (SQS does since 2023)."""
    if isinstance(exc, bx.ClientError):
        error: dict[str, Any] = exc.response.get("Error") or {}
        return str(error.get("Code") or "")
    return ""


def _codes(exc: bx.ClientError) -> set[str]:
    error: dict[str, Any] = exc.response.get("Error") or {}
    return {str(error.get("Code") or ""), str(error.get("QueryErrorCode") or "")} - {""}


def map_code(code: str, message: str, *, where: str, sender_fault: bool | None = None) -> QueueError:
    """The error for one AWS error ``code`` (a whole call or a batch entry)."""
    text = _one_line(message)
    if code in QUEUE_MISSING:
        return QueueNotFound(
            f"{where}: the SQS queue does not exist (check the queue name, region and account)"
        )
    if code in AUTH:
        return AuthenticationFailed(
            f"{where}: AWS rejected the credentials or they lack a permission ({code});"
            " check the access key, region and the IAM policy (see docs/providers/sqs.md)"
        )
    if code in THROTTLED:
        return Throttled(f"{where}: throttled by SQS ({code})")
    if code in RECEIPT:
        return InvalidReceipt(f"{where}: the receipt handle is no longer valid ({code})")
    if code in TOO_LARGE:
        return ValidationError(f"{where}: SQS says the message is too large ({code})")
    if code in TRANSIENT_SERVER:
        return ConnectionFailed(f"{where}: SQS is unavailable ({code})")
    transient = sender_fault is False
    if code.startswith(
        ("InvalidParameter", "MissingParameter", "InvalidAttribute", "InvalidMessage")
    ) or code in {
        "InvalidBatchEntryId",
        "BatchEntryIdsNotDistinct",
        "EmptyBatchRequest",
        "TooManyEntriesInBatchRequest",
        "UnsupportedOperation",
        "InvalidAddress",
        "ValidationError",
        "InvalidParameterValueException",
    }:
        return ValidationError(f"{where}: SQS rejected the request ({code}: {text})")
    return QueueError(f"{where}: SQS error {code or 'unknown'}: {text}", transient=transient)


def map_error(exc: BaseException, *, operation: str, queue: str | None = None) -> QueueError:
    """Map any exception raised by an aiobotocore call to a `queue_runtime.errors` type."""
    where = f"SQS {operation}" + (f" on {queue!r}" if queue else "")
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, bx.ClientError):
        codes = _codes(exc)
        code = next((c for c in codes if c in QUEUE_MISSING | AUTH | THROTTLED | RECEIPT), None)
        code = code or error_code(exc)
        error: dict[str, Any] = exc.response.get("Error") or {}
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        mapped = map_code(code, str(error.get("Message") or ""), where=where)
        if type(mapped) is QueueError and isinstance(status, int) and status >= 500:
            mapped.transient = True
        return mapped
    if isinstance(exc, bx.NoCredentialsError):
        return AuthenticationFailed(f"{where}: {CREDENTIALS_HINT}")
    if isinstance(exc, bx.PartialCredentialsError):
        return AuthenticationFailed(
            f"{where}: incomplete AWS credentials ({exc.kwargs.get('cred_var', '?')} missing)"
        )
    if isinstance(exc, bx.CredentialRetrievalError):
        return AuthenticationFailed(
            f"{where}: could not retrieve AWS credentials from {exc.kwargs.get('provider', '?')}"
        )
    if isinstance(exc, bx.NoRegionError):
        return ConfigurationError(
            f"{where}: no AWS region configured: set AWS_REGION (or aws.region in the config file)"
        )
    if isinstance(exc, bx.ProfileNotFound):
        return ConfigurationError(f"{where}: AWS profile {exc.kwargs.get('profile', '?')!r} not found")
    if isinstance(exc, bx.ParamValidationError):
        return ValidationError(f"{where}: invalid request: {_one_line(exc)}")
    if isinstance(exc, (bx.ReadTimeoutError,)):
        return Timeout(f"{where}: SQS did not answer in time")
    if isinstance(exc, (bx.ConnectTimeoutError, bx.EndpointConnectionError, bx.ConnectionError)):
        return ConnectionFailed(f"{where}: cannot reach the SQS endpoint ({type(exc).__name__})")
    if isinstance(exc, bx.HTTPClientError):
        inner = exc.kwargs.get("error")
        if (
            httpx is not None
            and isinstance(inner, httpx.TimeoutException)
            and not isinstance(inner, httpx.ConnectTimeout)
        ):
            return Timeout(f"{where}: SQS did not answer in time")
        return ConnectionFailed(f"{where}: HTTP failure talking to SQS ({type(inner or exc).__name__})")
    if httpx is not None and isinstance(exc, httpx.HTTPError):
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return Timeout(f"{where}: SQS did not answer in time")
        return ConnectionFailed(f"{where}: cannot reach the SQS endpoint ({type(exc).__name__})")
    if isinstance(exc, (ConnectionError, OSError)):
        return ConnectionFailed(f"{where}: cannot reach the SQS endpoint ({type(exc).__name__})")
    if isinstance(exc, TimeoutError):
        return Timeout(f"{where}: SQS did not answer in time")
    if isinstance(exc, bx.BotoCoreError):
        return QueueError(f"{where}: {type(exc).__name__}: {_one_line(exc)}")
    return QueueError(f"{where}: unexpected {type(exc).__name__}")


def map_entry_failure(entry: dict[str, Any], *, where: str) -> QueueError:
    """The error for one ``Failed`` entry of a batch response."""
    sender_fault = entry.get("SenderFault")
    return map_code(
        str(entry.get("Code") or ""),
        str(entry.get("Message") or ""),
        where=where,
        sender_fault=bool(sender_fault) if sender_fault is not None else None,
    )


__all__ = ["CREDENTIALS_HINT", "error_code", "map_code", "map_entry_failure", "map_error"]
