"""``imgclf inspect-dataset``: parse options, call ``imgclf_cli.inspection.inspect_dataset``, render."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from imgclf_cli.cli.options import JsonOption, flag
from imgclf_cli.console import err, make_progress, make_table, out, print_json, progress_enabled

# The report's dataclasses and defaults only: NumPy and Pillow load when the command runs.
from imgclf_cli.inspection_report import DEFAULT_HASH_DISTANCE, MAX_HASH_DISTANCE, InspectionReport

SEVERITY_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}
EXAMPLES_SHOWN = 5


def inspect_dataset_command(
    data_dir: Annotated[
        str,
        typer.Argument(
            help="Folder with one sub-folder of images per class (or train/ val/ test/ splits of them), "
            "or the s3://, gs:// or az:// URL of one.",
            metavar="DATA_DIR",
            show_default=False,
        ),
    ],
    json_output: JsonOption = False,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Also write the JSON and PNG plots (class counts, image sizes, samples, near duplicates) "
            "to this folder. It must lie outside DATA_DIR.",
            file_okay=False,
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
    strict: Annotated[
        bool,
        flag(
            "--strict",
            help="Exit with code 1 when errors are found (undecodable files, classes without images, "
            "images filed under two classes, images in two splits). Warnings never fail.",
        ),
    ] = False,
    near_duplicates: Annotated[
        bool,
        flag(
            "--near-duplicates/--no-near-duplicates",
            help="Look for near-identical images (re-encoded, resized) with a perceptual hash.",
        ),
    ] = True,
    hash_distance: Annotated[
        int,
        typer.Option(
            "--hash-distance",
            help="Largest difference, in bits of a 64-bit perceptual hash, that counts as a near duplicate. "
            "Raise it to find more, lower it for fewer false matches.",
            min=0,
            max=MAX_HASH_DISTANCE,
            metavar="BITS",
        ),
    ] = DEFAULT_HASH_DISTANCE,
) -> None:
    """Find what is wrong with a dataset before training on it; never changes a file.

    Reports image counts per class and split, class imbalance, formats (from content, not
    extension), colour modes, image sizes, files that cannot be decoded, exact and near
    duplicates (within a class, across classes, across splits) and a list of findings, worst
    first, each with what to do.

    Example:

    \b
        imgclf inspect-dataset flowers/ --report inspection/ --strict
    """
    from imgclf_cli.inspection import inspect_dataset

    if report_dir is not None:
        from imgclf_cli.inspection_plots import check_report_dir, write_report

        check_report_dir(report_dir, data_dir)
    with scan_progress() as on_progress:
        report = inspect_dataset(
            data_dir, near_duplicates=near_duplicates, hash_distance=hash_distance, on_progress=on_progress
        )
    written = write_report(report, report_dir) if report_dir is not None else []
    if json_output:
        print_json(report.to_dict())
    else:
        render_report(report)
    for path in written:
        err.print(f"Wrote {path}", highlight=False, markup=False)
    if strict and report.has_errors:
        raise typer.Exit(1)


@contextmanager
def scan_progress() -> Iterator[Callable[[int, int], None] | None]:
    """``on_progress(done, total)`` drawing a bar on stderr while files are scanned, only when
    a human watches."""
    if not progress_enabled():
        yield None
        return
    with make_progress() as progress:
        task = progress.add_task("Scanning images", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield on_progress


def render_report(report: InspectionReport) -> None:
    layout = (
        "splits " + "/".join(report.splits or {}) if report.layout == "splits" else "class folders, no split"
    )
    out.print(
        f"[bold]{escape(report.root)}[/bold]: {report.num_images} images in {len(report.classes)} classes "
        f"({layout}), {report.num_files} files scanned in {report.seconds:.1f} s",
        highlight=False,
    )
    out.print(class_table(report))
    out.print(content_table(report))
    out.print(duplicate_table(report))
    render_findings(report)


def class_table(report: InspectionReport) -> Table:
    """One row per class (with a column per split), then totals and the imbalance ratio."""
    split_names = list(report.splits or {})
    per_split = report.per_split or {}
    columns = ["class", *split_names, "images", "share", "median size", "not RGB", "small", "corrupt"]
    total = max(report.num_images, 1)
    rows = []
    for name, count in report.classes.items():
        summary = report.per_class[name]
        counts = [(report.splits or {})[split][name] for split in split_names]
        rows.append(
            [
                name,
                *counts,
                count,
                f"{count / total:.1%}",
                median_size(summary),
                summary["not_rgb"],
                summary["small"],
                summary["corrupt"],
            ]
        )
    table = make_table(
        columns,
        rows,
        title="Classes",
        numeric=[*split_names, "images", "share", "median size", "not RGB", "small", "corrupt"],
    )
    table.add_section()
    table.add_row(
        "all classes",
        *(str(per_split[split]["images"]) for split in split_names),
        str(report.num_images),
        "",
        "",
        str(sum(summary["not_rgb"] for summary in report.per_class.values())),
        str(len(report.small_images)),
        str(len(report.corrupt)),
    )
    table.add_row(
        "largest/smallest",
        *(format_ratio(per_split[split]["imbalance_ratio"]) for split in split_names),
        format_ratio(report.imbalance_ratio),
        *([""] * 5),
    )
    return table


def median_size(summary: dict[str, Any]) -> str | None:
    if summary["median_width"] is None:
        return None
    return f"{summary['median_width']:g}x{summary['median_height']:g}"


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:g}"


def content_table(report: InspectionReport) -> Table:
    rows: list[list[object]] = [
        ["formats", ", ".join(f"{name} {count}" for name, count in report.formats.items()) or "-"],
        ["colour modes", ", ".join(f"{name} {count}" for name, count in report.modes.items()) or "-"],
    ]
    for key, label in (
        ("width", "width (px)"),
        ("height", "height (px)"),
        ("aspect_ratio", "aspect ratio (w/h)"),
    ):
        if key in report.sizes:
            stats = report.sizes[key]
            rows.append([label, f"min {stats['min']:g}   median {stats['median']:g}   max {stats['max']:g}"])
    rows.append([f"very small images (< {report.small_side} px)", len(report.small_images)])
    rows.append(["extension does not match content", len(report.extension_mismatch)])
    rows.append(["files that cannot be decoded", len(report.corrupt)])
    rows.append(["files that are not images", len(report.non_image_files)])
    rows.append(["hidden / system files", len(report.hidden_files)])
    table = make_table(["", ""], rows, title="Content (formats from the bytes, not the file names)")
    table.show_header = False
    return table


def duplicate_table(report: InspectionReport) -> Table:
    near = report.near_duplicates
    kinds = (
        ("within one class", "within_class"),
        ("across classes", "cross_class"),
        ("across splits", "cross_split"),
    )
    rows = []
    for label, key in kinds:
        exact_groups = getattr(report.duplicates, key)
        near_groups = getattr(near, key) if near is not None else None
        rows.append(
            [
                label,
                len(exact_groups),
                sum(len(group) for group in exact_groups),
                "off" if near_groups is None else len(near_groups),
                "off" if near_groups is None else sum(len(group) for group in near_groups),
            ]
        )
    title = "Duplicates (groups / files)"
    if near is not None:
        title += f"; near: perceptual hash within {report.hash_distance} bits"
    return make_table(
        ["", "exact groups", "exact files", "near groups", "near files"],
        rows,
        title=title,
        numeric=["exact groups", "exact files", "near groups", "near files"],
    )


def render_findings(report: InspectionReport) -> None:
    if not report.findings:
        out.print("[green]No problems found.[/green]")
        return
    out.print("[bold]Findings[/bold] (worst first)")
    for finding in report.findings:
        style = SEVERITY_STYLES[finding.severity]
        out.print(
            f"[{style}]{finding.severity.upper():<7}[/{style}] {escape(finding.message)}", highlight=False
        )
        for example in finding.examples[:EXAMPLES_SHOWN]:
            out.print(f"          {escape(example)}", highlight=False)
        if finding.count > EXAMPLES_SHOWN and len(finding.examples) >= EXAMPLES_SHOWN:
            out.print(
                f"          ... {finding.count - EXAMPLES_SHOWN} more (--json lists every file)",
                highlight=False,
            )
        out.print(f"          [dim]What to do:[/dim] {escape(finding.action)}", highlight=False)
    errors, warnings = report.num_errors, report.num_warnings
    notes = len(report.findings) - errors - warnings
    out.print(f"{errors} error(s), {warnings} warning(s), {notes} note(s).", highlight=False)
