"""Training: from a dataset folder (or an interrupted run) to a completed run.  [heavy]

``train()`` is the library entry point behind ``imgclf train``; it can be called from a
notebook. The run folder is written as training goes: the config, labels and split first, then
after every epoch ``history.csv``, ``last.keras`` and (on improvement) ``best.keras``, each
atomically, so a crash or Ctrl-C never leaves a half-written model and ``--resume`` continues
from the last completed epoch.
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from imgclf_cli import __version__, store
from imgclf_cli.config import Config, resolve_config
from imgclf_cli.dataset import (
    DatasetScan,
    SplitManifest,
    count_per_class,
    make_manifest,
    scan_dataset,
    skipped_as_dicts,
)
from imgclf_cli.errors import DatasetError, RunNotFoundError, TrainingInterrupted
from imgclf_cli.models import build_model, canonical_model_name, load_model
from imgclf_cli.pipeline import DecodeFailures, make_dataset
from imgclf_cli.training_events import EpochEnded, TrainingListener, TrainingStarted
from imgclf_cli.training_recipe import (
    choose_strategy,
    class_weights_for,
    configure_precision,
    make_optimizer,
)


@dataclass
class TrainResult:
    run_id: str
    run_dir: str
    classes: list[str]
    num_train: int
    num_val: int
    epochs_run: int
    best_epoch: int
    val_accuracy: float
    val_loss: float
    train_seconds: float
    skipped_files: list[dict[str, str]]
    status: str = store.STATUS_COMPLETED
    num_test: int = 0
    model_path: str = ""
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingState:
    """What the epoch callback keeps across epochs (and rebuilds from history.csv on resume)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    epochs_without_improvement: int = 0

    def is_improvement(self, row: dict[str, float]) -> bool:
        """Best = highest validation accuracy; ties broken by lower validation loss."""
        accuracy, loss = row["val_accuracy"], row["val_loss"]
        return accuracy > self.best_val_accuracy + 1e-9 or (
            abs(accuracy - self.best_val_accuracy) <= 1e-9 and loss < self.best_val_loss
        )

    def record(self, row: dict[str, float]) -> bool:
        self.history.append(row)
        improved = self.is_improvement(row)
        if improved:
            self.best_epoch = int(row["epoch"])
            self.best_val_accuracy = row["val_accuracy"]
            self.best_val_loss = row["val_loss"]
        # Patience counts epochs where neither accuracy nor loss got better.
        best_loss_before = min((earlier["val_loss"] for earlier in self.history[:-1]), default=math.inf)
        if improved or row["val_loss"] < best_loss_before:
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved

    def best_row(self) -> dict[str, float]:
        """The history row of the best epoch (there must be one)."""
        return next(row for row in self.history if int(row["epoch"]) == self.best_epoch)

    @classmethod
    def from_history(cls, rows: list[dict[str, float]]) -> TrainingState:
        state = cls()
        for row in rows:
            state.record(row)
        return state


def library_versions() -> dict[str, str]:
    import PIL
    import sklearn

    return {
        "imgclf": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def save_model_atomically(model: keras.Model, path: Path) -> None:
    store.atomic_write(path, lambda temporary: model.save(temporary), suffix=".keras")


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: history.csv, last.keras, best.keras on improvement, early stopping.

    Keras' ModelCheckpoint/CSVLogger/EarlyStopping are not used because they write in place
    (a crash can leave half a file) and cannot restore their state for ``--resume``.
    ``best.keras`` is the deployment artifact, so it is saved from ``deployment_model`` (the
    same architecture, never compiled): no optimizer state, a third of the size of
    ``last.keras``, which keeps the optimizer for ``--resume``.
    """

    def __init__(
        self,
        run_dir: Path,
        state: TrainingState,
        patience: int,
        total_epochs: int,
        deployment_model: keras.Model,
        listener: TrainingListener,
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.state = state
        self.patience = patience
        self.total_epochs = total_epochs
        self.deployment_model = deployment_model
        self.listener = listener
        self.epoch_started = 0.0
        self.stopped_early = False
        self.train_batches = 0
        self.val_batches = 0
        # "training" or "validation" when that stream held no decodable image at all.
        self.empty_split: str | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()
        self.train_batches = self.val_batches = 0
        self.listener.on_epoch_start(epoch + 1)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.train_batches += 1
        logs = logs or {}
        self.listener.on_batch_end(
            batch + 1, float(logs.get("loss", math.nan)), float(logs.get("accuracy", math.nan))
        )

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.val_batches += 1

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if not self.train_batches or not self.val_batches:
            # Every file passed the header scan but none decoded: an epoch of NaNs, not a result.
            self.empty_split = "training" if not self.train_batches else "validation"
            self.model.stop_training = True
            return
        row = {
            "epoch": epoch + 1,
            "loss": float(logs.get("loss", math.nan)),
            "accuracy": float(logs.get("accuracy", math.nan)),
            "val_loss": float(logs.get("val_loss", math.nan)),
            "val_accuracy": float(logs.get("val_accuracy", math.nan)),
            "learning_rate": current_learning_rate(self.model),
            "seconds": time.perf_counter() - self.epoch_started,
        }
        improved = self.state.record(row)
        save_model_atomically(self.model, store.last_checkpoint_path(self.run_dir))
        if improved:
            self.deployment_model.set_weights(self.model.get_weights())
            save_model_atomically(self.deployment_model, store.best_model_file(self.run_dir))
        store.write_history(self.run_dir, self.state.history)
        store.update_meta(self.run_dir, epochs_completed=epoch + 1, best_epoch=self.state.best_epoch)
        self.listener.on_epoch_end(
            EpochEnded(
                epoch=epoch + 1,
                total_epochs=self.total_epochs,
                loss=row["loss"],
                accuracy=row["accuracy"],
                val_loss=row["val_loss"],
                val_accuracy=row["val_accuracy"],
                learning_rate=row["learning_rate"],
                seconds=row["seconds"],
                improved=improved,
            )
        )
        if self.patience and self.state.epochs_without_improvement >= self.patience:
            self.stopped_early = True
            self.model.stop_training = True


def current_learning_rate(model: keras.Model) -> float:
    optimizer = model.optimizer
    rate = optimizer.learning_rate
    try:
        return float(keras.ops.convert_to_numpy(rate))
    except Exception:
        return math.nan


def prepare_new_run(
    data_dir: str | Path,
    config: Config,
    runs_dir: str | Path | None,
    name: str | None,
    listener: TrainingListener,
) -> tuple[Path, SplitManifest, DatasetScan]:
    started = time.perf_counter()
    listener.on_status("Scanning images...")
    scan = scan_dataset(data_dir)
    manifest = make_manifest(scan, config.data.validation_split, config.seed)
    config.resolve_image_size(scan.median_short_side)
    model_name = canonical_model_name(config.model.name)
    run_dir = store.create_run_dir(store.runs_root(runs_dir), model_name, name)
    store.write_config(run_dir, config)
    store.write_labels(run_dir, manifest.classes)
    store.write_manifest(run_dir, manifest)
    train_counts = count_per_class(manifest.train, len(manifest.classes))
    store.update_meta(
        run_dir,
        run_id=run_dir.name,
        status=store.STATUS_RUNNING,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=model_name,
        image_size=list(config.image_size),
        versions=library_versions(),
        dataset={
            "root": scan.root,
            "layout": scan.layout,
            "fingerprint": scan.fingerprint(),
            "num_images": scan.num_images,
            "num_train": len(manifest.train),
            "num_val": len(manifest.val),
            "num_test": len(manifest.test),
            "train_per_class": dict(zip(manifest.classes, train_counts, strict=True)),
        },
        scan_seconds=round(time.perf_counter() - started, 3),
        skipped_files=skipped_as_dicts(scan.skipped),
    )
    return run_dir, manifest, scan


def prepare_resume(
    reference: str, runs_dir: str | Path | None, listener: TrainingListener
) -> tuple[Path, dict[str, Any], SplitManifest]:
    run_dir = store.resolve_run(reference, runs_dir) if reference != "latest" else latest_resumable(runs_dir)
    meta = store.read_meta(run_dir)
    if not store.has_checkpoint(run_dir):
        raise RunNotFoundError(
            f"Run {run_dir.name} has no checkpoint to resume from (no completed epoch)",
            "start a new run with imgclf train DATA_DIR",
        )
    stored = store.read_config_values(run_dir)
    manifest = store.read_manifest(run_dir)
    missing = [sample.path for sample in manifest.train[:50] if not Path(sample.path).exists()]
    if missing:
        raise DatasetError(
            f"The dataset of run {run_dir.name} is gone or moved: {missing[0]} does not exist",
            f"restore the images under {manifest.root}",
        )
    if meta.get("status") == store.STATUS_COMPLETED:
        listener.on_info(f"Run {run_dir.name} had completed; continuing it as asked.")
    return run_dir, stored, manifest


def latest_resumable(runs_dir: str | Path | None) -> Path:
    root = store.runs_root(runs_dir)
    candidates = [run for run in store.list_runs(root) if store.has_checkpoint(run)]
    unfinished = [run for run in candidates if store.run_status(run) != store.STATUS_COMPLETED]
    if not unfinished:
        raise RunNotFoundError(f"No interrupted run to resume in {root}", "pass the run id: --resume RUN")
    return unfinished[-1]


@dataclass
class TrainingData:
    """The training and validation streams, and how many steps make an epoch."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    steps_per_epoch: int


def make_training_data(
    config: Config,
    manifest: SplitManifest,
    replicas: int,
    failures: DecodeFailures,
    cache_dir: Path,
    listener: TrainingListener,
) -> TrainingData:
    common: dict[str, Any] = dict(
        image_size=config.image_size,
        batch_size=config.data.batch_size,
        num_classes=len(manifest.classes),
        seed=config.seed,
        failures=failures,
        cache=config.data.cache,
        cache_dir=cache_dir,
    )
    # Under MirroredStrategy a batch split unevenly across replicas fails inside Keras (AddN
    # of mismatched shapes): every batch must be a multiple of the number of replicas.
    val_batch = config.data.batch_size
    if replicas > 1:
        train_batch = max(replicas, min(config.data.batch_size, len(manifest.train)) // replicas * replicas)
        val_batch = max(replicas, min(train_batch, len(manifest.val) // replicas * replicas))
        common["batch_size"] = train_batch
    # Training batches are always full (see make_dataset), as MirroredStrategy needs.
    train_data = make_dataset(manifest.train, training=True, cache_name="train", **common)
    steps_per_epoch = max(1, math.ceil(len(manifest.train) / common["batch_size"]))
    if replicas > 1:
        common["batch_size"] = val_batch
        left_out = len(manifest.val) % val_batch
        if left_out:
            listener.on_info(
                f"Note: with {replicas} replicas, validation uses full batches of {val_batch} only "
                f"({left_out} of {len(manifest.val)} images left out)."
            )
    val_data = make_dataset(
        manifest.val, training=False, cache_name="val", drop_remainder=replicas > 1, **common
    )
    return TrainingData(train_data, val_data, steps_per_epoch)


def train(
    data_dir: str | Path | None = None,
    *,
    config: Config | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    runs_dir: str | Path | None = None,
    name: str | None = None,
    resume: str | None = None,
    listener: TrainingListener | None = None,
) -> TrainResult:
    """Train a classifier on ``data_dir`` (or continue the run ``resume``) and return its summary.

    ``config`` (a ready ``Config``) or ``config_file``/``overrides``/``flags`` describe the
    training. Nothing is printed: progress, notes and warnings go to ``listener`` (see
    ``imgclf_cli.training_events``). Raises ``TrainingInterrupted`` on Ctrl-C after recording
    the run as interrupted.
    """
    listener = listener or TrainingListener()
    try:
        return train_run(data_dir, config, config_file, overrides, flags, runs_dir, name, resume, listener)
    finally:
        listener.on_finish()


def train_run(
    data_dir: str | Path | None,
    config: Config | None,
    config_file: str | Path | None,
    overrides: list[str] | None,
    flags: dict[str, Any] | None,
    runs_dir: str | Path | None,
    name: str | None,
    resume: str | None,
    listener: TrainingListener,
) -> TrainResult:
    if resume:
        run_dir, stored, manifest = prepare_resume(resume, runs_dir, listener)
        config = resolve_config(config_file, overrides, flags, base=stored)
        store.write_config(run_dir, config)
        skipped = list(store.read_meta(run_dir).get("skipped_files", []))
        state = TrainingState.from_history(store.read_history(run_dir))
    else:
        if data_dir is None:
            raise DatasetError("No dataset folder given", "pass DATA_DIR")
        config = config or resolve_config(config_file, overrides, flags)
        canonical_model_name(config.model.name)  # fail on a typo before scanning
        run_dir, manifest, scan = prepare_new_run(data_dir, config, runs_dir, name, listener)
        skipped = skipped_as_dicts(scan.skipped)
        state = TrainingState()

    initial_epoch = len(state.history)
    keras.utils.set_random_seed(config.seed + initial_epoch)
    policy = configure_precision(config)
    strategy = choose_strategy(config)
    failures = DecodeFailures()
    cache_dir = store.cache_dir(run_dir)
    # A disk cache left by an interrupted run is incomplete (and locked): start it afresh.
    shutil.rmtree(cache_dir, ignore_errors=True)
    num_classes = len(manifest.classes)
    data = make_training_data(config, manifest, strategy.num_replicas_in_sync, failures, cache_dir, listener)

    with strategy.scope():
        if initial_epoch:
            model = load_model(store.last_checkpoint_path(run_dir), compile=True)
        else:
            model = build_model(config, num_classes)
            model.compile(
                optimizer=make_optimizer(config, data.steps_per_epoch),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.train.label_smoothing),
                metrics=["accuracy"],
            )
        build_before_tracing(model, data.train)
    # The same architecture, never compiled: what best.keras holds (see RunRecorder).
    deployment_model = type(model).from_config(model.get_config())

    store.update_meta(
        run_dir,
        status=store.STATUS_RUNNING,
        precision_policy=policy,
        strategy=type(strategy).__name__,
        num_replicas=strategy.num_replicas_in_sync,
        parameters=int(model.count_params()),
    )
    recorder = RunRecorder(
        run_dir, state, config.train.early_stopping_patience, config.train.epochs, deployment_model, listener
    )
    callbacks: list[keras.callbacks.Callback] = [recorder]
    if config.train.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=3, min_lr=1e-6)
        )
    listener.on_training_start(
        TrainingStarted(
            run_id=run_dir.name,
            run_dir=str(run_dir),
            model_name=model.name,
            num_classes=num_classes,
            num_train=len(manifest.train),
            num_val=len(manifest.val),
            total_epochs=config.train.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=data.steps_per_epoch,
        )
    )
    started = time.perf_counter()
    previous_seconds = float(store.read_meta(run_dir).get("train_seconds", 0.0)) if initial_epoch else 0.0

    def seconds_so_far() -> float:
        return previous_seconds + time.perf_counter() - started

    try:
        if initial_epoch < config.train.epochs:
            with warnings.catch_warnings():
                # Undecodable files are filtered out of the validation stream, so Keras cannot know
                # its number of batches in advance and warns about it; that is expected here.
                warnings.filterwarnings("ignore", message=".*ran out of data.*")
                warnings.filterwarnings("ignore", message=".*shuffle=True.*")
                model.fit(
                    data.train,
                    validation_data=data.val,
                    epochs=config.train.epochs,
                    initial_epoch=initial_epoch,
                    steps_per_epoch=data.steps_per_epoch,
                    class_weight=class_weights_for(config, manifest),
                    callbacks=callbacks,
                    verbose=0,
                )
    except KeyboardInterrupt:
        shutil.rmtree(cache_dir, ignore_errors=True)
        all_skipped = skipped + skipped_as_dicts(failures.entries())
        finish_run(run_dir, state, store.STATUS_INTERRUPTED, seconds_so_far(), all_skipped, listener)
        hint = f"continue it with: imgclf train --resume {run_dir.name}"
        if runs_dir:
            hint += f" --runs-dir {store.runs_root(runs_dir)}"
        raise TrainingInterrupted(
            f"Training interrupted after {len(state.history)} completed epoch(s); "
            f"the run is kept in {run_dir}",
            hint,
        ) from None
    except BaseException:
        finish_run(run_dir, state, store.STATUS_FAILED, seconds_so_far(), skipped, listener)
        raise
    train_seconds = seconds_so_far()
    all_skipped = skipped + skipped_as_dicts(failures.entries())
    shutil.rmtree(cache_dir, ignore_errors=True)
    if recorder.empty_split:
        finish_run(run_dir, state, store.STATUS_FAILED, train_seconds, all_skipped, listener)
        first = failures.entries()[0] if failures.entries() else None
        raise DatasetError(
            f"None of the {recorder.empty_split} images could be decoded"
            + (f" (e.g. {first.path}: {first.reason})" if first else ""),
            "check that the files are complete, readable images "
            "(imgclf inspect-dataset lists the broken ones)",
        )
    if not state.history:
        raise DatasetError("No epoch completed", "check that the dataset holds readable images")
    finish_run(run_dir, state, store.STATUS_COMPLETED, train_seconds, all_skipped, listener)
    failed_paths = {entry.path for entry in failures.entries()}
    best = state.best_row()
    return TrainResult(
        run_id=run_dir.name,
        run_dir=str(run_dir),
        classes=list(manifest.classes),
        num_train=sum(1 for sample in manifest.train if sample.path not in failed_paths),
        num_val=sum(1 for sample in manifest.val if sample.path not in failed_paths),
        num_test=len(manifest.test),
        epochs_run=len(state.history),
        best_epoch=state.best_epoch,
        val_accuracy=float(best["val_accuracy"]),
        val_loss=float(best["val_loss"]),
        train_seconds=round(train_seconds, 3),
        skipped_files=all_skipped,
        model_path=str(store.best_model_file(run_dir)),
        stopped_early=recorder.stopped_early,
    )


def build_before_tracing(model: keras.Model, train_data: tf.data.Dataset) -> None:
    """Create the optimizer slots and metric variables before ``fit`` traces its train step.

    Outside a tf.distribute strategy Keras creates them during the first trace, and a
    tf.function that creates variables is traced twice: for imgclf-cnn on 2 CPU cores that
    was ~3 s more start-up, mostly tracing the optimizer update (Keras does this very build
    itself when a strategy is in scope). Only a speed-up: skipped if Keras changes its API.
    """
    with contextlib.suppress(AttributeError, TypeError):
        model._symbolic_build(data_batch=train_data.element_spec)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def finish_run(
    run_dir: Path,
    state: TrainingState,
    status: str,
    train_seconds: float,
    skipped: list[dict[str, str]],
    listener: TrainingListener,
) -> None:
    """Record the final status and results in meta.json and draw the training curves."""
    fields: dict[str, Any] = {
        "status": status,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "train_seconds": round(train_seconds, 3),
        "epochs_completed": len(state.history),
        "skipped_files": skipped,
    }
    if state.history:
        best = state.best_row()
        fields.update(
            best_epoch=state.best_epoch, val_accuracy=best["val_accuracy"], val_loss=best["val_loss"]
        )
        try:
            from imgclf_cli.plots import plot_training_curves

            plot_training_curves(state.history, store.training_curves_path(run_dir))
        except Exception as error:  # a plot must never cost the user the run
            listener.on_warning(f"Could not draw training curves: {error}")
    store.update_meta(run_dir, **fields)
