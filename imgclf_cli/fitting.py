"""Running Keras ``fit`` for imgclf: quietly, resumable mid-epoch, and what ended it.  [heavy]

A run resumed from a checkpoint saved within an epoch (``train.checkpoint_every``) first runs
the rest of that epoch, as a ``fit`` of its remaining steps on a training stream that skips the
batches already trained on, with the epoch's running metrics restored by the ``RunRecorder``;
then the following epochs, on a stream that starts where that one ended. The weights, the
optimizer state and the learning-rate schedule's position come back with the checkpoint, so
without augmentation the resumed run takes the steps the uninterrupted one would have taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf

from imgclf_cli.checkpointing import CheckpointPosition
from imgclf_cli.training_callbacks import RunRecorder, TimeBudget
from imgclf_cli.training_events import STOPPED_BY_EARLY_STOPPING, STOPPED_BY_EPOCHS, STOPPED_BY_TIME_BUDGET


@dataclass
class TrainingData:
    """The training and validation streams, and how many steps make an epoch."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    steps_per_epoch: int
    batch_size: int = 0
    """Images per training step."""
    skipped_batches: int = 0
    """Batches the training stream skips at its start (a resumed run's)."""


# Runs epochs as fit_quietly does, taking its arguments.
FitFunction = Callable[..., None]


def fit_from(
    model: keras.Model,
    data: TrainingData,
    epochs: int,
    initial_epoch: int,
    callbacks: list[keras.callbacks.Callback],
    class_weight: dict[int, float] | None,
    recorder: RunRecorder,
    images: bool,
    resume: CheckpointPosition | None = None,
    stream_after: Callable[[int], TrainingData] | None = None,
    fit: FitFunction | None = None,
) -> None:
    """``fit`` from ``initial_epoch`` to ``epochs``; with ``resume`` (a mid-epoch position at
    ``initial_epoch``), the rest of that epoch first, then the others on ``stream_after(n)``:
    the training stream that skips the first ``n`` batches. ``fit``: what runs the epochs, with
    ``fit_quietly``'s arguments (default: ``fit_quietly``; multi-worker training has its own)."""
    fit = fit or fit_quietly
    recorder.steps_per_epoch = data.steps_per_epoch
    if resume is not None and resume.step and resume.epoch == initial_epoch and stream_after is not None:
        remaining = max(1, data.steps_per_epoch - resume.step)
        recorder.start_stream(data.skipped_batches, images, resume)
        fit(
            model,
            dataclasses.replace(data, steps_per_epoch=remaining),
            initial_epoch + 1,
            initial_epoch,
            callbacks,
            class_weight,
        )
        if stopped(recorder, callbacks) or initial_epoch + 1 >= epochs:
            return
        initial_epoch += 1
        data = stream_after(data.skipped_batches + remaining)
    recorder.start_stream(data.skipped_batches, images)
    if initial_epoch < epochs:
        fit(model, data, epochs, initial_epoch, callbacks, class_weight)


def stopped(recorder: RunRecorder, callbacks: list[keras.callbacks.Callback]) -> bool:
    """Whether the last ``fit`` ended before its epochs (early stopping, time, no data)."""
    time_keepers = [callback for callback in callbacks if isinstance(callback, TimeBudget)]
    return (
        recorder.stopped_early
        or recorder.empty_split is not None
        or any(keeper.stopped for keeper in time_keepers)
    )


def fit_quietly(
    model: keras.Model,
    data: TrainingData,
    epochs: int,
    initial_epoch: int,
    callbacks: list[keras.callbacks.Callback],
    class_weight: dict[int, float] | None,
) -> None:
    """``model.fit`` from ``initial_epoch`` to ``epochs`` (0-based, as Keras counts), reporting
    only through ``callbacks``."""
    with warnings.catch_warnings():
        # Undecodable files are filtered out of the validation stream, so Keras cannot know
        # its number of batches in advance and warns about it; that is expected here.
        warnings.filterwarnings("ignore", message=".*ran out of data.*")
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        model.fit(
            data.train,
            validation_data=data.val,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=data.steps_per_epoch,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=0,
        )


def stopped_reason(recorder: RunRecorder, time_keeper: TimeBudget | None) -> str:
    """What ended the last ``fit``: early stopping, the time budget or its number of epochs."""
    if recorder.stopped_early:
        return STOPPED_BY_EARLY_STOPPING
    if time_keeper is not None and time_keeper.stopped:
        return STOPPED_BY_TIME_BUDGET
    return STOPPED_BY_EPOCHS


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
