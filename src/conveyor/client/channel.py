"""Server addresses, gRPC channel options and the retry loop, shared by clients and workers.

A client or worker takes one address or several ("host1:50051,host2:50051"). Calls go to
the current address; a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED) moves to the next
one and retries after an exponential backoff with full jitter, so a fleet reconnecting
after a server restart spreads out instead of arriving at once. Each address has a circuit
breaker: an address that keeps failing is skipped until its probe time, and when every
address is open the loop waits for the first probe if the retry budget allows, else fails
fast with CircuitOpen.

`Credentials` is how a client or worker proves who it is and checks who it talks to: a
bearer token sent with every call, and TLS (the server's certificate checked against a CA,
optionally a client certificate for mutual TLS). Both come from arguments or, when those
are not given, from the CONVEYOR_TOKEN / CONVEYOR_TOKEN_FILE and CONVEYOR_TLS* environment
variables, so the CLI and a deployed application need no code for it.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Protocol, overload

import grpc
import grpc.aio

from conveyor import __version__
from conveyor.auth import TOKEN_PATTERN, is_loopback
from conveyor.breaker import BreakerPolicy, CircuitBreaker, Permit
from conveyor.errors import (
    CircuitOpen,
    ConfigError,
    ConveyorError,
    ServerUnavailable,
    Unauthenticated,
)
from conveyor.protocol.limits import LONGEST_CALL_TIMEOUT, MAX_PORT, PEER_MESSAGE_BYTES
from conveyor.protocol.status import (
    TRANSIENT_CODES,
    blamed_by,
    error_from_status,
    is_backpressure,
    retry_hint,
)
from conveyor.types import as_duration, utf8_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

DEFAULT_SERVER: Final = "localhost:50051"
SERVER_ENV: Final = "CONVEYOR_SERVER"
TOKEN_ENV: Final = "CONVEYOR_TOKEN"  # noqa: S105 - a variable's name, not a secret
TOKEN_FILE_ENV: Final = "CONVEYOR_TOKEN_FILE"  # noqa: S105 - likewise
# "1" (or "true"): TLS with the system's trusted roots; a CA file implies TLS too.
TLS_ENV: Final = "CONVEYOR_TLS"
TLS_CA_ENV: Final = "CONVEYOR_TLS_CA"
TLS_CERT_ENV: Final = "CONVEYOR_TLS_CERT"
TLS_KEY_ENV: Final = "CONVEYOR_TLS_KEY"
TLS_SERVER_NAME_ENV: Final = "CONVEYOR_TLS_SERVER_NAME"
INSECURE_ENV: Final = "CONVEYOR_INSECURE"
MESSAGE_BYTES: Final = PEER_MESSAGE_BYTES
# The least deadline any call (or request on a stream) is given, even when its retry budget
# is nearly spent: enough for an answer from a server that is up.
MIN_CALL_TIMEOUT: Final = 0.05

# Every channel to a server, a producer client's as a worker's, pings it after 10 s without
# hearing from it and gives the connection up when a ping is not answered within 5 s: a
# connection that died silently (a black hole, a NAT entry or a load balancer forgetting it)
# fails the calls on it within 15 s, and they go to the next server. Servers accept pings
# every 5 s, and pings go on while no call is open or a stream carries no data. The wait
# for the answer is gRPC's ping timeout (a minute by default), which recent gRPC applies to
# keepalive pings instead of their own timeout: both are set. (A producer's used to ping
# after 20 s and set only the keepalive timeout: an enqueue on a dead connection hung until
# its deadline.)
KEEPALIVE_OPTIONS: Final = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)
CHANNEL_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
    # Reconnect quickly after a server restart; our own retry loop adds the jitter.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
]


# The words click takes for a boolean flag (the server's CONVEYOR_INSECURE is one).
_TRUE_WORDS: Final = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE_WORDS: Final = frozenset({"", "0", "false", "f", "no", "n", "off"})


def env_flag(name: str) -> bool:
    """A yes/no environment variable; ConfigError for any other value.

    Anything but a yes used to read as no: CONVEYOR_TLS=required talked plain text.
    """
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={raw!r}: expected 1, true, yes or on (or 0, false, no, off)")


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsConfig:
    """TLS towards the servers.

    Attributes:
        ca_file: PEM file of the CA that signed the servers' certificates; None trusts the
            system's roots.
        cert_file: This client's certificate chain (PEM), for servers that require mutual TLS.
        key_file: The key of `cert_file`.
        server_name: The name to expect in the server's certificate when it differs from the
            address dialled (connecting by IP address, or through a tunnel).
    """

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        """Paths are paths, a name is text; a client certificate needs its key, and back."""
        # Checked here, not at the first call: a number given as a path was a TypeError
        # from inside pathlib there, and a number as the name an AttributeError at once.
        for field in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str | os.PathLike):
                raise ConfigError(
                    f"TlsConfig.{field} must be a path (str or Path), got {type(value).__name__}"
                )
        if self.server_name is not None and not isinstance(self.server_name, str):
            raise ConfigError(
                f"TlsConfig.server_name must be a str, got {type(self.server_name).__name__}"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a TLS client certificate needs its key (cert_file and key_file)")
        if self.server_name is not None:
            utf8_text(self.server_name, f"the TLS server name ({TLS_SERVER_NAME_ENV})")

    @classmethod
    def from_env(cls) -> TlsConfig | None:
        """The TLS settings in CONVEYOR_TLS*, or None if they ask for none."""
        ca, cert, key = (os.environ.get(n) or None for n in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV))
        wanted = env_flag(TLS_ENV)
        if not (wanted or ca or cert or key):
            return None
        return cls(
            ca_file=ca,
            cert_file=cert,
            key_file=key,
            server_name=os.environ.get(TLS_SERVER_NAME_ENV) or None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The gRPC credentials these settings describe (files are read now)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_file, "TLS CA"),
            private_key=_read_pem(self.key_file, "TLS key"),
            certificate_chain=_read_pem(self.cert_file, "TLS certificate"),
        )


def _read_file(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    # gRPC takes any bytes here, logs its own complaint on every connection attempt, and
    # the calls fail as unreachable until their whole retry budget is spent.
    content = _read_file(path, what)
    if content is not None and b"-----BEGIN " not in content:
        raise ConfigError(f"the {what} {path} is not in PEM format (no '-----BEGIN' line)")
    return content


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client or worker presents to the servers, and how it checks them.

    Build with `Credentials.resolve`, which falls back on the environment.
    """

    token: str | None = None
    tls: TlsConfig | None = None
    # Send the token in clear text to other machines anyway (CONVEYOR_INSECURE=1): a network
    # that is trusted, or encrypted by something else (a service mesh).
    insecure: bool = False

    def __repr__(self) -> str:
        """The credentials without the token's secret."""
        # Never the secret: a worker's credentials are public (`worker.credentials`), and a
        # debug print, a log line or an error reporter capturing locals would leak it. The
        # token's id (`cvy_<id>_...`) is enough to tell which token it is.
        match = TOKEN_PATTERN.fullmatch(self.token or "")
        token = (
            "None" if self.token is None else f"'cvy_{match.group(1)}_...'" if match else "'...'"
        )
        return f"Credentials(token={token}, tls={self.tls!r}, insecure={self.insecure})"

    @classmethod
    def resolve(cls, token: str | None = None, tls: TlsConfig | bool | None = None) -> Credentials:
        """Arguments first, then CONVEYOR_TOKEN, CONVEYOR_TOKEN_FILE and CONVEYOR_TLS*.

        `tls=False` turns TLS off whatever the environment says; `tls=True` uses the
        system's trusted roots.
        """
        if token is not None and not isinstance(token, str):
            raise ConfigError(f"the token must be a string, not {type(token).__name__}")
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        token_from_file = token is None and bool(os.environ.get(TOKEN_FILE_ENV))
        if token_from_file:
            content = _read_file(os.environ[TOKEN_FILE_ENV], "token file") or b""
            token = content.decode(errors="replace")
        if token is not None:
            token = token.strip()
            if not token:
                source = os.environ[TOKEN_FILE_ENV] if token_from_file else None
                raise ConfigError(
                    f"the token file {source!r} is empty" if source else "the token is empty"
                )
            # A header value must be visible ASCII; anything else is a pasting accident.
            if not all(33 <= ord(c) < 127 for c in token):  # noqa: PLR2004
                raise ConfigError("the token must be printable ASCII with no spaces")
        if tls is not None and not isinstance(tls, (TlsConfig, bool)):
            # A string read from the environment ("true") was taken as settings, and every
            # call then failed with an AttributeError.
            raise ConfigError(
                f"tls must be a TlsConfig, True, False or None, got {type(tls).__name__}"
            )
        settings = (
            TlsConfig.from_env() if tls is None else TlsConfig() if tls is True else tls or None
        )
        insecure = env_flag(INSECURE_ENV)
        return cls(token=token, tls=settings, insecure=insecure)

    def check(self, *addresses: str) -> None:
        """ConfigError if these credentials would send a token in clear text to another host."""
        if self.tls is not None or not self.token or self.insecure:
            return
        for address in addresses:
            if not is_loopback(address.rpartition(":")[0]):
                raise ConfigError(
                    f"refusing to send a token in clear text to {address}: configure TLS "
                    f"(tls=..., or {TLS_CA_ENV}/{TLS_ENV}), or set {INSECURE_ENV}=1 if this "
                    "network is trusted"
                )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The metadata every call carries (the bearer token), or None."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def channel_options(
        self, overrides: Sequence[tuple[str, object]] = ()
    ) -> list[tuple[str, object]]:
        """CHANNEL_OPTIONS, `overrides` replacing theirs; with TLS, the expected server name."""
        replaced = {name for name, _ in overrides}
        options: list[tuple[str, object]] = [
            option for option in CHANNEL_OPTIONS if option[0] not in replaced
        ]
        options.extend(overrides)
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options

    @overload
    def open_channel(
        self, address: str, *, aio: Literal[True], options: Sequence[tuple[str, object]] = ()
    ) -> grpc.aio.Channel: ...
    @overload
    def open_channel(
        self, address: str, *, aio: Literal[False], options: Sequence[tuple[str, object]] = ()
    ) -> grpc.Channel: ...
    def open_channel(
        self, address: str, *, aio: bool, options: Sequence[tuple[str, object]] = ()
    ) -> grpc.aio.Channel | grpc.Channel:
        """A channel to `address`, over TLS if configured; `options` replace the defaults'.

        A token is never sent in clear text to another machine unless told so: a client
        that forgot its TLS settings gets a ConfigError here, not a leaked credential. In
        a child forked while its parent held connections, ConfigError (see `_forked`).
        """
        options = self.channel_options(options)
        self.check(address)
        if _forked_from is not None:
            raise ConfigError(FORKED_WITH_CONNECTIONS.format(parent=_forked_from))
        channel: grpc.aio.Channel | grpc.Channel
        if self.tls is None:
            channel = (
                grpc.aio.insecure_channel(address, options=options)
                if aio
                else grpc.insecure_channel(address, options=options)
            )
        else:
            credentials = self.tls.channel_credentials()
            channel = (
                grpc.aio.secure_channel(address, credentials, options=options)
                if aio
                else grpc.secure_channel(address, credentials, options=options)
            )
        _open_channels.add(channel)
        return channel


FORKED_WITH_CONNECTIONS: Final = (
    "this process was forked from process {parent} while that one held gRPC connections "
    "(an open Client, AsyncClient or Worker), and gRPC cannot connect from such a child: "
    "its calls would hang. Start child processes with the 'spawn' or 'forkserver' method, "
    "or open connections only after the fork (in a prefork web server: a client made at "
    "import is fine, but used first in each worker, never in the parent)"
)
# The channels this process opened and still holds (a channel closed and released by its
# client leaves the set when it is collected).
_open_channels: weakref.WeakSet[grpc.aio.Channel | grpc.Channel] = weakref.WeakSet()
# The parent's pid if this process was forked while the parent held channels.
_forked_from: int | None = None


def _forked() -> None:
    """In a forked child: remember whether the parent held connections when it forked.

    gRPC's fork support is off (conveyor/__init__.py), and a child forked while its parent
    had live channels inherits gRPC's state without the threads that run it: a new channel
    in the child never connected, an enqueue waited out its whole retry budget and blamed
    the server, and a unary call hung past its deadline. A parent that never connected
    leaves gRPC idle, and the child's own clients work. (One that closed its clients
    before forking mostly does too, but gRPC winds down on a thread of its own, and a
    fork right after a close could still catch it running: not a way to rely on.)
    """
    global _forked_from  # noqa: PLW0603 - the process's own fact, set once at fork
    if _forked_from is None and len(_open_channels):
        _forked_from = os.getppid()
    if _forked_from is None:
        for client in list(_adoptable):
            client._adopt_if_unused()  # noqa: SLF001 - the clients' own hook, kept off their API


os.register_at_fork(after_in_child=_forked)


class Adoptable(Protocol):
    """A client a forked child may take over if its parent never used it."""

    def _adopt_if_unused(self) -> None:
        """In a forked child, with this thread alone: take the client over if no call began.

        A call that began in the parent may hold locks, its own or Python's (the import
        lock, while grpc imports its channel module), that no thread here would release:
        a child that adopted such a client hung on its first call. Its own locks are made
        anew regardless.
        """


# Clients a forked child may adopt: a prefork web server's master (gunicorn --preload)
# imports the app, which makes its client at import, and forks the workers that call it.
# Only a child of a parent that held no connections (`_forked`): one that did leaves
# gRPC's state unusable in the child, and its clients refuse at once. Weak: a client
# dropped is forgotten.
_adoptable: weakref.WeakSet[Adoptable] = weakref.WeakSet()


def adoptable_after_fork(client: Adoptable) -> None:
    """Let a child forked from this process adopt `client` if it is unused then."""
    _adoptable.add(client)


def parse_addresses(server: str | Sequence[str] | None) -> list[str]:
    """Normalise one address, a comma-separated list, or a sequence; None reads the env."""
    if server is None:
        server = os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    if isinstance(server, str):
        raw = server.split(",")
    elif isinstance(server, (bytes, bytearray)) or not isinstance(server, Iterable):
        raise ConfigError(
            f"server must be HOST:PORT, a comma-separated list of them or a list, got "
            f"{type(server).__name__}"
        )
    else:
        raw = list(server)
    for address in raw:
        if not isinstance(address, str):
            raise ConfigError("every server address must be a str (HOST:PORT)")
        utf8_text(address, f"the server address {address!r}")
    addresses = [address.strip() for address in raw if address.strip()]
    if not addresses:
        raise ConfigError("no server address given")
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()):
            raise ConfigError(f"server address must be HOST:PORT, got {address!r}")
        # gRPC takes the port modulo 65,536: 117587 dialled 52051, someone else's port.
        if not 1 <= int(port) <= MAX_PORT:
            raise ConfigError(f"server address {address!r}: the port must be 1-{MAX_PORT}")
    return addresses


_DEFAULT_CALL_TIMEOUT: Final = timedelta(seconds=10)
_DEFAULT_TOTAL_TIMEOUT: Final = timedelta(seconds=30)
_DEFAULT_BACKOFF_BASE: Final = timedelta(milliseconds=50)
_DEFAULT_BACKOFF_CAP: Final = timedelta(seconds=2)


# init=False: the constructor takes seconds as well as timedeltas, as Task's timeout does,
# and stores timedeltas, so that the attributes keep one type for whoever reads them.
@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """How long to keep retrying transient failures, and how to space the attempts.

    Each duration is a timedelta or a number of seconds (`RetryPolicy(total_timeout=5)`),
    stored as a timedelta; one that is not positive, not finite or too long (a call_timeout
    over an hour, any other over 100 years) raises ConfigError.

    Attributes:
        call_timeout: Deadline of each attempt.
        total_timeout: Give up (ServerUnavailable) once this much time has passed.
        backoff_base: First backoff ceiling; doubles after every failure.
        backoff_cap: Largest backoff ceiling.
    """

    call_timeout: timedelta
    total_timeout: timedelta
    backoff_base: timedelta
    backoff_cap: timedelta

    def __init__(
        self,
        *,
        call_timeout: timedelta | float = _DEFAULT_CALL_TIMEOUT,
        total_timeout: timedelta | float = _DEFAULT_TOTAL_TIMEOUT,
        backoff_base: timedelta | float = _DEFAULT_BACKOFF_BASE,
        backoff_cap: timedelta | float = _DEFAULT_BACKOFF_CAP,
    ) -> None:
        """Take each duration as a timedelta or seconds; ConfigError for an impossible one."""
        object.__setattr__(
            self,
            "call_timeout",
            as_duration(call_timeout, "call_timeout", ConfigError, maximum=LONGEST_CALL_TIMEOUT),
        )
        for name, value in (
            ("total_timeout", total_timeout),
            ("backoff_base", backoff_base),
            ("backoff_cap", backoff_cap),
        ):
            object.__setattr__(self, name, as_duration(value, name, ConfigError))

    def delays(self) -> Iterator[float]:
        """Seconds to sleep before each retry: exponential ceiling, full jitter."""
        ceiling = self.backoff_base.total_seconds()
        cap = self.backoff_cap.total_seconds()
        while True:
            yield random.uniform(0, ceiling)
            ceiling = min(cap, ceiling * 2)


def retry_policy(retry: RetryPolicy | None) -> RetryPolicy:
    """A client's retry policy: `retry`, or the default; ConfigError for anything else."""
    if retry is None:
        return RetryPolicy()
    if not isinstance(retry, RetryPolicy):
        # RetryPolicy(total_timeout=...) takes seconds; the client's argument does not,
        # and a number there failed every call later with an AttributeError.
        raise ConfigError(
            f"retry must be a RetryPolicy (e.g. RetryPolicy(total_timeout=30)), got "
            f"{type(retry).__name__}"
        )
    return retry


class Pick(NamedTuple):
    """Where one call goes: an address, and the permit its breaker let the call through with.

    The call's outcome goes back with both (`AddressRing.record`, `AddressRing.abandon`),
    so that it reaches that address's breaker and, if the call was the probe, settles it.
    """

    address: str
    permit: Permit


class AddressRing:
    """The addresses in rotation, each with its circuit breaker.

    Thread-safe, as the sync Client may be shared by threads: the rotation moves under a
    lock, and `pick` returns the very address whose breaker let the call through. (It used
    to read the rotation again after asking the breaker; another thread's move in between
    sent the call, and its outcome, to another address, and left the first breaker's probe
    in flight for good.)
    """

    def __init__(self, addresses: Sequence[str], breaker: BreakerPolicy | None = None) -> None:
        """Start at a random address so clients spread across servers."""
        if breaker is not None and not isinstance(breaker, BreakerPolicy):
            # Taken as is, it failed with an AttributeError at the first failed call: in
            # an outage, where the caller's handling of ServerUnavailable was due.
            raise ConfigError(f"breaker must be a BreakerPolicy, got {type(breaker).__name__}")
        self.addresses = list(addresses)
        self.breakers = {address: CircuitBreaker(breaker) for address in self.addresses}
        self._index = random.randrange(len(self.addresses))
        self._lock = threading.Lock()
        # The address and status ("CODE: details") of the latest call that reached no
        # server: when every breaker is open, the error says why, not only that they are.
        self.last_failure: tuple[str, str] | None = None

    @property
    def current(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._index]

    def advance(self) -> str:
        """Move to the next address and return it."""
        with self._lock:
            return self._advance()

    def _advance(self) -> str:
        self._index = (self._index + 1) % len(self.addresses)
        return self.addresses[self._index]

    def pick(self, *, probe: bool = True) -> Pick | None:
        """The first address from the current one whose breaker lets a call through.

        `probe=False`: only an address whose breaker is closed (see `CircuitBreaker.allow`).
        """
        with self._lock:
            for _ in self.addresses:
                address = self.addresses[self._index]
                permit = self.breakers[address].allow(probe=probe)
                if permit is not None:
                    return Pick(address, permit)
                self._advance()
        return None

    def next_probe_in(self) -> float:
        """Seconds until some open breaker lets a probe through."""
        return min(breaker.retry_in() for breaker in self.breakers.values())

    def record(self, pick: Pick, *, reachable: bool, cause: str | None = None) -> None:
        """Feed a call's outcome to its address's breaker; move on after a failure.

        `cause`: what the failed call said (its status), kept as `last_failure`.
        """
        address, permit = pick
        breaker = self.breakers[address]
        if reachable:
            breaker.record_success(permit)
            return
        breaker.record_failure(permit)
        with self._lock:
            if cause:
                self.last_failure = (address, cause)
            if address == self.addresses[self._index]:
                self._advance()

    def abandon(self, pick: Pick) -> None:
        """A call ended with no answer because its caller gave up."""
        self.breakers[pick.address].record_abandoned(pick.permit)


def tls_hint(failure: str, *, tls: bool | None) -> str:
    """What to check when a connection failed in a way a TLS mismatch causes ('' if not).

    gRPC names neither side's setting: a client with TLS meeting a server without it, or a
    certificate it cannot verify, reads "Tls handshake failed"; a client without TLS
    meeting a server with it, "Socket closed" (which a server that died mid-call also
    says, hence the "if").
    """
    if "handshake" in failure.lower():
        return (
            " (the TLS handshake failed: the server may not use TLS, or its certificate is "
            f"not signed by the CA this client trusts: {TLS_CA_ENV}, or "
            "tls=TlsConfig(ca_file=...))"
        )
    if tls is False and "Socket closed" in failure:
        return (
            f" (if the server uses TLS: set {TLS_CA_ENV} to the CA that signed its "
            f"certificate, or {TLS_ENV}=1 for one the system trusts; or pass tls=...)"
        )
    return ""


def is_transient(error: grpc.RpcError) -> bool:
    """Whether a failed call may succeed if retried (possibly on another server)."""
    return error.code() in TRANSIENT_CODES


class RetryLoop:
    """The decisions of one call with retries, without the I/O (shared by sync and async).

    Use: `step()` says which address to call or how long to sleep first; report the call's
    outcome with `succeeded` or `failed` (which raises the typed error when giving up).
    """

    def __init__(
        self,
        ring: AddressRing,
        policy: RetryPolicy,
        method: str,
        *,
        clock: Callable[[], float],
        token_sent: bool = True,
        tls: bool | None = None,
    ) -> None:
        """Start the retry budget now; `token_sent`: whether the calls carry a token.

        `tls`: whether the calls use TLS (None: not known), for the hint a connection
        refused at the TLS layer gets.
        """
        self._ring = ring
        self._policy = policy
        self._method = method
        self._token_sent = token_sent
        self._tls = tls
        self._clock = clock
        self._give_up_at = clock() + policy.total_timeout.total_seconds()
        self._delays = policy.delays()
        self._sleep = 0.0

    def step(self) -> tuple[Pick | None, float]:
        """(where to call, 0) to call now, or (None, seconds) to sleep before asking again."""
        if self._sleep > 0:
            delay, self._sleep = self._sleep, 0.0
            return None, delay
        pick = self._ring.pick()
        if pick is not None:
            return pick, 0.0
        wait = self._ring.next_probe_in()
        if self._clock() + wait >= self._give_up_at:
            last = self._ring.last_failure
            raise CircuitOpen(
                f"{self._method}: every server ({', '.join(self._ring.addresses)}) failed "
                f"repeatedly; next probe in {wait:.1f}s"
                + (f"; last failure ({last[0]}): {last[1]}" if last else "")
                + tls_hint(last[1] if last else "", tls=self._tls),
                retry_in=wait,
            )
        return None, max(wait, 0.01)

    def call_timeout(self) -> float:
        """The deadline for the next call: the per-call timeout within the remaining budget."""
        remaining = self._give_up_at - self._clock()
        return min(self._policy.call_timeout.total_seconds(), max(remaining, MIN_CALL_TIMEOUT))

    def succeeded(self, pick: Pick) -> None:
        """The call got an answer."""
        self._ring.record(pick, reachable=True)

    def abandoned(self, pick: Pick) -> None:
        """The call ended with no answer and no error of its own (the caller was cancelled)."""
        self._ring.abandon(pick)

    def failed(self, pick: Pick, error: grpc.RpcError) -> None:
        """Record a failed call; raise the typed error unless it is worth retrying."""
        if is_backpressure(error.code(), error.details()):
            # The server answered "not now" (rate or concurrency limit). It is reachable:
            # record so, or a breaker whose probe this was would stay half open for good.
            # Then wait and ask again while the budget lasts: at least as long as the
            # server said its limit needs (a retry sooner is refused for certain, and
            # costs the server another refusal), plus the jittered backoff, so that
            # callers refused together do not all come back at the same moment.
            self._ring.record(pick, reachable=True)
            delay = retry_hint(error.details()) + next(self._delays)
            if self._clock() + delay >= self._give_up_at:
                raise translate(error, method=self._method, token_sent=self._token_sent)
            self._sleep = delay
            return
        if not is_transient(error):
            self._ring.record(pick, reachable=True)  # the server answered
            raise translate(error, method=self._method, token_sent=self._token_sent)
        self._ring.record(pick, reachable=False, cause=f"{error.code().name}: {error.details()}")
        delay = next(self._delays)
        if self._clock() + delay >= self._give_up_at:
            raise ServerUnavailable(
                f"no Conveyor server answered {self._method} within "
                f"{self._policy.total_timeout.total_seconds():g}s "
                f"(tried {', '.join(self._ring.addresses)}): "
                f"{error.details()}" + tls_hint(error.details() or "", tls=self._tls)
            ) from None
        self._sleep = delay


# The server's "no token" is worded for whoever calls it, raw gRPC included ("send
# 'authorization: Bearer <token>'"); a client that sent none tells its user where it
# looks for one.
NO_TOKEN: Final = (
    f"no token: the server requires one; set {TOKEN_ENV} to the token, or "
    f"{TOKEN_FILE_ENV} to a file that holds it (or pass token=... in code)"
)


# What grpc answers for a method the server does not register: from a Conveyor server, one
# of a release older than this client's.
GRPC_METHOD_NOT_FOUND: Final = "Method not found!"


def translate(
    error: grpc.RpcError, *, method: str | None = None, token_sent: bool = True
) -> ConveyorError:
    """The typed Conveyor error for a failed call of `method` (which carried a token or not)."""
    code, details = error.code(), error.details()
    if code is grpc.StatusCode.UNAUTHENTICATED and not token_sent:
        return Unauthenticated(NO_TOKEN)
    if code is grpc.StatusCode.UNIMPLEMENTED and details == GRPC_METHOD_NOT_FOUND and method:
        # Still a plain ConveyorError whose message starts with the code, as documented
        # for unexpected statuses; the rest says what to do about it.
        return ConveyorError(
            f"UNIMPLEMENTED: the server has no {method} call: it is probably older than "
            f"this client (conveyor {__version__}); upgrade the server (it said: {details})"
        )
    return error_from_status(code, details, blamed_by(error))
