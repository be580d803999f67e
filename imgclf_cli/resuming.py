"""Resuming a run: which run, whether anything is left to train, and the run as it stands.

``imgclf train --resume RUN`` asks these questions before TensorFlow loads, so that a completed
run answers at once that there is nothing to resume instead of loading its model first;
``train()`` asks them again, for callers from a notebook. Nothing here imports TensorFlow.

A completed run is trained further only when asked for more: a number of epochs beyond those it
ran (``--epochs``, or ``train.fine_tune_epochs`` after fine-tuning started), or a new time budget
(``--time``; a resumed run always gets a new budget for its new session).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf_cli import store
from imgclf_cli.checkpointing import PREVIOUS_CHECKPOINT_FILE, ResumePoint, choose_checkpoint
from imgclf_cli.config import given_keys, resolve_config
from imgclf_cli.errors import DatasetError, RunNotFoundError
from imgclf_cli.filesystems import exists_checker
from imgclf_cli.liveness import LOCK_FILE, RunBusyError, read_owner
from imgclf_cli.time_budget import format_duration
from imgclf_cli.training_events import (
    STOPPED_BY_EARLY_STOPPING,
    STOPPED_BY_EPOCHS,
    STOPPED_BY_TIME_BUDGET,
    TrainingListener,
    TrainResult,
)

if TYPE_CHECKING:
    from imgclf_cli.dataset import SplitManifest

# The keys that ask a completed run for more training.
MORE_EPOCHS_KEYS = {"train.epochs", "train.fine_tune_epochs"}
NEW_BUDGET_KEY = "train.time_budget"


def resume_command(run_id: str, runs_dir: str | Path | None = None) -> str:
    """The command line that resumes ``run_id`` (naming ``--runs-dir`` when one was given)."""
    command = f"imgclf train --resume {run_id}"
    return command + (f" --runs-dir {store.runs_root(runs_dir)}" if runs_dir else "")


def find_resumable(reference: str, runs_dir: str | Path | None = None) -> Path:
    """The run ``reference`` names (a run id, a folder, or ``latest``: the newest crashed,
    interrupted or failed run with a checkpoint). A run still training is refused."""
    if reference != "latest":
        run_dir = store.resolve_run(reference, runs_dir)
        state = store.run_state(run_dir)
        if state.status == store.STATUS_RUNNING:
            owner = liveness_owner(run_dir)
            raise RunBusyError(
                f"Run {run_dir.name} is being trained right now{owner}",
                "wait for it to finish, or stop that process first (Ctrl-C keeps the run resumable)",
            )
        return run_dir
    root = store.runs_root(runs_dir)
    candidates = [run for run in store.list_runs(root) if (run / store.SPLIT_FILE).is_file()]
    unfinished = [run for run in candidates if store.run_state(run).status in store.RESUMABLE_STATUSES]
    if not unfinished:
        raise RunNotFoundError(
            f"No crashed, interrupted or failed run to resume in {root}", "pass the run id: --resume RUN"
        )
    return unfinished[-1]


def liveness_owner(run_dir: Path) -> str:
    """`` by process 123 on host``, when the run's lock file names its trainer."""
    owner = read_owner(run_dir / LOCK_FILE)
    return f" by process {owner['pid']} on {owner.get('host', '?')}" if owner.get("pid") else ""


def choose_resume_point(
    run_dir: Path, listener: TrainingListener
) -> tuple[ResumePoint, list[dict[str, float]]]:
    """The checkpoint to resume from (``last.keras``, else ``previous.keras``; ``None``: there is
    none, the run starts again) and the history that goes with it.

    The checkpoint is the record of where training stood: an epoch whose checkpoint was written
    but not its history row (a crash in between) gets its row back from the checkpoint, and
    epochs after an older checkpoint (``previous.keras``) are dropped from the history, to be
    trained again.
    """
    if not has_any_checkpoint(run_dir):
        # Stopped before its first checkpoint: its config and split are kept, so it trains
        # again from the start in the same folder rather than being lost.
        listener.on_info(f"Run {run_dir.name} has no checkpoint yet: training it from the start")
        if store.read_history(run_dir):
            store.write_history(run_dir, [])
        return None, []
    point = choose_checkpoint(run_dir, store.last_checkpoint_path(run_dir))
    if point.note:
        listener.on_warning(point.note)
    history = store.read_history(run_dir)
    position = point.position
    if position is None:
        return point, history
    if len(history) == position.epoch - 1 and position.row is not None:
        history = [*history, position.row]
        store.write_history(run_dir, history)
    elif len(history) > position.epoch:
        listener.on_warning(
            f"Epochs {position.epoch + 1}-{len(history)} are trained again: "
            "the checkpoint resumed from was saved before them"
        )
        history = history[: position.epoch]
        store.write_history(run_dir, history)
    return point, history


def prepare_resume(run_dir: Path, listener: TrainingListener) -> tuple[dict[str, Any], SplitManifest]:
    """The stored config values and split of ``run_dir``, once checked that it can go on."""
    stored = store.read_config_values(run_dir)
    manifest = store.read_manifest(run_dir)
    exists = exists_checker(manifest.root)  # one listing, when the dataset is on an object store
    missing = [sample.path for sample in manifest.train[:50] if not exists(sample.path)]
    if missing:
        raise DatasetError(
            f"The dataset of run {run_dir.name} is gone or moved: {missing[0]} does not exist",
            f"restore the images under {manifest.root}",
        )
    if has_any_checkpoint(run_dir):
        listener.on_status(f"Loading {run_dir.name} from its last checkpoint...")
    return stored, manifest


def has_any_checkpoint(run_dir: Path) -> bool:
    return store.has_checkpoint(run_dir) or (run_dir / PREVIOUS_CHECKPOINT_FILE).is_file()


@dataclass(frozen=True)
class NothingToResume:
    """A completed run that ``--resume`` was not asked to train further."""

    message: str
    hint: str
    result: TrainResult


def planned_epochs(meta: dict[str, Any], epochs: int, fine_tune_epochs: int) -> int:
    """The last epoch a run plans: ``train.epochs``, or after fine-tuning started, the head's
    epochs and ``train.fine_tune_epochs`` (see ``imgclf_cli.fine_tuning``)."""
    first_fine_tune_epoch = (meta.get("fine_tune") or {}).get("first_epoch")
    if first_fine_tune_epoch is not None:
        return int(first_fine_tune_epoch) - 1 + fine_tune_epochs
    return epochs


def nothing_to_resume(
    run_dir: Path,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    runs_dir: str | Path | None = None,
) -> NothingToResume | None:
    """Why resuming ``run_dir`` with these settings would train nothing, or ``None`` when it would
    (an unfinished run, or a completed one asked for more epochs or a new time budget)."""
    meta = store.read_meta(run_dir)
    if meta.get("status") != store.STATUS_COMPLETED:
        return None
    given = given_keys(config_file, overrides, flags)
    if NEW_BUDGET_KEY in given:
        return None
    done = len(store.read_history(run_dir))
    hint = (
        f"to train it further, ask for more: {resume_command(run_dir.name, runs_dir)} "
        f"--epochs N (N > {done}), or --time DURATION"
    )
    result = recorded_result(run_dir)
    best = f"best epoch {result.best_epoch}, val accuracy {result.val_accuracy:.4f}"
    if given & MORE_EPOCHS_KEYS:
        config = resolve_config(config_file, overrides, flags, base=store.read_config_values(run_dir))
        planned = planned_epochs(meta, config.train.epochs, config.train.fine_tune_epochs)
        if planned > done:
            return None
        how = f"has run {done} epochs and the settings given ask for {planned}"
    elif result.stopped_by == STOPPED_BY_EARLY_STOPPING:
        how = f"stopped early after {done} epochs (validation had stopped improving)"
    elif result.stopped_by == STOPPED_BY_TIME_BUDGET and result.time_budget:
        how = f"used its {format_duration(result.time_budget)} time budget ({done} epochs)"
    else:
        how = f"completed all {done} epochs"
    return NothingToResume(f"Nothing to resume: run {run_dir.name} {how}; {best}.", hint, result)


def recorded_result(run_dir: Path, *, trained: bool = False) -> TrainResult:
    """The summary of ``run_dir`` as its files record it (``train()`` returns the same)."""
    meta = store.read_meta(run_dir)
    manifest = store.read_manifest(run_dir)
    skipped = list(meta.get("skipped_files") or [])
    unreadable = {entry.get("path") for entry in skipped}
    stopped_by = str(meta.get("stopped_by") or STOPPED_BY_EPOCHS)
    budget = meta.get("time_budget")
    return TrainResult(
        run_id=run_dir.name,
        run_dir=str(run_dir),
        classes=list(manifest.classes),
        num_train=sum(1 for sample in manifest.train if sample.path not in unreadable),
        num_val=sum(1 for sample in manifest.val if sample.path not in unreadable),
        num_test=len(manifest.test),
        epochs_run=len(store.read_history(run_dir)),
        best_epoch=int(meta.get("best_epoch") or 0),
        val_accuracy=float(meta.get("val_accuracy", math.nan)),
        val_loss=float(meta.get("val_loss", math.nan)),
        train_seconds=float(meta.get("train_seconds") or 0.0),
        skipped_files=skipped,
        status=str(meta.get("status") or store.STATUS_COMPLETED),
        model_path=str(store.best_model_file(run_dir)),
        stopped_early=stopped_by == STOPPED_BY_EARLY_STOPPING,
        time_budget=float(budget) if budget is not None else None,
        stopped_by=stopped_by,
        stale_outputs=store.stale_outputs(run_dir),
        trained=trained,
    )
