"""TensorBoard event files of a run (``train.tensorboard``), under ``<run>/tensorboard/``.  [heavy]

Training writes, through Keras' own ``TensorBoard`` callback, each epoch's loss, accuracy and
learning rate in ``train/`` and the validation results in ``validation/``; ``imgclf evaluate``
adds its headline metrics as scalars and its confusion matrix and misclassified gallery as
images in ``evaluate/``, tagged ``<dataset>/...``. ``tensorboard --logdir runs/`` then shows
every run side by side (the viewer is a separate package: ``pip install "imgclf[tensorboard]"``).

A log is never worth the run: the first failure to write (a full disk, a read-only store) is one
warning, and the run goes on without TensorBoard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

TENSORBOARD_DIR = "tensorboard"
EVALUATE_FOLDER = "evaluate"
# The report's headline numbers, as evaluate's scalars.
EVALUATION_SCALARS = (
    "accuracy",
    "f1_macro",
    "precision_macro",
    "recall_macro",
    "f1_weighted",
    "ece",
    "log_loss",
)
EVALUATION_IMAGES = {"confusion_matrix": "confusion_matrix.png", "misclassified": "misclassified.png"}


def plugin_metadata(plugin: str) -> summary_pb2.SummaryMetadata:
    # TensorBoard's scalars and images plugins, at their data version 0 (empty content).
    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))


class CoreSummaries:
    """What Keras' callback and ``log_evaluation`` use of ``tf.summary``, written with
    TensorFlow's own ``tf.summary.write``: ``tf.summary.scalar`` and ``image`` belong to the
    ``tensorboard`` package, which TensorFlow 2.21 no longer installs (without it they raise).
    The records are those the package writes (same tensors, same plugin names), so the viewer
    reads them as its own."""

    create_file_writer = staticmethod(tf.summary.create_file_writer)
    record_if = staticmethod(tf.summary.record_if)

    @staticmethod
    def scalar(name: str, data: Any, step: Any = None, description: str | None = None) -> Any:
        return tf.summary.write(
            name, tf.cast(data, tf.float32), step=step, metadata=plugin_metadata("scalars")
        )

    @staticmethod
    def png_image(name: str, png: bytes, width: int, height: int, step: int) -> Any:
        """One PNG as TensorBoard's image summary: ``[width, height, encoded image]`` strings."""
        tensor = tf.constant([str(width).encode(), str(height).encode(), png])
        return tf.summary.write(name, tensor, step=step, metadata=plugin_metadata("images"))


def tensorboard_dir(run_dir: Path) -> Path:
    return run_dir / TENSORBOARD_DIR


def failure_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(getattr(error, "message", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__


class EpochLog(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback at its ``update_freq="epoch"`` settings (no graph, no
    profiling, no per-batch writes), whose failures end the logging instead of the training.

    Epochs are numbered as fit numbers them, so a resumed run (a new callback, fit started at
    ``initial_epoch``) and the second phase of fine-tuning continue the same curves; TensorBoard
    reads every event file of a folder.
    """

    def __init__(self, log_dir: Path, on_failure: Callable[[str], None]) -> None:
        super().__init__(log_dir=str(log_dir), write_graph=False, update_freq="epoch", profile_batch=0)
        self.on_failure = on_failure
        self.failed = False
        self._summary_module = CoreSummaries

    def safely(self, action: Callable[..., Any], *args: Any) -> None:
        if self.failed:
            return
        try:
            action(*args)
        except Exception as error:  # a log must never cost the user the run
            self.failed = True
            with contextlib.suppress(Exception):
                self._close_writers()
            self.on_failure(f"TensorBoard logging stopped ({failure_text(error)}); training goes on")

    def set_model(self, model: keras.Model) -> None:
        self.safely(super().set_model, model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.safely(super().on_train_begin, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.safely(super().on_train_end, logs)

    # The parent also logs each validation against the optimizer's iterations: fine-tuning's new
    # optimizer counts from 0 again, so that curve would fold back on itself, and the epoch's
    # validation scalars (validation/epoch_*) hold the same values.
    def on_test_begin(self, logs: dict | None = None) -> None:
        pass

    def on_test_end(self, logs: dict | None = None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.safely(super().on_epoch_begin, epoch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        def log_and_flush(epoch: int, logs: dict | None) -> None:
            super(EpochLog, self).on_epoch_end(epoch, logs)
            for writer in self._writers.values():  # on disk now: a running job can be watched
                writer.flush()

        self.safely(log_and_flush, epoch, logs)

    # Nothing is written per batch at update_freq="epoch": the parent's batch hooks would only
    # make summary calls without a writer, costing time at every step.
    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        pass

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        pass

    def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        pass

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        pass


def log_evaluation(
    run_dir: Path,
    dataset: str,
    metrics: dict[str, float],
    output_dir: Path,
    step: int,
    warn: Callable[[str], None],
) -> None:
    """An evaluation's headline ``metrics`` as scalars and its plots in ``output_dir`` as images,
    tagged ``<dataset>/<name>`` at ``step`` (the run's epochs), into the run's TensorBoard log
    (when the run keeps one). A failure is a warning: the evaluation itself is written."""
    log_dir = tensorboard_dir(run_dir)
    if not log_dir.is_dir():
        return
    from PIL import Image

    try:
        writer = CoreSummaries.create_file_writer(str(log_dir / EVALUATE_FOLDER))
        with writer.as_default():
            for name in EVALUATION_SCALARS:
                if name in metrics:
                    CoreSummaries.scalar(f"{dataset}/{name}", float(metrics[name]), step=step)
            for tag, file_name in EVALUATION_IMAGES.items():
                path = output_dir / file_name
                if path.is_file():
                    with Image.open(path) as image:
                        width, height = image.size
                    CoreSummaries.png_image(f"{dataset}/{tag}", path.read_bytes(), width, height, step)
        writer.close()
    except Exception as error:  # the evaluation is on disk already: a log must not fail it
        warn(f"Could not add the evaluation to TensorBoard ({failure_text(error)})")
