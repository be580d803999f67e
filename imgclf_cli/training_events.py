"""What ``train()`` reports while it runs, for whoever wants to show it, and what it returns.

The training library never draws anything itself. It calls the methods of a
``TrainingListener``: ``imgclf train`` passes one that renders them with Rich (bars on a
terminal, one line per epoch), a notebook or another tool may pass its own, and without one
training is silent. Standard library only, so a listener can be written without TensorFlow.

Example::

    from imgclf_cli.training import train
    from imgclf_cli.training_events import EpochEnded, TrainingListener

    class PrintEpochs(TrainingListener):
        def on_epoch_end(self, event: EpochEnded) -> None:
            print(event.epoch, event.val_accuracy)

    train("flowers", listener=PrintEpochs())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imgclf_cli.time_budget import TimePlan

__all__ = [
    "EpochEnded",
    "FineTuneStarted",
    "TimePlan",
    "TrainResult",
    "TrainingListener",
    "TrainingStarted",
]

STOPPED_BY_EPOCHS = "epochs"
STOPPED_BY_EARLY_STOPPING = "early_stopping"
STOPPED_BY_TIME_BUDGET = "time_budget"
STOPPED_BY_INTERRUPT = "interrupt"


@dataclass
class TrainResult:
    """What ``train()`` returns (and ``imgclf train --json`` prints): the run as it now stands."""

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
    status: str = "completed"
    num_test: int = 0
    model_path: str = ""
    stopped_early: bool = False
    time_budget: float | None = None
    """``train.time_budget`` in seconds (``None``: no budget)."""
    stopped_by: str = STOPPED_BY_EPOCHS
    """What ended training: ``epochs``, ``early_stopping`` or ``time_budget`` (``interrupt`` in meta.json)."""
    stale_outputs: list[str] = field(default_factory=list)
    """The run's outputs (``eval``, ``export``) made from an earlier best model, to make again."""
    trained: bool = True
    """``False`` when ``--resume`` found nothing left to train and returned the run as it was."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingStarted:
    """Sent once, when the model is built and the first epoch is about to run."""

    run_id: str
    run_dir: str
    model_name: str
    """As the config and run ids spell it (``imgclf-cnn``, ``mobilenet_v3_small``)."""
    num_classes: int
    num_train: int
    num_val: int
    total_epochs: int
    """The most epochs (with a time budget and no epoch cap: 0, unknown until planned)."""
    initial_epoch: int
    """Epochs already completed (non-zero when a run is resumed: it continues from the next)."""
    steps_per_epoch: int
    batch_size: int = 0
    """Images per training step (0: unknown)."""
    time_budget: float | None = None
    """Seconds for the whole command (``train.time_budget``), or ``None``."""
    seconds_left: float | None = None
    """With a time budget: what is left of it as the first epoch starts."""
    initial_step: int = 0
    """Steps of the next epoch already done (a run resumed from a checkpoint within an epoch)."""
    resumed_state: str = ""
    """What had become of a resumed run, e.g. ``run X crashed after epoch 2 (last sign of life ...)``."""


@dataclass(frozen=True)
class EpochEnded:
    """One completed epoch: the row written to ``history.csv``, and whether it is the new best."""

    epoch: int
    """1-based."""
    total_epochs: int
    """The most epochs, or with a time budget, those expected to fit."""
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    seconds: float
    improved: bool


@dataclass(frozen=True)
class FineTuneStarted:
    """Sent when training moves from the head on cached features to fine-tuning the backbone
    (``model.fine_tune_layers``, ``train.fine_tune_epochs``; see ``imgclf_cli.fine_tuning``)."""

    layers: int
    """The backbone's last layers that now train (BatchNorm excepted)."""
    first_epoch: int
    """The first fine-tune epoch (1-based, numbered after the head's epochs)."""
    total_epochs: int
    """The last planned epoch of the run."""
    learning_rate: float
    steps_per_epoch: int


class TrainingListener:
    """Receives ``train()``'s events; every method does nothing unless overridden.

    Methods are called from the thread that called ``train()``.
    """

    def on_status(self, message: str) -> None:
        """A step of unknown length has started (e.g. ``Scanning images...``)."""

    def on_info(self, message: str) -> None:
        """A note worth a line (e.g. how validation batches are split across replicas)."""

    def on_warning(self, message: str) -> None:
        """Something the user should know that does not stop training."""

    def on_training_start(self, event: TrainingStarted) -> None:
        """The model is built; epochs start next."""

    def on_time_plan(self, plan: TimePlan) -> None:
        """With a time budget: how many epochs are expected to fit (after the first epoch, and
        again whenever the estimate moves)."""

    def on_fine_tune_start(self, event: FineTuneStarted) -> None:
        """The backbone's last layers are unfrozen; the next epochs train the whole model."""

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch ``epoch`` (1-based) starts."""

    def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
        """Training step ``step`` (1-based, within the epoch) ended, with running metrics."""

    def on_epoch_end(self, event: EpochEnded) -> None:
        """An epoch ended and its checkpoint and history row are written."""

    def on_finish(self) -> None:
        """``train()`` is about to return or raise: stop any live display."""
