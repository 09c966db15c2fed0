"""Failpoints: named places where a test can make a server process die on purpose.

The fault-injection suite needs crashes at exact moments that no signal sent from outside
can hit reliably, such as "after the claim committed, before the reply left". A failpoint
is armed by name in `ServerConfig.failpoints` (the CLI fills it from the
CONVEYOR_FAILPOINTS environment variable, comma separated) and does nothing otherwise.
The only action is SIGKILL of the own process: a crash, not an exception, because an
exception would be handled and answered.

Names: `lease.after_claim` (the claim committed, the reply not sent) and
`enqueue.after_commit` (the tasks are committed, the reply not sent; this server's long polls
have already been woken, so a local worker may have claimed them).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Final

log = logging.getLogger("conveyor.server.failpoints")

KNOWN: Final = frozenset({"lease.after_claim", "enqueue.after_commit"})


def trigger(armed: frozenset[str], name: str) -> None:
    """Die here if `name` is armed."""
    if name in armed:
        log.critical("failpoint %s: killing this process", name, extra={"event": "failpoint"})
        os.kill(os.getpid(), signal.SIGKILL)
