"""Proving each exported artifact gives the trained Keras model's answers.  [heavy]

``verify_artifacts`` runs every artifact, through the same ``imgclf_cli.inference`` predictors
that ``imgclf predict`` uses, on the verification images (decoded by
``imgclf_cli.images.load_image`` exactly as in training), and compares it with the Keras model:
top-1 agreement, maximum absolute probability difference, accuracy and its change, file size and
mean latency per image (batch of one). ``THRESHOLDS`` says what each quantization mode must reach;
each artifact records the ``threshold`` it was held to, one that misses it gets ``problems``, and
``failure_message`` turns them into the error.
A SavedModel is also run on the files' own encoded bytes (``serving_default``), as TF Serving
would receive them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf_cli.dataset import Sample
from imgclf_cli.images import UnreadableImage, read_header
from imgclf_cli.inference import KerasPredictor, Predictor, SavedModelPredictor, load_predictor

BATCH_SIZE = 32
# Latency is the mean time of one-image calls, over at most this many images (after a warm-up).
LATENCY_IMAGES = 50
# tf.io.decode_image reads these; other formats (WebP, TIFF) are left out of the bytes check.
SERVING_DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP"})


@dataclass(frozen=True)
class Threshold:
    """What an artifact must reach against the Keras model on the verification images.

    ``min_agreement``: share of images with the same top-1 class; ``max_accuracy_drop``: the
    largest allowed accuracy loss (a fraction: 0.02 is two points); ``max_abs_diff``: the largest
    allowed difference of any class probability. ``None`` checks nothing.
    """

    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    max_abs_diff: float | None = None


# The mode "none" (no quantization: the spelling of --quantize and of the JSON "quantize" field
# since the first release) is called by what it is, float32, in everything people read.
QUANTIZATION_NAMES = {"none": "float32", "dynamic": "dynamic", "float16": "float16", "int8": "int8"}

THRESHOLDS: dict[str, Threshold] = {
    # float32 (TFLite, SavedModel, ONNX) computes the same function: only rounding may differ.
    "none": Threshold(min_agreement=0.995, max_abs_diff=0.01),
    "float16": Threshold(min_agreement=0.99, max_accuracy_drop=0.01),
    "dynamic": Threshold(min_agreement=0.98, max_accuracy_drop=0.01),
    "int8": Threshold(max_accuracy_drop=0.02),
}
# serving_default decodes and resizes with TensorFlow, not Pillow (and ignores EXIF rotation):
# close, not identical, so only a gross mismatch (wrong channels, scale, size) fails.
SERVING_BYTES_THRESHOLD = Threshold(min_agreement=0.95)
SERVING_BYTES_WARN_BELOW = 0.995


@dataclass
class ArtifactReport:
    """One exported model and how it compares with the Keras model (``None``: not verified)."""

    format: str
    quantize: str
    path: str
    size_bytes: int
    agreement: float | None = None
    max_abs_diff: float | None = None
    accuracy: float | None = None
    accuracy_delta: float | None = None
    latency_ms: float | None = None
    problems: list[str] = field(default_factory=list)
    note: str = ""
    threshold: Threshold | None = None
    """What it was held to; ``None`` until verified."""

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def quantization(self) -> str:
        """The mode's name for people: ``float32`` rather than ``none``."""
        return QUANTIZATION_NAMES.get(self.quantize, self.quantize)

    def to_dict(self) -> dict[str, Any]:
        """``quantize`` keeps the ``--quantize`` spelling (``none``); ``quantization`` names it.
        ``passed`` and ``threshold`` are ``None`` when the artifact was not verified."""
        verified = self.threshold is not None
        return {
            "format": self.format,
            "quantize": self.quantize,
            "quantization": self.quantization,
            "path": self.path,
            "size_bytes": self.size_bytes,
            "agreement": self.agreement,
            "max_abs_diff": self.max_abs_diff,
            "accuracy": self.accuracy,
            "accuracy_delta": self.accuracy_delta,
            "latency_ms": self.latency_ms,
            "passed": self.passed if verified else None,
            "threshold": asdict(self.threshold) if self.threshold is not None else None,
        }


@dataclass
class ReferenceReport:
    """The Keras model the artifacts are compared with."""

    path: str
    size_bytes: int
    accuracy: float
    latency_ms: float


@dataclass
class Verification:
    """What ``verify_artifacts`` found beside each artifact's own numbers."""

    reference: ReferenceReport
    num_images: int
    # serving_default (encoded bytes in) compared with Keras on the images TensorFlow decodes.
    serving_check: ArtifactReport | None = None
    warnings: list[str] = field(default_factory=list)


def verify_artifacts(
    artifacts: Sequence[ArtifactReport],
    reference_predictor: KerasPredictor,
    images: np.ndarray,
    truth: np.ndarray,
    samples: Sequence[Sample],
    on_progress: Callable[[str], None],
) -> Verification:
    """Fill in each artifact's numbers and problems, comparing it with ``reference_predictor``
    on ``images`` (decoded from ``samples``, whose classes are ``truth``)."""
    on_progress(f"Verifying against the Keras model on {len(images)} validation image(s)")
    labels = list(reference_predictor.labels)
    image_size = tuple(reference_predictor.image_size)
    reference, keras_latency = run_predictor(reference_predictor, images)
    verification = Verification(
        reference=ReferenceReport(
            path=reference_predictor.source,
            size_bytes=Path(reference_predictor.source).stat().st_size,
            accuracy=float((reference.argmax(axis=1) == truth).mean()),
            latency_ms=keras_latency,
        ),
        num_images=len(images),
    )
    for artifact in artifacts:
        on_progress(f"Verifying {artifact.format} ({artifact.quantization}): {artifact.path}")
        threshold = artifact.threshold = THRESHOLDS[artifact.quantize]
        predictor = load_predictor(model=artifact.path)
        if list(predictor.labels) != labels:
            artifact.problems.append(
                f"carries labels {list(predictor.labels)[:5]}..., expected {labels[:5]}..."
            )
        if tuple(predictor.image_size) != image_size:
            artifact.problems.append(f"takes {predictor.image_size} images, expected {image_size}")
            continue
        probabilities, artifact.latency_ms = run_predictor(predictor, images)
        compare(artifact, probabilities, reference, truth, threshold)
        if isinstance(predictor, SavedModelPredictor):
            check = check_serving_bytes(predictor.loaded, artifact, samples, reference, truth)
            if check is not None and check.passed and (check.agreement or 0.0) < SERVING_BYTES_WARN_BELOW:
                verification.warnings.append(
                    "serving_default (encoded image bytes) agrees with the Keras model on "
                    f"{check.agreement:.1%} of images: TensorFlow resamples slightly differently from "
                    "Pillow and ignores EXIF orientation"
                )
            verification.serving_check = check
    return verification


def run_predictor(predictor: Predictor, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Probabilities for all images (in batches) and the mean latency of one-image calls (ms)."""
    probabilities = np.concatenate(
        [
            np.asarray(predictor.predict_batch(images[start : start + BATCH_SIZE]), dtype=np.float32)
            for start in range(0, len(images), BATCH_SIZE)
        ]
    )
    timed = images[:LATENCY_IMAGES]
    predictor.predict_batch(timed[:1])  # warm-up: first call allocates and compiles
    started = time.perf_counter()
    for image in timed:
        predictor.predict_batch(image[None])
    latency_ms = (time.perf_counter() - started) * 1000.0 / max(1, len(timed))
    return probabilities, latency_ms


def compare(
    artifact: ArtifactReport,
    probabilities: np.ndarray,
    reference: np.ndarray,
    truth: np.ndarray,
    threshold: Threshold,
) -> None:
    """Fill in the agreement numbers and the problems found against ``threshold``."""
    expected_shape = reference.shape
    if probabilities.shape != expected_shape:
        artifact.problems.append(f"outputs shape {probabilities.shape}, expected {expected_shape}")
        return
    predicted = probabilities.argmax(axis=1)
    reference_predicted = reference.argmax(axis=1)
    artifact.agreement = float((predicted == reference_predicted).mean())
    artifact.max_abs_diff = float(np.abs(probabilities - reference).max())
    artifact.accuracy = float((predicted == truth).mean())
    artifact.accuracy_delta = artifact.accuracy - float((reference_predicted == truth).mean())
    if threshold.min_agreement is not None and artifact.agreement < threshold.min_agreement:
        artifact.problems.append(
            f"agrees with the Keras model on {artifact.agreement:.1%} of images, "
            f"needs {threshold.min_agreement:.1%}"
        )
    if (
        threshold.max_accuracy_drop is not None
        and artifact.accuracy_delta < -threshold.max_accuracy_drop - 1e-9
    ):
        artifact.problems.append(
            f"accuracy {artifact.accuracy:.1%} is {-artifact.accuracy_delta * 100:.1f} points below "
            f"the Keras model's, at most {threshold.max_accuracy_drop * 100:.1f} allowed"
        )
    if threshold.max_abs_diff is not None and artifact.max_abs_diff > threshold.max_abs_diff:
        artifact.problems.append(
            f"a probability differs by {artifact.max_abs_diff:.4f} from the Keras model's, "
            f"at most {threshold.max_abs_diff} allowed"
        )


def check_serving_bytes(
    loaded: Any,
    saved_model: ArtifactReport,
    samples: Sequence[Sample],
    reference: np.ndarray,
    truth: np.ndarray,
) -> ArtifactReport | None:
    """Run ``serving_default`` of the ``loaded`` SavedModel on the files' own bytes, as TF
    Serving would, against the Keras model."""
    import tensorflow as tf

    usable: list[int] = []
    for index, sample in enumerate(samples):
        try:
            if read_header(sample.path).format in SERVING_DECODABLE_FORMATS:
                usable.append(index)
        except UnreadableImage:
            continue
    if not usable:
        return None
    payloads = [Path(samples[index].path).read_bytes() for index in usable]
    signature = loaded.signatures["serving_default"]
    outputs = [
        np.asarray(
            signature(image_bytes=tf.constant(payloads[start : start + BATCH_SIZE]))["probabilities"],
            dtype=np.float32,
        )
        for start in range(0, len(payloads), BATCH_SIZE)
    ]
    timed = payloads[:LATENCY_IMAGES]
    started = time.perf_counter()
    for payload in timed:
        signature(image_bytes=tf.constant([payload]))
    latency_ms = (time.perf_counter() - started) * 1000.0 / len(timed)
    artifact = ArtifactReport(
        format="saved_model",
        quantize="none",
        path=saved_model.path,
        size_bytes=saved_model.size_bytes,
        latency_ms=latency_ms,
        note=f"serving_default on the encoded bytes of {len(usable)} image(s)",
        threshold=SERVING_BYTES_THRESHOLD,
    )
    compare(artifact, np.concatenate(outputs), reference[usable], truth[usable], SERVING_BYTES_THRESHOLD)
    return artifact


def failure_message(failures: Sequence[ArtifactReport], output_dir: str) -> tuple[str, str]:
    """The error's message (which artifact misses what) and hint (what to try instead)."""
    lines = [
        f"{Path(artifact.path).name} ({artifact.format} {artifact.quantization}"
        f"{', image bytes' if artifact.note else ''}): " + "; ".join(artifact.problems)
        for artifact in failures
    ]
    noun = "artifact does" if len(failures) == 1 else "artifacts do"
    message = f"{len(failures)} exported {noun} not match the trained model: " + " | ".join(lines)
    modes = {artifact.quantize for artifact in failures}
    hints = []
    if "int8" in modes:
        hints.append(
            "int8: calibrate on more training images (--calibration-images) "
            "or use --quantize float16 or dynamic"
        )
    if modes & {"dynamic", "float16"}:
        hints.append("prefer --quantize float32 or float16 for this model")
    if "none" in modes:
        hints.append("a float32 artifact should never differ: please report it, with the table above")
    hints.append(f"the files were kept in {output_dir}; --no-verify skips this check")
    return message, "; ".join(hints)
