"""The training recipe around the model: optimizer and learning-rate schedule, class weights,
numeric precision and the distribution strategy, each chosen from the config.  [heavy]
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from imgclf_cli.config import Config
from imgclf_cli.dataset import SplitManifest, count_per_class
from imgclf_cli.errors import ImgclfError


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


def make_optimizer(
    config: Config, steps_per_epoch: int, time_budgeted: bool = False, max_epochs: int | None = None
) -> keras.optimizers.Optimizer:
    """The optimizer and its learning-rate schedule.

    ``time_budgeted``: the cosine schedule follows the clock (``ProgressCosine``), ending after
    ``max_epochs`` epochs at the latest (``None``: the time alone decides).
    """
    rate: Any = config.train.learning_rate
    if config.train.lr_schedule == "cosine" and time_budgeted:
        warmup_steps = config.train.warmup_epochs * steps_per_epoch
        # Without an epoch cap, a step count no budget reaches: the clock alone drives progress.
        total_steps = (max_epochs or 10**6) * steps_per_epoch
        rate = ProgressCosine(config.train.learning_rate, max(total_steps, 1), warmup_steps)
    elif config.train.lr_schedule == "cosine":
        warmup_steps = config.train.warmup_epochs * steps_per_epoch
        total_steps = max(config.train.epochs * steps_per_epoch, warmup_steps + 1)
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.train.learning_rate * (0.1 if warmup_steps else 1.0),
            decay_steps=total_steps - warmup_steps,
            alpha=LEARNING_RATE_FLOOR,
            warmup_target=config.train.learning_rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    if config.train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=config.train.weight_decay)
    if config.train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    return keras.optimizers.SGD(
        learning_rate=rate, momentum=0.9, nesterov=True, weight_decay=config.train.weight_decay or None
    )
