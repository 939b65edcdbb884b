"""Command-line helpers shared by the clipforge CLIs."""

from __future__ import annotations

import argparse
import functools
from typing import Any


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a default worth showing (not
    None, not a flag's False) and the help text does not already state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            "default" in help_text
            or default is None
            or default is False
            or default == argparse.SUPPRESS  # --help, --version
        ):
            return help_text
        return f"{help_text} (default: %(default)s)"


def subparser_class() -> Any:
    """``parser_class`` for ``add_subparsers``: every sub-command shows its defaults too."""
    return functools.partial(argparse.ArgumentParser, formatter_class=DefaultsHelpFormatter)


__all__ = ["DefaultsHelpFormatter", "subparser_class"]
