"""``imgclf runs show RUN --html FILE``: one self-contained HTML page about a run.

Plain HTML and inline CSS; every image is embedded (``data:image/png;base64``), so the page
makes no request of any kind: it reads offline and can be attached to a ticket. What it shows
comes from ``run_catalog.run_details`` (the data of ``imgclf runs show``) and the PNGs the run
already holds (training curves, each evaluation's plots). A section whose data does not exist
yet says so, with the command that makes it.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from imgclf_cli import store
from imgclf_cli.errors import ImgclfError
from imgclf_cli.run_catalog import RunDetails, run_details
from imgclf_cli.run_outputs import EXPORT_REPORT_FILE, EvaluationSummary, ExportSummary

# Section ids: a contract with tests/test_run_report.py and anyone linking into a report.
SECTIONS = ("headline", "config", "dataset", "training-curves", "evaluations", "exports")
EVALUATION_PLOTS = (
    ("confusion-matrix", "Confusion matrix", "confusion_matrix.png"),
    ("misclassified", "Misclassified images", "misclassified.png"),
    ("reliability", "Reliability diagram", "reliability.png"),
)
EXPORT_COLUMNS = (
    ("path", "file"),
    ("format", "format"),
    ("quantization", "quantization"),
    ("size_bytes", "size"),
    ("agreement", "agreement"),
    ("max_abs_diff", "max abs diff"),
    ("accuracy_delta", "accuracy delta"),
    ("latency_ms", "latency (ms)"),
    ("threshold", "held to"),
    ("passed", "passed"),
)
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1100px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h1 small { color: #59636e; font-weight: normal; }
h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #d1d9e0; padding: 0.25em 0.7em; text-align: left; }
th { background: #f6f8fa; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #d1d9e0; border-radius: 6px; padding: 0.5em 1em; min-width: 9em; }
.card .value { font-size: 1.4em; font-weight: 600; } .card .label { color: #59636e; }
.status-completed { color: #1a7f37; } .status-failed, .status-crashed, .status-damaged { color: #cf222e; }
.status-interrupted, .status-running { color: #9a6700; }
.missing { color: #59636e; font-style: italic; } .stale { color: #9a6700; }
code { background: #f6f8fa; padding: 0.1em 0.3em; border-radius: 4px; }
img { max-width: 100%; border: 1px solid #d1d9e0; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
@media print { body { margin: 0; max-width: none; } h2 { break-after: avoid; } img { break-inside: avoid; } }
"""


def write_html_report(run_dir: Path, output: Path) -> None:
    """Write the report of ``run_dir`` to ``output`` (atomically; its folder is created).

    An output that cannot be written (a folder, a path through a file, no permission, a full
    disk) is one ``ImgclfError`` naming it, raised before anything is written.
    """
    output = Path(output).expanduser()
    if output.is_dir():
        raise ImgclfError(f"{output} is a folder", "give a file name for the report, e.g. report.html")
    existing = next((folder for folder in output.parents if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ImgclfError(
            f"Cannot write the report to {output}: {existing} is a file, not a folder",
            "give a path in a folder (--html FILE)",
        )
    page = render_report(run_details(Path(run_dir)))
    try:
        store.atomic_write_text(output, page)
    except store.StoreWriteError as error:
        raise ImgclfError(
            error.message,
            f"{store.write_remedy(error.errno, output.parent)}, or write it elsewhere (--html FILE)",
        ) from None


def render_report(details: RunDetails) -> str:
    summary = details.summary
    title = f"imgclf run {summary.run_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(summary.run_id)} <small>imgclf run report</small></h1>",
        f"<p>{esc(str(summary.path))}</p>",
        headline_section(details),
        config_section(details),
        dataset_section(details),
        curves_section(details),
        evaluations_section(details),
        exports_section(details.export, summary.run_id),
    ]
    if details.problems:
        parts.append(section("problems", "Files that could not be read", bullet_list(details.problems)))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def missing(text: str, command: str | None = None) -> str:
    how = f" Run <code>{esc(command)}</code>." if command else ""
    return f'<p class="missing">{esc(text)}{how}</p>'


def formatted(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(item) for item in value)
    return str(value)


def whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def size_text(size: Any) -> str:
    if not isinstance(size, (int, float)):
        return formatted(size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            # A no-break space: "2.5 MB" never wraps between its number and its unit.
            return f"{size:.0f}\u00a0{unit}" if unit == "B" else f"{size:.1f}\u00a0{unit}"
        size /= 1024
    return str(size)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> str:
    # A key/value table has no header row.
    head = "".join(f"<th>{esc(name)}</th>" for name in header) if any(header) else ""
    body = []
    for row in rows:
        cells = []
        for index, value in enumerate(row):
            is_number = (
                index >= numeric_from and isinstance(value, (int, float)) and not isinstance(value, bool)
            )
            css = ' class="number"' if is_number else ""
            cells.append(f"<td{css}>{esc(formatted(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def bullet_list(items: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>"


def embedded_png(path: Path, alt: str) -> str | None:
    """``path`` as an ``<img>`` holding its bytes; ``None`` when it is not a readable PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG"):
        return None
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{encoded}">'


def headline_section(details: RunDetails) -> str:
    summary = details.summary
    cards = [
        ("status", summary.status),
        ("model", summary.model),
        ("image size", formatted(summary.image_size)),
        ("classes", summary.num_classes),
        ("epochs", summary.epochs),
        ("best epoch", summary.best_epoch),
        ("best val accuracy", formatted(summary.val_accuracy)),
        ("val loss", formatted(summary.val_loss)),
        ("training time", f"{summary.train_seconds:.0f} s" if summary.train_seconds is not None else None),
        ("size on disk", size_text(summary.size_bytes)),
    ]
    card_html = "".join(
        f'<div class="card"><div class="value{status_class(label, value)}">{esc(formatted(value))}</div>'
        f'<div class="label">{esc(label)}</div></div>'
        for label, value in cards
    )
    rows = [
        ("started", summary.started),
        ("finished", summary.finished),
        ("stopped by", details.stopped_by),
        ("failure", details.failure),
        ("problem", summary.problem),
        ("software", ", ".join(f"{name} {version}" for name, version in details.versions.items()) or None),
    ]
    facts = table(["", ""], [row for row in rows if row[1]], numeric_from=2)
    return section("headline", "Headline", f'<div class="cards">{card_html}</div>{facts}')


def status_class(label: str, value: Any) -> str:
    return f" status-{esc(value)}" if label == "status" and value else ""


def config_section(details: RunDetails) -> str:
    if not details.config_differences:
        body = "<p>Every key has its default value.</p>"
    else:
        rows = [(key, value, default) for key, (default, value) in sorted(details.config_differences.items())]
        body = table(["key", "value", "default"], rows, numeric_from=3)
    return section("config", "Config: differences from the defaults", body)


def dataset_section(details: RunDetails) -> str:
    dataset = details.dataset or {}
    facts = [
        ("folder", dataset.get("root") or details.summary.dataset_root),
        ("fingerprint", dataset.get("fingerprint") or details.summary.dataset_fingerprint),
        ("layout", dataset.get("layout")),
        ("images", dataset.get("num_images")),
        (
            "train / val / test",
            " / ".join(str(dataset.get(key, "–")) for key in ("num_train", "num_val", "num_test")),
        ),
    ]
    body = table(["", ""], [row for row in facts if row[1] not in (None, "")], numeric_from=2)
    per_class = split_per_class(details.summary.path)
    if per_class:
        body += "<h3>Images per class</h3>" + table(
            ["class", "train", "val", "test"], [(name, *counts) for name, counts in per_class.items()]
        )
    skipped = details.skipped_files
    if skipped:
        rows = [(entry.get("path", ""), entry.get("reason", "")) for entry in skipped]
        body += f"<h3>Skipped files ({len(skipped)})</h3>" + table(["file", "reason"], rows, numeric_from=2)
    else:
        body += "<p>No file was skipped.</p>"
    return section("dataset", "Dataset and split", body)


def split_per_class(run_dir: Path) -> dict[str, tuple[int, int, int]]:
    """``{class: (train, val, test)}`` from the run's split manifest; ``{}`` when unreadable."""
    try:
        manifest = store.read_manifest(run_dir)
    except ImgclfError:
        return {}
    counts = {name: [0, 0, 0] for name in manifest.classes}
    for column, samples in enumerate((manifest.train, manifest.val, getattr(manifest, "test", None) or [])):
        for sample in samples:
            counts[manifest.classes[sample.label]][column] += 1
    return {name: (train, val, test) for name, (train, val, test) in counts.items()}


def curves_section(details: RunDetails) -> str:
    image = embedded_png(store.training_curves_path(details.summary.path), "training curves")
    body = image or missing("No training curves yet (drawn when training ends).")
    if details.history:
        rows = [
            (
                int(row.get("epoch") or 0),
                row.get("loss"),
                row.get("accuracy"),
                row.get("val_loss"),
                row.get("val_accuracy"),
                f"{row['learning_rate']:.2e}" if isinstance(row.get("learning_rate"), float) else None,
            )
            for row in details.history
        ]
        body += "<h3>Per epoch</h3>" + table(
            ["epoch", "loss", "accuracy", "val loss", "val accuracy", "learning rate"], rows
        )
    return section("training-curves", "Training curves", body)


def evaluations_section(details: RunDetails) -> str:
    if not details.evaluations:
        body = missing("No evaluation yet.", f"imgclf evaluate --run {details.summary.run_id}")
    else:
        body = "\n".join(evaluation_block(evaluation) for evaluation in details.evaluations)
    return section("evaluations", "Evaluations", body)


def evaluation_block(evaluation: EvaluationSummary) -> str:
    name = evaluation.dataset
    anchor = f"evaluation-{esc(name)}"
    parts = [
        f'<div id="{anchor}" class="evaluation"><h3>{esc(name)}: {esc(evaluation.description or "")}</h3>'
    ]
    if evaluation.stale:
        parts.append('<p class="stale">Stale: the run\'s best model changed after this evaluation.</p>')
    if evaluation.problem:
        parts.append(missing(evaluation.problem))
    headline = [
        ("images", evaluation.num_samples),
        ("accuracy", evaluation.accuracy),
        ("macro F1", evaluation.f1_macro),
        ("weighted F1", evaluation.f1_weighted),
        ("ECE", evaluation.ece),
        ("log loss", evaluation.log_loss),
        ("misclassified", evaluation.num_misclassified),
        *((key.replace("_", " "), value) for key, value in evaluation.top_k_accuracy.items()),
    ]
    parts.append(table([label for label, _ in headline], [[value for _, value in headline]], numeric_from=0))
    if evaluation.per_class:
        rows = [
            (
                label,
                scores.get("precision"),
                scores.get("recall"),
                scores.get("f1"),
                whole(scores.get("support")),
            )
            for label, scores in evaluation.per_class.items()
        ]
        parts.append(
            f'<div class="per-class">{table(["class", "precision", "recall", "F1", "support"], rows)}</div>'
        )
    for plot_id, title, file_name in EVALUATION_PLOTS:
        image = embedded_png(evaluation.path / file_name, f"{title}, {name}")
        content = image or missing(f"No {title.lower()} (evaluate was run with --no-plots?).")
        parts.append(f'<div class="{plot_id}"><h4>{esc(title)}</h4>{content}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def exports_section(export: ExportSummary | None, run_id: str) -> str:
    if export is None:
        return section("exports", "Exports", missing("No export yet.", f"imgclf export --run {run_id} --all"))
    parts = []
    if export.stale:
        parts.append('<p class="stale">Stale: the run\'s best model changed after this export.</p>')
    if export.problem:
        parts.append(missing(export.problem))
    if export.verified is not None:
        verdict = "passed" if export.passed else "failed" if export.verified else "not verified"
        css = "pass" if export.passed else "fail" if export.verified else "missing"
        parts.append(f'<p>Verification: <span class="{css}">{verdict}</span></p>')
    if export.artifacts:
        parts.append(
            table(
                [title for _, title in EXPORT_COLUMNS],
                export_rows(export.artifacts, export.path),
                numeric_from=3,
            )
        )
        problems = verification_problems(export.path)
        if problems:
            parts.append("<h3>Problems found</h3>" + bullet_list(problems))
    elif not export.problem:
        parts.append(missing("The export folder lists no artifact."))
    return section("exports", "Exports and their verification", "\n".join(parts))


def export_rows(artifacts: Sequence[dict[str, Any]], export_folder: Path) -> list[tuple[Any, ...]]:
    """One row per artifact; the SavedModel's check on encoded image bytes (``serving_check``,
    the same file a second time) is named as such."""
    rows = []
    seen: set[str] = set()
    for artifact in artifacts:
        path = str(artifact.get("path") or "")
        checked = path in seen
        seen.add(path)
        values: list[Any] = []
        for key, _ in EXPORT_COLUMNS:
            value = artifact.get(key)
            if key == "path":
                value = artifact_name(Path(path), export_folder) + (
                    " (serving_default, image bytes)" if checked else ""
                )
            elif key == "size_bytes":
                value = size_text(value)
            elif key == "threshold":
                value = threshold_text(value)
            elif key == "passed":
                value = "not verified" if value is None else "passed" if value else "FAILED"
            values.append(value)
        rows.append(tuple(values))
    return rows


def artifact_name(path: Path, export_folder: Path) -> str:
    """``model.tflite``, ``saved_model/1``: the artifact within the export folder (its recorded
    path is absolute, and the run may have been moved since)."""
    try:
        return str(path.relative_to(export_folder))
    except ValueError:
        return f"{path.parent.name}/{path.name}" if path.name.isdigit() else path.name


def threshold_text(threshold: Any) -> str | None:
    """``>= 99.5% agreement, probabilities within 0.01``: what the artifact was held to."""
    if not isinstance(threshold, dict):
        return None
    terms = []
    if isinstance(threshold.get("min_agreement"), (int, float)):
        terms.append(f"≥ {threshold['min_agreement']:.1%} agreement")
    if isinstance(threshold.get("max_abs_diff"), (int, float)):
        terms.append(f"probabilities within {threshold['max_abs_diff']:g}")
    if isinstance(threshold.get("max_accuracy_drop"), (int, float)):
        terms.append(f"≤ {threshold['max_accuracy_drop'] * 100:g} points of accuracy lost")
    return ", ".join(terms) or "none"


def verification_problems(export_folder: Path) -> list[str]:
    """``file: problem`` for each check an artifact failed (``export.json``'s ``problems``)."""
    try:
        recorded = store.read_run_json(export_folder / EXPORT_REPORT_FILE).get("problems")
    except (ImgclfError, AttributeError):
        return []
    if not isinstance(recorded, dict):
        return []
    return [
        f"{Path(str(path)).name}: {problem}"
        for path, problems in recorded.items()
        if isinstance(problems, list)
        for problem in problems
    ]
