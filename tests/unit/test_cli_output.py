"""What the CLI prints of handler-supplied text: never live terminal control sequences."""

from __future__ import annotations

import pytest

from conveyor.cli.output import inert, plain, truncate


class TestInert:
    @pytest.mark.parametrize(
        ("raw", "shown"),
        [
            ("plain text", "plain text"),
            ("tab\tand\nnewline", "tab\tand\nnewline"),
            ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
            ("title\x1b]0;pwned\x07", "title\\x1b]0;pwned\\x07"),
            ("abc\u202edcba", "abc\\u202edcba"),  # a bidi override reorders what follows
            ("héllo ✓", "héllo ✓"),
        ],
    )
    def test_control_and_format_characters_become_escapes(self, raw, shown) -> None:
        assert inert(raw) == shown

    def test_every_printing_path_is_inert(self) -> None:
        assert "\x1b" not in plain("a\x1b[31mred").plain
        assert "\x1b" not in truncate("a\x1b[31mred", 40)
