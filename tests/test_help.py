"""Every ``--help`` reads cleanly in an 80-column terminal.

Click caps help at 80 columns (78 of text) whatever the terminal's width, and wraps it to a
narrower terminal: 80 columns is what most users see. Each page is checked for what made it
hard to read: lines too long, type names instead of placeholders (``<int range>``,
``<bool>``, ``list[str]``), Typer's braces around required arguments, a word split across
lines, an example wrapped into its neighbour, one argument spelled several ways.
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from imgclf_cli.cli.app import app

COMMANDS = [info.name for info in app.registered_commands if info.name]
# How each command writes its data argument in its usage line: optional in brackets, required
# bare, several with "...". No other spelling of it may appear anywhere in the help.
USAGE_ENDINGS = {
    "train": "[OPTIONS] [DATA_DIR]",
    "evaluate": "[OPTIONS] [DATA_DIR]",
    "predict": "[OPTIONS] PATH...",
    "export": "[OPTIONS]",
    "export-tflite": "[OPTIONS]",
    "inspect-dataset": "[OPTIONS] DATA_DIR",
}
OTHER_SPELLINGS = re.compile(r"data_dir|data-dir|DATA-DIR|\[PATH|PATH\]")
# Typer's and Click's type names: <int range>, <file>, <bool>, <table|json|csv>, list[str].
TYPE_NAME = re.compile(r"<[a-z][\w |.\[\]-]*>|list\[")
# Placeholders are capitals: FILE, DIR, N, KEY=VALUE, MODE.
METAVAR = re.compile(r"[A-Z][A-Z_]*(=[A-Z]+)?")
WIDE = 10_000

runner = CliRunner()


def render_help(command: str | None, terminal_width: int | None = None) -> str:
    """The help page as a user sees it in an 80-column terminal, or laid out ``terminal_width`` wide."""
    args = [command, "--help"] if command else ["--help"]
    if terminal_width is None:
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
    else:
        result = runner.invoke(app, args, terminal_width=terminal_width)
    assert result.exit_code == 0, result.output
    return result.stdout


def option_metavars(page: str) -> list[str]:
    """The placeholder after each option name in the Options section (``FILE`` of ``--config FILE``)."""
    options = page.split("\nOptions:\n", 1)[1]
    metavars = []
    for line in options.splitlines():
        if line.startswith("  -"):
            names = re.split(r" {2,}", line.strip())[0]
            metavars += [word for word in names.split() if not word.startswith("-") and word != "/"]
    return metavars


def example_lines(page: str) -> list[str]:
    """The lines of the page's Example section, up to the next section."""
    if "Example:" not in page:
        return []
    block = page.split("Example:\n", 1)[1]
    block = re.split(r"\n(?:Arguments|Options):\n", block, maxsplit=1)[0]
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("command", [None, *COMMANDS], ids=lambda name: name or "imgclf")
def test_help_fits_80_columns_and_names_no_type(command: str | None) -> None:
    page = render_help(command)
    assert [line for line in page.splitlines() if len(line) > 80] == []
    assert TYPE_NAME.findall(page) == []
    assert "{" not in page and "}" not in page  # Typer's {ARGUMENT}
    assert [name for name in option_metavars(page) if not METAVAR.fullmatch(name)] == []


@pytest.mark.parametrize("command", [None, *COMMANDS], ids=lambda name: name or "imgclf")
def test_no_word_is_broken_or_cut_at_80_columns(command: str | None) -> None:
    """The same words, in the same order, as a page laid out without a width limit: no word
    is split at a hyphen or mid-word, no summary is cut short with "..."."""
    assert render_help(command).split() == render_help(command, terminal_width=WIDE).split()


@pytest.mark.parametrize("command", COMMANDS)
def test_data_argument_is_spelled_one_way(command: str) -> None:
    page = render_help(command)
    usage = page.splitlines()[0]
    assert usage == f"Usage: imgclf {command} {USAGE_ENDINGS[command]}"
    assert OTHER_SPELLINGS.findall(page) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_examples_are_whole_commands_indented_alike(command: str) -> None:
    lines = example_lines(render_help(command))
    assert lines, "every command's help has an example"
    assert [line for line in lines if not line.startswith(f"      imgclf {command} ")] == []
