"""The server's gate and TLS material: who is calling, whether they may, what to listen with.

`Gate.admit` runs first in every RPC (from `rpc.rpc_method`): it reads the bearer token from
the call's `authorization` metadata, authenticates it against the tokens file, and checks the
role against the RPC's permission (`conveyor.auth.RPC_PERMISSIONS`). The principal it returns
is the *caller* for the rest of the call (`caller()`), which is how the worker service binds
worker ids to principals and how history records who acted. With no tokens file the gate is
open and every caller is `ANONYMOUS` (an admin): that is a loopback development server, or
one its operator started with --insecure.

The gate also meters requests when authentication is on: each token has a token bucket per
server process, and a producer or operator call that finds it empty is refused with
RESOURCE_EXHAUSTED (clients wait and retry within their budget). Worker calls are not metered:
their rate is set by the protocol itself (one long poll, a heartbeat every few seconds,
batched reports), and refusing a heartbeat would cost a worker its leases. A producer's
enqueue stream is metered per request, not per stream; how many streams a token holds
open is capped by the task service (`max_enqueue_streams_per_token`).
"""

from __future__ import annotations

import logging
import ssl
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final

import grpc

from conveyor.auth import (
    ANONYMOUS,
    FixedTokens,
    Permission,
    Principal,
    TokenFile,
    TokenRegistry,
    bearer_token,
    permission_for,
)
from conveyor.errors import ConfigError, LimitExceeded, PermissionDenied, Unauthenticated
from conveyor.protocol.status import rate_limit_refusal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig

log = logging.getLogger("conveyor.server.security")

AUTHORIZATION: Final = "authorization"

# Streams whose requests are each admitted, and metered, as the call they stand for
# (server/enqueue_stream.py): opening one takes nothing from the bucket (the open streams
# themselves are capped per token: max_enqueue_streams_per_token).
METERED_PER_REQUEST: Final = frozenset({"EnqueueStream"})

_CALLER: ContextVar[Principal] = ContextVar("conveyor_caller", default=ANONYMOUS)


def caller() -> Principal:
    """The principal of the RPC being served (ANONYMOUS when authentication is off)."""
    return _CALLER.get()


class RateLimiter:
    """One token bucket per key: `rate` requests a second on average, bursts up to `burst`."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Buckets start full."""
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Spend one request; 0.0 if allowed, else the seconds until one would be."""
        now = self._clock()
        level, then = self._buckets.get(key, (self.burst, now))
        level = min(self.burst, level + (now - then) * self.rate)
        if level < 1:
            self._buckets[key] = (level, now)
            return (1 - level) / self.rate
        self._buckets[key] = (level - 1, now)
        return 0.0


class Gate:
    """Authentication, role checks and request metering for RPCs (and the dashboard's login)."""

    def __init__(
        self,
        tokens: TokenFile | FixedTokens | None,
        metrics: ServerMetrics | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        """`tokens` None: nobody is asked for a token. `limiter` None: no metering."""
        self.tokens = tokens
        self._metrics = metrics
        self._limiter = limiter
        self._log_limiter = RateLimiter(rate=0.1, burst=5)

    @classmethod
    def from_config(cls, config: ServerConfig, metrics: ServerMetrics | None = None) -> Gate:
        """The gate a server's configuration asks for (reads the tokens file now)."""
        # Metered per token, so only with tokens: without them every caller would share
        # one bucket, and one busy script would starve every other application.
        limiter = (
            RateLimiter(config.rate_limit, config.rate_burst)
            if config.rate_limit is not None and config.authentication
            else None
        )
        if config.tokens_toml is not None:
            registry = TokenRegistry.from_toml(config.tokens_toml, "CONVEYOR_TOKENS")
            return cls(FixedTokens(registry), metrics, limiter)
        if config.tokens_file is None:
            return cls(None, metrics, limiter)

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
        if metrics is not None:
            metrics.tokens_file_stale.set_function(lambda: float(tokens.last_error is not None))
        return cls(tokens, metrics, limiter)

    @property
    def enabled(self) -> bool:
        """Whether RPCs must pass through `admit` (tokens asked for, or requests metered)."""
        return self.tokens is not None or self._limiter is not None

    @property
    def authenticating(self) -> bool:
        """Whether callers must present a token."""
        return self.tokens is not None

    def authenticate(self, token: str | None) -> Principal:
        """The principal of a token; Unauthenticated if the server does not accept it."""
        if self.tokens is None:
            return ANONYMOUS
        try:
            return self.tokens.authenticate(token)
        except Unauthenticated as exc:
            # Debug only: anyone can send these, and each would otherwise be a log line.
            log.debug("refused a caller: %s", exc.message, extra={"event": "unauthenticated"})
            self._count("unauthenticated")
            raise

    def admit(
        self, rpc: str, metadata: Callable[[], Iterable[tuple[str, str | bytes]] | None]
    ) -> Principal:
        """Authenticate an RPC's caller, check their role may call it, and meter the call."""
        permission = permission_for(rpc)
        principal = ANONYMOUS
        if self.tokens is not None:
            principal = self.identify(metadata)
            try:
                principal.require(permission, rpc)
            except PermissionDenied as exc:
                self.note_denied(rpc, exc, principal)
                raise
        if (
            self._limiter is not None
            and permission is not Permission.WORK
            and rpc not in METERED_PER_REQUEST
        ):
            wait = self._limiter.take(principal.token_id or principal.name)
            if wait:
                if self._metrics is not None:
                    self._metrics.limit_refusals.labels("request_rate").inc()
                raise LimitExceeded(
                    rate_limit_refusal(f"of {self._limiter.rate:g}/s for {_who(principal)}", wait),
                    retry_in=wait,
                )
        return principal

    def identify(
        self, metadata: Callable[[], Iterable[tuple[str, str | bytes]] | None]
    ) -> Principal:
        """The principal of the call's bearer token; Unauthenticated if it has none valid."""
        token = None
        # Read only when asked: without tokens, no call pays for copying its metadata.
        for key, value in metadata() or ():
            if key == AUTHORIZATION and isinstance(value, str):
                token = bearer_token(value)
                break
        return self.authenticate(token)

    def note_denied(self, rpc: str, refusal: PermissionDenied, principal: Principal) -> None:
        """Count and log a PermissionDenied, whatever refused it (role, task types, worker).

        A valid token used beyond its rights is a misconfiguration or a probe, worth a line;
        at most a few a minute per token, so that no token holder can flood the log.
        """
        self._count("permission_denied")
        if self._log_limiter.take(principal.token_id or principal.name) == 0.0:
            log.warning(
                "%s refused %s: %s",
                rpc,
                principal.actor,
                refusal.message,
                extra={"event": "permission_denied", "token_id": principal.token_id},
            )

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.auth_refusals.labels(reason).inc()


# A servicer's gate until the server installs the configured one: nobody is asked for a token.
OPEN_GATE: Final = Gate(None)


def _who(principal: Principal) -> str:
    if principal.token_id:
        return f"token {principal.token_id} ({principal.name})"
    return "anonymous callers"


def enter_call(principal: Principal) -> object:
    """Make `principal` the caller for the current task; returns a token for `leave_call`."""
    return _CALLER.set(principal)


def leave_call(token: object) -> None:
    """Undo `enter_call`."""
    _CALLER.reset(token)  # type: ignore[arg-type]


def tls_material(
    config: ServerConfig,
) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
    """The gRPC credentials and the HTTP TLS context, or (None, None) for plain text.

    The HTTP context is built first: gRPC takes any bytes and fails later with "Failed to
    bind to address", while Python's ssl module says what is wrong with the files.
    """
    context = http_ssl_context(config)
    return (grpc_credentials(config) if context is not None else None), context


def grpc_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plain text (see `tls_material`)."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    if config.tls_client_ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(config.tls_client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the client CA {config.tls_client_ca_file}: {exc}"
            ) from None
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
