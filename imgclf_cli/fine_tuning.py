"""Fine-tuning after the head: fastai's ``fine_tune`` shape for transfer learning.  [heavy]

With ``train.cache_features: auto``, a frozen pretrained backbone and ``model.fine_tune_layers``
N > 0, training runs in two phases, recorded by one ``RunRecorder`` (epoch numbers,
``history.csv``, ``last.keras``, ``best.keras`` and the listener's events continue across them):

1. The backbone is frozen whole and the head trains on its features, computed once
   (``imgclf_cli.feature_cache``), for ``train.epochs`` or the time budget, as when N is 0.
2. The backbone's last N layers are unfrozen (BatchNorm excepted: it stays frozen, so in
   inference mode) and the whole model trains on augmented images for
   ``train.fine_tune_epochs`` epochs, at a tenth of ``train.learning_rate`` on a short cosine.

Why this order: a head fresh from random initialisation sends large, noisy gradients into the
pretrained layers; once it is trained (in seconds, on cached features) the backbone's tail needs
only a gentle adjustment, and the slow epochs that run the backbone on images are few.

Resume: ``last.keras`` says which phase a run reached. A backbone frozen whole is phase 1: its
features are computed again, the head continues, then phase 2 follows. A backbone whose tail is
trainable is phase 2 (meta.json's ``fine_tune.first_epoch`` records where it started): it
continues to its planned last epoch with the optimizer state and schedule it was saved with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from imgclf_cli import store
from imgclf_cli.config import Config, time_budget_seconds
from imgclf_cli.feature_cache import is_chain
from imgclf_cli.models import sole_backbone, unfreeze_tail
from imgclf_cli.time_budget import BudgetClock
from imgclf_cli.training_callbacks import RunRecorder, TimeBudget, current_learning_rate, fit_callbacks
from imgclf_cli.training_events import FineTuneStarted, TrainingListener
from imgclf_cli.training_recipe import make_optimizer

# The backbone's pretrained weights need small steps; fastai and the Keras transfer-learning
# guide both fine-tune at about a tenth of (or less than) the head's learning rate.
FINE_TUNE_RATE_FACTOR = 0.1
# A fine-tune epoch does what the feature pass did (decode every image, run the backbone
# forward) plus augmentation, the backward pass through the tail and the head, and a validation
# pass; about twice the feature pass. The first one also traces the whole model's training step.
FINE_TUNE_EPOCH_FACTOR = 2.0
FINE_TUNE_TRACE_SECONDS = 5.0
# With a time budget, fine-tuning keeps at most this share of the training time: the head
# learns in seconds on cached features, the time is worth more to the backbone, yet a head
# that never trained would make fine-tuning start from noise.
FINE_TUNE_MAX_SHARE = 0.75


@dataclass
class FineTuning:
    """Phase 2 of a two-phase run: what it trains and where it starts."""

    layers: int
    """The backbone's last layers to train (``model.fine_tune_layers``)."""
    epochs: int
    """``train.fine_tune_epochs``: 0 leaves the run at phase 1."""
    first_epoch: int | None = None
    """Phase 2's first epoch (1-based); ``None`` until it starts (or a resumed run says)."""
    tail_trainable: bool = False
    """The model is set up for phase 2 already (resumed from one of its checkpoints)."""
    epoch_seconds: float | None = None
    """With a time budget: one fine-tune epoch, estimated from the feature pass."""

    def estimate_epoch(self, feature_seconds: float) -> float:
        self.epoch_seconds = FINE_TUNE_EPOCH_FACTOR * feature_seconds + FINE_TUNE_TRACE_SECONDS
        return self.epoch_seconds

    def reserve_seconds(self, training_seconds_left: float) -> float:
        """The seconds phase 1 leaves to phase 2: its epochs at the estimated pace, at most
        ``FINE_TUNE_MAX_SHARE`` of the training time; none when that holds no whole epoch (the
        head then gets the time, and phase 2 runs only if the head stops early enough)."""
        if not self.epochs or self.epoch_seconds is None:
            return 0.0
        reserve = min(self.epochs * self.epoch_seconds, FINE_TUNE_MAX_SHARE * max(0.0, training_seconds_left))
        return reserve if reserve >= self.epoch_seconds else 0.0

    def fits(self, clock: BudgetClock | None) -> bool:
        """Whether the time left holds one fine-tune epoch (always, without a budget or estimate)."""
        if clock is None or self.epoch_seconds is None:
            return True
        return clock.training_end() - clock.now() >= self.epoch_seconds


def plan_fine_tuning(
    config: Config, model: keras.Model, replicas: int, meta: dict[str, Any], resumed: bool
) -> FineTuning | None:
    """The two-phase plan for ``model``, or ``None`` when it trains in one phase as built.

    A new run's backbone is frozen whole here, for phase 1. The same conditions as caching
    features (``train.cache_features`` auto, one device, a chain of layers) apply, since
    phase 1 is training on cached features.
    """
    if config.train.cache_features != "auto" or replicas > 1 or config.model.fine_tune_layers <= 0:
        return None
    backbone = sole_backbone(model)
    # build_backbone leaves a pretrained backbone's layers outside its tail frozen; one whose
    # layers all train (freeze_backbone false, or random weights under auto) is not fine-tuned.
    if backbone is None or not is_chain(model) or all(layer.trainable for layer in backbone.layers):
        return None
    plan = FineTuning(layers=config.model.fine_tune_layers, epochs=config.train.fine_tune_epochs)
    if not resumed:
        backbone.trainable = False
        return plan
    first_epoch = (meta.get("fine_tune") or {}).get("first_epoch")
    if backbone.trainable_weights and first_epoch is None:
        # A checkpoint from before two phases existed, tail already training: it goes on so.
        return None
    # Recorded, phase 2 had started; a frozen checkpoint then means it was interrupted before
    # its first epoch was saved, and phase 2 starts again at the same epoch.
    plan.first_epoch = None if first_epoch is None else int(first_epoch)
    plan.tail_trainable = bool(backbone.trainable_weights)
    return plan


def fine_tune_optimizer(
    config: Config, steps_per_epoch: int, epochs: int, time_budgeted: bool
) -> keras.optimizers.Optimizer:
    """``train.optimizer`` and ``train.lr_schedule`` at a tenth of the learning rate, without
    warmup, over the fine-tune epochs (with a budget, also following the clock)."""
    train = dataclasses.replace(
        config.train,
        learning_rate=config.train.learning_rate * FINE_TUNE_RATE_FACTOR,
        warmup_epochs=0,
        epochs=max(1, epochs),
    )
    return make_optimizer(
        dataclasses.replace(config, train=train), steps_per_epoch, time_budgeted, max(1, epochs)
    )


def start_fine_tuning(
    model: keras.Model,
    config: Config,
    plan: FineTuning,
    first_epoch: int,
    steps_per_epoch: int,
    time_budgeted: bool,
    run_dir: Path,
    listener: TrainingListener,
) -> None:
    """Unfreeze the tail and recompile ``model`` for phase 2 (call inside the strategy's scope)."""
    backbone = sole_backbone(model)
    if backbone is None:
        raise ValueError(f"{model.name} has no backbone to fine-tune")
    unfreeze_tail(backbone, plan.layers)
    plan.first_epoch = first_epoch
    model.compile(
        optimizer=fine_tune_optimizer(config, steps_per_epoch, plan.epochs, time_budgeted),
        loss=model.loss,
        metrics=["accuracy"],
    )
    learning_rate = config.train.learning_rate * FINE_TUNE_RATE_FACTOR
    # Recorded before the first fine-tune epoch's checkpoint: --resume reads it from there on.
    store.update_meta(
        run_dir,
        fine_tune={"first_epoch": first_epoch, "layers": plan.layers, "learning_rate": learning_rate},
    )
    announce(plan, steps_per_epoch, learning_rate, listener)


def announce(
    plan: FineTuning, steps_per_epoch: int, learning_rate: float, listener: TrainingListener
) -> None:
    """Tell the listener that phase 2 runs (from its start, or again after ``--resume``)."""
    first_epoch = plan.first_epoch or 1
    listener.on_fine_tune_start(
        FineTuneStarted(
            layers=plan.layers,
            first_epoch=first_epoch,
            total_epochs=first_epoch - 1 + plan.epochs,
            learning_rate=learning_rate,
            steps_per_epoch=steps_per_epoch,
        )
    )


@dataclass
class PhaseTwo:
    """Phase 2's ``fit``, prepared; ``callbacks`` is empty when it has nothing to run."""

    initial_epoch: int
    last_epoch: int
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)
    time_keeper: TimeBudget | None = None
    skipped: bool = False
    """The time budget left could not hold one fine-tune epoch."""
    resumed: bool = False
    """Continued from a phase-2 checkpoint (its stream and position come from it)."""


def prepare_phase_two(
    plan: FineTuning,
    model: keras.Model,
    steps_per_epoch: int,
    recorder: RunRecorder,
    deadline: float | None,
    validation_steps: int,
    config: Config,
    strategy: tf.distribute.Strategy,
    run_dir: Path,
    listener: TrainingListener,
) -> PhaseTwo:
    """Set up phase 2 on the full ``model`` after phase 1's epochs in ``recorder``.

    Its epochs are numbered after phase 1's and go to the same recorder, so history.csv, the
    checkpoints and best.keras (the best of both phases) continue. ``deadline``: the end of the
    whole time budget (``time.monotonic()``), or ``None``.
    """
    done = len(recorder.state.history)
    first_epoch = plan.first_epoch if plan.first_epoch is not None else done + 1
    phase = PhaseTwo(
        initial_epoch=done, last_epoch=first_epoch - 1 + plan.epochs, resumed=plan.tail_trainable
    )
    if done >= phase.last_epoch:
        return phase
    # Its own clock: epochs here are far slower than on cached features, so phase 1's
    # measurements would mislead the plan and the time-driven schedule.
    clock = BudgetClock(deadline, validation_steps=validation_steps) if deadline is not None else None
    if not plan.tail_trainable and not plan.fits(clock):
        left = clock.training_end() - clock.now() if clock is not None else 0.0
        listener.on_info(
            f"Skipping fine-tuning: one epoch needs ~{plan.epoch_seconds or 0:.0f} s, "
            f"{max(0.0, left):.0f} s of the time budget are left"
        )
        store.update_meta(run_dir, fine_tune={"skipped": "time_budget"})
        phase.skipped = True
        return phase
    if plan.tail_trainable:
        # Resumed from a phase-2 checkpoint: loaded with its tail trainable, its optimizer and
        # its schedule where it stopped.
        announce(plan, steps_per_epoch, current_learning_rate(model), listener)
    else:
        with strategy.scope():
            start_fine_tuning(
                model, config, plan, first_epoch, steps_per_epoch, clock is not None, run_dir, listener
            )
        # Phase 2 gets its own patience: phase 1 may have ended by running out of it.
        recorder.state.restart_patience()
    recorder.stopped_early = False
    recorder.total_epochs = phase.last_epoch
    recorder.clock = clock
    plateau = config.train.lr_schedule == "plateau"
    budget = time_budget_seconds(config)
    phase.callbacks, phase.time_keeper = fit_callbacks(
        recorder, listener, clock, budget, phase.last_epoch, plateau, tensorboard=config.train.tensorboard
    )
    return phase
