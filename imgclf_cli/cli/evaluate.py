"""``imgclf evaluate``: parse options, call ``imgclf_cli.evaluation.evaluate``, render the report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from imgclf_cli.cli.options import JsonOption, RunOption, RunsDirOption
from imgclf_cli.console import err, make_table, out, print_json, progress_callbacks, warn
from imgclf_cli.filesystems import is_url

if TYPE_CHECKING:
    from imgclf_cli.evaluation import EvaluationReport

# Wider confusion matrices are unreadable in a terminal; the CSV and PNG still hold them.
MAX_MATRIX_COLUMNS = 15


def local_folder_or_url(value: str | None) -> str | None:
    """DATA_DIR as given: a URL is checked when it is listed; a local folder must exist now."""
    if value is None or is_url(value):
        return value
    folder = Path(value)
    if not folder.exists():
        raise typer.BadParameter(f"Directory '{value}' does not exist.")
    if not folder.is_dir():
        raise typer.BadParameter(f"Directory '{value}' is a file.")
    return value


def evaluate_command(
    data_dir: Annotated[
        str | None,
        typer.Argument(
            help="A labelled folder: one sub-folder per class, named as the run's classes "
            "(with train/ val/ test/ sub-folders: its test split, else val); "
            "or its s3://, gs:// or az:// URL. "
            "Default: the run's own test split, or its validation split when the dataset had no test split.",
            callback=local_folder_or_url,
            metavar="DATA_DIR",
            show_default=False,
        ),
    ] = None,
    run: RunOption = "latest",
    runs_dir: RunsDirOption = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", min=1, metavar="N")] = 64,
    json_output: JsonOption = False,
) -> None:
    """Evaluate a trained run: per-class precision, recall and F1, confusion matrix, calibration.

    The report and its files (metrics.json, confusion_matrix.csv/.png, misclassified.csv and a
    gallery of the most confidently wrong images, reliability.png) are written to
    RUN/eval/NAME/, where NAME is the split (val or test) or the folder evaluated.

    Example:

    \b
        imgclf evaluate --run latest
        imgclf evaluate labelled_images/ --run 20240501-101500-imgclf-cnn --json
    """
    from imgclf_cli.evaluation import evaluate

    with progress_callbacks("Evaluating", quiet=json_output) as (on_start, on_progress):
        report = evaluate(
            run=run,
            data_dir=data_dir,
            runs_dir=runs_dir,
            batch_size=batch_size,
            on_warning=lambda text: warn(escape(text)),
            on_start=on_start,
            on_progress=on_progress,
        )
    if json_output:
        print_json(report.to_dict())
        return
    render_report(report)


def render_report(report: EvaluationReport) -> None:
    labels = [escape(label) for label in report.labels]
    rows: list[list[object]] = [
        [label, metrics.precision, metrics.recall, metrics.f1, metrics.support]
        for label, metrics in zip(labels, report.per_class.values(), strict=True)
    ]
    total = report.num_samples
    rows.append(["macro avg", report.precision_macro, report.recall_macro, report.f1_macro, total])
    weighted = [report.precision_weighted, report.recall_weighted, report.f1_weighted]
    rows.append(["weighted avg", *weighted, total])
    numbers = ["precision", "recall", "f1", "support"]
    title = f"Per class ({escape(report.description)})"
    per_class = make_table(["class", *numbers], rows, title=title, numeric=numbers)
    per_class.rows[-3].end_section = True
    out.print(per_class)

    if len(labels) <= MAX_MATRIX_COLUMNS:
        matrix_rows = [
            [label, *counts] for label, counts in zip(labels, report.confusion_matrix, strict=True)
        ]
        out.print(
            make_table(
                ["true \\ predicted", *labels],
                matrix_rows,
                title="Confusion matrix (rows: true class, columns: predicted class)",
                numeric=labels,
            )
        )
    else:
        matrix_file = escape(str(Path(report.output_dir) / "confusion_matrix.csv"))
        out.print(f"Confusion matrix: {len(labels)} classes, see {matrix_file}")

    top_k = "".join(f", top-{k} {value:.4f}" for k, value in report.top_k_accuracy.items())
    out.print(
        f"[bold]Accuracy {report.accuracy:.4f}[/bold]{top_k}, macro F1 {report.f1_macro:.4f}, "
        f"weighted F1 {report.f1_weighted:.4f}, ECE {report.ece:.4f} on {report.num_samples} images "
        f"({report.num_misclassified} misclassified), run {escape(report.run_id)}",
        highlight=False,
    )
    err.print(f"Files written to {escape(report.output_dir)}", highlight=False)
