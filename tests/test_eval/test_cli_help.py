"""Every option of every clipforge-data and clipforge-eval command has help text, and every
option with a default shows it in --help."""

from __future__ import annotations

import argparse

import pytest

from clipforge.data_tools.cli import build_parser as data_parser
from clipforge.eval.cli import build_parser as eval_parser


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(f"{parser.prog} {name}", sub)]
    return out


def _help_block(text: str, action: argparse.Action) -> str:
    """The lines of ``--help`` that describe ``action`` (its invocation and help text)."""
    lines = text.splitlines()
    head = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(str(head)) and len(line) - len(stripped) == 2:
            block = [line]
            for nxt in lines[i + 1 :]:
                if not nxt.strip() or (len(nxt) - len(nxt.lstrip()) == 2):
                    break
                block.append(nxt)
            return " ".join(" ".join(block).split())
    raise AssertionError(f"{head} not found in the help text")


ALL = [*_commands(data_parser()), *_commands(eval_parser())]


@pytest.mark.parametrize("prog, parser", ALL, ids=[p for p, _ in ALL])
def test_every_option_has_help_and_shows_its_default(
    prog: str, parser: argparse.ArgumentParser
) -> None:
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{prog} {name}: no help text"
        block = _help_block(text, action)
        assert len(block.split()) > 1 + len(action.option_strings), f"{prog} {name}: {block!r}"
        if action.default is not None and action.default is not False:
            assert "default" in block, f"{prog} {name}: default {action.default!r} not shown"
            if "(default: " in block and isinstance(action.default, (int, str)):
                assert f"(default: {action.default})" in block, block


def test_the_write_options_of_the_issue_show_their_defaults() -> None:
    write = dict(_commands(data_parser()))["clipforge-data write"]
    text = " ".join(write.format_help().split())
    for shown in (
        "(default: 224)",
        "(default: center_crop)",
        "(default: jpg)",
        "(default: 10000)",
        "processes encoding shards in parallel (default: 1)",
        "folder the shards",
    ):
        assert shown in text
