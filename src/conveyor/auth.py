"""Access tokens, roles and the permissions of each role: who may do what to a Conveyor cluster.

A token reads `cvy_<id>_<secret>`. The id (8 hex characters) is public: it names the token's
entry in the tokens file, shows in logs and audit records, and reveals nothing. The secret
is 32 random bytes. The server keeps only the SHA-256 digest of the whole token and compares
digests with `hmac.compare_digest`, so reading the tokens file or timing the server gives
nothing away. A fast hash is the right one here: with 256 bits of entropy there is nothing
to brute-force, and a deliberately slow one (bcrypt, scrypt) would only tax every call.

A token belongs to a *principal* (its `name`, such as "billing" or "email-workers") and
carries one role. Several tokens may share a name, which is how a credential is rotated
without downtime: add the new token, move the clients over, then delete the old one. The
server binds each worker id to the principal that registered it, so a worker's leases can
be reported only under the same name.

This module needs only `errors` and `types`: the gRPC server, the dashboard and the CLI
all use it, and it knows nothing of any of them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import ConfigError, PermissionDenied, Unauthenticated
from conveyor.types import TASK_TYPE_PATTERN

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

TOKEN_PREFIX: Final = "cvy"  # noqa: S105 - a prefix, not a secret
# Used with fullmatch: `$` also matches before a final newline, and a name "keep\n" from a
# hand-edited file passed, then broke the file `token revoke` wrote back.
TOKEN_PATTERN: Final = re.compile(r"cvy_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
# How often a TokenFile looks at its file for changes by default; a rotated token is live
# within this. A look is one stat() call, made by the next request after the interval.
RELOAD_CHECK_SECONDS: Final = 2.0


class Role(StrEnum):
    """What a token is for."""

    PRODUCER = "producer"
    WORKER = "worker"
    VIEWER = "viewer"
    ADMIN = "admin"


class Permission(StrEnum):
    """One kind of action; each RPC and dashboard action needs exactly one."""

    ENQUEUE = "enqueue"
    READ_TASK = "read_task"
    CANCEL_TASK = "cancel_task"
    WORK = "work"
    READ_CLUSTER = "read_cluster"
    OPERATE = "operate"


ROLE_PERMISSIONS: Final[Mapping[Role, frozenset[Permission]]] = {
    Role.PRODUCER: frozenset({Permission.ENQUEUE, Permission.READ_TASK, Permission.CANCEL_TASK}),
    Role.WORKER: frozenset({Permission.WORK}),
    Role.VIEWER: frozenset({Permission.READ_TASK, Permission.READ_CLUSTER}),
    Role.ADMIN: frozenset(Permission),
}

# Every RPC of the Conveyor services and the permission it needs. A method missing here is
# refused to everyone but admins (see `permission_for`), so a new RPC is closed by default.
RPC_PERMISSIONS: Final[Mapping[str, Permission]] = {
    "EnqueueTasks": Permission.ENQUEUE,
    "EnqueueStream": Permission.ENQUEUE,
    "GetTask": Permission.READ_TASK,
    "CancelTask": Permission.CANCEL_TASK,
    "RegisterWorker": Permission.WORK,
    "LeaseTasks": Permission.WORK,
    "Heartbeat": Permission.WORK,
    "ReportResult": Permission.WORK,
    "ReportResults": Permission.WORK,
    "UnregisterWorker": Permission.WORK,
    "Work": Permission.WORK,
    "ListWorkers": Permission.READ_CLUSTER,
    "GetLeader": Permission.READ_CLUSTER,
    "ExplainTask": Permission.READ_TASK,
    "GetStatus": Permission.READ_CLUSTER,
    "ListTasks": Permission.READ_CLUSTER,
    "RetryTasks": Permission.OPERATE,
    "CancelTasks": Permission.OPERATE,
    "PauseType": Permission.OPERATE,
    "ResumeType": Permission.OPERATE,
}


def permission_for(rpc: str) -> Permission:
    """The permission an RPC needs; OPERATE (admins only) for one not in the table."""
    return RPC_PERMISSIONS.get(rpc, Permission.OPERATE)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request, as established by their token.

    Attributes:
        name: The principal the token belongs to; what audit records and worker bindings use.
        role: The token's role.
        token_id: The public id of the token used (empty when authentication is off).
        task_types: The task types a worker token is limited to; None for any.
    """

    name: str
    role: Role
    token_id: str = ""
    task_types: frozenset[str] | None = None

    @property
    def actor(self) -> str:
        """How history and the audit log name this principal: "name (token id)"."""
        return f"{self.name} (token {self.token_id})" if self.token_id else self.name

    def may(self, permission: Permission) -> bool:
        """Whether the role grants `permission`."""
        return permission in ROLE_PERMISSIONS[self.role]

    def require(self, permission: Permission, action: str) -> None:
        """Raise PermissionDenied unless the role grants `permission`."""
        if not self.may(permission):
            raise PermissionDenied(
                f"{action} needs the {permission.value} permission, which the "
                f"{self.role.value} role of {self.name!r} does not have"
            )

    def require_task_types(self, task_types: Iterable[str]) -> None:
        """Raise PermissionDenied if any of `task_types` is outside the token's list."""
        if self.task_types is None:
            return
        outside = sorted(set(task_types) - self.task_types)
        if outside:
            raise PermissionDenied(
                f"the token of {self.name!r} may not work on task types {', '.join(outside)} "
                f"(allowed: {', '.join(sorted(self.task_types))})"
            )


# The caller when authentication is off: a local development server trusts its loopback.
ANONYMOUS: Final = Principal(name="anonymous", role=Role.ADMIN)


def digest(token: str) -> str:
    """The hex SHA-256 of a token: what the tokens file stores."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One accepted token, as the tokens file describes it (never the token itself)."""

    token_id: str
    name: str
    role: Role
    sha256: str
    expires_at: datetime | None = None
    task_types: frozenset[str] | None = None

    def principal(self) -> Principal:
        """The principal a request with this token acts as."""
        return Principal(self.name, self.role, self.token_id, self.task_types)

    def as_toml(self) -> str:
        """The entry as a `[[token]]` table for the tokens file."""
        lines = [
            "[[token]]",
            f'id = "{self.token_id}"',
            f'name = "{self.name}"',
            f'role = "{self.role.value}"',
            f'sha256 = "{self.sha256}"',
        ]
        if self.expires_at is not None:
            # In UTC, whatever offset the file gave: formatting the local time and appending
            # Z moved an expiry by its offset each time the file was rewritten (a revoke).
            expires_utc = self.expires_at.astimezone(UTC)
            lines.append(f"expires = {expires_utc.strftime('%Y-%m-%dT%H:%M:%SZ')}")
        if self.task_types is not None:
            types = ", ".join(f'"{task_type}"' for task_type in sorted(self.task_types))
            lines.append(f"task_types = [{types}]")
        return "\n".join(lines) + "\n"


def new_token(
    name: str,
    role: Role,
    *,
    expires_at: datetime | None = None,
    task_types: Iterable[str] | None = None,
) -> tuple[str, TokenEntry]:
    """A fresh token and the entry that accepts it. The token is shown once, never stored."""
    _check_name(name)
    types = _check_task_types(task_types, role) if task_types is not None else None
    token_id = secrets.token_hex(4)
    token = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    entry = TokenEntry(token_id, name, role, digest(token), expires_at, types)
    return token, entry


class TokenRegistry:
    """The set of accepted tokens, by id."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        """Index the entries; two entries with one id are a configuration error."""
        self._entries: dict[str, TokenEntry] = {}
        for entry in entries:
            if entry.token_id in self._entries:
                raise ConfigError(f"token id {entry.token_id} appears twice")
            self._entries[entry.token_id] = entry

    def __len__(self) -> int:
        """How many tokens are accepted."""
        return len(self._entries)

    def entries(self) -> list[TokenEntry]:
        """The accepted tokens' entries, in file order."""
        return list(self._entries.values())

    def entry(self, token_id: str) -> TokenEntry | None:
        """The entry with this public id, if any (for sessions that refer to a token by id)."""
        return self._entries.get(token_id)

    @classmethod
    def from_toml(cls, text: str, source: str = "tokens") -> TokenRegistry:
        """Parse a tokens file (see docs/security.md for its format)."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        unknown = set(document) - {"token"}
        if unknown:
            raise ConfigError(f"{source}: unknown keys {', '.join(sorted(unknown))}")
        tables = document.get("token", [])
        if not isinstance(tables, list):
            raise ConfigError(f"{source}: 'token' must be an array of tables ([[token]])")
        return cls(
            _entry_from_table(table, f"{source}, token {n}") for n, table in enumerate(tables, 1)
        )

    def authenticate(self, token: str | None, *, now: datetime | None = None) -> Principal:
        """The principal `token` belongs to, or Unauthenticated.

        The messages say what is wrong without echoing the token or confirming which ids
        exist: an unknown id and a wrong secret read the same.
        """
        if not token:
            raise Unauthenticated("no token: send 'authorization: Bearer <token>'")
        match = TOKEN_PATTERN.fullmatch(token)
        entry = self._entries.get(match.group(1)) if match else None
        # Compare even when the id is unknown, so both failures take the same time.
        expected = entry.sha256 if entry is not None else _NO_DIGEST
        if not hmac.compare_digest(digest(token), expected) or entry is None:
            raise Unauthenticated("the token is not valid")
        if entry.expires_at is not None and (now or datetime.now(UTC)) >= entry.expires_at:
            raise Unauthenticated(
                f"token {entry.token_id} expired at "
                f"{entry.expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
            )
        return entry.principal()


_NO_DIGEST: Final = "0" * 64


class TokenFile:
    """A TokenRegistry read from a file and read again when the file changes.

    Rotation needs no restart: edit the file (or replace it, as a Kubernetes secret mount
    does) and the new set is live within `check_interval` seconds. A file that fails to parse
    keeps the previous set in force and reports the error through `on_error`: a typo must
    not lock every client out.
    """

    def __init__(
        self,
        path: Path,
        *,
        on_error: Callable[[ConfigError], None] | None = None,
        check_interval: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Read the file now; a missing or invalid file at start-up is a ConfigError."""
        self.path = path
        self._on_error = on_error
        self._check_interval = check_interval
        self._clock = clock
        self._signature = self._stat()
        self.registry = self._read()
        self._checked_at = clock()
        # Why the file's current contents are not in force, if they are not.
        self.last_error: ConfigError | None = None

    def _stat(self) -> tuple[int, int, int]:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read the tokens file {self.path}: {exc.strerror}") from None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read(self) -> TokenRegistry:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the tokens file {self.path}: {exc}") from None
        return TokenRegistry.from_toml(text, str(self.path))

    def current(self) -> TokenRegistry:
        """The registry, re-read first if the file changed since the last look."""
        now = self._clock()
        if now - self._checked_at < self._check_interval:
            return self.registry
        self._checked_at = now
        try:
            signature = self._stat()
            if signature != self._signature:
                self.registry = self._read()
                self._signature = signature
                self.last_error = None
        except ConfigError as exc:
            self.last_error = exc
            if self._on_error is not None:
                self._on_error(exc)
        return self.registry

    def authenticate(self, token: str | None) -> Principal:
        """Authenticate against the current contents of the file."""
        return self.current().authenticate(token)


class FixedTokens:
    """A TokenRegistry that never changes: tokens given in the environment (CONVEYOR_TOKENS).

    Same interface as TokenFile. Rotating such tokens means restarting the servers one at a
    time, which is why a file is the better home for them.
    """

    last_error: ConfigError | None = None

    def __init__(self, registry: TokenRegistry) -> None:
        """Serve `registry` for ever."""
        self.registry = registry

    def current(self) -> TokenRegistry:
        """The registry."""
        return self.registry

    def authenticate(self, token: str | None) -> Principal:
        """Authenticate against the fixed set."""
        return self.registry.authenticate(token)


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (localhost, 127.0.0.0/8, ::1).

    The line between "nothing needed" and "TLS and tokens required", for servers and for
    clients about to send a token.
    """
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def bearer_token(value: str | None) -> str | None:
    """The token in an `authorization` value ("Bearer <token>"), or None."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"token name must be 1-64 characters of letters, digits and _.:@-, got {name!r}"
        )


def _check_task_types(task_types: Iterable[str], role: Role) -> frozenset[str]:
    if role is not Role.WORKER:
        raise ConfigError("only worker tokens can be limited to task types")
    types = frozenset(task_types)
    if not types:
        raise ConfigError("task_types, when given, must name at least one type")
    bad = sorted(t for t in types if not TASK_TYPE_PATTERN.fullmatch(t))
    if bad:
        raise ConfigError(f"invalid task types: {', '.join(map(repr, bad))}")
    return types


def _entry_from_table(table: Any, where: str) -> TokenEntry:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(table) - {"id", "name", "role", "sha256", "expires", "task_types"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    for key in ("id", "name", "role", "sha256"):
        if not isinstance(table.get(key), str):
            raise ConfigError(f"{where}: '{key}' is required and must be a string")
    token_id, name, sha256 = table["id"], table["name"], table["sha256"].lower()
    if not re.fullmatch(r"[0-9a-f]{8}", token_id):
        raise ConfigError(f"{where}: 'id' must be 8 hex characters")
    _check_name(name)
    try:
        role = Role(table["role"])
    except ValueError:
        roles = ", ".join(role.value for role in Role)
        raise ConfigError(f"{where}: 'role' must be one of {roles}") from None
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ConfigError(f"{where}: 'sha256' must be 64 hex characters")
    return TokenEntry(
        token_id, name, role, sha256, _expiry(table, where), _limited_types(table, role, where)
    )


def _expiry(table: dict[str, Any], where: str) -> datetime | None:
    expires = table.get("expires")
    if expires is None:
        return None
    if not isinstance(expires, datetime):
        raise ConfigError(f"{where}: 'expires' must be a TOML date-time (2027-01-31T00:00:00Z)")
    return expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)


def _limited_types(table: dict[str, Any], role: Role, where: str) -> frozenset[str] | None:
    task_types = table.get("task_types")
    if task_types is None:
        return None
    if not isinstance(task_types, list) or not all(isinstance(t, str) for t in task_types):
        raise ConfigError(f"{where}: 'task_types' must be a list of strings")
    try:
        return _check_task_types(task_types, role)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
