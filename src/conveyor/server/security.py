"""The server's gate and TLS material: who is calling, whether they may, what to listen with.

`Gate.admit` runs first in every RPC (from `rpc.rpc_method`): it reads the bearer token from
the call's `authorization` metadata, authenticates it against the tokens file, and checks the
role against the RPC's permission (`conveyor.auth.RPC_PERMISSIONS`). The principal it returns
is the *caller* for the rest of the call (`caller()`), which is how the worker service binds
worker ids to principals and how history records who acted. With no tokens file the gate is
open and every caller is `ANONYMOUS` (an admin): that is a loopback development server, or
one its operator started with --insecure.
"""

from __future__ import annotations

import logging
import ssl
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final

import grpc

from conveyor.auth import ANONYMOUS, Principal, TokenFile, bearer_token, permission_for
from conveyor.errors import ConfigError, PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig

log = logging.getLogger("conveyor.server.security")

AUTHORIZATION: Final = "authorization"

_CALLER: ContextVar[Principal] = ContextVar("conveyor_caller", default=ANONYMOUS)


def caller() -> Principal:
    """The principal of the RPC being served (ANONYMOUS when authentication is off)."""
    return _CALLER.get()


class Gate:
    """Authentication and role checks for RPCs (and, through `authenticate`, the dashboard)."""

    def __init__(self, tokens: TokenFile | None, metrics: ServerMetrics | None = None) -> None:
        """`tokens` None: the gate is open."""
        self.tokens = tokens
        self._metrics = metrics

    @classmethod
    def from_config(cls, config: ServerConfig, metrics: ServerMetrics | None = None) -> Gate:
        """The gate a server's configuration asks for (reads the tokens file now)."""
        if config.tokens_file is None:
            return cls(None, metrics)

        def report(error: ConfigError) -> None:
            log.error(
                "the tokens file changed but cannot be used; the previous tokens stay valid: %s",
                error.message,
                extra={"event": "tokens_reload_failed"},
            )

        tokens = TokenFile(
            config.tokens_file,
            on_error=report,
            check_interval=config.tokens_check_interval.total_seconds(),
        )
        return cls(tokens, metrics)

    @property
    def enabled(self) -> bool:
        """Whether callers must present a token."""
        return self.tokens is not None

    def authenticate(self, token: str | None) -> Principal:
        """The principal of a token; Unauthenticated if the server does not accept it."""
        if self.tokens is None:
            return ANONYMOUS
        try:
            return self.tokens.authenticate(token)
        except Unauthenticated:
            self._count("unauthenticated")
            raise

    def admit(self, rpc: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """Authenticate an RPC's caller and check their role may call it."""
        if self.tokens is None:
            return ANONYMOUS
        token = None
        for key, value in metadata or ():
            if key == AUTHORIZATION and isinstance(value, str):
                token = bearer_token(value)
                break
        principal = self.authenticate(token)
        try:
            principal.require(permission_for(rpc), rpc)
        except PermissionDenied:
            self._count("permission_denied")
            raise
        return principal

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.auth_refusals.labels(reason).inc()


# A servicer's gate until the server installs the configured one: nobody is asked for a token.
OPEN_GATE: Final = Gate(None)


def enter_call(principal: Principal) -> object:
    """Make `principal` the caller for the current task; returns a token for `leave_call`."""
    return _CALLER.set(principal)


def leave_call(token: object) -> None:
    """Undo `enter_call`."""
    _CALLER.reset(token)  # type: ignore[arg-type]


def grpc_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plain text."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    key, chain = _read(config.tls_key_file), _read(config.tls_cert_file)
    client_ca = _read(config.tls_client_ca_file) if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def http_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context for the HTTP ports, or None for plain text."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from None
    return context


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
