"""Conveyor's own SQL statements with their bind parameters replaced by SQL expressions.

The W4 backlog (benchmarks/conveyor_workloads.py) and the pgbench limit
(benchmarks/pgbench_limit.py) run Conveyor's statements themselves, not copies: the text
comes from `conveyor.storage.queries.SQL` (queries.sql, parsed by Conveyor at import), so a
change to a statement is measured as soon as it is made.

Neither caller can bind values the way the server does. A statement's parameters ($1, $2,
...) are therefore rewritten mechanically (`bind`): the values become SQL expressions in a
CTE put at the head of the statement, `WITH bench_params AS MATERIALIZED (SELECT <value 1>
AS p1, ...)`, and each `$N` becomes `(SELECT pN FROM bench_params)`. A statement may use a
parameter more than once (task_insert_skipping_taken reads its ids twice), and a value like "100 new
ids" is volatile: the CTE computes each value once per execution, as a bound value is, and
the planner sees it as it sees a parameter in a generic plan, a value known only at run
time. Arrays are built by the database (`ARRAY(SELECT ... FROM generate_series)`,
`array_fill`), so a batch costs no client-side encoding. Comments are dropped first (they
name parameters too). The rewrite checks the statement against what the caller expects:
the same set of parameters, and for every `$N::type` in the text, that type. A statement
whose signature changed fails loudly instead of being measured with the wrong values.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from conveyor.server.config import DEFAULT_DEADLINE_GRACE, DEFAULT_LEASE_TTL, ServerConfig
from conveyor.server.worker_service import LEASE_BYTES_BESIDES
from conveyor.storage.queries import SQL
from conveyor.types import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from collections.abc import Mapping

_PARAM: Final = re.compile(r"\$(\d+)(?!\d)")
_CAST: Final = re.compile(r"\$(\d+)::([A-Za-z0-9_]+(?:\[\])?)")

# A UUIDv7 made by the database, as `conveyor.types.new_task_id` makes one in the client:
# 48 bits of Unix milliseconds, version 7, and the RFC 4122 variant and random bits of a
# gen_random_uuid(). Time-ordered ids matter: they keep primary-key inserts at the right
# edge of the index, as the client's ids do.
UUID7: Final = (
    "encode(set_byte(overlay(uuid_send(gen_random_uuid()) PLACING "
    "substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) "
    "FROM 1 FOR 6), 6, 112 + (random() * 15)::int), 'hex')::uuid"
)

# What Conveyor's client sends for a bare Task(type=...): empty payload, default timeout
# and retries, no trace context.
TASK_TIMEOUT_S: Final = DEFAULT_TIMEOUT.total_seconds()
TASK_MAX_RETRIES: Final = DEFAULT_MAX_RETRIES
LEASE_TTL_S: Final = DEFAULT_LEASE_TTL.total_seconds()
DEADLINE_GRACE_S: Final = DEFAULT_DEADLINE_GRACE.total_seconds()
# The claim's byte bound as a server with the default settings passes it: one message.
LEASE_MESSAGE_BYTES: Final = ServerConfig(database_url="postgresql:///bench").lease_message_bytes

# The parameter types each statement is expected to declare (`$N::type` in its text).
# Parameters used without a cast (LIMIT $2, worker_id = $3) are listed as None.
SIGNATURES: Final[dict[str, dict[int, str | None]]] = {
    "task_insert_many": {
        1: "uuid[]",
        2: "text[]",
        3: "bytea[]",
        4: "float8[]",
        5: "integer[]",
        6: "text[]",
    },
    "task_claim": {1: "text[]", 2: None, 3: None, 4: None, 5: None, 6: "bigint", 7: "integer"},
    "task_succeed_many": {1: "uuid[]", 2: "uuid[]", 3: "bytea[]", 4: "boolean[]", 5: "text[]"},
}


class SignatureChangedError(RuntimeError):
    """A statement's parameters are not the ones this benchmark knows how to fill."""


def sql_literal(text: str) -> str:
    """A quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def strip_comments(text: str) -> str:
    """The statement without its `--` comments (which name parameters too) or blank lines."""
    out: list[str] = []
    quote: str | None = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote is not None:
            out.append(char)
            if char == quote:
                quote = None  # a doubled quote reopens at once on the next character
        elif char in "'\"":
            quote = char
            out.append(char)
        elif text.startswith("--", index):
            end = text.find("\n", index)
            index = len(text) if end < 0 else end
            continue
        else:
            out.append(char)
        index += 1
    lines = (line.rstrip() for line in "".join(out).splitlines())
    return "\n".join(line for line in lines if line)


def bind(name: str, values: Mapping[int, str]) -> str:
    """Statement `name`, without comments, with `$N` bound to the SQL expression `values[N]`.

    Raises:
        SignatureChangedError: the statement's parameters or their declared types differ
            from SIGNATURES[name], or `values` does not cover them.
    """
    text = strip_comments(SQL[name])
    expected = SIGNATURES[name]
    found = {int(n) for n in _PARAM.findall(text)}
    if found != set(expected) or set(values) != found:
        raise SignatureChangedError(
            f"{name} takes parameters {sorted(found)}; this benchmark fills "
            f"{sorted(values)} and expects {sorted(expected)}: update benchmarks/conveyor_sql.py"
        )
    for number, cast in _CAST.findall(text):
        wanted = expected[int(number)]
        if wanted is not None and cast != wanted:
            raise SignatureChangedError(
                f"{name}: ${number} is declared {cast}, expected {wanted}: update "
                "benchmarks/conveyor_sql.py"
            )
    head = ", ".join(f"{values[n]} AS p{n}" for n in sorted(values))
    body = _PARAM.sub(lambda match: f"(SELECT p{match[1]} FROM bench_params)", text)  # noqa: S608
    params = f"bench_params AS MATERIALIZED (SELECT {head})"
    # Joins the statement's own WITH list if it has one: a data-modifying CTE must stay at
    # the top level.
    if re.match(r"WITH\b", body, re.IGNORECASE):
        return f"WITH {params},\n{body[4:].lstrip()}"
    return f"WITH {params}\n{body}"


def filled(value: str, count: str) -> str:
    """An array of `count` copies of `value` (both SQL expressions)."""
    return f"array_fill({value}, ARRAY[{count}])"


def insert_many(task_type: str, count: str, ids: str | None = None) -> str:
    """task_insert_many for `count` tasks (a SQL expression) of `task_type`, as the client
    would send them; `ids` defaults to `count` new UUIDv7s made by the database."""
    if ids is None:
        ids = f"ARRAY(SELECT {UUID7} FROM generate_series(1, {count}))"  # noqa: S608 - our constants
    return bind(
        "task_insert_many",
        {
            1: ids,
            2: filled(f"{sql_literal(task_type)}::text", count),
            3: filled("''::bytea", count),
            4: filled(f"{TASK_TIMEOUT_S!r}::float8", count),
            5: filled(f"{TASK_MAX_RETRIES}::integer", count),
            6: filled("NULL::text", count),
        },
    )


def claim(task_type: str, limit: str, worker_id: str) -> str:
    """task_claim of up to `limit` tasks of `task_type` for `worker_id` (SQL expressions),
    with the server's default lease, grace and message size."""
    return bind(
        "task_claim",
        {
            1: f"ARRAY[{sql_literal(task_type)}]",
            2: limit,
            3: worker_id,
            4: f"{LEASE_TTL_S!r}::float8",
            5: f"{DEADLINE_GRACE_S!r}::float8",
            6: f"{LEASE_MESSAGE_BYTES}::bigint",
            7: f"{LEASE_BYTES_BESIDES}::integer",
        },
    )


# The claim's last lines, its projection of the rows it claimed and its probe for held rows
# when it claimed none, which pgbench's single client never meets (everything before them,
# the claim's work, runs whatever the projection reads: data-modifying CTEs always run whole).
_CLAIM_PROJECTION: Final = re.compile(r"\nSELECT [^;]*\nFROM claimed\n[^;]*ORDER BY seq;?\s*$")


def claim_as_arrays(task_type: str, limit: str, worker_id: str) -> str:
    """`claim`, projecting the claimed tasks as two arrays in one row, `ids` and `lease_ids`
    (task id order; empty when it claimed nothing): what pgbench's `\\gset` can carry into
    the completion, as the server carries the rows it claimed.

    Raises:
        SignatureChangedError: the claim no longer ends with its projection of `claimed`.
    """
    text = claim(task_type, limit, worker_id)
    if not _CLAIM_PROJECTION.search(text):
        raise SignatureChangedError(
            "task_claim no longer ends with SELECT ... FROM claimed ORDER BY seq: update "
            "benchmarks/conveyor_sql.py"
        )
    return _CLAIM_PROJECTION.sub(
        "\nSELECT coalesce(array_agg(id ORDER BY id), '{}') AS ids,"
        "\n       coalesce(array_agg(lease_id ORDER BY id), '{}') AS lease_ids"
        "\nFROM claimed;",
        text,
    )


def succeed_many(task_ids: str, lease_ids: str, count: str, worker_id: str) -> str:
    """task_succeed_many of the (task id, lease id) arrays given as SQL expressions, with no
    results, as a no-op handler reports; `worker_id` is the reporting worker's id, an SQL
    expression (the fencing checks it)."""
    return bind(
        "task_succeed_many",
        {
            1: task_ids,
            2: lease_ids,
            3: filled("''::bytea", count),
            4: filled("false", count),
            5: filled(worker_id, count),
        },
    )
