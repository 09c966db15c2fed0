"""`--dashboard-allowed-host` / CONVEYOR_DASHBOARD_ALLOWED_HOSTS, as operators write them.

A name listed with capitals (as DNS names are often written, `Queue.Internal`) was honoured
by the dashboard (views.py lower-cases the list) but not by /status and /metrics
(monitoring/hosts.py compared the Host header, which urlsplit lower-cases, with the list as
given): the same server answered /ui and refused /status under the same name.

CONVEYOR_DASHBOARD_ALLOWED_HOSTS given as a comma-separated list (the form CONVEYOR_SERVER
takes) was taken as one host name with a comma in it, which no Host header can match: every
name in it was silently refused. ServerConfig now lower-cases the names and splits lists.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from helpers import ServerProcess, wait_for


def get(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_name_listed_with_capitals_is_answered_on_status_and_metrics(server_process) -> None:
    server = server_process("--dashboard-allowed-host", "Queue.Internal")
    host = f"queue.internal:{server.http_port}"
    # The dashboard answers under the name...
    assert get(f"{server.http_url}/ui", host) == 200
    # ...and so must /status and /metrics, on the same server, under the same name.
    codes = {path: get(f"{server.http_url}{path}", host) for path in ("/status", "/metrics")}
    assert codes == {"/status": 200, "/metrics": 200}


def test_a_comma_separated_env_list_allows_each_name(database_url, processes) -> None:
    server = ServerProcess(processes, database_url, name="server-env")
    server.process = processes(
        server.argv(),
        name="server-env",
        CONVEYOR_DASHBOARD_ALLOWED_HOSTS="a.internal,b.internal",
    )
    server.generation = 1

    def settled() -> bool:
        return server.process.process.poll() is not None or server.ready()

    wait_for(settled, timeout=60, interval=0.05, what="the server to start")
    assert server.process.process.poll() is None, server.process.output()
    for name in ("a.internal", "b.internal"):
        assert get(f"{server.http_url}/ui", f"{name}:{server.http_port}") == 200
    assert get(f"{server.http_url}/ui", f"c.internal:{server.http_port}") == 421
