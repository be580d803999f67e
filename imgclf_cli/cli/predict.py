"""``imgclf predict``: parse options, call ``imgclf_cli.prediction.predict``, render the results.

Light on purpose: neither this module nor ``imgclf_cli.prediction`` imports TensorFlow, so a
``.tflite`` or ``.onnx`` model predicts without it.
"""

from __future__ import annotations

import io
from enum import Enum
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from imgclf_cli.cli.options import RunsDirOption
from imgclf_cli.console import (
    PathCell,
    err,
    fit_path_column,
    format_cell,
    make_table,
    out,
    progress_callbacks,
    warn,
)
from imgclf_cli.errors import DatasetError

if TYPE_CHECKING:
    from rich.table import Table

    from imgclf_cli.prediction import PredictionReport, PredictionResult


# Tables written to a file or a pipe are never shortened: a width no table reaches.
UNLIMITED_WIDTH = 100_000


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def predict_command(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively) and glob patterns such as 'photos/**/*.jpg'; "
            "each may be an s3://, gs:// or az:// URL.",
            metavar="PATH...",
            show_default=False,
        ),
    ],
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Run id, run folder, or 'latest' (the newest completed run); the default without --model.",
            metavar="RUN",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="A run folder, a .keras file, a SavedModel folder, a .tflite or an .onnx file "
            "(labels are read from beside it).",
            exists=True,
            metavar="MODEL",
            show_default=False,
        ),
    ] = None,
    runs_dir: RunsDirOption = None,
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            help="How many classes to list per image (at most the number of classes).",
            min=1,
            metavar="K",
        ),
    ] = 3,
    output_format: Annotated[
        OutputFormat | None,
        typer.Option(
            "--format",
            help="table, json (one array) or csv. "
            "Default: from the --output extension (.json, .csv), else table.",
            case_sensitive=False,
            metavar="FORMAT",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the results to this file instead of stdout.",
            dir_okay=False,
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", min=1, metavar="N")] = 32,
) -> None:
    """Predict the class of images with a trained model.

    Unreadable files get an entry with an "error" field and a warning on stderr; the exit
    code is 0 when at least one image was predicted, 1 when none could be.

    Example:

    \b
        imgclf predict photos/ extra/*.jpg --top-k 2
        imgclf predict photos/ --model model.tflite --output predictions.json
    """
    from imgclf_cli.errors import UsageError
    from imgclf_cli.prediction import predict

    if run is not None and model is not None:
        raise UsageError(
            "--run and --model were both given", "pass either --model FILE or --run RUN, not both"
        )
    if output is not None:
        from imgclf_cli.inference import check_output_folder

        # Before the model loads: results that cannot be saved are not worth computing.
        check_output_folder(
            output.parent,
            "the results",
            "free some space or make it writable, or pass --output FILE elsewhere",
        )
    chosen = resolve_format(output_format, output)
    # No progress bar for one file: it would be drawn and erased within milliseconds.
    one_file = len(paths) == 1 and Path(paths[0]).is_file()
    with progress_callbacks("Predicting", quiet=one_file) as (on_start, on_progress):
        report = predict(
            paths,
            model=model,
            run=run,
            runs_dir=runs_dir,
            top_k=top_k,
            batch_size=batch_size,
            on_unreadable=lambda path, reason: warn(f"{escape(path)}: {escape(reason)}"),
            on_start=on_start,
            on_progress=on_progress,
            on_warning=lambda text: warn(escape(text)),
        )
    if output is not None:
        from imgclf_cli.store import atomic_write_text

        atomic_write_text(output, render(report, chosen))
        written = f"Wrote {len(report.results)} results ({chosen.value}) to {escape(str(output))}"
        err.print(written, highlight=False)
    elif chosen is OutputFormat.table and out.is_terminal:
        print_tables(out, report)  # fitted to the terminal: long paths lose their start
    else:
        typer.echo(render(report, chosen), nl=False)
    err.print(
        f"Predicted {report.num_predicted} of {len(report.results)} images with {escape(report.model)} "
        f"(model loaded in {report.load_seconds:.1f} s, images predicted in {report.predict_seconds:.1f} s)",
        highlight=False,
    )
    if report.num_predicted == 0:
        raise DatasetError(
            f"None of the {len(report.results)} files could be read as an image",
            "supported formats are JPEG, PNG, BMP, GIF, WebP and TIFF",
        )


def resolve_format(chosen: OutputFormat | None, output: Path | None) -> OutputFormat:
    if chosen is not None:
        return chosen
    suffix = output.suffix.lower() if output else ""
    return {".json": OutputFormat.json, ".csv": OutputFormat.csv}.get(suffix, OutputFormat.table)


def render(report: PredictionReport, chosen: OutputFormat) -> str:
    """The results as text, for a file or a pipe: tables at full width (never shortened)."""
    if chosen is OutputFormat.json:
        import json

        return json.dumps(report.to_list(), indent=2) + "\n"
    if chosen is OutputFormat.csv:
        return report.to_csv()
    buffer = io.StringIO()
    print_tables(Console(file=buffer, width=UNLIMITED_WIDTH, color_system=None, soft_wrap=False), report)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def print_tables(console: Console, report: PredictionReport) -> None:
    """One table per folder argument, under a line naming it, its paths relative to it; the
    files and patterns between folder arguments in tables of their own, as given."""
    for folder, results in groupby(report.results, key=lambda result: result.folder):
        if folder is not None:
            console.print(f"Images in {folder}", markup=False, highlight=False)
        console.print(results_table(list(results), report.top_k, console))


def results_table(results: list[PredictionResult], top_k: int, console: Console) -> Table:
    """The results as rows, fitted to ``console``: a long path loses its start, not its file name."""
    table = make_table(["path", "label", "confidence", f"top {top_k}"], [], numeric=["confidence"])
    for result in results:
        path = PathCell(result.display_path)
        if result.error is not None:
            table.add_row(path, "-", "-", f"[red]error: {escape(result.error)}[/red]")
            continue
        ranked = ", ".join(f"{escape(entry.label)}={entry.probability:.3f}" for entry in result.top_k)
        table.add_row(path, escape(result.label or ""), format_cell(result.confidence), ranked)
    fit_path_column(table, 0, [result.display_path for result in results], console)
    return table
