"""Loading a trained model for inference, whatever its format, with its labels.

``load_predictor`` accepts a run (id, folder or ``latest``), a ``.keras`` file, and (once export
has landed) a SavedModel folder, a ``.tflite`` file or an ``.onnx`` file. Every predictor takes
a batch of RGB ``uint8`` images of its ``image_size`` (as decoded by
``imgclf_cli.images.load_image``) and returns class probabilities. This module is light: each
backend imports its runtime only when used, so a ``.tflite`` model never imports TensorFlow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imgclf_cli import store
from imgclf_cli.errors import ModelError


class Predictor(Protocol):
    labels: list[str]
    image_size: tuple[int, int]
    source: str

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """``uint8`` array ``(N, height, width, 3)`` -> ``float32`` probabilities ``(N, classes)``."""
        ...


def find_labels(model_path: Path) -> list[str]:
    """Labels travel with the model: labels.json of its run, or labels.txt / labels.json beside it."""
    folder = model_path if model_path.is_dir() else model_path.parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        json_file = candidate / store.LABELS_FILE
        if json_file.is_file():
            return [str(label) for label in json.loads(json_file.read_text(encoding="utf-8"))]
        text_file = candidate / "labels.txt"
        if text_file.is_file():
            return [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ModelError(
        f"No labels found for {model_path}",
        "keep labels.json (or labels.txt) beside the model, or pass --run",
    )


def image_size_of_keras_model(model: Any) -> tuple[int, int]:
    try:
        resize = model.get_layer("resize")
        return (int(resize.height), int(resize.width))
    except ValueError:
        shape = model.inputs[0].shape
        if shape[1] is None or shape[2] is None:
            raise ModelError(f"Cannot tell the input size of {model.name}") from None
        return (int(shape[1]), int(shape[2]))


@dataclass
class KerasPredictor:
    model: Any
    labels: list[str]
    image_size: tuple[int, int]
    source: str
    batch_size: int = 64

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        # Calling the model directly avoids predict()'s per-call dataset overhead on small batches.
        probabilities = self.model(images.astype("float32"), training=False)
        return np.asarray(probabilities, dtype=np.float32)


def load_keras_predictor(path: Path, labels: list[str] | None = None) -> KerasPredictor:
    from imgclf_cli.models import load_model

    model = load_model(path)
    return KerasPredictor(model, labels or find_labels(path), image_size_of_keras_model(model), str(path))


def load_predictor(
    model: str | Path | None = None,
    run: str | None = None,
    runs_dir: str | Path | None = None,
) -> Predictor:
    """The predictor for ``--model FILE`` or, without it, the best model of ``--run``."""
    if model is None:
        run_dir = store.resolve_run(run or "latest", runs_dir)
        return load_keras_predictor(run_dir / store.BEST_MODEL_FILE, store.read_labels(run_dir))
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"Model not found: {path}", "pass a run folder, a .keras, .tflite or .onnx file, or a SavedModel folder")
    if path.is_dir() and store.is_run_dir(path):
        return load_keras_predictor(path / store.BEST_MODEL_FILE, store.read_labels(path))
    if path.suffix == ".keras":
        return load_keras_predictor(path)
    raise ModelError(
        f"Unsupported model file: {path}",
        "pass a run folder, a .keras, .tflite or .onnx file, or a SavedModel folder",
    )


__all__ = ["Predictor", "load_predictor", "find_labels", "KerasPredictor"]
