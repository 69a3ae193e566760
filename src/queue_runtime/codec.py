"""Body decoding: from a message's bytes to the actor's declared body type.

An actor declares its body type as the generic parameter of `SessionActor[T]`:

* a `msgspec.Struct` (or any type msgspec can decode: dataclasses, dicts, lists...) — JSON by
  default, MessagePack when the message's content type says so;
* `bytes` — the raw body;
* `str` — the body decoded as UTF-8.

Decoders are built once per actor class; decoding errors become `DecodeError` (and nothing
else, whatever the bytes: tests/test_fuzz.py), whose text names what was wrong (msgspec's path
such as ``$.amount``) and never contains the body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["MSGPACK_CONTENT_TYPES", "DecodeError", "Decoder", "make_decoder"]

MSGPACK_CONTENT_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})


class DecodeError(Exception):
    """The body could not be decoded into the actor's type. Dead-lettered at once."""


Decoder = Callable[[bytes, "str | None"], Any]


def _content_type_base(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower()


def make_decoder(body_type: Any) -> Decoder:
    """A function ``(body, content_type) -> value`` for ``body_type``."""
    if body_type is bytes:
        return lambda body, content_type: body
    if body_type is str:

        def decode_text(body: bytes, content_type: str | None) -> str:
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DecodeError(f"body is not valid UTF-8 (byte {error.start})") from None

        return decode_text

    json_decoder = msgspec.json.Decoder(body_type)
    msgpack_decoder = msgspec.msgpack.Decoder(body_type)
    type_name = getattr(body_type, "__name__", repr(body_type))

    def decode(body: bytes, content_type: str | None) -> Any:
        msgpack = content_type is not None and _content_type_base(content_type) in MSGPACK_CONTENT_TYPES
        try:
            return (msgpack_decoder if msgpack else json_decoder).decode(body)
        except msgspec.ValidationError as error:
            raise DecodeError(f"body does not match {type_name}: {error}") from None
        except msgspec.DecodeError as error:
            kind = "MessagePack" if msgpack else "JSON"
            raise DecodeError(f"body is not valid {kind}: {error}") from None
        except RecursionError:
            # msgspec gives up on deep nesting ([[[[...) with RecursionError: a bad body too.
            raise DecodeError("body is nested too deeply") from None

    return decode
