"""Payload previews: whether the first bytes of a payload or result read as text.

Shared by the dashboard and the CLI, so both show the same payload the same way. Text means
UTF-8 without control characters other than tab, newline and carriage return: an escape
sequence could restyle or clear an operator's terminal, and anything else is better read
as hex.
"""

from __future__ import annotations

import codecs
import unicodedata
from typing import Final

_PRINTABLE_CONTROLS: Final = frozenset("\t\n\r")


def as_text(head: bytes, *, complete: bool) -> str | None:
    """`head` decoded as text, or None when it is not text.

    `complete` says whether `head` is the whole payload: when it is only the beginning, a
    multi-byte character cut at its end is not a sign of binary data (an incremental
    decoder leaves it out).
    """
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError:
        return None
    if any(unicodedata.category(char) == "Cc" and char not in _PRINTABLE_CONTROLS for char in text):
        return None
    return text
