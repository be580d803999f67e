"""Training: from a dataset folder (or an interrupted run) to a completed run.  [heavy]

``train()`` is the library entry point behind ``imgclf train``; it can be called from a
notebook. The run folder is written as training goes: the config, labels and split first, then
after every epoch ``history.csv``, ``last.keras`` and (on improvement) ``best.keras``, each
atomically, so a crash or Ctrl-C never leaves a half-written model and ``--resume`` continues
from the last completed epoch.
"""

from __future__ import annotations

import contextlib
import csv
import io
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
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from imgclf_cli import __version__, store
from imgclf_cli.config import Config, resolve_config
from imgclf_cli.console import err
from imgclf_cli.dataset import (
    DatasetScan,
    SplitManifest,
    count_per_class,
    make_manifest,
    scan_dataset,
    skipped_as_dicts,
)
from imgclf_cli.errors import DatasetError, ImgclfError, RunNotFoundError, TrainingInterrupted
from imgclf_cli.models import build_model, canonical_model_name, load_model
from imgclf_cli.pipeline import DecodeFailures, make_dataset

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]


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
        loss_improved = row["val_loss"] < min((r["val_loss"] for r in self.history[:-1]), default=math.inf)
        self.epochs_without_improvement = 0 if (improved or loss_improved) else self.epochs_without_improvement + 1
        return improved

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


def write_history(run_dir: Path, rows: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    store.atomic_write_text(run_dir / store.HISTORY_FILE, buffer.getvalue())


def read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / store.HISTORY_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [{key: float(value) for key, value in row.items() if value not in (None, "")} for row in csv.DictReader(handle)]


def save_model_atomically(model: keras.Model, path: Path) -> None:
    store.atomic_write(path, lambda temporary: model.save(temporary), suffix=".keras")


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: history.csv, last.keras, best.keras on improvement, early stopping.

    Keras' ModelCheckpoint/CSVLogger/EarlyStopping are not used because they write in place
    (a crash can leave half a file) and cannot restore their state for ``--resume``.
    """

    def __init__(self, run_dir: Path, state: TrainingState, patience: int, console_rows: EpochPrinter) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.state = state
        self.patience = patience
        self.console_rows = console_rows
        self.epoch_started = 0.0
        self.stopped_early = False
        self.train_batches = 0
        self.val_batches = 0
        # "training" or "validation" when that stream held no decodable image at all.
        self.empty_split: str | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()
        self.train_batches = self.val_batches = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.train_batches += 1

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
        last = self.run_dir / store.LAST_CHECKPOINT_FILE
        save_model_atomically(self.model, last)
        if improved:
            # The same weights: copying the file is cheaper than serialising the model again.
            best_path = self.run_dir / store.BEST_MODEL_FILE
            store.atomic_write(best_path, lambda temporary: shutil.copyfile(last, temporary))
        write_history(self.run_dir, self.state.history)
        store.update_meta(self.run_dir, epochs_completed=epoch + 1, best_epoch=self.state.best_epoch)
        self.console_rows.print_row(row, improved)
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


class EpochPrinter:
    """One aligned line per epoch on stderr (a table that grows as training goes)."""

    header = f"{'epoch':>7} {'loss':>8} {'accuracy':>9} {'val_loss':>9} {'val_acc':>8} {'lr':>9} {'time':>7}"

    def __init__(self, total_epochs: int, progress: Progress | None) -> None:
        self.total_epochs = total_epochs
        self.progress = progress
        self.printed_header = False

    def print(self, text: str) -> None:
        console = self.progress.console if self.progress else err
        console.print(text, highlight=False, markup=False)

    def print_row(self, row: dict[str, float], improved: bool) -> None:
        if not self.printed_header:
            self.print(self.header)
            self.printed_header = True
        epoch = f"{int(row['epoch'])}/{self.total_epochs}"
        self.print(
            f"{epoch:>7} {row['loss']:8.4f} {row['accuracy']:9.4f} {row['val_loss']:9.4f} "
            f"{row['val_accuracy']:8.4f} {row['learning_rate']:9.2e} {row['seconds']:6.1f}s" + ("  *" if improved else "")
        )


class RichProgressCallback(keras.callbacks.Callback):
    """A live epoch bar and batch bar with the running loss and accuracy."""

    def __init__(self, progress: Progress, total_epochs: int, initial_epoch: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.progress = progress
        self.epoch_task = progress.add_task("epochs", total=total_epochs, completed=initial_epoch, metrics="")
        self.batch_task = progress.add_task("batches", total=steps_per_epoch, metrics="")
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.progress.reset(self.batch_task, total=self.steps_per_epoch, description=f"epoch {epoch + 1}", metrics="")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        metrics = f"loss {float(logs.get('loss', math.nan)):.4f}  acc {float(logs.get('accuracy', math.nan)):.4f}"
        self.progress.update(self.batch_task, completed=batch + 1, metrics=metrics)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        self.progress.update(
            self.epoch_task,
            completed=epoch + 1,
            metrics=f"val_acc {float(logs.get('val_accuracy', math.nan)):.4f}",
        )


def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=err,
        transient=True,
    )


def choose_strategy(config: Config) -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    mode = config.train.distribute
    if mode == "mirrored" or (mode == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def configure_precision(config: Config) -> str:
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    use_mixed = config.train.mixed_precision == "true" or (config.train.mixed_precision == "auto" and has_gpu)
    policy = "mixed_float16" if use_mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def class_weights_for(config: Config, manifest: SplitManifest) -> dict[int, float] | None:
    """Per-class loss weights: explicit, or inverse frequency when classes are imbalanced."""
    setting = config.train.class_weights
    counts = count_per_class(manifest.train, len(manifest.classes))
    if setting == "none":
        return None
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(manifest.classes))
        if unknown:
            raise ImgclfError(
                f"train.class_weights names unknown class(es): {', '.join(unknown)}",
                f"classes are: {', '.join(manifest.classes)}",
            )
        return {index: float(setting.get(name, 1.0)) for index, name in enumerate(manifest.classes)}
    present = [count for count in counts if count > 0]
    if max(present) / min(present) < 1.5:
        return None
    total = sum(counts)
    return {index: total / (len(counts) * count) if count else 0.0 for index, count in enumerate(counts)}


def make_optimizer(config: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    rate: Any = config.train.learning_rate
    if config.train.lr_schedule == "cosine":
        warmup_steps = config.train.warmup_epochs * steps_per_epoch
        total_steps = max(config.train.epochs * steps_per_epoch, warmup_steps + 1)
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.train.learning_rate * (0.1 if warmup_steps else 1.0),
            decay_steps=total_steps - warmup_steps,
            alpha=0.01,
            warmup_target=config.train.learning_rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    if config.train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=config.train.weight_decay)
    if config.train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    return keras.optimizers.SGD(learning_rate=rate, momentum=0.9, nesterov=True, weight_decay=config.train.weight_decay or None)


def prepare_new_run(
    data_dir: str | Path, config: Config, runs_dir: str | Path | None, name: str | None, quiet: bool
) -> tuple[Path, SplitManifest, DatasetScan]:
    started = time.perf_counter()
    with err.status("Scanning images...") if not quiet and err.is_terminal else contextlib.nullcontext():
        scan = scan_dataset(data_dir)
    manifest = make_manifest(scan, config.data.validation_split, config.seed)
    config.resolve_image_size(scan.median_short_side)
    run_dir = store.create_run_dir(store.runs_root(runs_dir), canonical_model_name(config.model.name), name)
    store.atomic_write_text(run_dir / store.CONFIG_FILE, config.to_yaml())
    store.atomic_write_json(run_dir / store.LABELS_FILE, manifest.classes)
    store.atomic_write_text(run_dir / store.SPLIT_FILE, manifest.to_json())
    store.update_meta(
        run_dir,
        run_id=run_dir.name,
        status=store.STATUS_RUNNING,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=canonical_model_name(config.model.name),
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
            "train_per_class": dict(zip(manifest.classes, count_per_class(manifest.train, len(manifest.classes)))),
        },
        scan_seconds=round(time.perf_counter() - started, 3),
        skipped_files=skipped_as_dicts(scan.skipped),
    )
    return run_dir, manifest, scan


def prepare_resume(reference: str, runs_dir: str | Path | None) -> tuple[Path, dict[str, Any], SplitManifest]:
    run_dir = store.resolve_run(reference, runs_dir) if reference != "latest" else latest_resumable(runs_dir)
    meta = store.read_meta(run_dir)
    if not (run_dir / store.LAST_CHECKPOINT_FILE).is_file():
        raise RunNotFoundError(
            f"Run {run_dir.name} has no checkpoint to resume from (no completed epoch)",
            "start a new run with imgclf train DATA_DIR",
        )
    stored = yaml.safe_load((run_dir / store.CONFIG_FILE).read_text(encoding="utf-8")) or {}
    manifest = SplitManifest.from_json((run_dir / store.SPLIT_FILE).read_text(encoding="utf-8"))
    missing = [sample.path for sample in manifest.train[:50] if not Path(sample.path).exists()]
    if missing:
        raise DatasetError(
            f"The dataset of run {run_dir.name} is gone or moved: {missing[0]} does not exist",
            f"restore the images under {manifest.root}",
        )
    if meta.get("status") == store.STATUS_COMPLETED:
        err.print(f"Run {run_dir.name} had completed; continuing it as asked.", highlight=False)
    return run_dir, stored, manifest


def latest_resumable(runs_dir: str | Path | None) -> Path:
    root = store.runs_root(runs_dir)
    candidates = [run for run in store.list_runs(root) if (run / store.LAST_CHECKPOINT_FILE).is_file()]
    unfinished = [run for run in candidates if store.read_meta(run).get("status") != store.STATUS_COMPLETED]
    if not unfinished:
        raise RunNotFoundError(f"No interrupted run to resume in {root}", "pass the run id: --resume RUN")
    return unfinished[-1]


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
    show_progress: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Train a classifier on ``data_dir`` (or continue the run ``resume``) and return its summary.

    ``config`` (a ready ``Config``) or ``config_file``/``overrides``/``flags`` describe the
    training. Raises ``TrainingInterrupted`` on Ctrl-C after recording the run as interrupted.
    """
    if resume:
        run_dir, stored, manifest = prepare_resume(resume, runs_dir)
        config = resolve_config(config_file, overrides, flags, base=stored)
        store.atomic_write_text(run_dir / store.CONFIG_FILE, config.to_yaml())
        skipped = list(store.read_meta(run_dir).get("skipped_files", []))
        state = TrainingState.from_history(read_history(run_dir))
    else:
        if data_dir is None:
            raise DatasetError("No dataset folder given", "pass DATA_DIR")
        config = config or resolve_config(config_file, overrides, flags)
        canonical_model_name(config.model.name)  # fail on a typo before scanning
        run_dir, manifest, scan = prepare_new_run(data_dir, config, runs_dir, name, quiet)
        skipped = skipped_as_dicts(scan.skipped)
        state = TrainingState()

    initial_epoch = len(state.history)
    keras.utils.set_random_seed(config.seed + initial_epoch)
    policy = configure_precision(config)
    strategy = choose_strategy(config)
    failures = DecodeFailures()
    cache_dir = run_dir / ".cache"
    # A disk cache left by an interrupted run is incomplete (and locked): start it afresh.
    shutil.rmtree(cache_dir, ignore_errors=True)
    num_classes = len(manifest.classes)
    common = dict(
        image_size=config.image_size,
        batch_size=config.data.batch_size,
        num_classes=num_classes,
        seed=config.seed,
        failures=failures,
        cache=config.data.cache,
        cache_dir=cache_dir,
    )
    # Under MirroredStrategy a batch split unevenly across replicas fails inside Keras (AddN
    # of mismatched shapes): every batch must be a multiple of the number of replicas.
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        train_batch = max(replicas, min(config.data.batch_size, len(manifest.train)) // replicas * replicas)
        val_batch = max(replicas, min(train_batch, len(manifest.val) // replicas * replicas))
        common["batch_size"] = train_batch
    # Training batches are always full (see make_dataset), as MirroredStrategy needs.
    train_data = make_dataset(manifest.train, training=True, cache_name="train", **common)
    if replicas > 1:
        common["batch_size"] = val_batch
        left_out = len(manifest.val) % val_batch
        if left_out and not quiet:
            err.print(
                f"Note: with {replicas} replicas, validation uses full batches of {val_batch} only "
                f"({left_out} of {len(manifest.val)} images left out).",
                highlight=False,
            )
    val_data = make_dataset(manifest.val, training=False, cache_name="val", drop_remainder=replicas > 1, **common)
    steps_per_epoch = max(1, math.ceil(len(manifest.train) / common["batch_size"]))

    with strategy.scope():
        if initial_epoch:
            model = load_model(run_dir / store.LAST_CHECKPOINT_FILE, compile=True)
        else:
            model = build_model(config, num_classes)
            model.compile(
                optimizer=make_optimizer(config, steps_per_epoch),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.train.label_smoothing),
                metrics=["accuracy"],
            )
        build_before_tracing(model, train_data)

    store.update_meta(
        run_dir,
        status=store.STATUS_RUNNING,
        precision_policy=policy,
        strategy=type(strategy).__name__,
        num_replicas=strategy.num_replicas_in_sync,
        parameters=int(model.count_params()),
    )
    progress = make_progress() if show_progress else None
    printer = EpochPrinter(config.train.epochs, progress)
    recorder = RunRecorder(run_dir, state, config.train.early_stopping_patience, printer)
    callbacks: list[keras.callbacks.Callback] = [recorder]
    if config.train.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=3, min_lr=1e-6))
    if progress:
        callbacks.append(RichProgressCallback(progress, config.train.epochs, initial_epoch, steps_per_epoch))

    if not quiet:
        err.print(
            f"Training {model.name} on {len(manifest.train)} images ({num_classes} classes), "
            f"validating on {len(manifest.val)}; run {run_dir}",
            highlight=False,
        )
    started = time.perf_counter()
    previous_seconds = float(store.read_meta(run_dir).get("train_seconds", 0.0)) if initial_epoch else 0.0
    try:
        if initial_epoch < config.train.epochs:
            if progress:
                progress.start()
            with warnings.catch_warnings():
                # Undecodable files are filtered out of the validation stream, so Keras cannot know
                # its number of batches in advance and warns about it; that is expected here.
                warnings.filterwarnings("ignore", message=".*ran out of data.*")
                warnings.filterwarnings("ignore", message=".*shuffle=True.*")
                fit(
                    model, train_data, val_data, config, initial_epoch, steps_per_epoch,
                    class_weights_for(config, manifest), callbacks,
                )
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        shutil.rmtree(cache_dir, ignore_errors=True)
        finish_run(run_dir, state, store.STATUS_INTERRUPTED, previous_seconds + time.perf_counter() - started, skipped + skipped_as_dicts(failures.entries()))
        done = len(state.history)
        raise TrainingInterrupted(
            f"Training interrupted after {done} completed epoch(s); the run is kept in {run_dir}",
            f"continue it with: imgclf train --resume {run_dir.name}"
            + (f" --runs-dir {store.runs_root(runs_dir)}" if runs_dir else ""),
        ) from None
    except BaseException:
        if progress:
            progress.stop()
        finish_run(run_dir, state, store.STATUS_FAILED, previous_seconds + time.perf_counter() - started, skipped)
        raise
    if progress:
        progress.stop()
    train_seconds = previous_seconds + time.perf_counter() - started
    all_skipped = skipped + skipped_as_dicts(failures.entries())
    if recorder.empty_split:
        finish_run(run_dir, state, store.STATUS_FAILED, train_seconds, all_skipped)
        shutil.rmtree(cache_dir, ignore_errors=True)
        first = failures.entries()[0] if failures.entries() else None
        raise DatasetError(
            f"None of the {recorder.empty_split} images could be decoded"
            + (f" (e.g. {first.path}: {first.reason})" if first else ""),
            "check that the files are complete, readable images "
            "(imgclf inspect-dataset lists the broken ones)",
        )
    if not state.history:
        raise DatasetError("No epoch completed", "check that the dataset holds readable images")
    finish_run(run_dir, state, store.STATUS_COMPLETED, train_seconds, all_skipped)
    shutil.rmtree(cache_dir, ignore_errors=True)
    failed_paths = {entry.path for entry in failures.entries()}
    best = next(row for row in state.history if int(row["epoch"]) == state.best_epoch)
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
        model_path=str(run_dir / store.BEST_MODEL_FILE),
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


def fit(
    model: keras.Model,
    train_data: tf.data.Dataset,
    val_data: tf.data.Dataset,
    config: Config,
    initial_epoch: int,
    steps_per_epoch: int,
    class_weight: dict[int, float] | None,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    model.fit(
        train_data,
        validation_data=val_data,
        epochs=config.train.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=0,
    )


def finish_run(run_dir: Path, state: TrainingState, status: str, train_seconds: float, skipped: list[dict[str, str]]) -> None:
    """Record the final status and results in meta.json and draw the training curves."""
    fields: dict[str, Any] = {
        "status": status,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "train_seconds": round(train_seconds, 3),
        "epochs_completed": len(state.history),
        "skipped_files": skipped,
    }
    if state.history:
        best = next(row for row in state.history if int(row["epoch"]) == state.best_epoch)
        fields.update(best_epoch=state.best_epoch, val_accuracy=best["val_accuracy"], val_loss=best["val_loss"])
        try:
            from imgclf_cli.plots import plot_training_curves

            plot_training_curves(state.history, run_dir / store.PLOTS_DIR / "training_curves.png")
        except Exception as error:  # a plot must never cost the user the run
            err.print(f"Could not draw training curves: {error}", highlight=False)
    store.update_meta(run_dir, **fields)
