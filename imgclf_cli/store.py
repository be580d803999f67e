"""The run store: one self-describing folder per training run, written atomically.

Layout of a run folder (``<runs-dir>/<YYYYmmdd-HHMMSS>-<model>[-<name>]``)::

    config.yaml      resolved training config
    labels.json      class names in index order
    split.json       the split manifest (which file is in train / val / test)
    best.keras       the best model (lowest validation loss)
    last.keras       the last completed epoch, with optimizer state (for --resume)
    history.csv      one row per epoch
    meta.json        status, library versions, dataset fingerprint, timings, results
    plots/           training curves (PNG)
    eval/, export/   written by `imgclf evaluate` and `imgclf export`
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgclf_cli.errors import RunNotFoundError

RUNS_DIR_ENV = "IMGCLF_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"

CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
SPLIT_FILE = "split.json"
BEST_MODEL_FILE = "best.keras"
LAST_CHECKPOINT_FILE = "last.keras"
HISTORY_FILE = "history.csv"
META_FILE = "meta.json"
PLOTS_DIR = "plots"
EVAL_DIR = "eval"
EXPORT_DIR = "export"

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_INTERRUPTED = "interrupted"
STATUS_FAILED = "failed"


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """``--runs-dir``, else ``$IMGCLF_RUNS_DIR``, else ``./runs``."""
    chosen = runs_dir or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR
    return Path(chosen).expanduser()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def create_run_dir(root: Path, model_name: str, name: str | None = None) -> Path:
    """Make a new, unique run folder; names sort by start time.

    ``mkdir`` without ``exist_ok`` is atomic, so two trainings started in the same second get
    distinct folders.
    """
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(model_name)}"
    if name:
        stem += f"-{slug(name)}"
    for attempt in range(1000):
        candidate = root / (stem if attempt == 0 else f"{stem}-{attempt + 1}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RunNotFoundError(f"Could not create a run folder under {root}")


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Write through ``write(temporary_path)`` then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        # mkstemp creates files readable by their owner only; give them the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_path, 0o666 & ~umask)
        os.replace(temporary_path, path)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, document: Any) -> None:
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META_FILE
    if not path.is_file():
        return {}
    try:
        return dict(read_json(path))
    except (OSError, ValueError):
        return {}


def update_meta(run_dir: Path, **fields: Any) -> dict[str, Any]:
    meta = read_meta(run_dir)
    meta.update(fields)
    atomic_write_json(run_dir / META_FILE, meta)
    return meta


def read_labels(run_dir: Path) -> list[str]:
    path = run_dir / LABELS_FILE
    if not path.is_file():
        raise RunNotFoundError(f"{run_dir} has no {LABELS_FILE}", "is it an imgclf run folder?")
    return [str(label) for label in read_json(path)]


def is_run_dir(path: Path) -> bool:
    return (path / META_FILE).is_file() or (path / LABELS_FILE).is_file()


def list_runs(root: Path) -> list[Path]:
    """Run folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((child for child in root.iterdir() if child.is_dir() and is_run_dir(child)), key=lambda p: p.name)


def resolve_run(reference: str | Path | None, runs_dir: str | Path | None = None) -> Path:
    """A run folder from ``latest`` (newest completed run), a run id, or a path."""
    root = runs_root(runs_dir)
    reference = str(reference or "latest")
    if reference == "latest":
        completed = [run for run in list_runs(root) if read_meta(run).get("status") == STATUS_COMPLETED]
        if not completed:
            raise RunNotFoundError(
                f"No completed run in {root}",
                "train one with `imgclf train DATA_DIR`, or point --runs-dir at your runs folder",
            )
        return completed[-1]
    as_path = Path(reference).expanduser()
    if as_path.is_dir() and is_run_dir(as_path):
        return as_path
    candidate = root / reference
    if candidate.is_dir() and is_run_dir(candidate):
        return candidate
    matches = [run for run in list_runs(root) if run.name.startswith(reference)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(run.name for run in list_runs(root)[-5:]) or "none"
    raise RunNotFoundError(
        f"Run not found: {reference!r} (looked in {root})",
        f"pass a run id, a run folder or 'latest'; recent runs: {known}",
    )
