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


def part_arg(value: str) -> tuple[int, int]:
    """``I/N`` of a ``--part`` option (0 <= I < N): the slice of a job that one SLURM array task
    or rank does, for ``clipforge-data write`` and ``clipforge-index build`` alike."""
    try:
        i_str, n_str = value.split("/")
        i, n = int(i_str), int(n_str)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part wants I/N (e.g. 3/8), got {value!r}") from None
    if not (n > 0 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--part {value}: need 0 <= I < N")
    return i, n


__all__ = ["DefaultsHelpFormatter", "part_arg", "subparser_class"]
