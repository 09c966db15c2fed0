"""Who may read the server's HTTP endpoints: without tokens /status and /metrics answer only
to names a DNS-rebinding page cannot have, while /healthz and /readyz stay open to any name.

Real in-process servers, real PostgreSQL, real HTTP over loopback with the Host header a
browser on a rebinding page, or a scraper, would send.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from conveyor.auth import Role, new_token


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, error statuses included."""
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


class TestHostCheckWithoutTokens:
    def test_status_and_metrics_answer_only_to_names_a_rebinding_page_cannot_have(
        self, server
    ) -> None:
        port = server.server.http_port
        for path in ("/status", "/metrics"):
            status, content_type, body = get(
                f"{server.http_url}{path}", {"Host": f"attacker.example:{port}"}
            )
            assert status == 421, path
            assert content_type.startswith("application/json")
            refusal = json.loads(body)
            assert refusal["error"] == "misdirected_request"
            assert "--dashboard-allowed-host" in refusal["message"]
            # What a scraper sends for 127.0.0.1:PORT, localhost:PORT, [::1]:PORT, and
            # this machine's own name.
            for host in (
                f"127.0.0.1:{port}",
                f"localhost:{port}",
                f"[::1]:{port}",
                f"{socket.gethostname()}:{port}",
            ):
                assert get(f"{server.http_url}{path}", {"Host": host})[0] == 200, (path, host)
        for path in ("/healthz", "/readyz"):
            assert get(f"{server.http_url}{path}", {"Host": "attacker.example"})[0] == 200

    def test_a_listed_name_is_answered(self, start_server) -> None:
        server = start_server(dashboard_allowed_hosts=frozenset({"prom.internal"}))
        for path in ("/status", "/metrics"):
            assert get(f"{server.http_url}{path}", {"Host": "prom.internal:8080"})[0] == 200

    def test_with_tokens_the_token_is_what_counts(self, start_server) -> None:
        token, entry = new_token("grafana", Role.VIEWER)
        server = start_server(tokens_toml=entry.as_toml())
        for path in ("/status", "/metrics"):
            status, _, _ = get(
                f"{server.http_url}{path}",
                {"Host": "conveyor.example.com", "Authorization": f"Bearer {token}"},
            )
            assert status == 200, path

    def test_the_internal_metrics_address_answers_to_any_name(self, start_server) -> None:
        server = start_server(metrics_listen="127.0.0.1:0")
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        assert get(url, {"Host": "prometheus-target.example:9100"})[0] == 200
