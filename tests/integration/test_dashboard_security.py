"""The dashboard and the HTTP endpoints with authentication on: logins, sessions, CSRF, roles.

Issue 6, item 3 (and TLS on HTTP, item 1). Real servers with a real tokens file, real
PostgreSQL, real HTTP(S) over loopback, nothing mocked. A test that needs a forged or
expired cookie mints it with `Sessions.sign` and the server's own secret, so the only thing
wrong with it is the thing under test. Tasks are seeded through raw gRPC stubs carrying an
admin token, and every refused action is checked against the database, not only against
the status code.

The last class fuzzes the dashboard's forms, query parameters, paths and cookies with
hostile strings (invalid UTF-8 escapes, huge numbers, SQL and template fragments, very long
values) and requires that no answer is ever a 500 and that the server stays up.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from helpers import Db, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor import Task
from conveyor.auth import Role, TokenEntry, new_token
from conveyor.client.core import enqueue_request
from conveyor.monitoring.dashboard.sessions import COOKIE_NAME, Sessions
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

SECRET = b"dashboard-security-test-secret-0123456789"
TWELVE_HOURS = 12 * 3600
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
CSRF_REFUSAL = "This form has expired or did not come from this dashboard"


# --- HTTP without redirects, with cookies by hand -------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


@dataclass
class Answer:
    status: int
    headers: Message
    body: str

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    def set_cookie(self) -> SimpleCookie:
        """The session cookie this answer sets (or deletes), parsed."""
        cookies = SimpleCookie()
        for value in self.headers.get_all("Set-Cookie") or []:
            cookies.load(value)
        return cookies

    def csrf(self) -> str:
        match = CSRF_FIELD.search(self.body)
        assert match is not None, "the page has no CSRF field"
        return match.group(1)


def fetch(
    url: str,
    *,
    method: str = "GET",
    form: dict[str, str] | None = None,
    cookie: str | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """One request, redirects not followed; `cookie` is the session cookie's value."""
    all_headers = dict(headers or {})
    if cookie is not None:
        all_headers["Cookie"] = f"{COOKIE_NAME}={cookie}"
    data = None
    if method == "POST":
        data = urllib.parse.urlencode(form or {}).encode()
        all_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)  # noqa: S310
    try:
        with opener.open(request, timeout=10) as response:
            return Answer(response.status, response.headers, response.read().decode())
    except urllib.error.HTTPError as error:
        with error:
            return Answer(error.code, error.headers, error.read().decode())


# --- tokens, servers, seeding ---------------------------------------------------------------


@dataclass
class Tokens:
    """A tokens file and the tokens it accepts, by principal name."""

    path: Path
    tokens: dict[str, str]
    entries: dict[str, TokenEntry]

    def __getitem__(self, name: str) -> str:
        return self.tokens[name]

    def write(self, entries: list[TokenEntry] | None = None) -> None:
        chosen = list(self.entries.values()) if entries is None else entries
        self.path.write_text("".join(entry.as_toml() for entry in chosen))

    def minter(self, secret: bytes = SECRET) -> Sessions:
        """Cookies signed as a server with `secret` would sign them."""
        by_id = {entry.token_id: entry for entry in self.entries.values()}
        return Sessions(secret, by_id.get)


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    """alice and bob (admins), vera (viewer), billing (producer), mailer (worker), and
    `old`, an admin token that expired yesterday."""
    made: dict[str, tuple[str, TokenEntry]] = {
        "alice": new_token("alice", Role.ADMIN),
        "bob": new_token("bob", Role.ADMIN),
        "vera": new_token("vera", Role.VIEWER),
        "billing": new_token("billing", Role.PRODUCER),
        "mailer": new_token("mailer", Role.WORKER),
        "old": new_token("old", Role.ADMIN, expires_at=datetime.now(UTC) - timedelta(days=1)),
    }
    result = Tokens(
        tmp_path / "tokens.toml",
        {name: token for name, (token, _) in made.items()},
        {name: entry for name, (_, entry) in made.items()},
    )
    result.write()
    return result


@pytest.fixture
def secured(start_server: Callable[..., Any], tokens: Tokens) -> Any:
    """A server with the tokens file and a known session secret."""
    return start_server(tokens_file=tokens.path, session_secret=SECRET)


def enqueue(server: Any, token: str, task_type: str = "sec.idle") -> str:
    """Enqueue one task through a raw stub presenting `token`; its id."""
    channel = grpc.insecure_channel(server.address)
    try:
        request = enqueue_request([Task(type=task_type)])
        pb_grpc.TaskServiceStub(channel).EnqueueTasks(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        return request.tasks[0].id
    finally:
        channel.close()


def login(base: str, token: str, *, context: ssl.SSLContext | None = None, **form: str) -> str:
    """Log in with `token`; the session cookie's value."""
    answer = fetch(
        f"{base}/ui/login", method="POST", form={"token": token, **form}, context=context
    )
    assert answer.status == 303, answer.body
    return answer.set_cookie()[COOKIE_NAME].value


def task_state(db: Db, task_id: str) -> tuple[str, int]:
    """(state, number of history events) of a task, read from the database."""
    state = db.task(task_id)["state"]
    return str(state), len(db.events(task_id))


def paused_types(db: Db) -> list[str]:
    return [row["type"] for row in db.fetch("SELECT type FROM conveyor_paused_types")]


def permission_denials(server: Any) -> float:
    """conveyor_auth_refusals_total{reason="permission_denied"}: valid tokens refused for
    their role. Over HTTP they went uncounted (and unlogged) until a review found it."""
    value = server.server.metrics.registry.get_sample_value(
        "conveyor_auth_refusals_total", {"reason": "permission_denied"}
    )
    return value or 0.0


def is_login_redirect(answer: Answer) -> bool:
    return answer.status == 303 and (answer.location or "").startswith("/ui/login")


# --- logins ---------------------------------------------------------------------------------


class TestLogin:
    def test_every_page_without_a_session_redirects_to_the_login(self, secured, db) -> None:
        base = secured.http_url
        assert fetch(f"{base}/ui").location == "/ui/login"
        answer = fetch(f"{base}/ui/tasks?state=failed")
        assert answer.status == 303
        assert answer.location == "/ui/login?next=%2Fui%2Ftasks%3Fstate%3Dfailed"
        for path in ("/ui/", "/ui/workers", "/ui/tasks/0190b5d2-0000-7000-8000-000000000000"):
            assert is_login_redirect(fetch(f"{base}{path}")), path
        page = fetch(f"{base}/ui/login")
        assert page.status == 200
        assert 'name="token"' in page.body
        assert 'href="/ui/tasks"' not in page.body  # no navigation before logging in
        assert fetch(f"{base}/ui/static/style.css").status == 200
        # An action without a session does nothing and asks for a login too.
        pause = fetch(f"{base}/ui/types/pause", method="POST", form={"type": "sec.p"})
        assert is_login_redirect(pause)
        assert paused_types(db) == []

    def test_admin_logs_in_and_sees_the_actions(self, secured, tokens, db) -> None:
        base = secured.http_url
        task_id = enqueue(secured, tokens["alice"])
        answer = fetch(f"{base}/ui/login", method="POST", form={"token": tokens["alice"]})
        assert (answer.status, answer.location) == (303, "/ui")
        cookie = answer.set_cookie()[COOKIE_NAME].value
        # The cookie names the token by its public id; the token itself is not in it.
        assert tokens["alice"] not in cookie
        # The secret is everything after "cvy_<id>_": token_urlsafe may put "_" in it too,
        # so the part after the last "_" can be a character or two, found by chance.
        assert tokens["alice"].split("_", 2)[2] not in cookie
        assert tokens.entries["alice"].token_id in cookie
        page = fetch(f"{base}/ui/tasks/{task_id}", cookie=cookie)
        assert page.status == 200
        assert "alice (admin)" in page.body
        assert f'action="/ui/tasks/{task_id}/cancel"' in page.body
        assert 'action="/ui/logout"' in page.body
        assert page.csrf()
        # Already signed in: the login page sends the visitor on.
        assert fetch(f"{base}/ui/login?next=/ui/workers", cookie=cookie).location == "/ui/workers"
        # The login is on the record, naming the token by its id.
        logins = db.fetch("SELECT actor, action, target FROM conveyor_audit_log")
        assert [tuple(row) for row in logins] == [
            (f"alice (token {tokens.entries['alice'].token_id})", "dashboard_login", "admin")
        ]

    def test_viewer_logs_in_but_sees_no_actions(self, secured, tokens) -> None:
        base = secured.http_url
        task_id = enqueue(secured, tokens["alice"])
        cookie = login(base, tokens["vera"])
        page = fetch(f"{base}/ui/tasks/{task_id}", cookie=cookie)
        assert page.status == 200
        assert "vera (viewer)" in page.body
        assert "/cancel" not in page.body
        assert 'id="logout"' in page.body
        overview = fetch(f"{base}/ui", cookie=cookie)
        assert overview.status == 200
        assert "/pause" not in overview.body

    @pytest.mark.parametrize(("name", "role"), [("billing", "producer"), ("mailer", "worker")])
    def test_roles_that_cannot_read_the_cluster_cannot_log_in(
        self, secured, tokens, name, role
    ) -> None:
        before = permission_denials(secured)
        answer = fetch(f"{secured.http_url}/ui/login", method="POST", form={"token": tokens[name]})
        assert answer.status == 403
        assert permission_denials(secured) == before + 1
        assert f"The {role} role of &#39;{name}&#39; cannot use the dashboard" in answer.body
        assert "viewer or admin token" in answer.body
        assert COOKIE_NAME not in answer.set_cookie()

    def test_bad_expired_and_missing_tokens_are_refused(self, secured, tokens) -> None:
        base = secured.http_url
        alice = tokens["alice"]
        for token, message in (
            ("not-a-token", "the token is not valid"),
            (alice[:-1] + ("A" if alice[-1] != "A" else "B"), "the token is not valid"),
            (tokens["old"], f"token {tokens.entries['old'].token_id} expired at"),
            ("", "Enter a token to log in."),
            ("   ", "Enter a token to log in."),
        ):
            answer = fetch(f"{base}/ui/login", method="POST", form={"token": token})
            assert answer.status == 401, token
            assert message in answer.body, token
            assert COOKIE_NAME not in answer.set_cookie(), token
            assert token.strip() == "" or token not in answer.body  # never echoed
        # A form without a token field at all is refused the same way.
        assert fetch(f"{base}/ui/login", method="POST", form={}).status == 401

    def test_after_login_only_a_dashboard_page_is_a_destination(self, secured, tokens) -> None:
        base = secured.http_url
        for next_path, expected in (
            ("/ui/workers", "/ui/workers"),
            ("/ui/tasks?state=failed&type=a.b", "/ui/tasks?state=failed&type=a.b"),
            ("//evil.example/ui", "/ui"),
            ("https://evil.example/ui", "/ui"),
            ("/ui\\@evil.example", "/ui"),
            ("/uix", "/ui"),
            ("/ui/login", "/ui"),
            ("javascript:alert(1)", "/ui"),
        ):
            answer = fetch(
                f"{base}/ui/login",
                method="POST",
                form={"token": tokens["vera"], "next": next_path},
            )
            assert (answer.status, answer.location) == (303, expected), next_path

    def test_a_login_posted_from_another_site_is_refused(self, secured, tokens) -> None:
        answer = fetch(
            f"{secured.http_url}/ui/login",
            method="POST",
            form={"token": tokens["alice"]},
            headers={"Origin": "http://evil.example"},
        )
        assert answer.status == 403
        assert COOKIE_NAME not in answer.set_cookie()

    def test_logout_needs_the_csrf_token_and_clears_the_cookie(self, secured, tokens) -> None:
        base = secured.http_url
        cookie = login(base, tokens["alice"])
        csrf = fetch(f"{base}/ui", cookie=cookie).csrf()
        refused = fetch(f"{base}/ui/logout", method="POST", cookie=cookie)
        assert refused.status == 403
        assert CSRF_REFUSAL in refused.body
        assert COOKIE_NAME not in refused.set_cookie()
        answer = fetch(f"{base}/ui/logout", method="POST", cookie=cookie, form={"csrf": csrf})
        assert (answer.status, answer.location) == (303, "/ui/login?notice=logged-out")
        cleared = answer.set_cookie()[COOKIE_NAME]
        assert cleared.value == ""
        assert cleared["max-age"] == "0"
        assert cleared["path"] == "/ui"
        assert "You are logged out." in fetch(f"{base}{answer.location}").body

    def test_the_host_check_applies_to_the_login_too(self, secured) -> None:
        port = secured.http_url.rsplit(":", 1)[1]
        answer = fetch(f"{secured.http_url}/ui/login", headers={"Host": f"evil.example:{port}"})
        assert answer.status == 421


# --- cookies and sessions -------------------------------------------------------------------


class TestSessionCookie:
    def test_flags_over_plain_http(self, secured, tokens) -> None:
        answer = fetch(
            f"{secured.http_url}/ui/login", method="POST", form={"token": tokens["alice"]}
        )
        morsel = answer.set_cookie()[COOKIE_NAME]
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "Strict"
        assert morsel["path"] == "/ui"
        assert morsel["max-age"] == str(TWELVE_HOURS)
        assert not morsel["secure"]  # plain HTTP on loopback: a Secure cookie would be lost

    def test_flags_over_tls_and_https_everywhere(
        self, start_server, tokens, tmp_path: Path
    ) -> None:
        """With a certificate, the dashboard, /status and /metrics are HTTPS; cookies Secure."""
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
        cert_path.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key_path))
        server = start_server(
            tokens_file=tokens.path,
            session_secret=SECRET,
            tls_cert_file=cert_path,
            tls_key_file=key_path,
            metrics_listen="127.0.0.1:0",
        )
        context = ssl.create_default_context()
        ca.configure_trust(context)
        base = f"https://127.0.0.1:{server.server.http_port}"
        assert fetch(f"{base}/ui", context=context).location == "/ui/login"
        answer = fetch(
            f"{base}/ui/login", method="POST", form={"token": tokens["alice"]}, context=context
        )
        morsel = answer.set_cookie()[COOKIE_NAME]
        assert morsel["secure"] is True
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "Strict"
        assert fetch(f"{base}/ui", cookie=morsel.value, context=context).status == 200
        bearer = {"Authorization": f"Bearer {tokens['vera']}"}
        assert fetch(f"{base}/status", headers=bearer, context=context).status == 200
        metrics = f"https://127.0.0.1:{server.server.metrics_port}/metrics"
        assert fetch(metrics, context=context).status == 200
        # The ports speak only TLS.
        with pytest.raises((OSError, http.client.HTTPException)):
            fetch(f"http://127.0.0.1:{server.server.http_port}/healthz")

    def test_forged_tampered_and_stale_cookies_are_refused(self, secured, tokens) -> None:
        base = secured.http_url
        alice = tokens.entries["alice"]
        now = int(time.time())
        minter = tokens.minter()
        genuine = minter.sign(alice.token_id, alice.sha256, now, now + 3600)
        # The minted cookie follows the server's scheme: only what is changed below is wrong.
        assert fetch(f"{base}/ui", cookie=genuine).status == 200
        version, token_id, issued, expires, mac = genuine.split(".")
        flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
        bob = tokens.entries["bob"]
        billing = tokens.entries["billing"]
        refused = {
            "garbage": "hello",
            "empty": '""',
            "a huge value": "v1." + "9" * 3000,
            "another secret": tokens.minter(b"some-other-secret-of-32-bytes!!!").sign(
                alice.token_id, alice.sha256, now, now + 3600
            ),
            "expiry extended": f"{version}.{token_id}.{issued}.{int(expires) + 86400}.{mac}",
            "another token's id": f"{version}.{bob.token_id}.{issued}.{expires}.{mac}",
            "mac changed": f"{version}.{token_id}.{issued}.{expires}.{flipped}",
            "no mac": f"{version}.{token_id}.{issued}.{expires}.",
            "unknown version": f"v2.{token_id}.{issued}.{expires}.{mac}",
            "expired": minter.sign(alice.token_id, alice.sha256, now - 13 * 3600, now - 3600),
            "longer than 12 h": minter.sign(alice.token_id, alice.sha256, now, now + 48 * 3600),
            "issued in the future": minter.sign(
                alice.token_id, alice.sha256, now + 3600, now + 7200
            ),
            "a digest not in the file": minter.sign(alice.token_id, "0" * 64, now, now + 3600),
            "a producer's": minter.sign(billing.token_id, billing.sha256, now, now + 3600),
            "an expired token's": minter.sign(
                tokens.entries["old"].token_id, tokens.entries["old"].sha256, now, now + 3600
            ),
        }
        task_id = enqueue(secured, tokens["alice"])
        for what, cookie in refused.items():
            answer = fetch(f"{base}/ui", cookie=cookie)
            assert is_login_redirect(answer), what
            assert "notice=ended" in (answer.location or ""), what
            assert answer.set_cookie()[COOKIE_NAME]["max-age"] == "0", what
            cancel = fetch(
                f"{base}/ui/tasks/{task_id}/cancel",
                method="POST",
                cookie=cookie,
                form={"csrf": "x" * 43},
            )
            assert is_login_redirect(cancel), what
        assert fetch(f"{base}/ui", cookie=genuine).status == 200

    def test_servers_sharing_the_secret_share_sessions(self, start_server, tokens) -> None:
        """Stateless sessions: a load balancer may send each request to another server."""
        first = start_server(tokens_file=tokens.path, session_secret=SECRET)
        second = start_server(tokens_file=tokens.path, session_secret=SECRET)
        stranger = start_server(tokens_file=tokens.path, session_secret=b"x" * 32)
        cookie = login(first.http_url, tokens["alice"])
        page = fetch(f"{second.http_url}/ui", cookie=cookie)
        assert page.status == 200
        assert page.csrf() == fetch(f"{first.http_url}/ui", cookie=cookie).csrf()
        assert is_login_redirect(fetch(f"{stranger.http_url}/ui", cookie=cookie))

    def test_a_session_ends_with_its_token(self, secured, tokens, db) -> None:
        """Removing, expiring or demoting a token in the file changes its sessions at once."""
        base = secured.http_url
        task_id = enqueue(secured, tokens["alice"])
        vera, alice, bob = (login(base, tokens[name]) for name in ("vera", "alice", "bob"))
        alice_csrf = fetch(f"{base}/ui", cookie=alice).csrf()
        entries = tokens.entries
        tokens.write(
            [
                replace(entries["alice"], role=Role.VIEWER),
                replace(entries["bob"], expires_at=datetime.now(UTC) - timedelta(seconds=1)),
                entries["billing"],
            ]
        )
        # The server looks at the file every 2 s (auth.RELOAD_CHECK_SECONDS).
        wait_for(
            lambda: is_login_redirect(fetch(f"{base}/ui", cookie=vera)),
            timeout=10,
            what="the removed token's session to end",
        )
        assert is_login_redirect(fetch(f"{base}/ui", cookie=bob))
        page = fetch(f"{base}/ui/tasks/{task_id}", cookie=alice)
        assert page.status == 200
        assert "alice (viewer)" in page.body
        assert "/cancel" not in page.body
        answer = fetch(
            f"{base}/ui/tasks/{task_id}/cancel",
            method="POST",
            cookie=alice,
            form={"csrf": alice_csrf},
        )
        assert answer.status == 403
        assert task_state(db, task_id)[0] == "queued"
        # Logging in again with the removed token is refused too.
        assert fetch(f"{base}/ui/login", method="POST", form={"token": tokens["vera"]}).status == (
            401
        )


# --- CSRF and roles -------------------------------------------------------------------------


class TestActions:
    def test_actions_need_the_sessions_csrf_token(self, secured, tokens, db) -> None:
        base = secured.http_url
        task_id = enqueue(secured, tokens["alice"])
        before = task_state(db, task_id)
        alice = login(base, tokens["alice"])
        bob = login(base, tokens["bob"])
        bob_csrf = fetch(f"{base}/ui", cookie=bob).csrf()
        csrf = fetch(f"{base}/ui/tasks/{task_id}", cookie=alice).csrf()
        assert csrf != bob_csrf
        cancel = f"{base}/ui/tasks/{task_id}/cancel"
        for what, form, url in (
            ("no token", {}, cancel),
            ("empty", {"csrf": ""}, cancel),
            ("wrong", {"csrf": "A" * 43}, cancel),
            ("another session's", {"csrf": bob_csrf}, cancel),
            ("one character off", {"csrf": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")}, cancel),
            ("in the URL, not the form", {}, f"{cancel}?csrf={csrf}"),
            ("not ASCII", {"csrf": "é" * 43}, cancel),
        ):
            answer = fetch(url, method="POST", cookie=alice, form=form)
            assert answer.status == 403, what
            assert CSRF_REFUSAL in answer.body, what
            assert task_state(db, task_id) == before, what
        for action in ("pause", "resume"):
            answer = fetch(
                f"{base}/ui/types/{action}", method="POST", cookie=alice, form={"type": "sec.idle"}
            )
            assert answer.status == 403
        assert paused_types(db) == []
        # With the right token every action works.
        answer = fetch(cancel, method="POST", cookie=alice, form={"csrf": csrf})
        assert (answer.status, answer.location) == (303, f"/ui/tasks/{task_id}?notice=cancelled")
        assert task_state(db, task_id)[0] == "cancelled"
        retry = fetch(
            f"{base}/ui/tasks/{task_id}/retry", method="POST", cookie=alice, form={"csrf": csrf}
        )
        assert retry.location == f"/ui/tasks/{task_id}?notice=retried"
        pause = fetch(
            f"{base}/ui/types/pause",
            method="POST",
            cookie=alice,
            form={"csrf": csrf, "type": "sec.idle"},
        )
        assert pause.location == "/ui?notice=paused&type=sec.idle"
        assert paused_types(db) == ["sec.idle"]
        overview = fetch(f"{base}/ui", cookie=alice)
        assert 'action="/ui/types/resume"' in overview.body
        assert 'name="type" value="sec.idle"' in overview.body
        assert f'name="csrf" value="{csrf}"' in overview.body

    def test_a_viewer_cannot_act_even_with_a_valid_csrf_token(self, secured, tokens, db) -> None:
        base = secured.http_url
        task_id = enqueue(secured, tokens["alice"])
        before = task_state(db, task_id)
        vera = login(base, tokens["vera"])
        csrf = fetch(f"{base}/ui/tasks/{task_id}", cookie=vera).csrf()  # the logout form's
        denied = permission_denials(secured)
        for path in (
            f"/ui/tasks/{task_id}/cancel",
            f"/ui/tasks/{task_id}/retry",
            "/ui/types/pause",
            "/ui/types/resume",
        ):
            answer = fetch(
                f"{base}{path}",
                method="POST",
                cookie=vera,
                form={"csrf": csrf, "type": "sec.idle"},
            )
            assert answer.status == 403, path
            assert "operate permission" in answer.body, path
            assert "viewer role of &#39;vera&#39;" in answer.body, path
        assert permission_denials(secured) == denied + 4
        assert task_state(db, task_id) == before
        assert paused_types(db) == []

    def test_origin_check_still_applies_with_a_valid_session(self, secured, tokens, db) -> None:
        base = secured.http_url
        task_id = enqueue(secured, tokens["alice"])
        alice = login(base, tokens["alice"])
        csrf = fetch(f"{base}/ui", cookie=alice).csrf()
        answer = fetch(
            f"{base}/ui/tasks/{task_id}/cancel",
            method="POST",
            cookie=alice,
            form={"csrf": csrf},
            headers={"Origin": "http://evil.example"},
        )
        assert answer.status == 403
        assert "another site" in answer.body
        assert task_state(db, task_id)[0] == "queued"


# --- /status and /metrics -------------------------------------------------------------------


class TestMonitoringEndpoints:
    def test_health_endpoints_stay_open(self, secured) -> None:
        assert fetch(f"{secured.http_url}/healthz").status == 200
        assert fetch(f"{secured.http_url}/readyz").status == 200

    @pytest.mark.parametrize("path", ["/status", "/metrics"])
    def test_status_and_metrics_need_a_token_that_may_read_the_cluster(
        self, secured, tokens, path
    ) -> None:
        url = f"{secured.http_url}{path}"
        for header, expected in (
            (None, "no token"),
            ("Bearer nonsense", "the token is not valid"),
            (f"Basic {tokens['alice']}", "no token"),
            (f"Bearer {tokens['old']}", "expired"),
        ):
            answer = fetch(url, headers={"Authorization": header} if header else {})
            assert answer.status == 401, header
            assert answer.headers["WWW-Authenticate"] == 'Bearer realm="conveyor"'
            document = json.loads(answer.body)
            assert document["error"] == "unauthenticated"
            assert expected in document["message"], header
        denied = permission_denials(secured)
        for name in ("billing", "mailer"):
            answer = fetch(url, headers={"Authorization": f"Bearer {tokens[name]}"})
            assert answer.status == 403, name
            document = json.loads(answer.body)
            assert document["error"] == "permission_denied"
            assert "read_cluster" in document["message"]
        assert permission_denials(secured) == denied + 2
        for name in ("vera", "alice"):
            answer = fetch(url, headers={"Authorization": f"Bearer {tokens[name]}"})
            assert answer.status == 200, name
        # A dashboard session is not a credential for them.
        assert fetch(url, cookie=login(secured.http_url, tokens["alice"])).status == 401

    def test_metrics_listen_serves_metrics_alone_without_a_token(
        self, start_server, tokens
    ) -> None:
        server = start_server(
            tokens_file=tokens.path, session_secret=SECRET, metrics_listen="127.0.0.1:0"
        )
        metrics = f"http://127.0.0.1:{server.server.metrics_port}"
        answer = fetch(f"{metrics}/metrics")
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE conveyor_rpc_duration_seconds histogram" in answer.body
        for path in ("/status", "/healthz", "/readyz", "/ui", "/ui/login"):
            assert fetch(f"{metrics}{path}").status == 404, path
        admin = {"Authorization": f"Bearer {tokens['alice']}"}
        assert fetch(f"{server.http_url}/metrics", headers=admin).status == 404
        assert fetch(f"{server.http_url}/status", headers=admin).status == 200
        assert fetch(f"{server.http_url}/status").status == 401

    def test_without_tokens_nothing_asks_for_a_login(self, start_server) -> None:
        """Authentication off (a loopback server): today's open dashboard and endpoints."""
        server = start_server(metrics_listen="127.0.0.1:0")
        assert fetch(f"{server.http_url}/ui").status == 200
        assert fetch(f"{server.http_url}/status").status == 200
        assert fetch(f"{server.http_url}/ui/login").status == 404
        assert fetch(f"{server.http_url}/metrics").status == 404
        assert fetch(f"http://127.0.0.1:{server.server.metrics_port}/metrics").status == 200


# --- hostile input --------------------------------------------------------------------------

# Raw percent-escapes, sent as they are: invalid UTF-8, truncated and non-hex escapes.
RAW_ESCAPES = ["%ff", "%fe%ff", "%c3%28", "%ed%a0%80", "%f4%90%80%80", "%", "%%", "%zz", "%0"]
# Text sent percent-encoded: SQL, templates, markup, numbers of every size, long values.
HOSTILE_TEXT = [
    "' OR '1'='1",
    "1; DROP TABLE conveyor_tasks; --",
    '") UNION SELECT NULL--',
    "{{ 7*7 }}",
    "<script>alert(1)</script>",
    "\x00",
    "\r\nSet-Cookie: x=1",
    "../../etc/passwd",
    "-1",
    "0",
    "1e309",
    "NaN",
    "18446744073709551616",
    "9" * 400,
    "a" * 3000,
    "failed",
    "sec.idle",
    "0190b5d2-0000-7000-8000-000000000000",
    "ZmFrZSBjdXJzb3I=",
    "/ui/workers",
    "//evil.example",
]
_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60)
_piece = st.one_of(
    _text.map(lambda text: urllib.parse.quote(text, safe="")),
    st.sampled_from(RAW_ESCAPES),
    st.sampled_from(HOSTILE_TEXT).map(lambda text: urllib.parse.quote(text, safe="")),
)
# An already-encoded component: what a hostile client could put in a URL or a form.
component = st.lists(_piece, max_size=4).map("".join)
# Valid as a header value (the Cookie header), whatever its content.
cookie_value = st.one_of(
    st.text(alphabet="abcdefv0123456789._-=", max_size=200), st.sampled_from(["", "v1", "%ff"])
)

# What a request aims at, weighted towards the pages and actions that reach the database.
KINDS = [
    *("page", "page", "page", "task", "task"),
    *("action", "action", "type-action", "login", "logout"),
]
PAGES = ["/ui", "/ui/tasks", "/ui/tasks", "/ui/workers", "/ui/login"]
ACTIONS = ["retry", "cancel"]
TYPE_ACTIONS = ["pause", "resume"]
CONTENT_TYPES = [
    *["application/x-www-form-urlencoded"] * 5,
    "application/x-www-form-urlencoded; charset=latin-1",
    "multipart/form-data; boundary=x",
    "multipart/form-data",
    "text/plain",
    None,
]


@st.composite
def hostile_requests(draw: st.DrawFn, csrf: str) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path with query, body, headers) of one request a hostile client might send."""
    kind = draw(st.sampled_from(KINDS))
    headers: dict[str, str] = {}
    body = b""
    if kind == "page":
        names = draw(st.lists(st.sampled_from(["state", "type", "page", "id", "notice", "next"])))
        query = "&".join(f"{name}={draw(component)}" for name in names)
        path = f"{draw(st.sampled_from(PAGES))}?{query}"
        method = "GET"
    elif kind == "task":
        path, method = f"/ui/tasks/{draw(component) or 'x'}?notice={draw(component)}", "GET"
    else:
        method = "POST"
        fields = {
            "csrf": draw(st.sampled_from([csrf, ""])) if draw(st.booleans()) else draw(component),
            "token": draw(component),
            "next": draw(component),
            "type": draw(component),
        }
        body = "&".join(f"{name}={value}" for name, value in fields.items()).encode()
        if draw(st.integers(0, 5)) == 0:
            body = draw(st.binary(max_size=300))
        content_type = draw(st.sampled_from(CONTENT_TYPES))
        if content_type is not None:
            headers["Content-Type"] = content_type
        path = {
            "action": f"/ui/tasks/{draw(component) or 'x'}/{draw(st.sampled_from(ACTIONS))}",
            "type-action": f"/ui/types/{draw(st.sampled_from(TYPE_ACTIONS))}",
            "login": "/ui/login",
            "logout": "/ui/logout",
        }[kind]
    return method, path, body, headers


class TestHostileInput:
    @pytest.mark.parametrize("logins", [True, False], ids=["logins", "no-logins"])
    def test_no_form_or_query_makes_the_dashboard_fail(self, start_server, tokens, logins) -> None:
        """With logins the requests meet the session and CSRF checks (signed in or not);
        without, they reach every page and action directly."""
        if logins:
            server = start_server(tokens_file=tokens.path, session_secret=SECRET)
            cookie = login(server.http_url, tokens["alice"])
            csrf = fetch(f"{server.http_url}/ui", cookie=cookie).csrf()
        else:
            server = start_server()
            cookie, csrf = "unused", ""
        port = int(server.http_url.rsplit(":", 1)[1])
        seen: dict[int, int] = {}

        @settings(
            max_examples=250,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            request=hostile_requests(csrf),
            stray_cookie=cookie_value,
            signed_in=st.sampled_from([True, True, True, False]),
        )
        def hostile(
            request: tuple[str, str, bytes, dict[str, str]], stray_cookie: str, signed_in: bool
        ) -> None:
            method, path, body, headers = request
            headers = {
                **headers,
                "Cookie": f"{COOKIE_NAME}={cookie if signed_in else stray_cookie}",
            }
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.request(method, path, body=body or None, headers=headers)
                response = connection.getresponse()
                response.read()
            finally:
                connection.close()
            seen[response.status] = seen.get(response.status, 0) + 1
            assert response.status < 500, (method, path, body, response.status)

        hostile()
        # It really exercised the dashboard, signed in and out, not only its refusals.
        assert seen.get(200, 0) > 10, seen
        assert seen.get(303, 0) > 0, seen
        assert seen.get(400, 0) + seen.get(401, 0) + seen.get(403, 0) + seen.get(404, 0) > 20, seen
        assert fetch(f"{server.http_url}/healthz").status == 200
        assert fetch(f"{server.http_url}/ui", cookie=cookie).status == 200
