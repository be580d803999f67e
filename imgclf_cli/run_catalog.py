"""The run store as a catalog: one summary per run for listing, the details of one run, and the
comparison of several. What ``imgclf runs``, ``runs show`` and ``runs compare`` draw, and what
a notebook or the HTML report (``imgclf_cli.run_report``) reads.

Listing a store reads each run's ``meta.json`` and walks its folder for its size (and the names
in ``eval/`` and ``export/``): nothing else, and never a model, so that hundreds of runs list in
well under a second without TensorFlow. A run whose files are damaged or missing (a bad
``meta.json``, a folder half deleted by hand) is listed as ``damaged`` with the reason, never an
exception. Hidden folders (``.trash-*`` left by an interrupted ``runs rm``) are not runs.

Public API, stable: ``RunSummary`` / ``list_catalog`` / ``summarize_run`` (list rows),
``RunDetails`` / ``run_details`` (everything about one run, with ``EvaluationSummary`` and
``ExportSummary`` from ``imgclf_cli.run_outputs``, and ``FileEntry``), ``find_run``; comparing
runs is ``imgclf_cli.run_comparison``, deleting them ``imgclf_cli.run_cleanup``. Standard
library and light ``imgclf_cli`` modules only (PyYAML, for a run's config, when it is read).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from imgclf_cli import liveness, store
from imgclf_cli.errors import RunFileError, RunNotFoundError, UsageError, closest, did_you_mean
from imgclf_cli.run_outputs import (
    EXPORT_REPORT_FILE,
    METRICS_FILE,
    EvaluationSummary,
    ExportSummary,
    integer,
    number,
    summarize_evaluation,
    summarize_export,
    text,
)

STATUS_DAMAGED = "damaged"
STATUSES = (
    store.STATUS_COMPLETED,
    store.STATUS_RUNNING,
    store.STATUS_INTERRUPTED,
    store.STATUS_FAILED,
    store.STATUS_CRASHED,
    STATUS_DAMAGED,
)
# The files a run writes before its status first reaches meta.json: a run without one of them
# (or a completed run without its model) was deleted in part.
SETUP_FILES = (store.CONFIG_FILE, store.LABELS_FILE, store.SPLIT_FILE)
COMPLETED_FILES = (*SETUP_FILES, store.BEST_MODEL_FILE)
# Files any run folder may hold: a folder under the store with one of them is a run, even
# without meta.json (one that was half deleted).
RUN_FILES = frozenset(
    {*COMPLETED_FILES, store.META_FILE, store.HISTORY_FILE, store.LAST_CHECKPOINT_FILE, liveness.LOCK_FILE}
)
RUN_ID_TIME = re.compile(r"^(\d{8}-\d{6})(?:-|$)")
# In export/: the files that describe the artifacts rather than being one.
EXPORT_RECORDS = frozenset({EXPORT_REPORT_FILE, "labels.txt"})

# --sort keys: each sorts best (or biggest, or newest) first; runs without the value go last.
SORT_KEYS = {
    "started": ("started_timestamp", True),
    "val_accuracy": ("val_accuracy", True),
    "val_loss": ("val_loss", False),
    "train_seconds": ("train_seconds", True),
    "epochs": ("epochs", True),
    "size": ("size_bytes", True),
}
DEFAULT_SORT = "started"


@dataclass(frozen=True)
class FileEntry:
    """A file or folder directly in a run folder; a folder's size is that of everything in it."""

    name: str
    size_bytes: int
    is_dir: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size_bytes": self.size_bytes, "is_dir": self.is_dir}


@dataclass
class FolderScan:
    """One walk of a run folder: its top-level entries and what ``eval/`` and ``export/`` hold."""

    entries: list[FileEntry]
    size_bytes: int
    names: dict[str, list[str]]
    """Names inside each folder down to two levels: ``names["eval/test"]``."""

    @property
    def top_names(self) -> set[str]:
        return {entry.name for entry in self.entries}

    def visible(self, folder: str) -> list[str]:
        return sorted(name for name in self.names.get(folder, []) if not name.startswith("."))


def scan_folder(run_dir: Path) -> FolderScan:
    """Walk ``run_dir`` with ``os.scandir`` (no symlink followed below it), summing file sizes."""
    names: dict[str, list[str]] = {}

    def visit(path: str, relative: str, depth: int) -> int:
        size = 0
        inside: list[str] = []
        try:
            with os.scandir(path) as listing:
                for entry in listing:
                    inside.append(entry.name)
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            size += visit(entry.path, f"{relative}/{entry.name}".lstrip("/"), depth + 1)
                        else:
                            size += entry.stat(follow_symlinks=False).st_size
                    except OSError:  # removed meanwhile, or unreadable: counts for nothing
                        continue
        except OSError:
            pass
        if depth <= 2:
            names[relative] = inside
        return size

    entries: list[FileEntry] = []
    try:
        with os.scandir(run_dir) as listing:
            top = list(listing)
    except OSError:
        top = []
    for entry in top:
        try:
            if entry.is_dir(follow_symlinks=False):
                entries.append(FileEntry(entry.name, visit(entry.path, entry.name, 1), True))
            else:
                entries.append(FileEntry(entry.name, entry.stat(follow_symlinks=False).st_size, False))
        except OSError:
            continue
    names[""] = [entry.name for entry in top]
    entries.sort(key=lambda item: item.name)
    return FolderScan(entries, sum(entry.size_bytes for entry in entries), names)


@dataclass(frozen=True)
class RunSummary:
    """One row of ``imgclf runs``: what a run is and how it did, from ``meta.json`` and its folder.

    ``status`` is one of ``STATUSES``: ``crashed`` for a ``running`` run whose process is gone,
    ``damaged`` when ``meta.json`` is unreadable or files the run must have are missing
    (``problem`` says which; ``recorded_status`` is what meta.json says, if anything).
    Missing values are ``None``.
    """

    run_id: str
    path: Path
    status: str
    recorded_status: str | None = None
    problem: str | None = None
    last_seen: str | None = None
    model: str | None = None
    image_size: list[int] | None = None
    dataset: str | None = None
    dataset_root: str | None = None
    dataset_fingerprint: str | None = None
    num_classes: int | None = None
    epochs: int | None = None
    best_epoch: int | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    train_seconds: float | None = None
    started: str | None = None
    finished: str | None = None
    evaluations: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    size_bytes: int = 0
    started_timestamp: float | None = None
    """``started`` in seconds since the epoch, for sorting (not in the JSON)."""

    def to_dict(self) -> dict[str, Any]:
        """One object of ``imgclf runs --json``: the keys of ``SUMMARY_KEYS``, in that order."""
        document = {key: getattr(self, key) for key in SUMMARY_KEYS}
        document["path"] = str(self.path)
        return document


# The keys of every object of ``imgclf runs --json``, in order (README: "Comparing and cleaning
# runs"): the fields of ``RunSummary`` but its sort key.
SUMMARY_KEYS = tuple(item.name for item in fields(RunSummary) if item.name != "started_timestamp")


def name_of(root: str) -> str:
    """The folder name of a dataset root, local or ``s3://bucket/prefix/``."""
    return root.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or root


def timestamp(when: str | None) -> float | None:
    if not when:
        return None
    for pattern in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y%m%d-%H%M%S"):
        try:
            return datetime.strptime(when, pattern).timestamp()
        except ValueError:
            continue
    return None


def started_of(run_dir: Path, meta: dict[str, Any]) -> tuple[str | None, float | None]:
    """When the run started: meta.json's ``created``, else the time in its id, else the folder's
    modification time."""
    created = text(meta.get("created"))
    if created and timestamp(created) is not None:
        return created, timestamp(created)
    match = RUN_ID_TIME.match(run_dir.name)
    if match and timestamp(match.group(1)) is not None:
        moment = datetime.strptime(match.group(1), "%Y%m%d-%H%M%S")
        return moment.strftime("%Y-%m-%dT%H:%M:%S"), moment.timestamp()
    try:
        modified = run_dir.stat().st_mtime
    except OSError:
        return None, None
    return datetime.fromtimestamp(modified).strftime("%Y-%m-%dT%H:%M:%S"), modified


def best_row(history: Sequence[dict[str, float]]) -> dict[str, float] | None:
    """The epoch training keeps as best.keras: highest val_accuracy, then lowest val_loss."""
    scored = [row for row in history if number(row.get("val_accuracy")) is not None]
    if not scored:
        return None
    return max(scored, key=lambda row: (row["val_accuracy"], -(number(row.get("val_loss")) or 0.0)))


def read_meta_leniently(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """``(meta, problem)``: ``({}, reason)`` when meta.json is missing or damaged."""
    if not (run_dir / store.META_FILE).is_file():
        return {}, f"no {store.META_FILE}"
    try:
        return store.read_meta(run_dir), None
    except RunFileError as error:
        return {}, error.message


def status_of(
    run_dir: Path, meta: dict[str, Any], meta_problem: str | None, present: set[str]
) -> tuple[str, str | None, str | None]:
    """``(status, problem, last_seen)`` of a run as the catalog shows it."""
    recorded = meta.get("status")
    if meta_problem is not None or recorded is None:
        # A training sets its folder up (config, labels, split) before meta.json: while its lock
        # is alive it is running, whatever is missing.
        if (run_dir / liveness.LOCK_FILE).is_file() and liveness.liveness(run_dir).alive:
            return store.STATUS_RUNNING, None, None
        return STATUS_DAMAGED, meta_problem or f"{store.META_FILE} records no status", None
    if recorded == store.STATUS_RUNNING:
        state = store.run_state(run_dir)
        if state.status == store.STATUS_RUNNING:
            return store.STATUS_RUNNING, None, None
        recorded_status = state.status or store.STATUS_CRASHED
        if recorded_status == store.STATUS_CRASHED:
            missing = [name for name in SETUP_FILES if name not in present]
            if missing:
                return STATUS_DAMAGED, f"missing {', '.join(missing)}", state.last_seen
            return store.STATUS_CRASHED, None, state.last_seen
        recorded = recorded_status
    if recorded not in STATUSES:
        return STATUS_DAMAGED, f"{store.META_FILE} records an unknown status {recorded!r}", None
    required = COMPLETED_FILES if recorded == store.STATUS_COMPLETED else SETUP_FILES
    missing = [name for name in required if name not in present]
    if missing:
        return STATUS_DAMAGED, f"missing {', '.join(missing)}", None
    return str(recorded), None, None


def summarize_run(run_dir: Path, scan: FolderScan | None = None) -> RunSummary:
    """The list row of ``run_dir``; never raises for a damaged run (see ``RunSummary``)."""
    scan = scan or scan_folder(run_dir)
    meta, meta_problem = read_meta_leniently(run_dir)
    status, problem, last_seen = status_of(run_dir, meta, meta_problem, scan.top_names)
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    root = text(dataset.get("root"))
    per_class = dataset.get("train_per_class")
    num_classes = len(per_class) if isinstance(per_class, dict) and per_class else None
    if num_classes is None and store.LABELS_FILE in scan.top_names:
        try:
            num_classes = len(store.read_labels(run_dir))
        except RunFileError:
            num_classes = None
    size = meta.get("image_size")
    image_size = (
        [int(side) for side in size]
        if isinstance(size, list) and all(integer(side) for side in size)
        else None
    )
    epochs = integer(meta.get("epochs_completed"))
    best_epoch = integer(meta.get("best_epoch"))
    val_accuracy, val_loss = number(meta.get("val_accuracy")), number(meta.get("val_loss"))
    if val_accuracy is None and epochs and store.HISTORY_FILE in scan.top_names:
        # Written into meta.json when training ends: a running or crashed run has only its history.
        try:
            best = best_row(store.read_history(run_dir))
        except RunFileError:
            best = None
        if best is not None:
            val_accuracy, val_loss = number(best.get("val_accuracy")), number(best.get("val_loss"))
            best_epoch = int(best["epoch"]) if number(best.get("epoch")) is not None else best_epoch
    started, started_timestamp = started_of(run_dir, meta)
    stale = meta.get(store.STALE_KEY)
    return RunSummary(
        run_id=run_dir.name,
        path=run_dir,
        status=status,
        recorded_status=text(meta.get("status")),
        problem=problem,
        last_seen=last_seen,
        model=text(meta.get("model")),
        image_size=image_size,
        dataset=name_of(root) if root else None,
        dataset_root=root,
        dataset_fingerprint=text(dataset.get("fingerprint")),
        num_classes=num_classes,
        epochs=epochs,
        best_epoch=best_epoch,
        val_accuracy=val_accuracy,
        val_loss=val_loss,
        train_seconds=number(meta.get("train_seconds")),
        started=started,
        finished=text(meta.get("finished")),
        evaluations=[
            name
            for name in scan.visible(store.EVAL_DIR)
            if METRICS_FILE in scan.names.get(f"{store.EVAL_DIR}/{name}", [])
        ],
        exports=[name for name in scan.visible(store.EXPORT_DIR) if name not in EXPORT_RECORDS],
        stale=[name for name in stale if isinstance(name, str)] if isinstance(stale, list) else [],
        size_bytes=scan.size_bytes,
        started_timestamp=started_timestamp,
    )


def looks_like_run(folder: Path, in_store: bool) -> bool:
    """A run folder: meta.json or labels.json (``store.is_run_dir``); directly in the store, also
    a folder with any other file of a run or named like a run id (a run half deleted)."""
    if store.is_run_dir(folder):
        return True
    if not in_store or folder.name.startswith("."):
        return False
    if RUN_ID_TIME.match(folder.name):
        return True
    try:
        return any(entry.name in RUN_FILES for entry in os.scandir(folder))
    except OSError:
        return False


def run_folders(root: Path) -> list[Path]:
    """Every run folder in the store, damaged ones included, hidden folders (trash) excluded."""
    try:
        # Hidden first: trash holds a whole run, meta.json included.
        children = [
            Path(entry.path)
            for entry in os.scandir(root)
            if not entry.name.startswith(".") and entry.is_dir()
        ]
    except OSError:
        return []
    return sorted(child for child in children if looks_like_run(child, in_store=True))


def parse_statuses(statuses: str | Iterable[str] | None) -> set[str] | None:
    """``"failed,interrupted"`` (or a list) as a set of statuses; ``None``: every status."""
    if statuses is None:
        return None
    parts = statuses.split(",") if isinstance(statuses, str) else list(statuses)
    chosen = {part.strip().lower() for part in parts if part.strip()}
    for name in chosen:
        if name not in STATUSES:
            raise UsageError(
                did_you_mean(f"Unknown status {name!r}", closest(name, STATUSES)),
                f"--status takes a comma-separated list of: {', '.join(STATUSES)}",
            )
    return chosen or None


def check_sort_key(sort: str) -> None:
    if sort not in SORT_KEYS:
        raise UsageError(
            did_you_mean(f"Unknown sort key {sort!r}", closest(sort, SORT_KEYS)),
            f"--sort takes one of: {', '.join(SORT_KEYS)}",
        )


def sort_summaries(summaries: list[RunSummary], sort: str = DEFAULT_SORT) -> list[RunSummary]:
    check_sort_key(sort)
    attribute, descending = SORT_KEYS[sort]
    # Newest first among equals; a missing value goes last whatever the direction.
    by_start = sorted(summaries, key=lambda item: (item.started_timestamp or 0.0, item.run_id), reverse=True)
    known = [item for item in by_start if getattr(item, attribute) is not None]
    unknown = [item for item in by_start if getattr(item, attribute) is None]
    return sorted(known, key=lambda item: getattr(item, attribute), reverse=descending) + unknown


def list_catalog(
    runs_dir: str | Path | None = None,
    statuses: str | Iterable[str] | None = None,
    sort: str = DEFAULT_SORT,
    limit: int | None = None,
) -> list[RunSummary]:
    """The runs of the store, newest first (or by ``sort``), those of ``statuses`` only, at most
    ``limit``. Unknown statuses or sort keys are ``UsageError``s naming the valid ones."""
    chosen = parse_statuses(statuses)
    check_sort_key(sort)  # before reading the store: a typo answers at once
    summaries = [summarize_run(folder) for folder in run_folders(store.runs_root(runs_dir))]
    if chosen is not None:
        summaries = [summary for summary in summaries if summary.status in chosen]
    ordered = sort_summaries(summaries, sort)
    return ordered[:limit] if limit is not None else ordered


def find_run(reference: str | Path, runs_dir: str | Path | None = None) -> Path:
    """The run folder ``reference`` names (``store.resolve_run``: a run id, a unique prefix of
    one, a path, ``latest``), damaged runs of the store included; an absolute path without
    ``.`` or ``..`` (``runs rm .`` inside a run folder must name that folder)."""
    try:
        found = store.resolve_run(reference, runs_dir)
    except RunNotFoundError as error:
        root = store.runs_root(runs_dir)
        name = str(reference)
        folders = run_folders(root)
        exact = [folder for folder in folders if folder.name == name or folder == Path(name).expanduser()]
        matches = exact or [folder for folder in folders if folder.name.startswith(name)]
        if len(matches) != 1:
            raise error from None
        found = matches[0]
    return Path(os.path.abspath(found))


@dataclass
class RunDetails:
    """Everything ``imgclf runs show`` says about a run; ``problems`` lists the files that could
    not be read (the rest is still there)."""

    summary: RunSummary
    config: dict[str, Any]
    """The whole config, flat: ``{"train.epochs": 12, ...}``."""
    config_differences: dict[str, tuple[Any, Any]]
    """``{key: (default, value)}`` for the keys that differ from imgclf's defaults."""
    dataset: dict[str, Any]
    """meta.json's ``dataset``: root, layout, fingerprint, num_images, num_train/val/test,
    train_per_class."""
    skipped_files: list[dict[str, str]]
    history: list[dict[str, float]]
    best: dict[str, float] | None
    last: dict[str, float] | None
    evaluations: list[EvaluationSummary]
    export: ExportSummary | None
    files: list[FileEntry]
    versions: dict[str, str]
    failure: str | None
    stopped_by: str | None
    problems: list[str]

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        """The ``runs show --json`` document (``full``: with every config key, not only the
        differences)."""
        document: dict[str, Any] = {
            **self.summary.to_dict(),
            "config_differences": {
                key: {"default": default, "value": value}
                for key, (default, value) in self.config_differences.items()
            },
            "dataset_summary": self.dataset,
            "skipped_files": self.skipped_files,
            "best": self.best,
            "last": self.last,
            "history": self.history,
            "evaluations_detail": [evaluation.to_dict() for evaluation in self.evaluations],
            "export": self.export.to_dict() if self.export else None,
            "files": [entry.to_dict() for entry in self.files],
            "versions": self.versions,
            "failure": self.failure,
            "stopped_by": self.stopped_by,
            "problems": self.problems,
        }
        if full:
            document["config"] = self.config
        return document


def run_details(run_dir: Path) -> RunDetails:
    """Everything about ``run_dir`` for ``runs show`` and the HTML report; never raises for a
    damaged file (it is named in ``problems``)."""
    from imgclf_cli import config  # PyYAML: not needed to list runs

    scan = scan_folder(run_dir)
    summary = summarize_run(run_dir, scan)
    meta, meta_problem = read_meta_leniently(run_dir)
    problems = [meta_problem] if meta_problem and summary.status == STATUS_DAMAGED else []
    if summary.problem and summary.problem not in problems:
        problems.append(summary.problem)
    values: dict[str, Any] = {}
    try:
        values = store.read_config_values(run_dir)
    except RunFileError as error:
        problems.append(error.message)
    history: list[dict[str, float]] = []
    try:
        history = store.read_history(run_dir)
    except RunFileError as error:
        problems.append(error.message)
    evaluations = [
        summarize_evaluation(
            run_dir,
            name,
            scan.visible(f"{store.EVAL_DIR}/{name}"),
            store.EVAL_DIR in summary.stale,
        )
        for name in scan.visible(store.EVAL_DIR)
    ]
    export = (
        summarize_export(run_dir, scan.visible(store.EXPORT_DIR), store.EXPORT_DIR in summary.stale)
        if scan.visible(store.EXPORT_DIR)
        else None
    )
    problems += [item.problem for item in evaluations if item.problem]
    if export is not None and export.problem:
        problems.append(export.problem)
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    skipped = meta.get("skipped_files")
    versions = meta.get("versions")
    return RunDetails(
        summary=summary,
        config=config.flatten(values),
        config_differences=config.differences_from_defaults(values),
        dataset=dataset,
        skipped_files=[entry for entry in skipped if isinstance(entry, dict)]
        if isinstance(skipped, list)
        else [],
        history=history,
        best=best_row(history),
        last=history[-1] if history else None,
        evaluations=evaluations,
        export=export,
        files=scan.entries,
        versions={str(key): str(value) for key, value in versions.items()}
        if isinstance(versions, dict)
        else {},
        failure=text(meta.get("failure")),
        stopped_by=text(meta.get("stopped_by")),
        problems=problems,
    )
