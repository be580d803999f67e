"""Rich rendering of ``imgclf runs``: the run list, one run's details, a comparison."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.markup import escape

from imgclf_cli.console import make_table, out, warn
from imgclf_cli.time_budget import format_duration

if TYPE_CHECKING:
    from imgclf_cli.run_catalog import RunDetails, RunSummary
    from imgclf_cli.run_comparison import RunComparison

STATUS_STYLES = {
    "completed": "green",
    "running": "cyan",
    "interrupted": "yellow",
    "failed": "red",
    "crashed": "red",
    "damaged": "magenta",
}


def human_size(size: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size:.1f}T"  # pragma: no cover


def styled_status(status: str) -> str:
    return f"[{STATUS_STYLES.get(status, 'white')}]{status}[/]"


def export_label(name: str) -> str:
    """``model_int8.tflite`` -> ``tflite-int8``; ``saved_model`` and unknown names as they are."""
    stem, dot, extension = name.partition(".")
    if not dot:
        return name
    variant = stem.removeprefix("model").strip("_")
    return f"{extension}-{variant}" if variant else extension


def seconds_text(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)


def number_text(value: float | None, digits: int = 4) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


# The columns a narrow terminal loses first (the rest always stay: run, status, epochs, val acc,
# val loss, disk); --json has them all.
OPTIONAL_COLUMNS = ("exports", "classes", "size", "model", "time", "dataset")
NUMERIC_COLUMNS = ("classes", "epochs", "val acc", "val loss", "time", "disk")


def list_row(summary: RunSummary) -> dict[str, str]:
    """The cells of a run's row, as plain text (``-`` for a missing value)."""
    cells = {
        "run": summary.run_id,
        "status": summary.status,
        "model": summary.model,
        "size": "x".join(str(side) for side in summary.image_size) if summary.image_size else None,
        "dataset": f"{summary.dataset} {(summary.dataset_fingerprint or '')[:8]}".strip()
        if summary.dataset
        else None,
        "classes": summary.num_classes,
        "epochs": summary.epochs,
        "val acc": number_text(summary.val_accuracy),
        "val loss": number_text(summary.val_loss),
        "time": seconds_text(summary.train_seconds),
        "exports": ", ".join(export_label(name) for name in summary.exports),
        "disk": human_size(summary.size_bytes),
    }
    return {name: "-" if value in (None, "") else str(value) for name, value in cells.items()}


def render_list(summaries: Sequence[RunSummary], title: str) -> None:
    """The run table, without the columns that do not fit the terminal (saying which).

    Widths are counted here from the plain cells: measuring a table of hundreds of rows with
    Rich, once per candidate set of columns, took longer than reading the store.
    """
    rows = [list_row(summary) for summary in summaries]
    widths = {name: max(cell_len(name), *(cell_len(row[name]) for row in rows)) for name in rows[0]}
    shown = list(widths)
    hidden: list[str] = []
    for name in OPTIONAL_COLUMNS:
        # Each column takes its width, one space each side and one border; plus the last border.
        if sum(widths[column] + 3 for column in shown) + 1 <= out.width:
            break
        shown.remove(name)
        hidden.append(name)
    cells = [
        [
            styled_status(value) if name == "status" else escape(value)
            for name, value in row.items()
            if name in shown
        ]
        for row in rows
    ]
    table = make_table(shown, cells, title=escape(title), numeric=NUMERIC_COLUMNS)
    for column in table.columns:
        # Too narrow a terminal folds run ids over two lines rather than cut a number or a status.
        column.no_wrap = column.header in (*NUMERIC_COLUMNS, "status")
    table.columns[0].overflow = "fold"
    out.print(table)
    if hidden:
        out.print(f"Not shown, for the width: {', '.join(hidden)} (--json has them).", highlight=False)
    for summary in summaries:
        if summary.problem:
            out.print(f"{escape(summary.run_id)}: {escape(summary.problem)}", highlight=False)


def key_value_table(title: str, pairs: Sequence[tuple[str, Any]]) -> Any:
    table = make_table(["", ""], [(name, value) for name, value in pairs if value is not None], title=title)
    table.show_header = False
    return table


def render_details(details: RunDetails, full: bool) -> None:
    summary = details.summary
    title = f"[bold]Run {escape(summary.run_id)}[/bold] {styled_status(summary.status)}"
    out.print(f"{title}  {escape(str(summary.path))}", highlight=False)
    for problem in details.problems:
        warn(escape(problem))
    out.print(
        key_value_table(
            "Run",
            [
                ("model", escape(summary.model or "-")),
                ("image size", "x".join(map(str, summary.image_size)) if summary.image_size else None),
                ("epochs", summary.epochs),
                ("best epoch", summary.best_epoch),
                ("val accuracy", number_text(summary.val_accuracy)),
                ("val loss", number_text(summary.val_loss)),
                ("training time", seconds_text(summary.train_seconds)),
                ("started", summary.started),
                ("finished", summary.finished),
                ("stopped by", details.stopped_by),
                ("failure", escape(details.failure) if details.failure else None),
                ("last sign of life", summary.last_seen),
                ("stale outputs", ", ".join(summary.stale) or None),
                ("size on disk", human_size(summary.size_bytes)),
            ],
        )
    )
    if full:
        rows = [(escape(key), escape(repr_value(value))) for key, value in details.config.items()]
        out.print(make_table(["key", "value"], rows, title="Config"))
    elif details.config_differences:
        rows = [
            (escape(key), escape(repr_value(value)), escape(repr_value(default)))
            for key, (default, value) in details.config_differences.items()
        ]
        out.print(
            make_table(["key", "value", "default"], rows, title="Config (differences from the defaults)")
        )
    else:
        out.print("Config: the defaults (--full shows every key)", highlight=False)
    render_dataset(details)
    render_history(details)
    render_evaluations(details)
    render_export(details)
    rows = [
        (escape(entry.name + ("/" if entry.is_dir else "")), human_size(entry.size_bytes))
        for entry in details.files
    ]
    out.print(make_table(["file", "size"], rows, title="Files", numeric=["size"]))


def repr_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def render_dataset(details: RunDetails) -> None:
    dataset = details.dataset
    if not dataset:
        return
    per_class = dataset.get("train_per_class")
    classes = (
        ", ".join(f"{name} {count}" for name, count in per_class.items())
        if isinstance(per_class, dict)
        else None
    )
    splits = [dataset.get(f"num_{split}") for split in ("train", "val", "test")]
    out.print(
        key_value_table(
            "Dataset and split",
            [
                ("root", escape(str(dataset.get("root")))),
                ("layout", dataset.get("layout")),
                ("fingerprint", dataset.get("fingerprint")),
                ("images", dataset.get("num_images")),
                ("train / val / test", " / ".join("-" if count is None else str(count) for count in splits)),
                ("train per class", escape(classes) if classes else None),
                ("skipped files", len(details.skipped_files)),
            ],
        )
    )
    for entry in details.skipped_files[:10]:
        out.print(
            f"  skipped {escape(str(entry.get('path')))}: {escape(str(entry.get('reason')))}", highlight=False
        )
    if len(details.skipped_files) > 10:
        out.print(
            f"  ... and {len(details.skipped_files) - 10} more (--json lists them all)", highlight=False
        )


def render_history(details: RunDetails) -> None:
    metrics = ["loss", "accuracy", "val_loss", "val_accuracy"]
    rows = [
        [
            name,
            int(row.get("epoch", 0)),
            *(row.get(metric) for metric in metrics),
            f"{row['learning_rate']:.3g}" if "learning_rate" in row else None,
        ]
        for name, row in (("best", details.best), ("last", details.last))
        if row is not None
    ]
    if rows:
        numeric = ["epoch", *metrics, "learning_rate"]
        out.print(make_table(["", *numeric], rows, title="Metrics (history.csv)", numeric=numeric))


def render_evaluations(details: RunDetails) -> None:
    if not details.evaluations:
        return
    numbers = ["images", "accuracy", "macro F1", "weighted F1", "ECE", "misclassified"]
    rows = [
        [
            escape(item.dataset) + (" (stale)" if item.stale else ""),
            item.num_samples,
            item.accuracy,
            item.f1_macro,
            item.f1_weighted,
            item.ece,
            item.num_misclassified,
        ]
        for item in details.evaluations
    ]
    out.print(make_table(["evaluation", *numbers], rows, title="Evaluations (eval/)", numeric=numbers))


def render_export(details: RunDetails) -> None:
    export = details.export
    if export is None:
        return
    numbers = ["size", "agreement", "max diff", "accuracy", "latency ms"]
    rows = []
    for artifact in export.artifacts:
        passed = artifact.get("passed")
        size = artifact.get("size_bytes")
        rows.append(
            [
                escape(Path(str(artifact.get("path") or "-")).name),
                escape(str(artifact.get("format"))),
                escape(str(artifact.get("quantization") or artifact.get("quantize") or "-")),
                human_size(size) if isinstance(size, int) else None,
                artifact.get("agreement"),
                artifact.get("max_abs_diff"),
                artifact.get("accuracy"),
                artifact.get("latency_ms"),
                "[green]passed[/]"
                if passed is True
                else "[red]failed[/]"
                if passed is False
                else "not verified",
            ]
        )
    verdict = {True: "all passed", False: "some failed", None: "not verified"}[export.passed]
    title = f"Exports (export/, {verdict}{', stale' if export.stale else ''})"
    columns = ["artifact", "format", "quantization", *numbers, "verification"]
    out.print(make_table(columns, rows, title=title, numeric=numbers))
    if not export.artifacts:
        out.print(f"  files: {escape(', '.join(export.files))}", highlight=False)


def render_comparison(comparison: RunComparison) -> None:
    runs = comparison.runs
    ids = [escape(summary.run_id) for summary in runs]
    fields: list[tuple[str, Callable[[RunSummary], Any]]] = [
        ("status", lambda item: styled_status(item.status)),
        ("model", lambda item: escape(item.model or "-")),
        ("image size", lambda item: "x".join(map(str, item.image_size)) if item.image_size else None),
        (
            "dataset",
            lambda item: (
                escape(f"{item.dataset} {(item.dataset_fingerprint or '')[:8]}") if item.dataset else None
            ),
        ),
        ("classes", lambda item: item.num_classes),
        ("epochs", lambda item: item.epochs),
        ("best epoch", lambda item: item.best_epoch),
        ("val accuracy", lambda item: number_text(item.val_accuracy)),
        ("val loss", lambda item: number_text(item.val_loss)),
        ("training time", lambda item: seconds_text(item.train_seconds)),
        ("size on disk", lambda item: human_size(item.size_bytes)),
    ]
    rows = [[name, *(value(summary) for summary in runs)] for name, value in fields]
    out.print(make_table(["", *ids], rows, title="Runs", numeric=ids))
    same = "the same dataset" if comparison.same_dataset else "different datasets (or unknown)"
    out.print(f"Dataset: {same}", highlight=False)
    if comparison.config_differences:
        rows = [
            [escape(key), *(escape(repr_value(value)) for value in values)]
            for key, values in comparison.config_differences.items()
        ]
        out.print(make_table(["config key", *ids], rows, title="Config differences"))
    else:
        out.print("Config: the same", highlight=False)
    for dataset, entries in comparison.evaluations.items():
        per_class = comparison.per_class_f1(dataset)
        rows = [[escape(label), *scores] for label, scores in per_class.items()]
        rows.append(["accuracy", *(entry.accuracy if entry else None for entry in entries)])
        rows.append(["macro F1", *(entry.f1_macro if entry else None for entry in entries)])
        table = make_table(["class", *ids], rows, title=f"F1 per class (eval/{escape(dataset)})", numeric=ids)
        if len(table.rows) > 2:
            table.rows[-3].end_section = True
        out.print(table)
    for problem in comparison.problems:
        warn(escape(problem))
