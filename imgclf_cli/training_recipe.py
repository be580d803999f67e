"""The training recipe around the model: optimizer and learning-rate schedule, class weights,
numeric precision and the distribution strategy, each chosen from the config.  [heavy]
"""

from __future__ import annotations

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
    return keras.optimizers.SGD(
        learning_rate=rate, momentum=0.9, nesterov=True, weight_decay=config.train.weight_decay or None
    )
