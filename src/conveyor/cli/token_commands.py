"""`conveyor token create` and `conveyor token list`: managing the tokens file.

A new token is printed once, on stdout, and only its SHA-256 digest is written to the file,
so the file can be read by whoever runs the servers without granting anything. Rotation is
`create` with the same name, moving the clients to the new token, then `revoke` of the old
id; servers re-read the file within seconds, so no restart is involved.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import click

from conveyor.auth import Role, TokenRegistry, new_token
from conveyor.cli.params import BoundedFloat
from conveyor.errors import ConfigError

# A century: longer is "never", which is what leaving the option out says.
MAX_DAYS: Final = 36_500

tokens_file_option = click.option(
    "--file",
    "tokens_file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    envvar="CONVEYOR_TOKENS_FILE",
    help="The tokens file the servers read (--tokens-file of `conveyor server`).",
)


@click.group()
def token() -> None:
    """Create, list and revoke access tokens."""


@token.command()
@tokens_file_option
@click.option("--name", required=True, help="Who the token is for (kept across rotations).")
@click.option(
    "--role",
    type=click.Choice([role.value for role in Role]),
    required=True,
    help="producer: enqueue, status, cancel. worker: run tasks. viewer: read only. "
    "admin: everything.",
)
@click.option(
    "--expires-in-days",
    type=BoundedFloat(min=0, min_open=True, max=MAX_DAYS),
    default=None,
    help="The token stops working after this many days (default: never).",
)
@click.option(
    "--task-type",
    "task_types",
    multiple=True,
    metavar="TYPE",
    help="Limit a worker token to these task types (repeatable).",
)
def create(
    tokens_file: Path,
    name: str,
    role: str,
    expires_in_days: float | None,
    task_types: tuple[str, ...],
) -> None:
    """Add a token to the tokens file and print it (once: only its digest is kept)."""
    existing = _read_text(tokens_file) if tokens_file.exists() else ""
    TokenRegistry.from_toml(existing, str(tokens_file))  # a file already unreadable is refused
    expires_at = (
        datetime.now(UTC).replace(microsecond=0) + timedelta(days=expires_in_days)
        if expires_in_days is not None
        else None
    )
    secret, entry = new_token(
        name, Role(role), expires_at=expires_at, task_types=task_types or None
    )
    # A file the operator edited may end without a newline (after a comment, the new table's
    # header would be commented out) or with a blank line of its own.
    separator = "\n" if existing and not existing.endswith("\n") else ""
    if existing.strip():
        separator += "\n"
    # The file as it will read after the append, checked before writing: a clashing id or
    # anything else that would leave it unreadable (servers keep their old tokens and the
    # next start fails) is refused with the file untouched.
    TokenRegistry.from_toml(existing + separator + entry.as_toml(), str(tokens_file))
    # Appending keeps the file's owner and mode, so servers running as another user can
    # still read it. A new file is created private: the digests grant nothing, but the names
    # and roles are nobody's business.
    try:
        descriptor = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a") as file:
            file.write(separator + entry.as_toml())
    except OSError as exc:
        raise ConfigError(f"cannot write {tokens_file}: {exc.strerror}") from None
    click.echo(secret)
    click.echo(
        f"token {entry.token_id} ({entry.role.value}) for {entry.name!r} added to {tokens_file}"
        + (f"; expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""),
        err=True,
    )


@token.command("list")
@tokens_file_option
def list_tokens(tokens_file: Path) -> None:
    """List the tokens in the file (ids, names, roles, expiry: never secrets)."""
    now = datetime.now(UTC)
    for entry in _read(tokens_file).entries():
        expiry = (
            "never"
            if entry.expires_at is None
            else f"{entry.expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        )
        if entry.expires_at is not None and entry.expires_at <= now:
            expiry += " (expired)"
        types = ",".join(sorted(entry.task_types)) if entry.task_types else "*"
        click.echo(
            f"{entry.token_id}  {entry.role.value:<8}  {entry.name}  "
            f"expires {expiry}  types {types}"
        )


@token.command()
@tokens_file_option
@click.argument("token_id", metavar="ID")
def revoke(tokens_file: Path, token_id: str) -> None:
    """Remove the token with this id; servers stop accepting it within seconds."""
    registry = _read(tokens_file)
    kept = [entry for entry in registry.entries() if entry.token_id != token_id]
    if len(kept) == len(registry.entries()):
        raise ConfigError(f"no token with id {token_id!r} in {tokens_file}")
    text = "\n".join(entry.as_toml() for entry in kept)
    # Checked before it replaces the file, as `create` checks: a file the servers cannot
    # read leaves them on their old tokens, the one just revoked included.
    TokenRegistry.from_toml(text, str(tokens_file))
    _replace(tokens_file, text)
    click.echo(f"token {token_id} revoked", err=True)


def _replace(path: Path, text: str) -> None:
    """Write `text` to a new file beside `path` and rename it over `path`.

    A server never reads half a file that way. The new file takes the old one's mode, owner
    and group: servers usually run as another user than the operator running this command,
    and a file they cannot read would leave them on the old tokens (revoked one included).
    """
    try:
        original = path.stat()
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise ConfigError(f"cannot rewrite {path}: {exc.strerror}") from None
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), original.st_mode & 0o777)
            if (original.st_uid, original.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(file.fileno(), original.st_uid, original.st_gid)
            os.fsync(file.fileno())
        Path(temporary).replace(path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise ConfigError(
            f"cannot rewrite {path} with its owner and mode kept ({exc.strerror}); run this "
            "command as the file's owner or as root"
        ) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text, so not a tokens file") from None


def _read(path: Path) -> TokenRegistry:
    return TokenRegistry.from_toml(_read_text(path), str(path))
