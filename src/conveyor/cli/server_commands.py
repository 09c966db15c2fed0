"""`conveyor server`, `conveyor migrate` and `conveyor dev`: running the server side."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg
import click

from conveyor import event_loop
from conveyor.auth import is_loopback
from conveyor.cli.database_option import (
    EMBEDDED_DATA_DIR,
    database_url_option,
    embedded_postgres,
    resolve_database,
    start_embedded,
)
from conveyor.cli.gc_policy import tune_for_long_running_process
from conveyor.cli.params import BoundedFloat
from conveyor.cli.stop_signals import (
    StopSignal,
    ignore_stop_signals,
    raise_on_stop_signals,
    stop_signals_taken,
)
from conveyor.errors import ConfigError
from conveyor.logs import LOG_FORMAT_KEY
from conveyor.monitoring.http import HttpLimits
from conveyor.server.app import ConveyorServer
from conveyor.server.config import (
    DEFAULT_ENQUEUE_STREAM_IDLE,
    DEFAULT_GRPC_LISTEN,
    DEFAULT_HTTP_LISTEN,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_ENQUEUE_STREAMS_PER_TOKEN,
    DEFAULT_MAX_LEASE_BATCH,
    DEFAULT_MAX_LEASE_WAIT,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_RATE_LIMIT,
    MAX_CONCURRENT_RPCS,
    MAX_PAYLOAD_BYTES_LIMIT,
    ServerConfig,
    check_heartbeat_interval,
    check_worker_lost_after,
    default_server_id,
    default_worker_lost_after,
    split_host_port,
)
from conveyor.server.database import connect_failure, require_own_sessions, writable_target
from conveyor.server.listeners import check_can_listen
from conveyor.storage import migrate
from conveyor.storage.embedded import ClusterInUse
from conveyor.types import LARGEST_DURATION, utf8_text
from conveyor.worker.runtime import MAX_CONCURRENCY

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.storage.embedded import EmbeddedPostgres

log = logging.getLogger("conveyor.cli.server")
# The database URL a server's settings are checked with before the embedded PostgreSQL
# starts (a well-formed URL; never connected to: the cluster's own replaces it).
_EMBEDDED_NOT_STARTED: Final = "postgresql:///conveyor-embedded-not-started"

# How often `_serve` asks its `watch` whether something it depends on has failed.
WATCH_INTERVAL: Final = 0.5


async def _serve(
    config: ServerConfig,
    on_started: Callable[[ConveyorServer], None] | None = None,
    before_stop: Callable[[], None] | None = None,
    *,
    on_second_signal: Callable[[], None] | None = None,
    announce: bool = True,
    watch: Callable[[], str | None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM/SIGHUP, then stop.

    `on_started` and `before_stop` run in a thread (they may block on this loop), one after
    the other: `before_stop` runs to its end before the server stops, so what it stops (the
    dev's demo worker) can still report to the server. `on_second_signal` runs on the loop
    when a second SIGINT/SIGTERM comes while stopping; without it, that signal is ignored.
    `announce=False` skips the one-line banner, for JSON logs: every stderr line must be a
    JSON object there, and the server logs the same facts as a record anyway.
    `watch`, asked every WATCH_INTERVAL seconds once `on_started` has run, returns why
    serving cannot go on (the dev's demo worker crashed): the server then stops without
    `before_stop`, and ConfigError(that reason) is raised.
    """
    server = ConveyorServer(config)
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM that arrives while the server starts (or just after it
    # says it has) must still stop it gracefully, not kill it.
    stop_requested = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
        # A closed terminal may send SIGHUP twice: that is no call to skip the drain.
        elif on_second_signal is not None and sig != signal.SIGHUP:
            on_second_signal()

    for sig in stop_signals_taken():
        loop.add_signal_handler(sig, on_signal, sig)
    failure: str | None = None
    if not await _started_unless_stopped(server, stop_requested):
        log.info(
            "conveyor server %s stopped while starting",
            config.server_id,
            extra={"event": "stopped_while_starting"},
        )
        return
    try:
        if announce:
            click.echo(
                f"Conveyor server {config.server_id}: gRPC on {_host(config.grpc_listen)}:"
                f"{server.grpc_port}"
                + (
                    f", HTTP on {'https' if config.tls else 'http'}://"
                    f"{_host(config.http_listen)}:{server.http_port}/status"
                    if config.http_listen
                    else ""
                ),
                err=True,
            )
        if on_started is not None and not stop_requested.is_set():
            await loop.run_in_executor(None, on_started, server)
        failure = await _until_stop(stop_requested, watch)
        if before_stop is not None and failure is None:
            await loop.run_in_executor(None, before_stop)
    finally:
        # Also when a callback failed: the server stops as it would at a signal.
        await server.stop()
    if failure is not None:
        raise ConfigError(failure)


def _empty_variable_is_no(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """`value`, or False when the flag's variable is set but empty (`CONVEYOR_DASHBOARD=`).

    Click reads an empty variable as unset, so a flag on by default stayed on; a yes/no
    variable here reads empty as no (operations.md), as CONVEYOR_TLS does.
    """
    from_default = ctx.get_parameter_source(param.name or "") is click.core.ParameterSource.DEFAULT
    if from_default and isinstance(param.envvar, str) and os.environ.get(param.envvar) == "":
        return False
    return value


async def _started_unless_stopped(server: ConveyorServer, stop_requested: asyncio.Event) -> bool:
    """Start `server`; False if a stop signal came first, and the start was abandoned.

    A start waits up to its start-up timeout for an unreachable database: the signal that
    an operator (or systemd, or Kubernetes) sends meanwhile stops it at once, with status
    0, as at any other stage; it used to be ignored until the start gave up, exit 1.
    """
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop_requested.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not starting.done():
        # The start closes what it had opened as it unwinds (ConveyorServer.start).
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return False
    starting.result()  # its failure, if it failed
    return True


async def _until_stop(
    stop_requested: asyncio.Event, watch: Callable[[], str | None] | None
) -> str | None:
    """Wait for a stop signal, or for `watch` to say why serving cannot go on (returned)."""
    if watch is None:
        await stop_requested.wait()
        return None
    while not stop_requested.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_requested.wait(), WATCH_INTERVAL)
        failure = None if stop_requested.is_set() else watch()
        if failure is not None:
            return failure
    return None


# The --http-* options' defaults: HttpLimits' own.
_HTTP_DEFAULTS: Final = HttpLimits()


# How long Ctrl-C on `conveyor dev` lets running demo tasks finish before handing them back
# (a worker's default is 30 s): quick enough to restart at once, and nothing is lost, since
# a handed-back task is queued again without spending an attempt.
DEV_DRAIN_TIMEOUT: Final = timedelta(seconds=10)


def _failpoints_from_env() -> frozenset[str]:
    """CONVEYOR_FAILPOINTS=a,b arms test crash points (see conveyor/server/failpoints.py)."""
    raw = os.environ.get("CONVEYOR_FAILPOINTS", "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def _session_secret() -> bytes | None:
    """CONVEYOR_SESSION_SECRET: dashboard sessions valid on every server that shares it."""
    secret = os.environ.get("CONVEYOR_SESSION_SECRET", "")
    # Bytes that are not UTF-8 reach Python as lone surrogates: a traceback, before.
    return utf8_text(secret, "CONVEYOR_SESSION_SECRET").encode() if secret else None


def _host(listen: str | None) -> str:
    return (listen or "").rpartition(":")[0] or "0.0.0.0"  # noqa: S104 - display only


def _stop_embedded(embedded: EmbeddedPostgres | None) -> None:
    # Whatever brought us here, a signal must not stop PostgreSQL's stop half way.
    ignore_stop_signals()
    if embedded is not None:
        with contextlib.suppress(Exception):
            embedded.stop()


def _stopped_while_starting(stop: StopSignal) -> None:
    log.info(
        "received %s while starting: stopped what had started",
        signal.Signals(stop.signum).name,
        extra={"event": "stopped_while_starting"},
    )


@click.command()
@database_url_option
@click.option(
    "--grpc-listen",
    default=DEFAULT_GRPC_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="gRPC address (0.0.0.0:PORT for every interface).",
)
@click.option(
    "--http-listen",
    default=DEFAULT_HTTP_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="HTTP address for /healthz /readyz /status /metrics and the /ui dashboard.",
)
@click.option(
    "--dashboard/--no-dashboard",
    default=True,
    show_default=True,
    envvar="CONVEYOR_DASHBOARD",
    callback=_empty_variable_is_no,
    help="Serve the /ui dashboard on the HTTP address (with a login when --tokens-file is given).",
)
@click.option(
    "--dashboard-allowed-host",
    "dashboard_allowed_hosts",
    multiple=True,
    metavar="NAME",
    envvar="CONVEYOR_DASHBOARD_ALLOWED_HOSTS",
    help="A host name the dashboard may be opened under (repeatable, or several separated by "
    "commas or spaces; IP addresses and "
    "localhost always work). Other names are refused, against DNS rebinding.",
)
@click.option(
    "--migrate",
    "apply_migrations",
    is_flag=True,
    help="Apply pending schema migrations before serving.",
)
@click.option(
    "--lease-ttl",
    type=BoundedFloat(min=1),
    default=30,
    show_default=True,
    help="Seconds a lease lasts without a heartbeat.",
)
@click.option(
    "--retry-backoff-base",
    type=BoundedFloat(min=0.001),
    default=1.0,
    show_default=True,
    help="Seconds before the first retry (doubles each time).",
)
@click.option(
    "--retry-backoff-cap",
    type=BoundedFloat(min=0.001),
    default=300.0,
    show_default=True,
    help="Longest delay between retries, in seconds.",
)
@click.option(
    "--max-payload-bytes",
    # ServerConfig's bound: a larger value is a usage error naming the flag, before any
    # database starts.
    type=click.IntRange(1, MAX_PAYLOAD_BYTES_LIMIT),
    default=DEFAULT_MAX_PAYLOAD_BYTES,
    show_default=True,
    help="Largest payload (and result) accepted.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    help=(
        "Most tasks in one enqueue call. The Python clients split larger batches into calls "
        "of 1,000, so a lower limit refuses their larger enqueue_tasks calls."
    ),
)
@click.option(
    "--max-lease-wait",
    type=BoundedFloat(min=0),
    default=DEFAULT_MAX_LEASE_WAIT.total_seconds(),
    show_default=True,
    help="Longest a worker's long poll may wait on this server, in seconds.",
)
@click.option(
    "--max-lease-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_LEASE_BATCH,
    show_default=True,
    help="Most tasks one long poll leases.",
)
@click.option(
    "--heartbeat-interval",
    type=BoundedFloat(min=0.01),
    default=None,
    help="Seconds between worker heartbeats (default: 3, or lease-ttl / 3 if less); at most "
    "lease-ttl / 2.",
)
@click.option(
    "--worker-lost-after",
    type=BoundedFloat(min=0.01),
    default=None,
    help="Seconds of heartbeat silence before a worker is lost (default: 15, or 5 heartbeat "
    "intervals if more); at least 2 heartbeat intervals.",
)
@click.option(
    "--leader-ttl",
    type=BoundedFloat(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a leader's lease lasts; a dead leader is replaced within it.",
)
@click.option(
    "--reaper-interval",
    type=BoundedFloat(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between lease-reaper and sweeper rounds.",
)
# Retention bounds: every duration is at most LARGEST_DURATION, and 1e9 days (BoundedFloat's
# own bound) overflowed timedelta with a traceback.
@click.option(
    "--retention-days",
    type=BoundedFloat(min=0, max=LARGEST_DURATION / timedelta(days=1)),
    default=7.0,
    show_default=True,
    envvar="CONVEYOR_RETENTION_DAYS",
    help="Delete finished tasks and their history this many days after they finish "
    "(0: keep them forever).",
)
@click.option(
    "--worker-retention-hours",
    type=BoundedFloat(min=0, max=LARGEST_DURATION / timedelta(hours=1)),
    default=24.0,
    show_default=True,
    envvar="CONVEYOR_WORKER_RETENTION_HOURS",
    help="Delete stopped and lost workers this many hours after they were last heard from "
    "(0: keep them forever).",
)
@click.option(
    "--group-commit/--no-group-commit",
    default=True,
    show_default=True,
    help="Let concurrent enqueues share one insert and commit (off only to measure it).",
)
@click.option(
    "--handoff/--no-handoff",
    default=True,
    show_default=True,
    help="Lease new tasks straight to the workers waiting for them (off only to measure it).",
)
@click.option(
    "--work-stream/--no-work-stream",
    default=True,
    show_default=True,
    help="Serve workers one Work stream each (off: they long-poll; to measure or test it).",
)
@click.option(
    "--enqueue-stream/--no-enqueue-stream",
    default=True,
    show_default=True,
    help="Serve clients' enqueues on one stream each (off: a call per enqueue; to measure "
    "or test it).",
)
@click.option(
    "--enqueue-stream-idle",
    type=BoundedFloat(min=0, min_open=True),
    default=DEFAULT_ENQUEUE_STREAM_IDLE.total_seconds(),
    show_default=True,
    metavar="SECONDS",
    help="End a client's enqueue stream after this long without a request (it reopens one "
    "with its next enqueue).",
)
@click.option(
    "--keepalive-interval",
    type=BoundedFloat(min=0, min_open=True),
    default=DEFAULT_KEEPALIVE_INTERVAL.total_seconds(),
    show_default=True,
    metavar="SECONDS",
    help="Ping a client or worker after this long without hearing from it.",
)
@click.option(
    "--keepalive-timeout",
    type=BoundedFloat(min=0, min_open=True),
    default=DEFAULT_KEEPALIVE_TIMEOUT.total_seconds(),
    show_default=True,
    metavar="SECONDS",
    help="Drop a peer's connection (its calls, a worker's Work stream) when a ping is not "
    "answered within this.",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    envvar="CONVEYOR_METRICS_LISTEN",
    help="Serve /metrics on this address instead, without a token (an internal network).",
)
@click.option(
    "--http-max-connections",
    type=click.IntRange(min=1),
    default=_HTTP_DEFAULTS.max_connections,
    show_default=True,
    envvar="CONVEYOR_HTTP_MAX_CONNECTIONS",
    help="Connections open at once on each HTTP address (this one and --metrics-listen). "
    "Past it a new one closes the longest idle one, or is refused (503) when all are busy.",
)
@click.option(
    "--http-request-head-timeout",
    type=BoundedFloat(min=0, min_open=True),
    default=_HTTP_DEFAULTS.request_head_timeout.total_seconds(),
    show_default=True,
    metavar="SECONDS",
    envvar="CONVEYOR_HTTP_REQUEST_HEAD_TIMEOUT",
    help="Close an HTTP connection that has not sent its request line and headers within "
    "this (TLS handshake included).",
)
@click.option(
    "--http-answer-timeout",
    type=BoundedFloat(min=0, min_open=True),
    default=_HTTP_DEFAULTS.answer_timeout.total_seconds(),
    show_default=True,
    metavar="SECONDS",
    envvar="CONVEYOR_HTTP_ANSWER_TIMEOUT",
    help="Close an HTTP connection whose request is not answered within this (its body "
    "read, the answer written to the client).",
)
@click.option(
    "--http-keepalive-timeout",
    type=BoundedFloat(min=0, min_open=True),
    default=_HTTP_DEFAULTS.keepalive_timeout.total_seconds(),
    show_default=True,
    metavar="SECONDS",
    envvar="CONVEYOR_HTTP_KEEPALIVE_TIMEOUT",
    help="Close a kept-alive HTTP connection idle for this long between requests.",
)
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="CONVEYOR_TOKENS_FILE",
    help="Accepted tokens (see `conveyor token create`); callers must present one. "
    "Re-read when it changes.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="CONVEYOR_TLS_CERT",
    help="PEM certificate chain: serve gRPC and HTTP over TLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="CONVEYOR_TLS_KEY",
    help="The private key of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="CONVEYOR_TLS_CLIENT_CA",
    help="Require gRPC clients to present a certificate signed by this CA (mutual TLS).",
)
@click.option(
    "--rate-limit",
    type=BoundedFloat(min=0),
    default=DEFAULT_RATE_LIMIT,
    show_default=True,
    envvar="CONVEYOR_RATE_LIMIT",
    help="Producer and operator requests per second per token, on each server (0: no "
    "limit). Bursts up to twice this.",
)
@click.option(
    "--max-concurrent-rpcs",
    type=click.IntRange(min=1, max=MAX_CONCURRENT_RPCS),
    default=DEFAULT_MAX_CONCURRENT_RPCS,
    show_default=True,
    help="Calls in progress on this server at once (each worker holds one long poll).",
)
@click.option(
    "--max-enqueue-streams-per-token",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_ENQUEUE_STREAMS_PER_TOKEN,
    show_default=True,
    help="With tokens: enqueue streams one token may hold open on this server (0: no cap). "
    "A client refused one enqueues with calls.",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="CONVEYOR_INSECURE",
    help="Serve a non-loopback address without TLS or tokens (a trusted network only).",
)
@click.option(
    "--server-id",
    default=None,
    help="This server's id: 1-200 printable characters (default: host-pid-random).",
)
def server(
    database_url: str | None,
    grpc_listen: str,
    http_listen: str,
    dashboard: bool,
    dashboard_allowed_hosts: tuple[str, ...],
    apply_migrations: bool,
    lease_ttl: float,
    retry_backoff_base: float,
    retry_backoff_cap: float,
    max_payload_bytes: int,
    max_batch: int,
    max_lease_wait: float,
    max_lease_batch: int,
    heartbeat_interval: float | None,
    worker_lost_after: float | None,
    leader_ttl: float,
    reaper_interval: float,
    retention_days: float,
    worker_retention_hours: float,
    group_commit: bool,
    handoff: bool,
    work_stream: bool,
    enqueue_stream: bool,
    enqueue_stream_idle: float,
    keepalive_interval: float,
    keepalive_timeout: float,
    metrics_listen: str | None,
    http_max_connections: int,
    http_request_head_timeout: float,
    http_answer_timeout: float,
    http_keepalive_timeout: float,
    tokens_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    rate_limit: float,
    max_concurrent_rpcs: int,
    max_enqueue_streams_per_token: int,
    insecure: bool,
    server_id: str | None,
) -> None:
    """Run a Conveyor server (gRPC + HTTP) in front of PostgreSQL.

    On a loopback address it needs nothing more. On any other address it refuses to start
    without TLS and tokens (docs/security.md), unless told --insecure.
    """
    # Before the embedded PostgreSQL starts: a stop signal from now on stops it too.
    raise_on_stop_signals()
    # Checked again by ServerConfig, but here in the flags' names, and before any database
    # starts.
    if heartbeat_interval is not None:
        check_heartbeat_interval(
            timedelta(seconds=heartbeat_interval),
            timedelta(seconds=lease_ttl),
            names=("--heartbeat-interval", "--lease-ttl"),
            unit="",
        )
    heartbeat_interval = heartbeat_interval or min(3.0, lease_ttl / 3)
    if worker_lost_after is None:
        worker_lost_after = default_worker_lost_after(
            timedelta(seconds=heartbeat_interval)
        ).total_seconds()
    check_worker_lost_after(
        timedelta(seconds=worker_lost_after),
        timedelta(seconds=heartbeat_interval),
        names=("--worker-lost-after", "--heartbeat-interval"),
        unit="",
    )
    _check_listen(
        ("--grpc-listen", grpc_listen),
        ("--http-listen", http_listen),
        ("--metrics-listen (CONVEYOR_METRICS_LISTEN)", metrics_listen),
    )
    # Every setting is checked before any database starts: an address the server may not
    # listen on without TLS used to be refused only after the embedded PostgreSQL had
    # been chosen and started. The embedded cluster's URL is known once it runs.
    config = ServerConfig(
        database_url=database_url or _EMBEDDED_NOT_STARTED,
        grpc_listen=grpc_listen,
        http_listen=http_listen,
        dashboard=dashboard,
        dashboard_allowed_hosts=frozenset(dashboard_allowed_hosts),
        migrate=apply_migrations,
        lease_ttl=timedelta(seconds=lease_ttl),
        heartbeat_interval=timedelta(seconds=heartbeat_interval),
        retry_backoff_base=timedelta(seconds=retry_backoff_base),
        retry_backoff_cap=timedelta(seconds=max(retry_backoff_cap, retry_backoff_base)),
        max_payload_bytes=max_payload_bytes,
        max_batch=max_batch,
        max_lease_wait=timedelta(seconds=max_lease_wait),
        max_lease_batch=max_lease_batch,
        worker_lost_after=timedelta(seconds=worker_lost_after),
        leader_ttl=timedelta(seconds=leader_ttl),
        leader_retry_interval=timedelta(seconds=min(1.0, leader_ttl / 4)),
        reaper_interval=timedelta(seconds=reaper_interval),
        retention=timedelta(days=retention_days) if retention_days else None,
        worker_retention=(
            timedelta(hours=worker_retention_hours) if worker_retention_hours else None
        ),
        group_commit=group_commit,
        handoff=handoff,
        work_stream=work_stream,
        enqueue_stream=enqueue_stream,
        enqueue_stream_idle=timedelta(seconds=enqueue_stream_idle),
        keepalive_interval=timedelta(seconds=keepalive_interval),
        keepalive_timeout=timedelta(seconds=keepalive_timeout),
        metrics_listen=metrics_listen,
        http_limits=HttpLimits(
            max_connections=http_max_connections,
            request_head_timeout=timedelta(seconds=http_request_head_timeout),
            answer_timeout=timedelta(seconds=http_answer_timeout),
            keepalive_timeout=timedelta(seconds=http_keepalive_timeout),
        ),
        tokens_file=tokens_file,
        tokens_toml=os.environ.get("CONVEYOR_TOKENS") or None,
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        tls_client_ca_file=tls_client_ca,
        insecure=insecure,
        rate_limit=rate_limit or None,
        rate_burst=max(1.0, rate_limit * 2),
        max_concurrent_rpcs=max_concurrent_rpcs,
        max_enqueue_streams_per_token=max_enqueue_streams_per_token or None,
        session_secret=_session_secret(),
        server_id=server_id or default_server_id(),
        failpoints=_failpoints_from_env(),
    )
    embedded: EmbeddedPostgres | None = None
    try:
        url, embedded = resolve_database(database_url, "server")
        # The embedded cluster is private to this machine: keep it migrated.
        config = dataclasses.replace(
            config, database_url=url, migrate=apply_migrations or embedded is not None
        )
        json_logs = click.get_current_context().meta.get(LOG_FORMAT_KEY) == "json"
        tune_for_long_running_process()
        event_loop.run(_serve(config, announce=not json_logs))
    except StopSignal as stop:
        _stopped_while_starting(stop)
    finally:
        _stop_embedded(embedded)


@click.command("migrate")
@database_url_option
@click.option(
    "--lock-timeout",
    type=BoundedFloat(min=0.001, max=migrate.LONGEST_LOCK_TIMEOUT.total_seconds()),
    default=migrate.DEFAULT_LOCK_TIMEOUT.total_seconds(),
    show_default=True,
    help="Seconds each attempt waits for a table lock. Claims and enqueues on that table "
    "queue behind a waiting migration, so keep it short.",
)
@click.option(
    "--lock-attempts",
    type=click.IntRange(min=1),
    default=migrate.DEFAULT_LOCK_ATTEMPTS,
    show_default=True,
    help="Attempts before giving up (waiting longer after each), naming the sessions in "
    "the way; nothing is applied then.",
)
def migrate_command(database_url: str | None, lock_timeout: float, lock_attempts: int) -> None:
    """Apply pending schema migrations (idempotent; safe from several processes at once)."""
    # A stop signal interrupts the migration (its transaction rolls back), and stops the
    # embedded PostgreSQL this command started.
    raise_on_stop_signals()
    url, embedded = resolve_database(database_url, "migrate")

    async def connect() -> asyncpg.Connection[asyncpg.Record]:
        try:
            return await asyncpg.connect(
                url,
                timeout=10,
                server_settings={"application_name": "conveyor migrate"},
                **writable_target(url),
            )
        except Exception as exc:
            failure = connect_failure(exc, url)
            if failure is None:
                raise
            raise failure from exc

    async def run() -> tuple[list[migrate.Migration], int]:
        conn = await connect()
        try:
            # A second session only looks at what the migration waits for, to name it;
            # first, it shows whether the two are sessions of their own.
            observer = await connect()
            try:
                await require_own_sessions(conn, observer)
                applied = await migrate.migrate(
                    conn,
                    lock_timeout=timedelta(seconds=lock_timeout),
                    attempts=lock_attempts,
                    observer=observer,
                )
            finally:
                await observer.close()
            return applied, await migrate.check_schema(conn)
        finally:
            await conn.close()

    try:
        applied, version = asyncio.run(run())
    finally:
        _stop_embedded(embedded)
    for migration in applied:
        click.echo(f"applied {migration.label}")
    latest = migrate.latest_version()
    if version > latest:
        click.echo(
            f"nothing to apply: the schema is version {version}, newer than this Conveyor "
            f"({latest}), and its newer migrations all say this release runs correctly on it"
        )
    elif not applied:
        click.echo(f"schema is up to date (version {version})")


@click.command()
@click.option(
    "--grpc-listen",
    default=DEFAULT_GRPC_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="gRPC address (a loopback one: dev has no TLS or tokens).",
)
@click.option(
    "--http-listen",
    default=DEFAULT_HTTP_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="HTTP address of /status, /metrics and the /ui dashboard (a loopback one).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=MAX_CONCURRENCY),
    default=4,
    show_default=True,
    help="Concurrency of the demo worker.",
)
@click.option(
    "--drain-timeout",
    type=BoundedFloat(min=0),
    default=DEV_DRAIN_TIMEOUT.total_seconds(),
    show_default=True,
    metavar="SECONDS",
    help="On Ctrl-C, how long the demo worker's running tasks get to finish before they are "
    "handed back to the queue (0: hand them back at once).",
)
def dev(grpc_listen: str, http_listen: str, concurrency: int, drain_timeout: float) -> None:
    """Run everything locally: embedded PostgreSQL, a server and a demo worker.

    Stops gracefully on SIGINT (Ctrl-C), SIGTERM or SIGHUP, and exits 1 if the demo
    worker crashes.
    """
    # Before anything starts: a stop signal from now on stops what has started.
    raise_on_stop_signals()
    _check_dev_listen(grpc_listen, http_listen)
    embedded = embedded_postgres("dev")
    try:
        # A second `conveyor dev` here would share the first one's database and demo task
        # types, and fight it for the ports: refuse it, naming the one that runs.
        embedded.claim(exclusive=True)
    except ClusterInUse as exc:
        raise ConfigError(
            f"{exc.owner} is already running in this directory, with the embedded "
            f"PostgreSQL in {EMBEDDED_DATA_DIR}/: stop it first, or start this one from "
            "another directory"
        ) from None
    try:
        _dev(embedded, grpc_listen, http_listen, concurrency, timedelta(seconds=drain_timeout))
    except StopSignal as stop:
        _stopped_while_starting(stop)
    finally:
        _stop_embedded(embedded)


def _check_listen(*addresses: tuple[str, str | None]) -> None:
    """A usage error naming the flag of an address that is not HOST:PORT.

    Before any database starts; ServerConfig would say only "expected HOST:PORT", of one
    of three addresses (one perhaps from the environment).
    """
    for flag, address in addresses:
        if address:
            try:
                split_host_port(address)
            except ConfigError as exc:
                raise click.BadParameter(exc.message, param_hint=flag) from None


def _check_dev_listen(grpc_listen: str, http_listen: str) -> None:
    """Refuse an address other machines could reach: dev serves without TLS or tokens.

    The server would refuse it too, but only after PostgreSQL had started, and advising
    flags that `dev` does not have.
    """
    pairs = (("--grpc-listen", grpc_listen), ("--http-listen", http_listen))
    _check_listen(*pairs)
    for flag, address in pairs:
        host, port = split_host_port(address)
        if not is_loopback(host):
            raise ConfigError(
                f"{flag} {address}: conveyor dev serves this machine only (it has no TLS "
                f"or tokens), so it listens on a loopback address such as 127.0.0.1:{port}; "
                "to serve other machines, run `conveyor server` with TLS and tokens "
                "(docs/security.md)"
            )


def _dev(
    embedded: EmbeddedPostgres,
    grpc_listen: str,
    http_listen: str,
    concurrency: int,
    drain_timeout: timedelta,
) -> None:
    from conveyor.cli.demo_worker import build_demo_worker  # noqa: PLC0415 - dev only

    # Before PostgreSQL starts (the server checks again): a port in use is one line, at once.
    for what, address in (("gRPC", grpc_listen), ("HTTP", http_listen)):
        check_can_listen(address, what)
    url = start_embedded(embedded)
    config = ServerConfig(
        database_url=url, grpc_listen=grpc_listen, http_listen=http_listen, migrate=True
    )
    demo = build_demo_worker(concurrency=concurrency)
    demo.configure(drain_timeout=drain_timeout)

    def start_demo(server: ConveyorServer) -> None:
        demo.configure(server=f"127.0.0.1:{server.grpc_port}")
        demo.start(timeout=timedelta(seconds=10))
        address = f"localhost:{server.grpc_port}"
        click.echo(
            "\nConveyor is running.\n"
            f"  gRPC:    {address}\n"
            f"  status:  http://localhost:{server.http_port}/status\n"
            f"  worker:  demo worker ({', '.join(demo.registry.task_types())})\n\n"
            "Try, in another terminal (with .venv/bin on your PATH):\n"
            f"  conveyor enqueue demo.echo --payload hello --server {address}\n"
            f"  conveyor status <ID> --history --server {address}\n\n"
            "Ctrl-C stops everything.\n",
            err=True,
        )

    def stop_demo() -> None:
        # After a SIGHUP the terminal may be gone: the stop must go on without this line.
        with contextlib.suppress(OSError):
            click.echo(
                f"\nStopping: running tasks get {drain_timeout.total_seconds():g} s to "
                "finish, then are handed back to the queue (Ctrl-C again: hand them back now).",
                err=True,
            )
        # Returns once the worker has drained, handed the rest back and unregistered (or
        # after the drain timeout plus a margin for that): only then does the server stop,
        # so that every outcome and hand-back reaches it rather than ending lease_expired.
        demo.stop()

    def hand_back_now() -> None:
        with contextlib.suppress(OSError):
            click.echo("Handing the running tasks back now.", err=True)
        demo.hand_back_now()

    def demo_crashed() -> str | None:
        # Like `conveyor worker`, whose crash is exit 1: a dev that served on without its
        # worker left every new task queued for ever, the crash a traceback in the scroll.
        if demo.running:
            return None
        return (
            "the demo worker crashed (its traceback is above, after 'worker crashed'); "
            "stopped the server and the embedded PostgreSQL"
        )

    tune_for_long_running_process()
    try:
        event_loop.run(
            _serve(
                config,
                on_started=start_demo,
                before_stop=stop_demo,
                on_second_signal=hand_back_now,
                watch=demo_crashed,
            )
        )
    finally:
        ignore_stop_signals()
        # A no-op after stop_demo; stops the worker if the server failed under it.
        demo.stop(timeout=timedelta(seconds=10))
