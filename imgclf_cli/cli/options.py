"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def flag(*names: str, help: str, **settings: Any) -> Any:
    """A boolean option that takes no value (``--json``), shown without a type in ``--help``.

    Typer 0.29's help panels print ``<bool>`` beside a flag that has no metavar; an empty one
    prints nothing. Use it as ``Annotated[bool, flag("--json", help="...")] = False``.
    """
    return typer.Option(*names, help=help, metavar="", **settings)


def show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


# Every command's --help (``imgclf_cli.cli.app`` turns Typer's own off): Typer's is shown as
# ``--help <bool>``, and the group's copy makes ``imgclf COMMAND --help`` import pydantic
# (Typer validates a flag through pydantic unless its value is already a bool: Typer's has
# no default, this one defaults to False).
HelpOption = Annotated[
    bool,
    flag("--help", help="Show this message and exit.", is_eager=True, expose_value=False, callback=show_help),
]
RunOption = Annotated[
    str,
    typer.Option("--run", help="Run id, run folder, or 'latest' (the newest completed run).", metavar="RUN"),
]
RunsDirOption = Annotated[
    Path | None,
    typer.Option(
        "--runs-dir",
        help="Root of the run store (default: $IMGCLF_RUNS_DIR or ./runs).",
        file_okay=False,
        metavar="DIR",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool,
    flag("--json", help="Print exactly one JSON object on stdout (progress stays on stderr)."),
]
