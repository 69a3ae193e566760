"""Redaction: the one function every text passes through before it leaves the process.

`redact` masks two things:

* **the configured secret values themselves**, wherever they appear in the text: every
  `queue_runtime.config.Secret` registers its value here when it is created (settings from a
  file, the environment, keyword arguments, a secret store reference), and so do the
  credential variables azure-identity reads (``AZURE_CLIENT_SECRET``...) when settings are
  loaded. For a connection string, the key inside it (``SharedAccessKey=...``) is registered
  as well, so the key alone is masked too; a value is also known in its URL-encoded form.
  Values shorter than `MIN_SECRET_LENGTH` are not registered (masking every ``admin`` in every
  line would garble the output and protects nothing: such a value is no credential);
* **credential patterns**, known or not: the values of ``SharedAccessKey=``,
  ``SharedAccessSignature``/``sig=``, ``AccountKey=``, ``aws_secret_access_key``, session and
  security tokens, ``Signature=``/``X-Amz-Signature=``, passwords, client secrets, API keys and
  whole ``Authorization`` header values.

It is applied at every exit: the log formatters (`telemetry.JsonFormatter`,
`telemetry.TextFormatter`), everything the ``queue-runtime`` command writes to stdout and
stderr (error lines and ``--debug`` tracebacks included), dead-letter descriptions (before
they are stored), and span attributes, events and statuses. ``docs/security.md`` lists them.

This module is at the bottom of the package: it imports nothing of queue_runtime.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Final

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "forget_secrets",
    "has_known_secrets",
    "looks_like_a_credential",
    "mask_known",
    "redact",
    "redact_patterns",
    "register_secret",
]

#: What a masked value is replaced by.
MASK: Final = "***"
#: Shortest value `register_secret` remembers.
MIN_SECRET_LENGTH: Final = 8
#: Most values remembered (the oldest are forgotten first): rotations add values, and each
#: one stays known so that an old value still echoed by an error is masked too.
MAX_KNOWN_SECRETS: Final = 256

_SECRET_KEYS = (
    r"SharedAccessKey|SharedAccessSignature|AccountKey|aws_secret_access_key|aws_session_token"
    r"|SecretAccessKey|SessionToken|SecurityToken|X-Amz-Signature|X-Amz-Security-Token|Signature|sig"
    r"|password|passwd|pwd|client_secret|api[_-]?key|access[_-]?token|refresh[_-]?token"
)
# key, separator (= or :, optionally quoted), value up to a delimiter of the usual notations
# (connection strings ';', query strings '&', JSON/dict quotes and commas, whitespace).
_SECRET_VALUE = re.compile(
    rf"(?i)(?<![A-Za-z0-9_-])({_SECRET_KEYS})(\s*[\"']?\s*[=:]\s*[\"']?)([^;&\s\"',}}]+)"
)
# An Authorization header's whole value (scheme included) up to the end of the line or quote.
_AUTH_HEADER = re.compile(r"(?i)(\bAuthorization[\"']?\s*[=:]\s*[\"']?)([^\"'\r\n]+)")
# "SharedAccessSignature sr=...&sig=..." tokens outside key=value form.
_SAS_TOKEN = re.compile(r"(?i)(SharedAccessSignature\s+)(\S+)")
# The parts of a connection string that are keys (their values are registered on their own).
_KEY_PARTS: Final = frozenset(
    {"sharedaccesskey", "sharedaccesssignature", "accountkey", "password", "pwd", "clientsecret"}
)
# A connection string's "Endpoint=" (Service Bus, Storage, Event Hubs...).
_ENDPOINT = re.compile(r"(?i)(?:^|;)\s*endpoint\s*=")

_lock = threading.Lock()
_known: dict[str, None] = {}  # insertion-ordered set: the oldest is forgotten first
_snapshot: tuple[str, ...] = ()  # longest first; replaced whole, so readers need no lock


def _forms(value: str) -> Iterable[str]:
    yield value
    quoted = urllib.parse.quote(value, safe="")
    if quoted != value:
        yield quoted
    if ";" in value and "=" in value:
        for part in value.split(";"):
            name, sep, inner = part.partition("=")
            if sep and name.strip().lower() in _KEY_PARTS:
                # "=" padding of a base64 key stays part of the value.
                yield inner.strip()


def register_secret(value: str | None) -> None:
    """Remember ``value`` (and its key parts) so that `redact` masks it wherever it appears.

    Values shorter than `MIN_SECRET_LENGTH` are ignored; at most `MAX_KNOWN_SECRETS` values
    are kept. Thread-safe; cheap when the value is already known.
    """
    global _snapshot
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in _known:
        return
    with _lock:
        for form in _forms(value):
            if len(form) >= MIN_SECRET_LENGTH:
                _known.pop(form, None)
                _known[form] = None
        while len(_known) > MAX_KNOWN_SECRETS:
            del _known[next(iter(_known))]
        _snapshot = tuple(sorted(_known, key=len, reverse=True))


def forget_secrets() -> None:
    """Forget every registered value (for tests)."""
    global _snapshot
    with _lock:
        _known.clear()
        _snapshot = ()


def has_known_secrets() -> bool:
    """Whether any secret value is registered (a fast check before `mask_known`)."""
    return bool(_snapshot)


def mask_known(text: str) -> str:
    """``text`` with every registered secret value replaced by `MASK` (no patterns)."""
    for value in _snapshot:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(text: str) -> str:
    """``text`` with the registered secret values and credential patterns masked (``***``).

    Keys and the rest of the text are kept so the line stays useful. Idempotent. Never raises
    on a string.
    """
    if not text:
        return text
    return redact_patterns(mask_known(text))


def looks_like_a_credential(text: str) -> bool:
    """Whether ``text`` holds a credential by its shape: a connection string (``Endpoint=...``)
    or a value the patterns of `redact` would mask. Used to refuse such text in settings that
    are not secrets (and so would be shown)."""
    return bool(_ENDPOINT.search(text)) or redact_patterns(text) != text


def redact_patterns(text: str) -> str:
    """`redact` without the registered values: the credential patterns only."""
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)
    text = _SAS_TOKEN.sub(lambda m: m.group(1) + MASK, text)
    return _SECRET_VALUE.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
