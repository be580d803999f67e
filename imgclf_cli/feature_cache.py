"""Transfer learning at CPU speed: a frozen backbone's features computed once.  [heavy]

With a frozen pretrained backbone, almost all of a training step is the backbone's forward
pass, and it gives the same answer for an image every epoch. So each training and validation
image goes through the backbone once (without augmentation); the classification head (dropout,
the dense layer, softmax) then trains on those features in seconds per epoch. The head's
layers are the full model's own layers, so the full model (what ``best.keras`` holds, and what
prediction and export use) has the trained weights without any copying.

Only for models that are a chain of layers with one frozen ``keras.applications`` backbone
in it (how ``imgclf_cli.models.build_model`` makes them). With ``model.fine_tune_layers`` this
is the first of two phases: ``imgclf_cli.fine_tuning`` then trains the backbone's tail on images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from imgclf_cli.config import Config
from imgclf_cli.models import sole_backbone


@dataclass
class SplitModel:
    """The full model cut after its frozen backbone: ``features`` (image -> backbone features)
    and ``head`` (features -> probabilities), sharing the full model's layers."""

    features: keras.Model
    head: keras.Model


def frozen_backbone(model: keras.Model) -> keras.Model | None:
    """The frozen, fully inference-mode backbone inside ``model``, or ``None``."""
    backbone = sole_backbone(model)
    return None if backbone is None or backbone.trainable_weights else backbone


def should_cache_features(config: Config, model: keras.Model, replicas: int) -> bool:
    """``train.cache_features``: auto caches when the backbone is frozen whole, on one device.

    With ``model.fine_tune_layers`` > 0 the backbone is frozen whole only for the first of two
    phases (``imgclf_cli.fine_tuning``); while its tail trains, nothing is cached.
    """
    setting = config.train.cache_features
    if setting == "false" or replicas > 1:
        return False
    return frozen_backbone(model) is not None and is_chain(model)


def is_chain(model: keras.Model) -> bool:
    """Whether every layer takes the previous one's output (no branches)."""
    return all(len(layer._inbound_nodes) == 1 for layer in model.layers[1:])


def split_at_backbone(model: keras.Model) -> SplitModel:
    backbone = frozen_backbone(model)
    if backbone is None:
        raise ValueError(f"{model.name} has no frozen backbone")
    position = model.layers.index(backbone)
    image = keras.Input(shape=model.inputs[0].shape[1:], name="image")
    x = image
    for layer in model.layers[1 : position + 1]:
        x = layer(x)
    features = keras.Model(image, x, name="backbone_features")
    feature_input = keras.Input(shape=x.shape[1:], name="features")
    y = feature_input
    for layer in model.layers[position + 1 :]:
        y = layer(y)
    return SplitModel(features, keras.Model(feature_input, y, name="head"))


def compute_features(features: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's features of every image of ``dataset`` (one pass, inference mode), with
    their labels; undecodable images were already dropped by the pipeline."""

    @tf.function(reduce_retracing=True)
    def extract(images: Any) -> Any:
        return features(images, training=False)

    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for images, batch_labels in dataset:
        chunks.append(np.asarray(extract(images)))
        labels.append(np.asarray(batch_labels))
    if not chunks:
        width = int(features.outputs[0].shape[-1])
        return np.zeros((0, width), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(chunks), np.concatenate(labels)


def feature_datasets(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    seed: int,
) -> tuple[tf.data.Dataset, tf.data.Dataset, int]:
    """Training (reshuffled, endless, full batches) and validation streams of cached features,
    shaped like the image streams of ``imgclf_cli.pipeline.make_dataset``; and steps per epoch."""
    train_features, train_labels = train
    batch = max(1, min(batch_size, len(train_features)))
    train_data = (
        tf.data.Dataset.from_tensor_slices((train_features, train_labels))
        .shuffle(max(1, len(train_features)), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch, drop_remainder=True)
        .prefetch(2)
    )
    val_data = tf.data.Dataset.from_tensor_slices(val).batch(batch_size).prefetch(2)
    steps = max(1, -(-len(train_features) // batch))
    return train_data, val_data, steps
