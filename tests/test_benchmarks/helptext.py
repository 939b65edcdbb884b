"""The help-text rule of clipforge's command lines, for the benchmarks' own parsers."""

from __future__ import annotations

import argparse


def check_every_option_has_help_with_its_default(p: argparse.ArgumentParser) -> None:
    """Each option says what it does; each optional one also says what happens when it is not
    given (its default value, or in words for flags and None)."""
    options = [
        a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]
    assert options
    for action in options:
        name = "/".join(action.option_strings)
        assert action.help and action.help.strip(), f"{name}: no help text"
        if action.required:
            continue
        rendered = action.help % {**vars(action), "default": action.default, "prog": p.prog}
        assert "default" in rendered, f"{name}: help does not show the default"
        if action.default not in (None, False, True, []) and not isinstance(action.default, tuple):
            assert str(action.default) in rendered, f"{name}: {rendered!r}"
    text = p.format_help()  # renders without a formatting error
    assert all(s in text for a in options for s in a.option_strings)
