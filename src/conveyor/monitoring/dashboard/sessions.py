"""Dashboard sessions: stateless signed cookies, and the CSRF tokens bound to them.

A session cookie reads `v1.<token id>.<issued>.<expires>.<mac>`: the public id of the token
that logged in, two Unix times, and an HMAC-SHA256 over them keyed by HMAC-SHA256(session
secret, the token's SHA-256 digest). The cookie never holds the token, and no server keeps
anything for it, so every server sharing the secret and the tokens file accepts it (several
servers behind one load balancer). Each request looks the token id up in the tokens file as
it is *now* and derives the key from the digest listed there: a session ends when its token
leaves the file, expires, is replaced under the same id, or loses the right to view the
cluster, and when its own lifetime (12 h by default) runs out. Logging out deletes the
browser's cookie; a copy taken before stays valid until it expires, and removing the token
(or changing the secret) is what ends every session at once. The CSRF token a session's
forms carry is another HMAC under the same key, so it differs per session and cannot be
made without the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Final

from conveyor.auth import Permission, Principal, digest
from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.auth import TokenEntry, TokenRegistry

COOKIE_NAME: Final = "conveyor_session"
DEFAULT_LIFETIME: Final = timedelta(hours=12)
# How far in the future another server's clock may have put a session's issue time.
CLOCK_SKEW_SECONDS: Final = 60
_VERSION: Final = "v1"
_COOKIE: Final = re.compile(
    r"^v1\.([0-9a-f]{8})\.([0-9]{1,12})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})$"
)


@dataclass(frozen=True, slots=True)
class Session:
    """A valid session: who it is, until when, and the CSRF token of its forms."""

    principal: Principal
    expires_at: int
    csrf: str


def token_entries(current: Callable[[], TokenRegistry]) -> Callable[[str], TokenEntry | None]:
    """Look a token's entry up by id in the registry `current()` returns at each call."""

    def entry(token_id: str) -> TokenEntry | None:
        return current().entry(token_id)

    return entry


class Sessions:
    """Issues and checks session cookies and CSRF tokens (see the module docstring)."""

    def __init__(
        self,
        secret: bytes,
        token_entry: Callable[[str], TokenEntry | None],
        *,
        lifetime: timedelta = DEFAULT_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`token_entry` finds a token's current entry by id (None once it is gone)."""
        if len(secret) < 16:  # noqa: PLR2004 - 128 bits, the least an HMAC key should have
            raise ConfigError("the session secret must be at least 16 bytes")
        self._secret = secret
        self._token_entry = token_entry
        self.lifetime = int(lifetime.total_seconds())
        self._clock = clock

    def issue(self, token: str, principal: Principal) -> tuple[str, int]:
        """A cookie value for `principal`, who just logged in with `token`, and its max-age.

        The session ends with its lifetime, or earlier if the token itself expires sooner.
        """
        issued = int(self._clock())
        expires = issued + self.lifetime
        entry = self._token_entry(principal.token_id)
        if entry is not None and entry.expires_at is not None:
            expires = min(expires, int(entry.expires_at.timestamp()))
        value = self.sign(principal.token_id, digest(token), issued, expires)
        return value, max(expires - issued, 0)

    def sign(self, token_id: str, token_sha256: str, issued_at: int, expires_at: int) -> str:
        """The cookie value naming a token (by id and digest) for the given times."""
        key = self._key(token_sha256)
        mac = _mac(key, "session", token_id, issued_at, expires_at)
        return f"{_VERSION}.{token_id}.{issued_at}.{expires_at}.{mac}"

    def open(self, value: str | None) -> Session | None:
        """The session a cookie value carries, or None if it is not (or no longer) valid."""
        match = _COOKIE.match(value or "")
        entry = self._token_entry(match.group(1)) if match is not None else None
        if match is None or entry is None:
            return None
        token_id, issued, expires = match.group(1), int(match.group(2)), int(match.group(3))
        key = self._key(entry.sha256)
        now = self._clock()
        valid = (
            hmac.compare_digest(match.group(4), _mac(key, "session", token_id, issued, expires))
            and issued - CLOCK_SKEW_SECONDS <= now < expires
            and expires - issued <= self.lifetime
            and (entry.expires_at is None or now < entry.expires_at.timestamp())
            and entry.principal().may(Permission.READ_CLUSTER)
        )
        if not valid:
            return None
        return Session(entry.principal(), expires, _mac(key, "csrf", token_id, issued, expires))

    def csrf_matches(self, session: Session, submitted: object) -> bool:
        """Whether a form's CSRF field is the one this session's pages carry."""
        if not isinstance(submitted, str) or not submitted.isascii():
            return False
        return hmac.compare_digest(submitted, session.csrf)

    def _key(self, token_sha256: str) -> bytes:
        return hmac.new(self._secret, token_sha256.encode(), hashlib.sha256).digest()


def _mac(key: bytes, purpose: str, token_id: str, issued_at: int, expires_at: int) -> str:
    message = f"{_VERSION}|{purpose}|{token_id}|{issued_at}|{expires_at}".encode()
    mac = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
