"""Payload confidentiality: sealing payloads, results and error messages before they leave.

A `PayloadCodec` runs in the client and the worker, never in the server. The client seals
each payload before sending it; the worker opens it before the handler sees it, and seals
the handler's result and error message before reporting them. The server, the database,
the server's logs and the dashboard only ever hold sealed bytes, which the dashboard shows
as "encrypted".

`AesGcmCodec` seals with AES-256-GCM:

- **Several keys, each with an id.** Sealed data names the key that sealed it, so keys can
  rotate: add the new key first in the list (it seals from then on), keep the old ones
  for opening what they sealed, and drop a key only once no live task needs it.
- **Sealed data is bound to its task and its field** through GCM's associated data.
  Someone with write access to the database cannot move a sealed payload to another task,
  or pass a result off as a payload: opening fails.
- **Data that was never sealed passes through unchanged.** Producers can then adopt the
  codec one at a time; a worker still runs their plain payloads.

Sealed bytes start with SEALED_MAGIC. Sealed text (error messages) starts with
SEALED_TEXT_PREFIX, followed by the sealed bytes in base64url.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import uuid
from typing import TYPE_CHECKING, Final, Protocol, cast

from conveyor.errors import ConfigError, SealError

if TYPE_CHECKING:
    from collections.abc import Sequence

SEALED_MAGIC: Final = b"\x00cvy-aesgcm1\x00"
SEALED_TEXT_PREFIX: Final = "cvy-sealed:v1:"
# How the server's own words (the dashboard, a task's explanation) show a sealed text.
SEALED_TEXT_SHOWN_AS: Final = "(encrypted by the worker)"
KEYS_ENV: Final = "CONVEYOR_PAYLOAD_KEYS"
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
# What sealing adds to a payload, at most: magic, key id, nonce and tag.
SEALED_OVERHEAD: Final = len(SEALED_MAGIC) + 1 + 32 + _NONCE_BYTES + _TAG_BYTES
_KEY_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # fullmatch: `$` allows a final newline
_URL_SAFE_TO_STANDARD: Final = str.maketrans("-_", "+/")


def size_limit(data: bytes, limit: int) -> int:
    """The most bytes `data` may have under a payload limit of `limit`.

    A sealed payload or result may be larger by the seal's overhead: the limit is on what
    the producer (or the handler) gave, and a producer whose payloads were accepted was
    refused once it sealed them, with a size it never sent.
    """
    return limit + SEALED_OVERHEAD if is_sealed(data) else limit


def is_sealed(data: bytes) -> bool:
    """Whether `data` was sealed by a codec (a cheap check of its first bytes)."""
    return data.startswith(SEALED_MAGIC)


def shown_text(text: str | None) -> str | None:
    """`text` as the server's own words show it: a sealed one as SEALED_TEXT_SHOWN_AS.

    The server has no key, and the base64 of up to 8,000 characters reads as noise.
    """
    return SEALED_TEXT_SHOWN_AS if text and is_sealed_text(text) else text


def is_sealed_text(text: str) -> bool:
    """Whether `text` is a sealed message."""
    return text.startswith(SEALED_TEXT_PREFIX)


def sealed_key_id(data: bytes) -> str | None:
    """The id of the key that sealed `data`, or None if it is not sealed (or truncated)."""
    if not is_sealed(data) or len(data) <= len(SEALED_MAGIC):
        return None
    start = len(SEALED_MAGIC) + 1
    length = data[len(SEALED_MAGIC)]
    key_id = data[start : start + length]
    return key_id.decode("ascii", "replace") if len(key_id) == length else None


class PayloadCodec(Protocol):
    """Seals and opens the bytes and text a task carries. `field` and `task_id` bind them."""

    def seal(self, data: bytes, *, field: str, task_id: str) -> bytes:
        """The sealed form of `data`."""
        ...

    def open(self, data: bytes, *, field: str, task_id: str) -> bytes:
        """The original of sealed `data`; `data` itself if it was not sealed."""
        ...


def chosen_codec(codec: object) -> PayloadCodec | None:
    """The codec a client or worker was given, else the one CONVEYOR_PAYLOAD_KEYS describes.

    ConfigError for what cannot be one: the class rather than an instance, or anything
    without seal() and open(). Accepted, every payload failed when it was sealed or opened,
    each task spending its attempts on a mistake in the worker's or client's set-up.
    """
    if codec is None:
        return AesGcmCodec.from_env()
    if isinstance(codec, type) or not all(
        callable(getattr(codec, method, None)) for method in ("seal", "open")
    ):
        shown = codec.__name__ if isinstance(codec, type) else type(codec).__name__
        raise ConfigError(
            f"codec must be an object with seal() and open() methods, such as "
            f"AesGcmCodec([...]); got {shown}"
            + (" (the class itself, not an instance)" if isinstance(codec, type) else "")
        )
    return cast("PayloadCodec", codec)  # checked above: it has both methods


# The server keeps this many characters of an error or a progress report; a sealed message
# must fit whole, since a cut seal cannot be opened.
MAX_SEALED_TEXT: Final = 8000
# A first cut before sealing, so a megabyte of traceback is not sealed only to be cut: with
# AesGcmCodec's overhead it fits (4 * ceil((5,900 + 74) / 3) + prefix < 8,000).
FIRST_CUT_BYTES: Final = 5900


def kept_text(text: str) -> str:
    """A worker's unsealed text (an error, a progress note) cut to what the server keeps.

    Cut before it is sent, not only by the server: a progress note of megabytes made every
    heartbeat that carried it too large for the server to read, and the worker, silent for
    a whole lease, lost the leases of all its tasks.
    """
    if len(text) <= MAX_SEALED_TEXT:
        return text
    return text[:MAX_SEALED_TEXT] + "... (truncated)"


def seal_text(codec: PayloadCodec, text: str, *, field: str, task_id: str) -> str:
    """A message sealed into text (errors are text in the database), cut to fit.

    Cut on a character boundary, and again by whatever still does not fit: a codec of
    another kind (one that carries a wrapped key, say) adds more than AesGcmCodec does.
    """
    data = _cut(text.encode(), FIRST_CUT_BYTES)
    while True:
        sealed = codec.seal(data, field=field, task_id=task_id)
        encoded = SEALED_TEXT_PREFIX + base64.urlsafe_b64encode(sealed).decode("ascii")
        if len(encoded) <= MAX_SEALED_TEXT or not data:
            return encoded
        # Every 4 characters too many are 3 bytes; one more step of 4 for the padding.
        data = _cut(data, len(data) - (len(encoded) - MAX_SEALED_TEXT) * 3 // 4 - 3)


def _cut(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    return data[: max(limit, 0)].decode(errors="ignore").encode()


def open_text(codec: PayloadCodec, text: str, *, field: str, task_id: str) -> str:
    """The original of a sealed message; `text` itself if it was not sealed."""
    if not is_sealed_text(text):
        return text
    try:
        sealed = base64.b64decode(
            text.removeprefix(SEALED_TEXT_PREFIX), altchars=b"-_", validate=True
        )
    except (binascii.Error, ValueError):
        sealed = b""
    if not is_sealed(sealed):
        raise SealError(f"the sealed {field} of task {task_id} is damaged")
    return codec.open(sealed, field=field, task_id=task_id).decode(errors="replace")


class AesGcmCodec:
    """AES-256-GCM with named keys; the first key seals, every key opens.

    Args:
        keys: (key id, 32-byte key) pairs, newest first. Ids are 1-32 characters of
            [A-Za-z0-9_.-].

    Needs the `cryptography` package (`pip install conveyor-tasks[crypto]`).
    """

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        """Check the keys; ConfigError for a bad id, a bad length, or no key at all."""
        try:
            from cryptography.hazmat.primitives.ciphers.aead import (  # noqa: PLC0415
                AESGCM,
            )
        except ImportError:
            raise ConfigError(
                "AesGcmCodec needs the cryptography package: pip install 'conveyor-tasks[crypto]'"
            ) from None
        if not keys:
            raise ConfigError("AesGcmCodec needs at least one key")
        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID.fullmatch(key_id):
                raise ConfigError(
                    f"key id must be 1-32 characters of [A-Za-z0-9_.-], got {key_id!r}"
                )
            if len(key) != 32:  # noqa: PLR2004 - AES-256
                raise ConfigError(f"key {key_id} must be 32 bytes (AES-256), not {len(key)}")
            if key_id in self._ciphers:
                raise ConfigError(f"key id {key_id} appears twice")
            self._ciphers[key_id] = AESGCM(key)
        self.current_key_id = keys[0][0]
        self._header = (
            SEALED_MAGIC + bytes([len(self.current_key_id)]) + self.current_key_id.encode()
        )

    @classmethod
    def from_env(cls) -> AesGcmCodec | None:
        """The codec CONVEYOR_PAYLOAD_KEYS describes, or None if it is not set.

        The variable lists "id=BASE64KEY" items separated by commas, newest key first.
        """
        raw = os.environ.get(KEYS_ENV, "").strip()
        if not raw:
            return None
        keys: list[tuple[str, bytes]] = []
        for position, item in enumerate(raw.split(","), start=1):
            key_id, sep, encoded = item.strip().partition("=")
            # The messages never repeat the item: a mistyped separator or a stray character
            # would put the key itself on stderr and into whatever collects the logs. They
            # name the item's position, and its id once the id is known to be one.
            if not sep or not _KEY_ID.fullmatch(key_id):
                raise ConfigError(
                    f"{KEYS_ENV}: item {position} is not id=BASE64KEY (the id: 1-32 "
                    "characters of [A-Za-z0-9_.-], then '=', then the key in base64)"
                )
            try:
                # Either base64 alphabet: URL-safe keys are what many tools print, and the
                # two differ only in two characters, so a key cannot mean two things.
                # Padding optional: secrets.token_urlsafe(32) and JWK values leave it out.
                standard = encoded.translate(_URL_SAFE_TO_STANDARD)
                key = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    f"{KEYS_ENV}: the key of item {position} ({key_id}) is not valid base64"
                ) from None
            keys.append((key_id, key))
        return cls(keys)

    @staticmethod
    def new_key() -> bytes:
        """A fresh random 32-byte key."""
        return os.urandom(32)

    def seal(self, data: bytes, *, field: str, task_id: str) -> bytes:
        """Encrypt and authenticate `data` under the current key."""
        nonce = os.urandom(_NONCE_BYTES)
        cipher = self._ciphers[self.current_key_id]
        return self._header + nonce + cipher.encrypt(nonce, data, _bound_to(field, task_id))

    def open(self, data: bytes, *, field: str, task_id: str) -> bytes:
        """Decrypt sealed `data` (SealError if it cannot be); plain data is returned as is."""
        if not is_sealed(data):
            return data
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415 - optional dependency

        key_id = sealed_key_id(data)
        cipher = self._ciphers.get(key_id or "")
        if key_id is None or cipher is None:
            raise SealError(
                f"the {field} of task {task_id} was sealed with key {key_id!r}, which this "
                f"codec does not have (it has {', '.join(sorted(self._ciphers))})"
            )
        start = len(SEALED_MAGIC) + 1 + len(key_id)
        nonce, ciphertext = data[start : start + _NONCE_BYTES], data[start + _NONCE_BYTES :]
        try:
            return cipher.decrypt(nonce, ciphertext, _bound_to(field, task_id))
        except (InvalidTag, ValueError):
            raise SealError(
                f"the {field} of task {task_id} does not open with key {key_id}: it was "
                "altered, or belongs to another task or field"
            ) from None


def _bound_to(field: str, task_id: str) -> bytes:
    # The canonical id: the client may have written it in capitals, the worker gets it back
    # from the database in lower case.
    with contextlib.suppress(ValueError):  # the server refuses a malformed id anyway
        task_id = str(uuid.UUID(task_id))
    return f"conveyor/v1/{field}/{task_id}".encode()
