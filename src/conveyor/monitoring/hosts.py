"""Which names the server's HTTP address answers to when it asks for no credentials.

Without tokens (a loopback server, `conveyor dev`, an `--insecure` one) anyone who can
connect may read /ui, /status and /metrics; the only thing keeping a hostile web page in an
operator's browser out is that it must connect under its own domain name (DNS rebinding: a
domain of the attacker's that resolves to 127.0.0.1), and the browser then names that
domain in the Host header. So those endpoints answer only to IP literals, `localhost`, this
machine's own host name and the names an operator listed (`--dashboard-allowed-host`):
names no attacker's page can be served under. /healthz and /readyz reveal nothing and stay
open to every name.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def this_machines_names() -> frozenset[str]:
    """This machine's host name, as `hostname` prints it (no DNS lookup)."""
    name = socket.gethostname().strip().lower()
    return frozenset({name} if name else ())


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether a request's Host header (`host`, with or without a port) may be answered.

    IP literals and `localhost` always may: an attacker cannot serve a page under those.
    Other names must be in `allowed` (lower case).
    """
    try:
        hostname = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # not even a well-formed authority
        return False
    if hostname == "localhost" or hostname in allowed:
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True
