"""The training recipe around the model: optimizer and learning-rate schedule, class weights,
numeric precision and the distribution strategy, each chosen from the config.  [heavy]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from imgclf_cli.cluster import check_distribute, cluster_from_environment, worker_timeout_seconds
from imgclf_cli.config import Config
from imgclf_cli.dataset import SplitManifest, count_per_class
from imgclf_cli.errors import ImgclfError


def choose_strategy(config: Config, on_status: Callable[[str], None] | None = None) -> tf.distribute.Strategy:
    """``train.distribute``: across the workers ``TF_CONFIG`` names (``imgclf_cli.multi_worker``;
    created before anything else starts TensorFlow's runtime, as it must be), else mirrored
    over this machine's GPUs, else the default (one device)."""
    cluster = cluster_from_environment()
    check_distribute(config, cluster)
    if cluster is not None:
        from imgclf_cli.multi_worker import cluster_strategy

        return cluster_strategy(cluster, worker_timeout_seconds(), on_status)
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


# With a time budget the warmup ends after warmup_epochs or this share of the training time,
# whichever comes first: a short budget may not hold a whole epoch.
WARMUP_MAX_SHARE = 0.1
LEARNING_RATE_FLOOR = 0.01  # the schedule ends at this fraction of the peak learning rate


@keras.saving.register_keras_serializable(package="imgclf")
class ProgressCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from a tenth of the peak, then cosine decay over training's progress (0 to 1).

    Progress is the larger of the steps done over ``total_steps`` and ``time_progress``, a
    variable that a ``--time`` budget (``imgclf_cli.time_budget``) advances with the clock: the
    schedule completes when either the planned steps or the time run out, whichever comes first,
    however fast the machine turns out to be.
    """

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        warmup_steps: int,
        alpha: float = LEARNING_RATE_FLOOR,
        time_progress: float = 0.0,
        name: str = "progress_cosine",
    ) -> None:
        super().__init__()
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.alpha = float(alpha)
        self.name = name
        self.time_progress = tf.Variable(float(time_progress), trainable=False, dtype=tf.float32, name=name)

    def __call__(self, step: Any) -> Any:
        step = tf.cast(step, tf.float32)
        progress = tf.clip_by_value(tf.maximum(step / self.total_steps, self.time_progress), 0.0, 1.0)
        warm = tf.constant(1.0)
        if self.warmup_steps:
            warm = tf.minimum(1.0, tf.maximum(step / self.warmup_steps, progress / WARMUP_MAX_SHARE))
        cosine = self.alpha + (1.0 - self.alpha) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.learning_rate * (0.1 + 0.9 * warm) * cosine

    def get_config(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "alpha": self.alpha,
            "time_progress": float(self.time_progress.numpy()),
            "name": self.name,
        }


def learning_rate_schedule(
    config: Config,
    steps_per_epoch: int,
    time_budgeted: bool = False,
    max_epochs: int | None = None,
    time_progress: float = 0.0,
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """``train.lr_schedule`` for ``train.epochs`` (a constant rate for ``constant`` and ``plateau``).

    ``time_budgeted``: the cosine schedule follows the clock (``ProgressCosine``, from
    ``time_progress``), ending after ``max_epochs`` epochs at the latest (``None``: the time
    alone decides).
    """
    if config.train.lr_schedule != "cosine":
        return config.train.learning_rate
    warmup_steps = config.train.warmup_epochs * steps_per_epoch
    if time_budgeted:
        # Without an epoch cap, a step count no budget reaches: the clock alone drives progress.
        total_steps = (max_epochs or 10**6) * steps_per_epoch
        return ProgressCosine(
            config.train.learning_rate, max(total_steps, 1), warmup_steps, time_progress=time_progress
        )
    total_steps = max(config.train.epochs * steps_per_epoch, warmup_steps + 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.train.learning_rate * (0.1 if warmup_steps else 1.0),
        decay_steps=total_steps - warmup_steps,
        alpha=LEARNING_RATE_FLOOR,
        warmup_target=config.train.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def make_optimizer(
    config: Config, steps_per_epoch: int, time_budgeted: bool = False, max_epochs: int | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer and its learning-rate schedule (see ``learning_rate_schedule``)."""
    rate = learning_rate_schedule(config, steps_per_epoch, time_budgeted, max_epochs)
    if config.train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=config.train.weight_decay)
    if config.train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    return keras.optimizers.SGD(
        learning_rate=rate, momentum=0.9, nesterov=True, weight_decay=config.train.weight_decay or None
    )


def planned_steps(schedule: Any) -> int | None:
    """The training steps a cosine schedule anneals over (``None``: not a cosine schedule)."""
    if isinstance(schedule, ProgressCosine):
        return schedule.total_steps
    if isinstance(schedule, keras.optimizers.schedules.CosineDecay):
        return int(schedule.decay_steps) + int(schedule.warmup_steps)
    return None


@dataclass(frozen=True)
class Replanned:
    """A resumed run's cosine schedule, planned again for the epochs now asked for."""

    previous_epochs: int
    """The epochs the checkpoint's schedule annealed over (large: it followed the clock alone)."""
    first_rate: float
    """The learning rate of the next step."""
    last_rate: float
    """The rate at the end of the new plan (the schedule's floor)."""


def replan_schedule(
    optimizer: keras.optimizers.Optimizer,
    config: Config,
    steps_per_epoch: int,
    time_budgeted: bool,
    max_epochs: int,
) -> Replanned | None:
    """Give a resumed run's optimizer the cosine schedule of a ``max_epochs`` run when its own
    was planned for another number of epochs (``None``: it was, or it is no cosine schedule).

    Without this, epochs past the checkpoint's plan would all run at the schedule's floor. The
    new schedule is the one a run planned for ``max_epochs`` from the start would have: it
    continues at its value for the step reached (a warm restart when the old plan had ended)
    and anneals to the floor by the last epoch. Call it inside the distribution strategy's scope.
    """
    previous = getattr(optimizer, "_learning_rate", None)
    previous_steps = planned_steps(previous)
    if previous_steps is None:
        return None
    progress = float(previous.time_progress.numpy()) if isinstance(previous, ProgressCosine) else 0.0
    schedule = learning_rate_schedule(config, steps_per_epoch, time_budgeted, max_epochs, progress)
    steps = planned_steps(schedule)
    if steps is None or steps == previous_steps:
        return None
    optimizer.learning_rate = schedule
    step = int(keras.ops.convert_to_numpy(optimizer.iterations))
    return Replanned(
        previous_epochs=round(previous_steps / max(1, steps_per_epoch)),
        first_rate=float(schedule(step)),
        last_rate=float(schedule(steps)),
    )
