"""The run store: one self-describing folder per training run, written atomically.

Layout of a run folder (``<runs-dir>/<YYYYmmdd-HHMMSS>-<model>[-<name>]``)::

    config.yaml      resolved training config
    labels.json      class names in index order
    split.json       the split manifest (which file is in train / val / test)
    best.keras       the best model (highest validation accuracy, ties broken by lower
                     validation loss), without optimizer state: the deployment artifact
    last.keras       the last completed epoch, with optimizer state (for --resume)
    history.csv      one row per epoch
    meta.json        status, library versions, dataset fingerprint, timings, results
    plots/           training curves (PNG)
    eval/, export/   written by `imgclf evaluate` and `imgclf export`; meta.json's ``stale``
                     lists those made from a best.keras that a resumed training has replaced

This module is the only one that knows these names: every other module reads and writes a run
through the accessors below, and each accessor fails with one ``RunFileError`` naming the file
when it is missing or damaged.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf_cli import liveness
from imgclf_cli.errors import RunFileError, RunNotFoundError, StoreError

if TYPE_CHECKING:
    from imgclf_cli.config import Config
    from imgclf_cli.dataset import SplitManifest

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
CACHE_DIR = ".cache"
TRAINING_CURVES_FILE = "training_curves.png"

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_INTERRUPTED = "interrupted"
STATUS_FAILED = "failed"
# Never written: what a reader calls a run recorded as running whose process is gone
# (``imgclf_cli.liveness``).
STATUS_CRASHED = "crashed"
# The statuses --resume continues from (a completed run only when asked for more).
RESUMABLE_STATUSES = (STATUS_CRASHED, STATUS_INTERRUPTED, STATUS_FAILED)


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """``--runs-dir``, else ``$IMGCLF_RUNS_DIR``, else ``./runs``."""
    chosen = runs_dir or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR
    return Path(chosen).expanduser()


def check_writable(root: Path) -> None:
    """Fail now, in one line, if runs cannot be written under ``root`` (a read-only filesystem,
    a full disk, no permission), rather than after TensorFlow has loaded or mid-training."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".write-check.{os.getpid()}.", dir=root)
        try:
            os.write(handle, b"\0" * 4096)
            os.fsync(handle)
        finally:
            os.close(handle)
            Path(name).unlink(missing_ok=True)
    except OSError as error:
        raise StoreError(
            f"Cannot write runs to {root}: {error.strerror or error}",
            "free some space, fix its permissions, or pass --runs-dir (or set IMGCLF_RUNS_DIR) "
            "to a writable folder",
        ) from None


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


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    suffix: str = "",
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Write through ``write(temporary_path)``, flush it to disk, rename it into place and flush
    the folder: readers never see half a file, and after a power cut the file is either the old
    one or the whole new one (a rename alone may reach the disk before the data it names).

    Temporaries are named ``.<stem>.<pid>.<random><suffix>``: one left behind by a writer that
    died (``kill -9``, a crash) is removed by the next write to the same file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.stem}.{os.getpid()}.", suffix=suffix or path.suffix, dir=path.parent
        )
    except OSError as error:
        raise write_error(path, error) from None
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        # mkstemp creates files readable by their owner only; give them the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_path, 0o666 & ~umask)
        fsync_path(temporary_path)
        if before_replace is not None:  # the new file is whole on disk: e.g. keep the old one
            before_replace()
        os.replace(temporary_path, path)
        fsync_path(path.parent)
    except OSError as error:
        raise write_error(path, error) from None
    except Exception as error:
        # Keras and h5py wrap a full disk in their own exceptions; the errno is in the chain.
        cause = os_error_in(error)
        if cause is None:
            raise
        raise write_error(path, cause) from None
    finally:
        with contextlib.suppress(OSError):
            temporary_path.unlink(missing_ok=True)


class StoreWriteError(StoreError):
    """A file of the store could not be written; ``errno`` says why (``ENOSPC``: a full disk)."""

    def __init__(self, message: str, hint: str | None, errno_code: int | None, path: Path) -> None:
        super().__init__(message, hint)
        self.errno = errno_code
        self.path = path


def write_error(path: Path, error: OSError) -> StoreWriteError:
    """One line for a write that failed: which file, why, what to do."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = write_remedy(error.errno, path.parent)
    if error.errno in SPACE_OR_PERMISSION:
        hint += ", or write elsewhere (--runs-dir)"
    return StoreWriteError(f"Cannot write {path}: {reason}", hint, error.errno, path)


SPACE_OR_PERMISSION = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM)


def write_remedy(code: int | None, folder: Path) -> str:
    """What to do about a write into ``folder`` that failed with errno ``code``."""
    if code == errno.ENOSPC:
        return f"free some space on the disk holding {folder}"
    if code in SPACE_OR_PERMISSION:
        return f"make {folder} writable"
    return "check the disk and the folder's permissions"


def os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` with an errno that ``error`` was raised from, if any (or that it names:
    h5py reports a full disk as a RuntimeError/OSError text with "errno = 28")."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        match = re.search(r"errno = (\d+)|\[Errno (\d+)\]", str(current))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def output_lock(folder: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock while writing its outputs: a second ``evaluate``/``export`` of the
    same output folder waits (``on_wait`` tells it once) instead of mixing its files with ours.

    An advisory ``flock`` on ``<folder>.lock``: the kernel releases it when the holder dies, so a
    killed writer never leaves the folder locked.
    """
    import fcntl

    lock_path = folder.parent / f".{folder.name}.lock"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_error(lock_path, error) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data to the disk (a folder: the names in it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_dead_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` whose writing process is gone (on this host)."""
    for leftover in path.parent.glob(f".{path.stem}.*"):
        writer = leftover.name[len(path.stem) + 2 :].split(".", 1)[0]
        if writer.isdigit() and not liveness.pid_exists(int(writer)):
            leftover.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, document: Any) -> None:
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def damaged(path: Path, error: BaseException) -> RunFileError:
    reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
    return RunFileError(
        f"{path} is damaged ({reason})",
        "the run folder was modified or not written completely; train a new run or restore the file",
    )


def missing(path: Path, hint: str = "is it a complete imgclf run folder?") -> RunFileError:
    return RunFileError(f"{path.parent.name} has no {path.name} (looked for {path})", hint)


def read_run_json(path: Path) -> Any:
    """A JSON file of a run: ``RunFileError`` when it is missing or not valid JSON."""
    if not path.is_file():
        raise missing(path)
    try:
        return read_json(path)
    except (OSError, ValueError) as error:
        raise damaged(path, error) from None


def read_meta(run_dir: Path) -> dict[str, Any]:
    """``meta.json`` (``{}`` before the run's first write of it); damaged: ``RunFileError``."""
    path = run_dir / META_FILE
    if not path.is_file():
        return {}
    document = read_run_json(path)
    if not isinstance(document, dict):
        raise damaged(path, ValueError(f"expected a JSON object, found {type(document).__name__}"))
    return document


def run_status(run_dir: Path) -> str | None:
    """The status recorded in ``meta.json``; ``None`` when it is missing or unreadable (a listing
    of many runs must not stop at one damaged file)."""
    try:
        status = read_meta(run_dir).get("status")
    except RunFileError:
        return None
    return str(status) if status is not None else None


@dataclass(frozen=True)
class RunState:
    """A run's status as a reader should show it: ``crashed`` for a dead ``running`` one."""

    status: str | None
    last_seen: str | None = None
    """For a crashed run: its last sign of life, as ``2026-11-28 18:40:12, 3 min ago``."""
    epochs_completed: int = 0

    def describe(self, run_id: str) -> str:
        """``run X crashed after epoch 2 (last sign of life ...)``."""
        epochs = (
            f" after epoch {self.epochs_completed}"
            if self.epochs_completed
            else " before its first epoch ended"
        )
        if self.status == STATUS_CRASHED:
            return f"run {run_id} crashed{epochs} (last sign of life {self.last_seen})"
        if self.status in (STATUS_INTERRUPTED, STATUS_FAILED):
            return f"run {run_id} was {self.status}{epochs}"
        if self.status == STATUS_RUNNING:
            return f"run {run_id} is still training"
        return f"run {run_id} is {self.status or 'of unknown status'}"


def run_state(run_dir: Path) -> RunState:
    """The status of ``run_dir`` with liveness taken into account (``None``: meta.json missing or
    damaged)."""
    try:
        meta = read_meta(run_dir)
    except RunFileError:
        return RunState(None)
    status = meta.get("status")
    epochs = int(meta.get("epochs_completed") or 0) if str(meta.get("epochs_completed", "0")).isdigit() else 0
    if status != STATUS_RUNNING:
        return RunState(str(status) if status is not None else None, epochs_completed=epochs)
    process = meta.get("process")
    state = liveness.liveness(run_dir, process if isinstance(process, dict) else None)
    if state.alive:
        return RunState(STATUS_RUNNING, epochs_completed=epochs)
    return RunState(STATUS_CRASHED, state.last_seen_text(), epochs)


def update_meta(run_dir: Path, **fields: Any) -> dict[str, Any]:
    meta = read_meta(run_dir)
    meta.update(fields)
    atomic_write_json(run_dir / META_FILE, meta)
    return meta


def read_labels(run_dir: Path) -> list[str]:
    """The class names in the model's output order (``labels.json``)."""
    path = run_dir / LABELS_FILE
    labels = read_run_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise damaged(path, ValueError("expected a non-empty list of class names"))
    return labels


def write_labels(run_dir: Path, labels: list[str]) -> None:
    atomic_write_json(run_dir / LABELS_FILE, labels)


def read_manifest(run_dir: Path, hint: str | None = None) -> SplitManifest:
    """Which file is in train / val / test (``split.json``); ``hint`` says what to do without it."""
    from imgclf_cli.dataset import SplitManifest

    path = run_dir / SPLIT_FILE
    if not path.is_file():
        raise missing(path, hint or "is it a complete imgclf run folder?")
    try:
        return SplitManifest.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise damaged(path, error) from None


def write_manifest(run_dir: Path, manifest: SplitManifest) -> None:
    atomic_write_text(run_dir / SPLIT_FILE, manifest.to_json())


def read_config_values(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as nested values (resolve them with ``config.resolve_config``)."""
    import yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise missing(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise damaged(path, error) from None
    if not isinstance(values, dict):
        raise damaged(path, ValueError("expected a mapping of config keys"))
    return values


def write_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml())


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """One row per completed epoch (``history.csv``); ``[]`` before the first epoch ends."""
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        with path.open(encoding="utf-8") as handle:
            return [
                {key: float(value) for key, value in row.items() if value not in (None, "")}
                for row in csv.DictReader(handle)
            ]
    except (OSError, ValueError, csv.Error) as error:
        raise damaged(path, error) from None


def write_history(run_dir: Path, rows: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()}
        )
    atomic_write_text(run_dir / HISTORY_FILE, buffer.getvalue())


def best_model_file(run_dir: Path) -> Path:
    """Where ``best.keras`` is written; it may not exist yet (see ``best_model_path``)."""
    return run_dir / BEST_MODEL_FILE


def best_model_path(run_dir: Path) -> Path:
    """``best.keras``, which must exist (a run that completed at least one epoch)."""
    path = best_model_file(run_dir)
    if not path.is_file():
        state = run_state(run_dir)
        if state.status in (STATUS_CRASHED, STATUS_RUNNING, STATUS_INTERRUPTED, STATUS_FAILED):
            described = state.describe(run_dir.name)
            raise RunNotFoundError(
                f"{described[0].upper()}{described[1:]}: it has no {BEST_MODEL_FILE} yet",
                "use another run (--run RUN), or wait for its first epoch"
                if state.status == STATUS_RUNNING
                else f"resume it with imgclf train --resume {run_dir.name}, or use another run (--run RUN)",
            )
        raise missing(path, "its training did not complete an epoch; use another run (--run RUN)")
    return path


def last_checkpoint_path(run_dir: Path) -> Path:
    """``last.keras`` (the model with optimizer state); it may not exist yet."""
    return run_dir / LAST_CHECKPOINT_FILE


def has_checkpoint(run_dir: Path) -> bool:
    return last_checkpoint_path(run_dir).is_file()


def training_curves_path(run_dir: Path) -> Path:
    return run_dir / PLOTS_DIR / TRAINING_CURVES_FILE


def cache_dir(run_dir: Path) -> Path:
    """Where a disk cache of decoded images lives while the run trains."""
    return run_dir / CACHE_DIR


def eval_dir(run_dir: Path, dataset_name: str) -> Path:
    return run_dir / EVAL_DIR / dataset_name


def export_dir(run_dir: Path) -> Path:
    return run_dir / EXPORT_DIR


# The outputs made from best.keras; each names its folder and the command that makes it again.
MODEL_OUTPUTS = {EVAL_DIR: "imgclf evaluate", EXPORT_DIR: "imgclf export"}
STALE_KEY = "stale"


def mark_outputs_stale(run_dir: Path) -> list[str]:
    """Record in meta.json that the ``eval/`` and ``export/`` present were made from a best.keras
    that has just been replaced (a resumed training improved on it); return every stale output.

    Called whenever training writes best.keras: a new run has no such outputs and writes nothing.
    """
    present = [name for name in MODEL_OUTPUTS if has_outputs(run_dir / name)]
    if not present:
        return stale_outputs(run_dir)
    stale = sorted(set(stale_outputs(run_dir)) | set(present))
    update_meta(run_dir, **{STALE_KEY: stale})
    return stale


def has_outputs(folder: Path) -> bool:
    """Whether ``folder`` holds outputs (its hidden lock and staging files are not)."""
    return folder.is_dir() and any(not entry.name.startswith(".") for entry in folder.iterdir())


def stale_outputs(run_dir: Path) -> list[str]:
    """The outputs (``eval``, ``export``) that meta.json records as made from an earlier best model."""
    recorded = read_meta(run_dir).get(STALE_KEY) or []
    return [name for name in recorded if name in MODEL_OUTPUTS] if isinstance(recorded, list) else []


def clear_stale(run_dir: Path, output: str) -> None:
    """``output`` (``eval`` or ``export``) was made again from the current best.keras."""
    stale = stale_outputs(run_dir)
    if output in stale:
        update_meta(run_dir, **{STALE_KEY: [name for name in stale if name != output]})


def no_completed_run(root: Path, runs: list[Path]) -> RunNotFoundError:
    """Why ``latest`` names no run, saying what became of the newest one."""
    if not runs:
        return RunNotFoundError(
            f"No completed run in {root}",
            "train one with `imgclf train DATA_DIR`, or point --runs-dir at your runs folder",
        )
    newest = runs[-1]
    state = run_state(newest)
    resumable = state.status in RESUMABLE_STATUSES and has_checkpoint(newest)
    return RunNotFoundError(
        f"No completed run in {root}; the newest, {state.describe(newest.name)}",
        f"resume it with imgclf train --resume {newest.name}"
        if resumable
        else "train one with `imgclf train DATA_DIR`, or pass --run RUN",
    )


def run_dir_of(path: Path) -> Path | None:
    """The run folder that ``path`` (a file of a run, or the run itself) belongs to."""
    for folder in (path, *path.parents):
        if is_run_dir(folder):
            return folder
    return None


def is_run_dir(path: Path) -> bool:
    return (path / META_FILE).is_file() or (path / LABELS_FILE).is_file()


def list_runs(root: Path) -> list[Path]:
    """Run folders under ``root``, oldest first; hidden ones (a run ``imgclf runs rm`` is
    deleting, renamed ``.trash-...``) are not runs any more."""
    if not root.is_dir():
        return []
    runs = (
        child
        for child in root.iterdir()
        if not child.name.startswith(".") and child.is_dir() and is_run_dir(child)
    )
    return sorted(runs, key=lambda path: path.name)


def resolve_run(reference: str | Path | None, runs_dir: str | Path | None = None) -> Path:
    """A run folder from ``latest`` (newest completed run), a run id, or a path."""
    root = runs_root(runs_dir)
    reference = str(reference or "latest")
    if reference == "latest":
        runs = list_runs(root)
        completed = [run for run in runs if run_status(run) == STATUS_COMPLETED]
        if not completed:
            raise no_completed_run(root, runs)
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
