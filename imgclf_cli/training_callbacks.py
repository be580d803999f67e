"""What ``fit`` calls back during training: the run recorder and the time budget.  [heavy]

``RunRecorder`` writes the run after every epoch (history, checkpoints, meta) and stops at the
early-stopping patience; ``TimeBudget`` moves the learning-rate schedule with the clock and
stops training when a ``--time`` budget's training share is spent. Both report through the
``TrainingListener``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from imgclf_cli import store
from imgclf_cli.checkpointing import (
    PREVIOUS_CHECKPOINT_FILE,
    CheckpointEvery,
    CheckpointPosition,
    add_position,
    position_summary,
)
from imgclf_cli.time_budget import BudgetClock, TimePlan
from imgclf_cli.training_events import EpochEnded, TrainingListener
from imgclf_cli.training_recipe import ProgressCosine

# A fresh estimate of the epochs that fit is reported when it moves by more than this share.
PLAN_REPORT_CHANGE = 0.1


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

    def snapshot(self) -> TrainingState:
        return dataclasses.replace(self, history=list(self.history))

    def restore(self, snapshot: TrainingState) -> None:
        self.__dict__.update(dataclasses.replace(snapshot, history=list(snapshot.history)).__dict__)

    def restart_patience(self) -> None:
        """A new phase of training (fine-tuning) gets its own early-stopping patience."""
        self.epochs_without_improvement = 0

    @classmethod
    def from_history(cls, rows: list[dict[str, float]], phase_start: int | None = None) -> TrainingState:
        """The state after ``rows``; patience restarts at epoch ``phase_start`` as it did live."""
        state = cls()
        for row in rows:
            if phase_start is not None and int(row["epoch"]) == phase_start:
                state.restart_patience()
            state.record(row)
        return state


def save_model_atomically(model: keras.Model, path: Path) -> None:
    store.atomic_write(path, lambda temporary: model.save(temporary), suffix=".keras")


def save_checkpoint(model: keras.Model, run_dir: Path, position: CheckpointPosition) -> None:
    """``last.keras`` with ``position`` inside; the one it replaces becomes ``previous.keras``.

    A failure at any point (a full disk) leaves ``last.keras`` the intact checkpoint before.
    """
    last = store.last_checkpoint_path(run_dir)
    previous = run_dir / PREVIOUS_CHECKPOINT_FILE

    def write(temporary: Path) -> None:
        model.save(temporary)
        add_position(temporary, position)

    rotated = False

    def keep_previous() -> None:
        # Only once the new checkpoint is whole on disk: until then last.keras stays in place.
        nonlocal rotated
        if last.is_file():
            os.replace(last, previous)
            rotated = True

    if last.is_file():
        try:
            previous.unlink(missing_ok=True)  # at most two checkpoints and the one being written
        except OSError as error:
            raise store.write_error(previous, error) from None
    try:
        store.atomic_write(last, write, suffix=".keras", before_replace=keep_previous)
    except BaseException:
        if rotated and not last.exists():  # the final rename failed: put the old one back
            os.replace(previous, last)
        raise


def metric_states(model: keras.Model) -> list[list[float]]:
    """The running state of ``model``'s metrics (the epoch's loss and accuracy means so far)."""
    return [
        [float(value) for value in np.ravel(keras.ops.convert_to_numpy(variable))]
        for metric in model.metrics
        for variable in metric.variables
    ]


def random_states(model: keras.Model) -> list[list[int]]:
    """The states of ``model``'s random generators (dropout, augmentation layers), which a
    Keras model file does not keep: saved with them, a resumed run draws the same masks, flips
    and rotations as the uninterrupted one would have."""
    return [
        [int(value) for value in np.ravel(keras.ops.convert_to_numpy(variable))]
        for variable in seed_variables(model)
    ]


def restore_random_states(model: keras.Model, states: list[list[int]]) -> bool:
    """Put back what ``random_states`` saved; ``False`` (nothing changed) if they do not match."""
    variables = seed_variables(model)
    if not states or len(variables) != len(states):
        return False
    for variable, state in zip(variables, states, strict=True):
        variable.assign(np.reshape(np.asarray(state, dtype=variable.dtype), variable.shape))
    return True


def seed_variables(model: keras.Model) -> list:
    # Layer.variables lists each layer's seed generator state after its weights, in a fixed order.
    return [variable for variable in model.variables if variable.name == "seed_generator_state"]


def restore_metric_states(model: keras.Model, states: list[list[float]]) -> bool:
    """Put back what ``metric_states`` saved; ``False`` (nothing changed) if they do not match."""
    variables = [variable for metric in model.metrics for variable in metric.variables]
    if len(variables) != len(states) or any(
        int(np.prod(variable.shape)) != len(state) for variable, state in zip(variables, states, strict=True)
    ):
        return False
    for variable, state in zip(variables, states, strict=True):
        variable.assign(np.reshape(np.asarray(state, dtype=variable.dtype), variable.shape))
    return True


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: history.csv, last.keras, best.keras on improvement, early stopping.

    Replacing best.keras marks the run's ``eval/`` and ``export/`` stale (``store.mark_outputs_stale``).

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
        clock: BudgetClock | None = None,
        checkpoint_model: keras.Model | None = None,
        checkpoint_every: CheckpointEvery | None = None,
        steps_per_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.checkpoint_every = checkpoint_every or CheckpointEvery()
        self.steps_per_epoch = steps_per_epoch
        # Where the training stream stands (see start_stream) and the epoch's progress.
        self.stream_batches = 0
        self.images = True
        self.step_in_epoch = 0
        self.saved_step = 0
        self.saved_epoch = 0  # the last epoch last.keras holds whole (this process's)
        self.saved_at = time.perf_counter()
        # A run resumed mid-epoch: the step it continues from and the epoch's state then.
        self.resume: CheckpointPosition | None = None
        self.clock = clock
        # The model last.keras holds: the one fit trains, or the full model around a head
        # trained on cached features (imgclf_cli.feature_cache).
        self.checkpoint_model = checkpoint_model
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

    def start_stream(
        self, batches_before: int, images: bool, resume: CheckpointPosition | None = None
    ) -> None:
        """Before each ``fit``: the batches its training stream starts after, whether it trains
        on images (mid-epoch checkpoints) or cached features, and the mid-epoch position it
        continues from, if any (its ``fit`` then runs only the rest of that epoch)."""
        self.stream_batches = batches_before
        self.images = images
        self.resume = resume if resume is not None and resume.step else None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()
        self.train_batches = self.val_batches = 0
        self.step_in_epoch = 0
        resume = self.resume
        if resume is not None and resume.epoch == epoch:
            # fit has just reset the metrics: the epoch's means continue from the checkpoint.
            self.step_in_epoch = resume.step
            self.epoch_started -= resume.epoch_seconds
            if not restore_metric_states(self.model, resume.metrics):
                self.listener.on_warning(
                    f"Epoch {epoch + 1}'s loss and accuracy cover only the steps after the resume"
                )
            self.resume = None
        self.saved_step = self.step_in_epoch
        self.listener.on_epoch_start(epoch + 1)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.train_batches += 1
        self.step_in_epoch += 1
        self.stream_batches += 1
        logs = logs or {}
        self.listener.on_batch_end(
            self.step_in_epoch, float(logs.get("loss", math.nan)), float(logs.get("accuracy", math.nan))
        )
        if (
            self.images
            and self.step_in_epoch < self.steps_per_epoch
            and self.checkpoint_every.due(
                self.step_in_epoch - self.saved_step, time.perf_counter() - self.saved_at
            )
        ):
            self.save_mid_epoch()

    def save_mid_epoch(self) -> None:
        """A checkpoint within the epoch: what a crash costs is the steps since this one."""
        epoch = len(self.state.history)
        position = CheckpointPosition(
            epoch=epoch,
            step=self.step_in_epoch,
            steps_per_epoch=self.steps_per_epoch,
            stream_batches=self.stream_batches,
            images=self.images,
            metrics=metric_states(self.model),
            epoch_seconds=time.perf_counter() - self.epoch_started,
            random_states=random_states(self.checkpoint_model or self.model),
        )
        save_checkpoint(self.checkpoint_model or self.model, self.run_dir, position)
        store.update_meta(self.run_dir, checkpoint=position_summary(position))
        self.saved_step = self.step_in_epoch
        self.saved_at = time.perf_counter()

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
        before = self.state.snapshot()
        improved = self.state.record(row)
        try:
            self.save_epoch(epoch, row, improved)
        except BaseException:
            # Stopped (Ctrl-C, a full disk) before last.keras held this epoch: the epoch is not
            # the run's, or its end would record an epoch that history.csv and last.keras lack.
            if self.saved_epoch != epoch + 1:
                self.state.restore(before)
            raise
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

    def save_epoch(self, epoch: int, row: dict[str, float], improved: bool) -> None:
        """best.keras (when ``improved``), then last.keras, history.csv and meta.json; once
        last.keras holds the epoch, an interruption finishes writing history.csv, so that the
        three agree."""
        saving_started = time.perf_counter()
        checkpoint_model = self.checkpoint_model or self.model
        if improved:
            # Before last.keras: a crash in between leaves a best.keras that the resumed run
            # reaches again, never a history naming a best epoch that best.keras lacks.
            self.deployment_model.set_weights(checkpoint_model.get_weights())
            save_model_atomically(self.deployment_model, store.best_model_file(self.run_dir))
            # A resumed run may hold evaluations and exports of the model just replaced.
            store.mark_outputs_stale(self.run_dir)
        position = CheckpointPosition(
            epoch=epoch + 1,
            steps_per_epoch=self.steps_per_epoch,
            stream_batches=self.stream_batches,
            images=self.images,
            row=row,
            random_states=random_states(checkpoint_model),
        )
        save_checkpoint(checkpoint_model, self.run_dir, position)
        self.saved_epoch = epoch + 1
        self.saved_step, self.saved_at = 0, time.perf_counter()
        try:
            store.write_history(self.run_dir, self.state.history)
            store.update_meta(
                self.run_dir,
                epochs_completed=epoch + 1,
                best_epoch=self.state.best_epoch,
                checkpoint=position_summary(position),
            )
        except KeyboardInterrupt:
            store.write_history(self.run_dir, self.state.history)  # the epoch is in last.keras
            raise
        if self.clock is not None:
            self.clock.checkpoint_seconds = time.perf_counter() - saving_started


def current_learning_rate(model: keras.Model) -> float:
    optimizer = model.optimizer
    rate = optimizer.learning_rate
    try:
        return float(keras.ops.convert_to_numpy(rate))
    except Exception:
        return math.nan


class TimeBudget(keras.callbacks.Callback):
    """Fits training into a ``--time`` budget (see ``imgclf_cli.time_budget``).

    After every training step: the schedule's ``time_progress`` follows the clock, and training
    stops once the time for training is spent (Keras still runs that epoch's validation and the
    recorder saves it). After every epoch: the epochs that fit are re-estimated and reported.
    Put it before the ``RunRecorder`` in the callback list, so that the epoch row shows the plan.
    """

    def __init__(
        self,
        clock: BudgetClock,
        budget_seconds: float,
        recorder: RunRecorder,
        listener: TrainingListener,
        max_epochs: int | None,
        later_epochs: int = 0,
        later_seconds: float = 0.0,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.budget_seconds = budget_seconds
        self.recorder = recorder
        self.listener = listener
        self.max_epochs = max_epochs
        # A later phase (fine-tuning) runs on its own clock after this one's deadline: its
        # epochs and the time kept for it are added to the plan shown.
        self.later_epochs = later_epochs
        self.later_seconds = later_seconds
        self.schedule: ProgressCosine | None = None
        self.start_progress = 0.0
        self.stopped = False
        self.steps_seen = 0
        self.step_started = 0.0
        self.epoch_started = 0.0
        self.test_started = 0.0
        self.reported_epochs: int | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.clock.start()
        schedule = getattr(self.model.optimizer, "_learning_rate", None)
        if isinstance(schedule, ProgressCosine):
            self.schedule = schedule
            # A resumed run continues its schedule from where it stopped, over the new budget;
            # one whose schedule had completed starts a new one.
            progress = float(schedule.time_progress.numpy())
            self.start_progress = progress if progress < 0.999 else 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = self.clock.now()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.step_started = self.clock.now()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.steps_seen:  # the first step traces the model: not a measure of speed
            self.clock.step_seconds = self.clock.now() - self.step_started
        self.steps_seen += 1
        if self.schedule is not None:
            progress = self.start_progress + (1.0 - self.start_progress) * self.clock.progress()
            self.schedule.time_progress.assign(progress)
        if self.clock.expired():
            self.stopped = True
            self.model.stop_training = True

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.test_started = self.clock.now()

    def on_test_end(self, logs: dict | None = None) -> None:
        self.clock.validation_seconds = self.clock.now() - self.test_started

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # The recorder saves next: count the last measured save in this epoch's duration.
        self.clock.epoch_seconds.append(self.clock.now() - self.epoch_started + self.clock.checkpoint_seconds)
        fit = self.clock.epochs_that_fit(epoch + 1)
        if fit is None:
            return
        planned = max(epoch + 1, min(fit, self.max_epochs) if self.max_epochs else fit)
        if self.stopped:
            planned = epoch + 1
        planned += self.later_epochs
        self.recorder.total_epochs = planned
        previous = self.reported_epochs
        if previous is None or abs(planned - previous) > max(1.0, PLAN_REPORT_CHANGE * previous):
            self.reported_epochs = planned
            self.listener.on_time_plan(
                TimePlan(
                    budget_seconds=self.budget_seconds,
                    epochs=planned,
                    epoch_seconds=self.clock.epoch_pace() or 0.0,
                    seconds_left=self.clock.seconds_left() + self.later_seconds,
                )
            )


def fit_callbacks(
    recorder: RunRecorder,
    listener: TrainingListener,
    clock: BudgetClock | None,
    budget_seconds: float | None,
    max_epochs: int | None,
    plateau: bool,
    later_epochs: int = 0,
    later_seconds: float = 0.0,
    tensorboard: bool = False,
) -> tuple[list[keras.callbacks.Callback], TimeBudget | None]:
    """The callbacks of one ``fit`` (one phase of training), and its ``TimeBudget`` if any.

    ``plateau``: ``train.lr_schedule`` is ``plateau`` (Keras' ReduceLROnPlateau).
    ``tensorboard``: ``train.tensorboard``, event files in the run (``imgclf_cli.tensorboard_log``).
    """
    callbacks: list[keras.callbacks.Callback] = [recorder]
    if tensorboard:
        from imgclf_cli.tensorboard_log import EpochLog, tensorboard_dir

        # After the recorder: the epoch's row (and learning rate) is settled when it logs.
        callbacks.append(EpochLog(tensorboard_dir(recorder.run_dir), listener.on_warning))
    time_keeper: TimeBudget | None = None
    if clock is not None and budget_seconds is not None:
        time_keeper = TimeBudget(
            clock, budget_seconds, recorder, listener, max_epochs, later_epochs, later_seconds
        )
        callbacks.insert(0, time_keeper)
    if plateau:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=3, min_lr=1e-6)
        )
    return callbacks, time_keeper
