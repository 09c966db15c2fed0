"""Click parameter types shared by the commands.

`BoundedFloat` is the type of every number of seconds, rate or count of days on the command
line: click's FloatRange lets `nan`, `inf` and numbers like 1e300 through, which no setting
can mean and which then fail deep inside (`timedelta` overflows) with a traceback instead
of a usage error.

Unbounded, it describes no range in `--help`: click would print "x<=None". An option whose
value a component checks again (`enqueue --timeout` by `Task`, `worker --call-timeout` by
`Worker`) takes that component's bounds, so an out-of-range value is a usage error naming
the flag (exit 2) rather than the component's `error:` line (exit 1).
"""

from __future__ import annotations

import math
from typing import Any, Final

import click

from conveyor.text import not_utf8

# Beyond any setting: 31 years in seconds, a billion requests a second.
LARGEST: Final = 1e9


class BoundedFloat(click.FloatRange):
    """A FloatRange that also refuses nan, infinities and magnitudes beyond LARGEST."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Parse and range-check as FloatRange does, then refuse what no setting can be."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            # Before the range: "up to 1e+09" named a limit that is not the option's.
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if abs(number) > LARGEST:
            self.fail(f"{value!r} is not a finite number up to {LARGEST:g}", param, ctx)
        return number

    def _describe_range(self) -> str:
        """The range note `--help` prints, or none when neither end is bounded."""
        if self.min is None and self.max is None:
            return ""
        return super()._describe_range()


class WireCount(click.IntRange):
    """An IntRange whose top is a wire limit (a uint64 field's) that no one reaches.

    Bounded, so that a larger number is a usage error rather than the server's, with a
    `--help` that names only the bottom: `[1<=x<=18446744073709551615]` told nobody anything.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Parse and range-check as IntRange does, in words that fit the unnamed top."""
        number = click.INT.convert(value, param, ctx)
        if self.max is not None and number > self.max:
            self.fail(f"{number} is more than a request can carry ({self.max})", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        return f"x>={self.min}"


class WireText(click.types.StringParamType):
    """Text that can travel to a server: a usage error for bytes that are not UTF-8.

    Python hands a command-line argument that is not valid in the locale's encoding to the
    program as lone surrogates (surrogateescape), which no protobuf string can hold: sent
    as they are, they ended in a traceback, for a bulk action after its confirmation.
    """

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The text as given, if it encodes as UTF-8."""
        value = super().convert(value, param, ctx)
        bad = not_utf8(value)
        if bad is not None:
            self.fail(
                f"{bad!r} is not a character (bytes that are not UTF-8?); give it as text",
                param,
                ctx,
            )
        return value
