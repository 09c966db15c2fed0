"""Where the server's database comes from.

In order: --database-url, CONVEYOR_DATABASE_URL, or an embedded PostgreSQL kept in
./.conveyor/ so local data survives restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import click

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


def resolve_database(url: str | None) -> tuple[str, EmbeddedPostgres | None]:
    """Return the URL to use, starting the embedded cluster when none was given."""
    if url:
        return url, None
    embedded = EmbeddedPostgres(EMBEDDED_DATA_DIR)
    click.echo(
        f"No database URL given: using the embedded PostgreSQL in {EMBEDDED_DATA_DIR}/ "
        "(data survives restarts; pass --database-url for your own).",
        err=True,
    )
    return embedded.start(), embedded
