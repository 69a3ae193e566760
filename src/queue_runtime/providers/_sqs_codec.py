"""How a `Message` is laid out on SQS, and back (private to the SQS provider).

Layout of a message we send:

* the SQS body is the message body when it is text SQS accepts (valid UTF-8 without the
  control characters SQS rejects); otherwise its base64 form, marked in ``qr.meta``;
* one ``qr.meta`` String attribute holds our system fields as compact JSON (message id,
  session id, correlation id, content type, expiry, body encoding, names of properties whose
  value is empty — SQS refuses empty attribute values);
* every application property is a String attribute of its own (readable in the console);
* a dead-lettered copy adds ``qr.dl.reason``, ``qr.dl.description`` and ``qr.dl.source``.

So SQS's 10-attribute limit leaves 10 - 4 = 6 application properties. A message without
``qr.meta`` (a foreign producer: boto3, the console) is read as it is: the SQS ``MessageId``
is the message id, the ``MessageGroupId`` the session, String/Number attributes the properties.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from ..errors import MessageTooLarge, ValidationError
from ..message import Message, ReceivedMessage, validate_message_id, validate_session_id

META: Final = "qr.meta"
DL_REASON: Final = "qr.dl.reason"
DL_DESCRIPTION: Final = "qr.dl.description"
DL_SOURCE: Final = "qr.dl.source"
RESERVED_PREFIX: Final = "qr."

MAX_ATTRIBUTES: Final = 10
#: Attributes we may need ourselves: ``qr.meta`` plus the three dead-letter attributes.
RESERVED_ATTRIBUTES: Final = 4
MAX_PROPERTIES: Final = MAX_ATTRIBUTES - RESERVED_ATTRIBUTES
MAX_MESSAGE_SIZE: Final = 256 * 1024
MAX_BATCH_COUNT: Final = 10
MAX_DELAY_SECONDS: Final = 900

_STRING: Final = "String"
# Characters SQS rejects in bodies and String attribute values (its allowed set is #x9 #xA #xD
# #x20-#xD7FF #xE000-#xFFFD #x10000-#x10FFFF; strict UTF-8 decoding already excludes surrogates).
_SQS_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# Attribute names: letters, digits, '_', '-', '.'; no leading/trailing/double '.'; <= 256.
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9_.-]{0,254}[A-Za-z0-9_-])?")


class Meta(msgspec.Struct, omit_defaults=True):
    """Our system fields, JSON-encoded into the ``qr.meta`` attribute (short keys: it counts
    against the 256 KiB limit)."""

    id: str
    sid: str | None = None
    cid: str | None = None
    ct: str | None = None
    exp: float | None = None
    """Expiry, Unix seconds (SQS has no per-message TTL: expired messages are dropped on receipt)."""
    enc: str | None = None
    """Body encoding: None (text as is), ``"b64"``, or ``"empty"`` (SQS bodies are never empty)."""
    empty: list[str] | None = None
    """Names of properties whose value is the empty string."""


_meta_encoder = msgspec.json.Encoder()
_meta_decoder = msgspec.json.Decoder(Meta)


def encode_body(body: bytes) -> tuple[str, str | None]:
    """The SQS body for ``body`` and its encoding marker (None when sent as is)."""
    if not body:
        return "-", "empty"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "b64"
    if _SQS_INVALID.search(text):
        return base64.b64encode(body).decode("ascii"), "b64"
    return text, None


def decode_body(text: str, encoding: str | None) -> bytes:
    if encoding == "empty":
        return b""
    if encoding == "b64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            # Not ours after all (a foreign producer copied the marker?): keep the text.
            return _utf8(text)
    return _utf8(text)


def _utf8(text: str) -> bytes:
    # SQS never sends lone surrogates, but a JSON answer can spell them ("\ud800"): such a
    # body is damaged, not a reason to fail the receive.
    return text.encode("utf-8", "replace")


def validate_property(name: str, value: str) -> None:
    """Raise `ValidationError` if ``name``/``value`` cannot be an SQS message attribute."""
    if not _ATTRIBUTE_NAME.fullmatch(name) or ".." in name:
        raise ValidationError(
            f"property name {name[:40]!r} is invalid for SQS: use 1-256 letters, digits, '_', '-', '.'"
            " (no leading, trailing or double '.')"
        )
    lowered = name.lower()
    if lowered.startswith(("aws.", "amazon.")) or name.startswith(RESERVED_PREFIX):
        raise ValidationError(
            f"property name {name[:40]!r} is reserved on SQS (prefixes 'AWS.', 'Amazon.', 'qr.')"
        )
    if _SQS_INVALID.search(value):
        raise ValidationError(f"property {name[:40]!r} has a control character SQS does not accept")


def encode(message: Message) -> tuple[str, dict[str, dict[str, str]]]:
    """``(body, MessageAttributes)`` for ``message``; validates properties against SQS rules."""
    if len(message.properties) > MAX_PROPERTIES:
        raise ValidationError(
            f"message has {len(message.properties)} properties; SQS allows {MAX_PROPERTIES}"
            f" (10 message attributes, {RESERVED_ATTRIBUTES} used by queue-runtime)"
        )
    body, enc = encode_body(message.body)
    expires = time.time() + message.time_to_live if message.time_to_live is not None else None
    attributes: dict[str, dict[str, str]] = {}
    empty: list[str] = []
    for name, value in message.properties.items():
        validate_property(name, value)
        if value:
            attributes[name] = {"DataType": _STRING, "StringValue": value}
        else:
            empty.append(name)
    meta = Meta(
        id=message.message_id,
        sid=message.session_id,
        cid=message.correlation_id,
        ct=message.content_type,
        exp=round(expires, 3) if expires is not None else None,
        enc=enc,
        empty=empty or None,
    )
    if message.correlation_id and _SQS_INVALID.search(message.correlation_id):
        raise ValidationError("correlation id has a control character SQS does not accept")
    if message.content_type and _SQS_INVALID.search(message.content_type):
        raise ValidationError("content type has a control character SQS does not accept")
    attributes[META] = {"DataType": _STRING, "StringValue": _meta_encoder.encode(meta).decode()}
    return body, attributes


def attribute_size(name: str, attribute: dict[str, Any]) -> int:
    """What SQS counts for one attribute: its name, type and value, in UTF-8 bytes."""
    size = len(name.encode()) + len(str(attribute.get("DataType", "")).encode())
    if "StringValue" in attribute:
        size += len(str(attribute["StringValue"]).encode())
    elif "BinaryValue" in attribute:
        value = attribute["BinaryValue"]
        size += len(value) if isinstance(value, (bytes, bytearray)) else len(str(value).encode())
    return size


def sqs_size(body: str, attributes: dict[str, dict[str, Any]]) -> int:
    """The size SQS checks against its 256 KiB limit: body plus every attribute."""
    return len(body.encode()) + sum(attribute_size(n, a) for n, a in attributes.items())


def encoded_size(message: Message) -> int:
    body, attributes = encode(message)
    return sqs_size(body, attributes)


def check_size(body: str, attributes: dict[str, dict[str, Any]]) -> int:
    size = sqs_size(body, attributes)
    if size > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(size, MAX_MESSAGE_SIZE, what="SQS message (body + attributes)")
    return size


def _valid(validate: Any, value: str) -> str | None:
    """``value`` if ``validate`` accepts it, else None."""
    try:
        return str(validate(value))
    except ValidationError:
        return None


def _epoch_ms(value: object) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(str(value)) / 1000, tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):  # OSError: beyond the platform's time_t
        return None


def _int(value: object, default: int | None = None) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def decode(
    raw: dict[str, Any], *, locked_until: float | None, receipt: str | None = None
) -> tuple[ReceivedMessage, float | None]:
    """A `ReceivedMessage` from one SQS message dict, and its expiry (Unix seconds) if any.

    Tolerant: a message we did not produce is read as it is, and a damaged ``qr.meta`` is
    ignored rather than turning the message into an error (it still reaches the consumer).
    """
    system: dict[str, Any] = raw.get("Attributes") or {}
    attributes: dict[str, dict[str, Any]] = raw.get("MessageAttributes") or {}
    meta: Meta | None = None
    meta_attribute = attributes.get(META)
    if meta_attribute is not None:
        try:
            meta = _meta_decoder.decode(str(meta_attribute.get("StringValue", "")))
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeEncodeError):
            meta = None
    properties: dict[str, str] = {}
    for name, attribute in attributes.items():
        if name.startswith(RESERVED_PREFIX):
            continue
        if "StringValue" in attribute:
            properties[name] = str(attribute["StringValue"])
    if meta is not None and meta.empty:
        for name in meta.empty:
            properties.setdefault(name, "")
    group = system.get("MessageGroupId")
    session_id = str(group) if group else (meta.sid if meta is not None else None)
    body_text = str(raw.get("Body", ""))
    message_id = meta.id if meta is not None else str(raw.get("MessageId", ""))
    try:
        message = Message(
            body=decode_body(body_text, meta.enc if meta is not None else None),
            session_id=session_id,
            message_id=message_id,
            correlation_id=meta.cid if meta is not None else None,
            properties=properties,
            content_type=meta.ct if meta is not None else None,
        )
    except ValidationError:
        # A foreign message whose ids break our rules: fall back to SQS's own message id (or a
        # new one) and drop what does not validate, so it can still be handled or dead-lettered.
        message = Message(
            body=_utf8(body_text),
            session_id=_valid(validate_session_id, session_id) if session_id else None,
            properties={k: v for k, v in properties.items() if k},
        )
        fallback_id = _valid(validate_message_id, str(raw.get("MessageId", "")))
        if fallback_id is not None:  # else the new id the Message was given
            message.message_id = fallback_id
    dl_reason = attributes.get(DL_REASON, {}).get("StringValue")
    dl_description = attributes.get(DL_DESCRIPTION, {}).get("StringValue")
    dl_source = attributes.get(DL_SOURCE, {}).get("StringValue")
    received = ReceivedMessage(
        message=message,
        receipt=receipt if receipt is not None else str(raw.get("ReceiptHandle", "")),
        delivery_count=_int(system.get("ApproximateReceiveCount"), 1) or 1,
        enqueued_at=_epoch_ms(system.get("SentTimestamp")),
        sequence_number=_int(system.get("SequenceNumber")),
        locked_until=locked_until,
        dead_letter_reason=str(dl_reason) if dl_reason is not None else None,
        dead_letter_description=str(dl_description) if dl_description is not None else None,
        dead_letter_source=str(dl_source) if dl_source is not None else None,
    )
    return received, meta.exp if meta is not None else None


def dead_letter_attributes(
    raw: dict[str, Any], *, reason: str, description: str | None, source: str
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Body and attributes for the DLQ copy of ``raw``: the original's attributes plus the
    reason, the description (cut to fit 256 KiB and SQS's character rules) and the source."""
    body = str(raw.get("Body", ""))
    attributes: dict[str, dict[str, Any]] = {
        name: dict(value)
        for name, value in (raw.get("MessageAttributes") or {}).items()
        if name not in (DL_REASON, DL_DESCRIPTION, DL_SOURCE)
    }
    # A message may be dead-lettered again after a replay: the newest reason wins.
    for attribute in attributes.values():
        attribute.pop("StringListValues", None)
        attribute.pop("BinaryListValues", None)
    if len(attributes) + 3 > MAX_ATTRIBUTES:
        raise ValidationError(
            f"message has {len(attributes)} attributes: no room for the 3 dead-letter attributes"
            f" within SQS's {MAX_ATTRIBUTES}"
        )
    reason = _SQS_INVALID.sub("?", reason)[:256] or "unknown"
    attributes[DL_REASON] = {"DataType": _STRING, "StringValue": reason}
    attributes[DL_SOURCE] = {"DataType": _STRING, "StringValue": source}
    text = _SQS_INVALID.sub("?", description or "")
    room = (
        MAX_MESSAGE_SIZE
        - sqs_size(body, attributes)
        - attribute_size(DL_DESCRIPTION, {"DataType": _STRING, "StringValue": ""})
    )
    if text and room > 8:
        encoded = text.encode()
        if len(encoded) > room:
            text = encoded[: max(room - 3, 0)].decode("utf-8", "ignore") + "..."
            while len(text.encode()) > room:
                text = text[:-4] + "..."
        attributes[DL_DESCRIPTION] = {"DataType": _STRING, "StringValue": text}
    return body, attributes
