"""The workers listing (`conveyor workers`, `Client.list_workers_page`, the Workers page):
workers in trouble first, pages that cover every worker once, and a count of the whole.

It stopped at 500 workers without a word, newest first, so the longest-running workers (the
ones stuck since yesterday) were the ones left out.
"""

from __future__ import annotations

import json
import re
import urllib.request

import grpc
import pytest
from helpers import run_cli, worker_stub

from conveyor.errors import InvalidTask
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc


def seed_workers(db, count: int, *, prefix: str = "w-", same_start: bool = False) -> list[str]:
    """`count` active workers, the first the oldest (or all started at once), by SQL: the
    rows a fleet's registrations would leave, without a fleet."""
    db.execute(
        "INSERT INTO conveyor_workers (id, host, pid, task_types, concurrency, version, "
        "started_at, last_heartbeat_at) "
        "SELECT $1 || lpad(i::text, 5, '0'), 'h', i + 1, ARRAY['t'], 1, '1', "
        "CASE WHEN $3 THEN now() ELSE now() - make_interval(secs => $2 - i) END, now() "
        "FROM generate_series(0, $2 - 1) AS i",
        prefix,
        count,
        same_start,
    )
    return [f"{prefix}{i:05d}" for i in range(count)]


def workers_page(server) -> str:
    with urllib.request.urlopen(f"{server.http_url}/ui/workers", timeout=30) as response:  # noqa: S310 - http
        return response.read().decode()


class TestPages:
    def test_pages_cover_every_worker_once_and_count_them_all(self, db, client) -> None:
        """Keyset pages in a fixed order, ties on the start time broken by id; each page
        carries the total."""
        ids = seed_workers(db, 30, same_start=True)
        seen: list[str] = []
        token = None
        pages = 0
        while True:
            page = client.list_workers_page(limit=7, page_token=token)
            pages += 1
            assert page.total == 30
            seen += [w.id for w in page.workers]
            token = page.next_page_token
            if token is None:
                break
        assert pages == 5
        assert sorted(seen) == ids
        assert len(seen) == len(set(seen))

    def test_workers_in_trouble_come_first(self, server, db, client) -> None:
        """A lost worker and one whose event loop is blocked head the listing, however
        long they have run: with newest first, the oldest fell off the end."""
        ids = seed_workers(db, 10)
        db.execute("UPDATE conveyor_workers SET state = 'lost' WHERE id = $1", ids[0])
        with worker_stub(server.address) as stub:
            stub.Heartbeat(pb.HeartbeatRequest(worker_id=ids[1], loop_lag_ms=1500), timeout=10)
            stub.Heartbeat(pb.HeartbeatRequest(worker_id=ids[2], loop_lag_ms=999), timeout=10)

        page = client.list_workers_page(limit=3)

        # In trouble, newest first; then the newest of the rest.
        assert [w.id for w in page.workers] == [ids[1], ids[0], ids[9]]
        assert page.total == 10

    def test_a_lost_or_stopped_worker_has_nothing_in_flight(self, server, db, client) -> None:
        """Its row keeps its last heartbeat's count (3 of 4 here), but its leases ended when
        it was lost or stopped: the listing said "3/4" of a worker lost 11 minutes before."""
        ids = seed_workers(db, 4)
        for worker_id, state in zip(ids, ("active", "draining", "lost", "stopped"), strict=True):
            db.execute(
                "UPDATE conveyor_workers SET state = $2, in_flight = 3, concurrency = 4 "
                "WHERE id = $1",
                worker_id,
                state,
            )
        listed = {w.id: (w.state, w.in_flight) for w in client.list_workers(include_stopped=True)}
        assert listed == {
            ids[0]: ("active", 3),
            ids[1]: ("draining", 3),
            ids[2]: ("lost", 0),
            ids[3]: ("stopped", 0),
        }

    def test_a_malformed_page_token_is_refused(self, server, client) -> None:
        for token in ("junk!", "bm90IGEgdG9rZW4", "MTox", "x" * 5000):
            with pytest.raises(InvalidTask, match="malformed page token"):
                client.list_workers_page(page_token=token)
        client.list_workers_page()  # still serving

    def test_the_server_caps_a_page(self, server, db) -> None:
        """A page holds at most 10,000 workers, whatever the request asks for."""
        seed_workers(db, 10_001)
        channel = grpc.insecure_channel(server.address)
        try:
            admin = pb_grpc.AdminServiceStub(channel)
            response = admin.ListWorkers(pb.ListWorkersRequest(limit=2**32 - 1), timeout=30)
        finally:
            channel.close()
        assert len(response.workers) == 10_000
        assert response.total == 10_001
        assert response.next_page_token


class TestTheCommand:
    def test_it_says_what_it_left_out_and_pages_on(self, server, db) -> None:
        """The table's page says on stderr how many of how many it shows, and the token
        that continues; --json carries the total and the token."""
        ids = seed_workers(db, 8)
        base = ("workers", "--server", server.address)

        first = run_cli(*base, "--limit", "5", COLUMNS="200")
        assert first.returncode == 0, first.stderr
        match = re.fullmatch(
            r"showing 5 of 8 workers; more: add --page-token (\S+)\n", first.stderr
        )
        assert match, first.stderr
        assert all(worker_id in first.stdout for worker_id in ids[3:])

        rest = run_cli(*base, "--limit", "5", "--page-token", match[1], COLUMNS="200")
        assert rest.returncode == 0, rest.stderr
        assert rest.stderr == "showing 3 of 8 workers\n"
        assert all(worker_id in rest.stdout for worker_id in ids[:3])

        as_json = run_cli(*base, "--limit", "5", "--json")
        document = json.loads(as_json.stdout)
        assert document["total"] == 8
        assert document["next_page_token"] == match[1]
        assert [w["id"] for w in document["workers"]] == ids[:2:-1]

    def test_the_default_page_of_500_says_so(self, server, db) -> None:
        """520 workers: 500 listed, `showing 500 of 520` said, and the oldest, lost, among
        those shown (it was the first left out)."""
        ids = seed_workers(db, 520)
        db.execute("UPDATE conveyor_workers SET state = 'lost' WHERE id = $1", ids[0])

        table = run_cli("workers", "--server", server.address, COLUMNS="200")
        as_json = run_cli("workers", "--json", "--server", server.address)

        assert table.returncode == 0, table.stderr
        assert table.stderr.startswith("showing 500 of 520 workers; more: add --page-token ")
        document = json.loads(as_json.stdout)
        assert len(document["workers"]) == 500
        assert document["total"] == 520
        assert document["workers"][0]["id"] == ids[0]

    def test_a_malformed_page_token_is_one_error_line(self, server) -> None:
        result = run_cli("workers", "--page-token", "junk!", "--server", server.address)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith("error: malformed page token")
        assert len(result.stderr.splitlines()) == 1

    @pytest.mark.parametrize("limit", ["0", "10001"])
    def test_a_limit_out_of_range_is_refused(self, server, limit: str) -> None:
        result = run_cli("workers", "--limit", limit, "--server", server.address)
        assert result.returncode == 2
        assert "--limit" in result.stderr


class TestTheWorkersPage:
    def test_it_says_how_many_it_shows_of_how_many(self, server, db) -> None:
        """The page lists 500 workers and says so; the lost one is among them."""
        ids = seed_workers(db, 520)
        db.execute("UPDATE conveyor_workers SET state = 'lost' WHERE id = $1", ids[0])
        body = workers_page(server)
        rows = re.findall(r'<tr data-worker-id="([^"]+)">', body)
        assert len(rows) == 500
        assert rows[0] == ids[0]
        assert re.search(r'id="workers-left-out"[^>]*>Showing 500 of 520 workers', body)

    def test_no_notice_when_all_are_shown(self, server, db) -> None:
        seed_workers(db, 3)
        body = workers_page(server)
        assert len(re.findall(r'<tr data-worker-id="([^"]+)">', body)) == 3
        assert "workers-left-out" not in body
