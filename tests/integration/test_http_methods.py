"""Every method on every path answers without a server error.

The hostile-input fuzz of test_dashboard_security sends GET and POST only; this covers
HEAD, OPTIONS, PUT, DELETE, PATCH, TRACE and an unknown method on every route."""

from __future__ import annotations

import http.client

PATHS = [
    "/healthz",
    "/readyz",
    "/status",
    "/metrics",
    "/ui",
    "/ui/",
    "/ui/tasks",
    "/ui/workers",
    "/ui/tasks/0190b5d2-0000-7000-8000-000000000000",
    "/ui/tasks/0190b5d2-0000-7000-8000-000000000000/retry",
    "/ui/tasks/0190b5d2-0000-7000-8000-000000000000/cancel",
    "/ui/types/pause",
    "/ui/types/resume",
    "/ui/static/style.css",
    "/nope",
]
METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH", "TRACE", "FOO"]


def test_methods(server) -> None:
    port = server.server.http_port
    bad = []
    for path in PATHS:
        for method in METHODS:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request(
                    method,
                    path,
                    body=b"type=x" if method == "POST" else None,
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                )
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
            if response.status >= 500:
                bad.append((method, path, response.status, body[:200]))
    assert not bad, bad
