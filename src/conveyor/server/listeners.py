"""Whether the server can listen on its addresses, asked before anything starts.

A port already taken (by another server, or a second `conveyor dev`), a host that is not an
address of this machine, or a privileged port is one `ConfigError` naming the address and
the reason, raised before the database is connected: not an OSError traceback from aiohttp,
nor gRPC's "Failed to bind" after the schema was migrated. The probe binds the way both
servers do (SO_REUSEADDR, no SO_REUSEPORT); the server then binds for real, and a bind that
fails there all the same (a race) is reported in the same words (`cannot_listen`).
"""

from __future__ import annotations

import errno
import os
import socket

from conveyor.errors import ConfigError
from conveyor.server.config import split_host_port


def cannot_listen(address: str, what: str, reason: str | OSError) -> ConfigError:
    """The error for an address that cannot be listened on, for `reason` or that error."""
    if isinstance(reason, OSError):
        # The system's words alone ("address already in use"): event loops wrap them in
        # a sentence of their own that repeats the address.
        reason = os.strerror(reason.errno).lower() if reason.errno else str(reason)
    return ConfigError(f"cannot listen on {address} for {what}: {reason}")


def check_can_listen(address: str, what: str) -> None:
    """Raise ConfigError unless every address `address` resolves to can be bound now.

    `what` names the listener in the message ("gRPC", "HTTP"). Port 0 (any free port) is
    not checked: it cannot be taken.
    """
    host, port = split_host_port(address)
    if port == 0:
        return
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise cannot_listen(address, what, str(exc.strerror).lower()) from None
    unavailable: OSError | None = None
    bound = 0
    for family, kind, proto, _, sockaddr in resolved:
        with socket.socket(family, kind, proto) as probe:
            # As both servers set it: a port whose last connections linger in TIME_WAIT is
            # free to listen on.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise cannot_listen(address, what, exc) from None
                # A family this machine lacks ("localhost" as ::1 without IPv6): both
                # servers skip it and listen on the others, so only all of them missing is
                # an error.
                unavailable = unavailable or exc
            else:
                bound += 1
    if not bound and unavailable is not None:
        raise cannot_listen(address, what, unavailable)
