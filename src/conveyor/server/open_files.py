"""Raising the process's limit on open files to the most it may have, when a server starts.

Every gRPC and HTTP connection, database connection and file the server holds takes a file
descriptor, and at the limit gRPC can accept no one and the database pool can grow no more.
Processes usually start with a soft limit of 1024 (systemd services, most shells) and a
hard limit far above it (524288 under systemd, a container runtime's own), which a process
may raise its soft limit to without privileges; servers commonly do, and so does this one.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("conveyor.server")

# Asked for when the hard limit is unlimited, which the kernel never grants as such.
_UNLIMITED_TARGET = 1024 * 1024


def raise_open_files_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now (None on Windows)."""
    if sys.platform == "win32":
        return None
    import resource  # noqa: PLC0415 - not on Windows

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "could not raise the open files limit from %d to %d: %s",
                soft,
                target,
                exc,
                extra={"event": "open_files_limit"},
            )
            return soft
        log.info(
            "raised the open files limit from %d to %d",
            soft,
            target,
            extra={"event": "open_files_limit"},
        )
        return target
    log.debug("open files limit: %d", soft, extra={"event": "open_files_limit"})
    return soft
