"""Rich consoles and small rendering helpers shared by every command.

Results go to stdout (``out``); progress, warnings and errors go to stderr (``err``), so that
``--json`` output on stdout stays exactly one JSON document.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.progress import Progress

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def progress_enabled() -> bool:
    """Live progress bars only when a human watches stderr (never in CI logs or pipes)."""
    if os.environ.get("IMGCLF_PROGRESS") == "0":
        return False
    return err.is_terminal


def print_json(document: Any) -> None:
    """Write one JSON document to stdout, bypassing Rich so nothing is wrapped or highlighted."""
    import json

    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {message}", highlight=False, markup=True)


def info(message: str) -> None:
    err.print(message, highlight=False)


def make_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    numeric: Sequence[str] = (),
) -> Table:
    """A table whose numeric columns are right-aligned."""
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, justify="right" if name in numeric else "left")
    for row in rows:
        table.add_row(*(format_cell(value) for value in row))
    return table


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def shorten_from_left(path: str, width: int) -> str:
    """``path`` in at most ``width`` cells, losing its start rather than its end
    (``…/rose/9633056561_6d.jpg``): the file name is what tells rows apart. Whole folder names
    go first; the file name itself is cut only when nothing else is left."""
    if cell_len(path) <= width:
        return path
    if width < 2:
        return "…"[:width]
    separators = [index for index, character in enumerate(path) if character in ("/", os.sep)]
    for index in separators:
        tail = "…" + path[index:]
        if cell_len(tail) <= width:
            return tail
    kept = path
    while cell_len(kept) > width - 1:
        kept = kept[1:]
    return "…" + kept


class PathCell:
    """A table cell holding a path, shortened from the left to the width its column gets.

    Rich can only cut text at its end, which hides the file name of a long path.
    ``fit_path_column`` decides that width.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, cell_len(self.path))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(shorten_from_left(self.path, options.max_width), no_wrap=True, overflow="ignore", end="")


# A file name longer than this (or than half the console) may lose its start too, rather than
# squeeze the other columns.
MAXIMUM_FILE_NAME_WIDTH = 40


def fit_path_column(table: Table, index: int, paths: Sequence[str], console: Console) -> None:
    """Give column ``index`` of ``table`` (``PathCell`` cells holding ``paths``) what the other
    columns leave of the console's width, but at least ``…/`` and the file name, so that the
    other columns wrap before a file name is cut. Nothing changes when the table fits."""
    column = table.columns[index]
    natural = max([cell_len(str(column.header)), *(cell_len(path) for path in paths)])
    unlimited = console.options.update_width(sys.maxsize // 2)
    others = console.measure(table, options=unlimited).maximum - natural
    available = console.width - others
    if available >= natural:
        return
    name_limit = min(MAXIMUM_FILE_NAME_WIDTH, console.width // 2)
    names = [min(cell_len("…/" + os.path.basename(path)), cell_len(path), name_limit) for path in paths]
    column.max_width = max([available, *names])
    column.no_wrap = True  # Rich then narrows the columns that can wrap


def print_skipped_files(skipped: Sequence[dict[str, str]], limit: int = 20) -> None:
    """List files that could not be read, on stderr (they were skipped, not fatal)."""
    if not skipped:
        return
    warn(f"{len(skipped)} file(s) could not be read and were skipped:")
    for entry in skipped[:limit]:
        err.print(f"  {entry['path']}: {entry['reason']}", highlight=False, markup=False)
    if len(skipped) > limit:
        err.print(f"  ... and {len(skipped) - limit} more", highlight=False)


def make_progress(*, counts: bool = True, metrics: bool = False) -> Progress:
    """The one progress display of every command, on stderr and gone when done.

    ``counts``: a bar with ``done/total`` (work of known size); otherwise a spinner (steps of
    unknown length). ``metrics`` adds a column for a task's ``metrics`` field (running loss...).
    Callers decide whether to show it at all (``progress_enabled()``).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns: list[Any] = (
        [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if counts
        else [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
    )
    if metrics:
        columns.append(TextColumn("{task.fields[metrics]}"))
    return Progress(*columns, console=err, transient=True)


@contextmanager
def progress_callbacks(
    description: str, quiet: bool = False
) -> Iterator[tuple[Callable[[int], None] | None, Callable[[int], None] | None]]:
    """A progress bar on stderr when a person watches it (``Loading model`` until the images
    start); no callbacks otherwise."""
    if quiet or not progress_enabled():
        yield None, None
        return
    with make_progress() as progress:
        task = progress.add_task("Loading model", total=None)

        def on_start(total: int) -> None:
            progress.update(task, description=description, total=total)

        def on_progress(count: int) -> None:
            progress.advance(task, count)

        yield on_start, on_progress


@contextmanager
def status_callback(first_message: str, quiet: bool = False) -> Iterator[Callable[[str], None] | None]:
    """``on_status(message)`` for steps of unknown length: a spinner line on a terminal, one
    plain line per step when stderr is a file or pipe, nothing when ``quiet``."""
    if quiet:
        yield None
        return
    if not progress_enabled():
        yield info
        return
    with make_progress(counts=False) as progress:
        task = progress.add_task(first_message, total=None)
        yield lambda message: progress.update(task, description=message)


def make_training_progress(console: Console | None = None) -> Progress:
    """``make_progress(metrics=True)`` with two more columns for training: the time left and the
    speed, the task fields ``remaining`` and ``rate`` (text the caller keeps up to date, as it
    does ``metrics``). The caller estimates them: an epoch can outlast Rich's 30-second speed
    window, and the first step of a session, which traces the model, must not set the pace.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    columns = [
        TextColumn("{task.description}"),
        # Narrower than make_progress's 40 cells: with the two columns more, a bar still fits in
        # one line of 110 columns.
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        # Fixed widths: the bars must not jump as the numbers change from one step to the next.
        TextColumn("{task.fields[remaining]}", justify="right", table_column=Column(min_width=12)),
        TextColumn("{task.fields[rate]}", justify="right", table_column=Column(min_width=11)),
        TextColumn("{task.fields[metrics]}"),
    ]
    return Progress(*columns, console=console or err, transient=True)
