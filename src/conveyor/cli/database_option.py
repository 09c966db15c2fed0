"""Where the server's database comes from.

In order: --database-url, CONVEYOR_DATABASE_URL, or an embedded PostgreSQL kept in
./.conveyor/ so local data survives restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import click

from conveyor.server.config import check_database_url
from conveyor.storage.embedded import EmbeddedPostgres

EMBEDDED_DATA_DIR: Final = Path(".conveyor") / "pgdata"

database_url_option = click.option(
    "--database-url",
    envvar="CONVEYOR_DATABASE_URL",
    default=None,
    metavar="URL",
    help="PostgreSQL URL (or CONVEYOR_DATABASE_URL). Without one, an embedded PostgreSQL "
    "is started with its data in ./.conveyor/.",
)


def embedded_postgres(command: str) -> EmbeddedPostgres:
    """The embedded cluster of this directory, for `conveyor COMMAND` (not started yet)."""
    return EmbeddedPostgres(EMBEDDED_DATA_DIR, owner_name=f"conveyor {command}")


def resolve_database(url: str | None, command: str) -> tuple[str, EmbeddedPostgres | None]:
    """Return the URL to use, starting the embedded cluster when none was given.

    When another process (a `conveyor dev`) already runs the embedded cluster, it is used
    as it is: this command leaves it running when it ends.
    """
    if url:
        # Before anything starts: a malformed URL is one line now, not a traceback later.
        check_database_url(url)
        return url, None
    embedded = embedded_postgres(command)
    return start_embedded(embedded), embedded


def start_embedded(embedded: EmbeddedPostgres) -> str:
    """Start (or join) `embedded`, saying which on stderr; its URL."""
    # Before saying which cluster is used: one that cannot be used is one error line.
    embedded.check_version()
    where = f"No database URL given: using the embedded PostgreSQL in {EMBEDDED_DATA_DIR}/"
    if embedded.claim():
        click.echo(f"{where} (data survives restarts; pass --database-url for your own).", err=True)
    else:
        owner = embedded.owner() or "another process"
        click.echo(f"{where}, which {owner} runs (it stops when that process does).", err=True)
    try:
        return embedded.start()
    except BaseException:
        embedded.stop()
        raise
