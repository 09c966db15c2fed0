"""ConveyorServer: the composition root of a server process; owns the start and stop order.

Start: database (schema checked) -> notifier -> leader election -> gRPC services -> HTTP ->
maintenance loops (which act only while this server leads).
Stop (SIGTERM): long polls answered at once and health NOT_SERVING -> leadership resigned
(the next leader need not wait for the TTL) -> gRPC stops accepting and finishes in-flight
calls within the grace period -> the calls it cancelled have unwound and handed back the
leases they could not send -> maintenance -> HTTP -> notifier -> database. Every step
runs even if an earlier one failed. A stop before start, or a second stop, does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from conveyor import __version__
from conveyor.errors import ConveyorError
from conveyor.monitoring.dashboard.sessions import token_entries
from conveyor.monitoring.dashboard.views import Dashboard
from conveyor.monitoring.hosts import this_machines_names
from conveyor.monitoring.http import (
    HTTP_STOP_GRACE,
    HttpServer,
    create_app,
    create_metrics_app,
)
from conveyor.monitoring.metrics import ServerMetrics
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server.admin_service import AdminService
from conveyor.server.config import ServerConfig, split_host_port
from conveyor.server.control import TaskControl
from conveyor.server.dashboard_backend import DashboardBackend
from conveyor.server.database import Database
from conveyor.server.explanation import Explainer
from conveyor.server.leadership import LeaderElector
from conveyor.server.listeners import cannot_listen, check_can_listen
from conveyor.server.maintenance.lease_reaper import LeaseReaper
from conveyor.server.maintenance.planner_statistics import PlannerStatistics
from conveyor.server.maintenance.retention import RetentionPruner
from conveyor.server.maintenance.worker_retention import WorkerPruner
from conveyor.server.maintenance.worker_sweeper import WorkerSweeper
from conveyor.server.notifier import TaskNotifier
from conveyor.server.open_files import raise_open_files_limit
from conveyor.server.rpc import add_service
from conveyor.server.security import Gate, tls_material
from conveyor.server.standard_services import GatedHealth, GatedReflection
from conveyor.server.stats_sampler import StatsSampler
from conveyor.server.task_service import TaskService
from conveyor.server.worker_service import WorkerService
from conveyor.storage import migrate, queries
from conveyor.types import ClusterStatus

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

log = logging.getLogger("conveyor.server")

# Due retries moved into the queue per statement: a storm's worth goes in a few of them,
# each a short transaction.
PROMOTE_BATCH: Final = 1000

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["TaskService"].full_name,
    pb.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


class ConveyorServer:
    """One server process: gRPC + HTTP in front of the database."""

    def __init__(self, config: ServerConfig) -> None:
        """Build the components; nothing starts until `start`."""
        self.config = config
        self.metrics = ServerMetrics()
        self.gate = Gate.from_config(config, self.metrics)
        self.database = Database(config)
        self.elector = LeaderElector(
            database=self.database,
            server_id=config.server_id,
            ttl=config.leader_ttl,
            retry_interval=config.leader_retry_interval,
            on_change=self.metrics.set_leadership,
        )
        self.notifier = TaskNotifier(
            config.database_url,
            self.database.connect_options(),
            promote_due=self._promote_due,
            on_leader_resigned=self.elector.wake,
            own_backends=self.database.backend_pids,
        )
        self.worker_service = WorkerService(config, self.database, self.notifier, self.metrics)
        explainer = Explainer.from_settings(
            worker_lost_after=config.worker_lost_after,
            lease_ttl=config.lease_ttl,
            reaper_interval=config.reaper_interval,
        )
        self.task_service = TaskService(
            config,
            self.database,
            self.notifier,
            self.metrics,
            explainer=explainer,
            handoff=self.worker_service.handoff if config.handoff else None,
        )
        self.control = TaskControl(self.database, self.notifier, self.metrics, explainer=explainer)
        self.stats = StatsSampler(config.stats_interval, self.database, self.metrics)
        self.admin_service = AdminService(
            self.database,
            self.elector,
            self.metrics,
            config.worker_lost_after,
            control=self.control,
            cluster_status=self.cluster_status,
        )
        for service in (self.task_service, self.worker_service, self.admin_service):
            service.gate = self.gate
        self.maintenance = [
            LeaseReaper(config, self.database, self.metrics, self.notifier, self.elector),
            WorkerSweeper(config, self.database, self.elector),
            PlannerStatistics(config, self.database, self.elector, self.metrics),
            self.stats,
        ]
        if config.retention is not None:
            self.maintenance.append(
                RetentionPruner(
                    config.retention_interval,
                    config.retention,
                    self.database,
                    self.elector,
                    self.metrics,
                )
            )
        if config.worker_retention is not None:
            self.maintenance.append(
                WorkerPruner(
                    config.retention_interval,
                    config.worker_retention,
                    self.database,
                    self.elector,
                    self.metrics,
                )
            )
        self.health = GatedHealth(self.gate)
        self._grpc: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._started_at = time.time()
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        # /metrics on an address of its own (config.metrics_listen), and the port it got.
        self._metrics_http: HttpServer | None = None
        self.metrics_port: int | None = None

    async def start(self, *, startup_timeout: float = 30.0) -> None:
        """Connect, check the schema, and start serving."""
        from datetime import timedelta  # noqa: PLC0415 - keep the import list short

        # Certificates and addresses first: a bad file or a port in use is a one-line
        # ConfigError before anything starts.
        credentials, ssl_context = tls_material(self.config)
        for what, address in self._listeners():
            check_can_listen(address, what)
        raise_open_files_limit()
        try:
            await self.database.connect(startup_timeout=timedelta(seconds=startup_timeout))
        except BaseException:
            # Failed, or cancelled while it retried (a stop asked for during start-up): the
            # pools that did open close now.
            await self.database.close()
            raise
        try:
            await self._start_serving(credentials, ssl_context)
        except BaseException:
            # Whatever did start (the gRPC server, the elector) stops, rather than being
            # left to the garbage collector after the loop is closed.
            await self.stop()
            raise

    def _listeners(self) -> list[tuple[str, str]]:
        """(what, HOST:PORT) of every address this server listens on."""
        listeners = [("gRPC", self.config.grpc_listen)]
        if self.config.http_listen is not None:
            listeners.append(("HTTP", self.config.http_listen))
        if self.config.metrics_listen is not None:
            listeners.append(("metrics", self.config.metrics_listen))
        return listeners

    async def _start_serving(
        self, credentials: grpc.ServerCredentials | None, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.notifier.start()
        self.elector.start()
        # Per-task limits are checked in the services; this bounds whole messages, and the
        # lease deliveries size their messages by it too (config.lease_message_bytes).
        message_bytes = self.config.max_message_bytes
        self._grpc = grpc.aio.server(
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
            options=[
                ("grpc.max_concurrent_streams", self.config.max_streams_per_connection),
                ("grpc.max_receive_message_length", message_bytes),
                ("grpc.max_send_message_length", message_bytes),
                # Pings find a peer that went away without a word (see keepalive_interval):
                # its calls end, and a worker's Work stream stops claiming for it. They go
                # on while a stream carries no data (max_pings_without_data 0). Recent gRPC
                # waits for a keepalive ping's answer for its ping timeout (a minute by
                # default), not for the keepalive timeout: both are set.
                ("grpc.keepalive_time_ms", _grpc_ms(self.config.keepalive_interval)),
                ("grpc.keepalive_timeout_ms", _grpc_ms(self.config.keepalive_timeout)),
                ("grpc.http2.ping_timeout_ms", _grpc_ms(self.config.keepalive_timeout)),
                ("grpc.http2.max_pings_without_data", 0),
                # Workers and clients ping every 10 s; more often than this counts
                # as abuse, and gRPC ends the connection of a peer that keeps at it.
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # gRPC sets SO_REUSEPORT by default on Linux: a second server on the same
                # port would start without a word and take some of this one's connections.
                ("grpc.so_reuseport", 0),
            ],
        )
        add_service(self._grpc, self.task_service, "TaskService")
        add_service(self._grpc, self.worker_service, "WorkerService")
        add_service(self._grpc, self.admin_service, "AdminService")
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            GatedReflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.gate
            ),
            self._grpc,
        )
        try:
            self.grpc_port = (
                self._grpc.add_secure_port(self.config.grpc_listen, credentials)
                if credentials is not None
                else self._grpc.add_insecure_port(self.config.grpc_listen)
            )
        except RuntimeError:  # "Failed to bind", without the reason (gRPC logs it)
            self.grpc_port = 0
        if not self.grpc_port:
            raise cannot_listen(self.config.grpc_listen, "gRPC", "the address cannot be bound")
        await self._grpc.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.http_listen is not None:
            host, port = split_host_port(self.config.http_listen)
            authenticate = self.gate.authenticate if self.gate.authenticating else None
            # A token refused for its role over HTTP is counted and logged as over gRPC.
            on_denied = self.gate.note_denied if self.gate.authenticating else None
            # The names the dashboard, and without tokens /status and /metrics, answer to
            # besides IP addresses and localhost (against DNS rebinding: monitoring/hosts.py).
            allowed_hosts = self.config.dashboard_allowed_hosts | this_machines_names()
            dashboard = (
                Dashboard(
                    DashboardBackend(self.control, self.stats, self.cluster_status, self.database),
                    allowed_hosts=allowed_hosts,
                    authenticate=authenticate,
                    on_denied=on_denied,
                    token_entry=token_entries(self.gate.tokens.current)
                    if self.gate.tokens is not None
                    else None,
                    session_secret=self.config.session_secret,
                )
                if self.config.dashboard
                else None
            )
            app = create_app(
                self,
                dashboard,
                authenticate=authenticate,
                on_denied=on_denied,
                allowed_hosts=allowed_hosts,
                metrics=self.config.metrics_listen is None,
            )
            self._http = HttpServer(
                app,
                host,
                port,
                ssl_context=ssl_context,
                limits=self.config.http_limits,
                on_dropped=self.metrics.count_http_connection_dropped,
                stop_grace=self._http_stop_grace(),
            )
            self.http_port = await _listen(self._http, self.config.http_listen, "HTTP")
        if self.config.metrics_listen is not None:
            host, port = split_host_port(self.config.metrics_listen)
            self._metrics_http = HttpServer(
                create_metrics_app(self),
                host,
                port,
                ssl_context=ssl_context,
                limits=self.config.http_limits,
                on_dropped=self.metrics.count_http_connection_dropped,
                stop_grace=self._http_stop_grace(),
            )
            self.metrics_port = await _listen(
                self._metrics_http, self.config.metrics_listen, "metrics"
            )
        for service in self.maintenance:
            service.start()
        log.info(
            "conveyor server %s serving gRPC on port %s, HTTP on port %s",
            self.config.server_id,
            self.grpc_port,
            self.http_port,
            extra={"event": "server_started"},
        )

    async def stop(self) -> None:
        """Stop gracefully (see the module docstring for the order); callers all wait for it."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        # Every step runs whatever the previous one did: a process told to stop must stop.
        self.worker_service.start_draining()
        self.task_service.start_draining()
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("health", self.health.enter_graceful_shutdown),
            ("leadership", self.elector.stop),
            ("grpc", self._stop_grpc),
            # Leases enqueues handed to polls that went away, while the database is here.
            ("handoff", self._hand_back_undelivered),
            *((service.name, service.stop) for service in self.maintenance),
            ("http", self._stop_http),
            ("notifier", self.notifier.stop),
            ("database", self.database.close),
        ]
        try:
            for name, step in steps:
                try:
                    await step()
                except Exception:
                    log.exception("stopping %s failed", name, extra={"event": "stop_failed"})
            log.info(
                "conveyor server %s stopped", self.config.server_id, extra={"event": "stopped"}
            )
        finally:
            self._stopped.set()

    async def _hand_back_undelivered(self) -> None:
        grace = self.config.shutdown_grace.total_seconds()
        # The streams and long-poll claims gRPC cancelled hand their unsent leases back as
        # they unwind: first let them, then wait for those hand-backs with the rest.
        await self.worker_service.calls_unwound(grace)
        await self.worker_service.handoff.handed_back(grace)

    async def _stop_grpc(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.config.shutdown_grace.total_seconds())

    def _http_stop_grace(self) -> float:
        """How long a stop lets an HTTP request finish.

        A page or a scrape takes milliseconds, and nothing a monitoring client asked for
        is worth holding a stopping server for the whole shutdown_grace.
        """
        return min(self.config.shutdown_grace.total_seconds(), HTTP_STOP_GRACE)

    async def _stop_http(self) -> None:
        # Together: each may wait its grace for a request in progress.
        listeners = [http for http in (self._http, self._metrics_http) if http is not None]
        results = await asyncio.gather(*(http.stop() for http in listeners), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _promote_due(self) -> bool:
        """Move the retries whose backoff ended into the queue; True if any moved.

        Each batch NOTIFYs every server in its own transaction. A background task whose
        failure nobody awaits: it says so here, as a warning (a retry left `scheduled` is
        stuck until a promotion succeeds), and the leader's next reaper round tries again.
        """
        promoted = 0
        try:
            async with self.database.connection() as conn:
                while True:
                    batch = await queries.task_promote_due(conn, limit=PROMOTE_BATCH)
                    promoted += batch
                    if batch < PROMOTE_BATCH:
                        break
        except Exception as exc:
            log.warning(
                "could not move due retries into the queue: %s; the leader's next reaper "
                "round tries again",
                exc if isinstance(exc, ConveyorError) else _described(exc),
                extra={"event": "retry_promotion_failed"},
            )
        return promoted > 0

    async def wait_stopped(self) -> None:
        """Return once the server has stopped completely."""
        await self._stopped.wait()

    # --- StatusSource, for the HTTP endpoints -------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the database answers with the expected schema and we are not draining."""
        checks: dict[str, Any] = {"draining": self.worker_service.draining}
        try:
            async with self.database.connection() as conn:
                checks["schema_version"] = await migrate.check_schema(conn)
                await self.database.require_writable(conn)
            checks["database"] = "ok"
        except ConveyorError as exc:
            checks["database"] = exc.message
        except Exception as exc:
            # Not "unavailable" (the role may not log in, the database is gone: errors no
            # retry fixes), but no more ready for it: 503 with the reason, not a 500.
            checks["database"] = _described(exc)
        ready = checks["database"] == "ok" and not self.worker_service.draining
        return ready, checks

    async def status(self) -> dict[str, Any]:
        """Version, identity, and the last stats sample; leadership and paused types read now.

        Read as `cluster_status` reads them (two small queries per request): a pause
        showed here up to a sample late, while `conveyor stats` and the dashboard showed it
        at once. Without the database, the sample's own list stands in.
        """
        document: dict[str, Any] = {
            "version": __version__,
            "server_id": self.config.server_id,
            "is_leader": self.elector.is_leader,
            "leader": None,
            "uptime_seconds": round(time.time() - self._started_at, 1),
            "draining": self.worker_service.draining,
            "listening_for_notifications": self.notifier.listening.is_set(),
        }
        snapshot = self.stats.snapshot
        paused: set[str] | None = None
        try:
            paused = {item.type for item in await self.control.paused_types()}
            leader = await self.elector.current_leader()
            if leader is not None:
                document["leader"] = {
                    "server_id": leader.holder,
                    "term": leader.term,
                    "active": leader.active,
                    "elected_at": leader.elected_at.isoformat(),
                    "expires_at": leader.expires_at.isoformat(),
                }
            document["database"] = "ok"
        except ConveyorError as exc:
            document["database"] = exc.message
        except Exception as exc:  # as in `readiness`
            document["database"] = _described(exc)
        document.update(snapshot.as_status(paused))
        return document

    async def cluster_status(self) -> ClusterStatus:
        """The status numbers as typed values, for AdminService.GetStatus and the dashboard.

        From the last stats sample, except leadership and paused types, which are read now
        (an operator who just paused a type expects to see it paused).
        """
        snapshot = self.stats.snapshot
        leader = await self.elector.current_leader()
        paused = await self.control.paused_types()
        last_minute = snapshot.last_minute
        return ClusterStatus(
            version=__version__,
            server_id=self.config.server_id,
            is_leader=self.elector.is_leader,
            leader_id=leader.holder if leader is not None and leader.active else None,
            leader_term=leader.term if leader is not None else 0,
            sampled_at=datetime.fromtimestamp(snapshot.taken_at, UTC)
            if snapshot.taken_at
            else None,
            types=snapshot.type_statuses({item.type for item in paused}),
            workers=dict(snapshot.workers),
            succeeded_last_minute=last_minute.get("succeeded", 0),
            failed_last_minute=last_minute.get("failed", 0),
            retried_last_minute=last_minute.get("retried", 0),
            started_last_minute=last_minute.get("started", 0),
            paused_types=tuple(paused),
            last_minute_seconds=snapshot.last_minute_seconds,
            other_types=snapshot.other,
        )

    def metrics_text(self) -> bytes:
        """Prometheus text for /metrics; the HTTP endpoint calls it in a thread.

        At the type-label bound a render takes most of a second of pure Python, which on
        the event loop would hold up every RPC for as long. (The pool's in-use count is a
        read of its connection list: a gauge may read it from another thread.)
        """
        self.metrics.db_pool_in_use.set(self.database.pool_in_use())
        return self.metrics.render()


def _grpc_ms(duration: timedelta) -> int:
    """A duration as the whole milliseconds a gRPC option takes (a C int, at least 1)."""
    return max(1, min(2**31 - 1, round(duration.total_seconds() * 1000)))


def _described(exc: Exception) -> str:
    """An unexpected database error for an operator: its kind and its message."""
    return f"{type(exc).__name__}: {exc}"


async def _listen(http: HttpServer, address: str, what: str) -> int:
    """Start `http`; its port. A bind that fails is a ConfigError naming the address."""
    try:
        return await http.start()
    except OSError as exc:
        raise cannot_listen(address, what, exc) from None
