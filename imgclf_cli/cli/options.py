"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RunOption = Annotated[
    str,
    typer.Option("--run", help="Run id, run folder, or 'latest' (the newest completed run).", metavar="RUN"),
]
RunsDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--runs-dir",
        help="Root of the run store (default: $IMGCLF_RUNS_DIR or ./runs).",
        file_okay=False,
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print exactly one JSON object on stdout (progress stays on stderr)."),
]
