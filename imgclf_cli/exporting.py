"""Exporting a run for deployment, and proving each artifact gives the trained model's answers.  [heavy]

``export_run()`` is the library entry point behind ``imgclf export``. From a run's ``best.keras``
it writes, into ``<run>/export/`` (or ``output_dir``):

* ``model.tflite`` (float32), ``model_dynamic.tflite`` (dynamic-range int8 weights),
  ``model_float16.tflite`` and ``model_int8.tflite`` (full integer, calibrated on the run's
  training images; ``model_int8_uint8.tflite`` with ``int8_io``, whose input and output are
  ``uint8`` too). Labels and the input size are stored inside the file (metadata ``imgclf``).
* ``saved_model/1/``: a SavedModel in TF Serving's layout. ``serving_default`` takes a batch of
  encoded images (JPEG, PNG, GIF or BMP bytes), ``serving_images`` a batch of float RGB images
  (0..255, the model's size); both return ``probabilities``, ``classes`` (the class names) and
  ``predicted_class``. ``assets/labels.txt`` holds the labels.
* ``model.onnx`` through tf2onnx (``pip install 'imgclf[onnx]'``), labels in its metadata.
* ``labels.txt`` (one class name a line, in index order) and ``export.json`` (this report).

Every exported model has a fixed input of the trained image size and takes RGB pixels as
floats in 0..255: rescaling (and the backbone's own normalisation) is inside the model, so a
deployment only decodes and resizes.

Verification (on by default) runs every artifact, through the same ``imgclf_cli.inference``
predictors that ``imgclf predict`` uses, on up to ``max_verify_images`` validation images of the
run, decoded by ``imgclf_cli.images.load_image`` exactly as in training, and compares it with
the Keras model: top-1 agreement, maximum absolute probability difference, accuracy and its
change, file size and mean latency per image (batch of one). ``THRESHOLDS`` says what each
quantization mode must reach; when an artifact misses, ``ExportVerificationError`` is raised,
carrying the full report.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf_cli import __version__, store
from imgclf_cli.dataset import Sample, SplitManifest
from imgclf_cli.errors import DatasetError, ExportVerificationError, ImgclfError, ModelError, UsageError
from imgclf_cli.images import UnreadableImage, load_image, read_header
from imgclf_cli.inference import (
    IMAGES_SIGNATURE,
    LABELS_TEXT_FILE,
    MODEL_METADATA_KEY,
    KerasPredictor,
    Predictor,
    SavedModelPredictor,
    image_size_of_keras_model,
    load_predictor,
)

FORMATS = ("tflite", "saved_model", "onnx")
QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
TFLITE_FILES = {
    "none": "model.tflite",
    "dynamic": "model_dynamic.tflite",
    "float16": "model_float16.tflite",
    "int8": "model_int8.tflite",
}
TFLITE_INT8_IO_FILE = "model_int8_uint8.tflite"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_VERSION = 1
REPORT_FILE = "export.json"
# tf.io.decode_image reads these; other formats (WebP, TIFF) are left out of the bytes check.
SERVING_DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP"})
BATCH_SIZE = 32
# Latency is the mean time of one-image calls, over at most this many images (after a warm-up).
LATENCY_IMAGES = 50
SELECTION_SEED = 0


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

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "quantize": self.quantize,
            "path": self.path,
            "size_bytes": self.size_bytes,
            "agreement": self.agreement,
            "max_abs_diff": self.max_abs_diff,
            "accuracy": self.accuracy,
            "accuracy_delta": self.accuracy_delta,
            "latency_ms": self.latency_ms,
        }


@dataclass
class ReferenceReport:
    """The Keras model the artifacts are compared with."""

    path: str
    size_bytes: int
    accuracy: float
    latency_ms: float


@dataclass
class ExportReport:
    run_id: str
    run_dir: str
    output_dir: str
    labels: list[str]
    image_size: tuple[int, int]
    artifacts: list[ArtifactReport]
    verified: bool
    num_verify_images: int = 0
    reference: ReferenceReport | None = None
    # serving_default (encoded bytes in) compared with Keras on the images TensorFlow decodes.
    serving_check: ArtifactReport | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[ArtifactReport]:
        checked = [*self.artifacts, *([self.serving_check] if self.serving_check else [])]
        return [artifact for artifact in checked if not artifact.passed]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: ``{"artifacts": [...]}`` with fractions, not percents."""
        return {"artifacts": [artifact.to_dict() for artifact in self.artifacts]}

    def to_record(self) -> dict[str, Any]:
        """Everything, for ``export.json`` beside the artifacts."""
        return {
            **self.to_dict(),
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "labels": self.labels,
            "image_size": list(self.image_size),
            "verified": self.verified,
            "num_verify_images": self.num_verify_images,
            "reference": asdict(self.reference) if self.reference else None,
            "serving_check": self.serving_check.to_dict() if self.serving_check else None,
            "problems": {artifact.path: artifact.problems for artifact in self.failures},
            "thresholds": {mode: asdict(threshold) for mode, threshold in THRESHOLDS.items()},
            "warnings": self.warnings,
            "imgclf_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


@dataclass
class Plan:
    """What to export: formats, TFLite quantization modes and where."""

    formats: tuple[str, ...]
    modes: tuple[str, ...]
    int8_io: bool


def make_plan(formats: Sequence[str], quantize: Sequence[str], int8_io: bool) -> Plan:
    """Validate the requested formats and modes; ``quantize`` alone implies TFLite."""
    unknown = [name for name in formats if name not in FORMATS and name != "all"]
    if unknown:
        raise UsageError(f"Unknown export format {unknown[0]!r}", f"choose from: {', '.join(FORMATS)}")
    bad_modes = [mode for mode in quantize if mode not in QUANTIZE_MODES]
    if bad_modes:
        raise UsageError(f"Unknown quantization mode {bad_modes[0]!r} for --quantize", f"choose from: {', '.join(QUANTIZE_MODES)}")
    chosen = set(FORMATS) if "all" in formats else set(formats)
    if quantize:
        chosen.add("tflite")
    if not chosen:
        raise UsageError(
            "Nothing to export: no format was chosen",
            "pass --tflite, --saved-model, --onnx (any combination) or --all",
        )
    if "all" in formats and not quantize:
        modes = QUANTIZE_MODES
    else:
        modes = tuple(mode for mode in QUANTIZE_MODES if mode in quantize) or ("none",)
    if "tflite" not in chosen:
        modes = ()
    if int8_io and "int8" not in modes:
        raise UsageError("--int8-io applies to the int8 TFLite model only", "add --quantize int8 (or --all)")
    return Plan(tuple(name for name in FORMATS if name in chosen), modes, int8_io)


def select_samples(samples: Sequence[Sample], limit: int, seed: int = SELECTION_SEED) -> list[Sample]:
    """A seeded random subset (the split lists are grouped by class), in the original order."""
    if limit >= len(samples):
        return list(samples)
    chosen = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[index] for index in chosen]


def load_images(samples: Sequence[Sample], image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[Sample], list[str]]:
    """Decode samples like training does; unreadable files are left out and described."""
    images: list[np.ndarray] = []
    kept: list[Sample] = []
    skipped: list[str] = []
    for sample in samples:
        try:
            images.append(load_image(sample.path, image_size))
        except (UnreadableImage, FileNotFoundError) as error:
            reason = error.reason if isinstance(error, UnreadableImage) else "file not found"
            skipped.append(f"{sample.path}: {reason}")
            continue
        kept.append(sample)
    height, width = image_size
    stacked = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return stacked, np.array([sample.label for sample in kept], dtype=np.int64), kept, skipped


def read_manifest(run_dir: Path) -> SplitManifest:
    path = run_dir / store.SPLIT_FILE
    if not path.is_file():
        raise DatasetError(
            f"Run {run_dir.name} has no {store.SPLIT_FILE}: its validation images are unknown",
            "pass --no-verify to export without checking (int8 also needs the training images)",
        )
    return SplitManifest.from_json(path.read_text(encoding="utf-8"))


def directory_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Converters print to stdout from Python; keep stdout for results (one JSON document)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


# ---------------------------------------------------------------------------------------------
# Writing the artifacts


class Exporter:
    """Holds the loaded Keras model and the fixed-size functions every format is built from."""

    def __init__(self, model: Any, labels: list[str], image_size: tuple[int, int], run_id: str, workdir: Path) -> None:
        import tensorflow as tf

        self.tf = tf
        self.model = model
        self.labels = labels
        self.image_size = image_size
        self.run_id = run_id
        self.workdir = workdir
        height, width = image_size
        self.image_spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="image")
        self._conversion_saved_model: Path | None = None

        # training=False matters: the augmentation layers are active when `training` is unset.
        @tf.function(input_signature=[self.image_spec])
        def probabilities(image: Any) -> dict[str, Any]:
            return {"probabilities": model(image, training=False)}

        self.probabilities = probabilities

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "image_size": list(self.image_size),
            "input": "RGB pixels as float32 in 0..255 (rescaling is inside the model)",
            "run_id": self.run_id,
            "imgclf_version": __version__,
        }

    def conversion_saved_model(self) -> Path:
        """A plain SavedModel (one ``serve`` signature, probabilities only) for the TFLite converter."""
        if self._conversion_saved_model is None:
            import keras

            path = self.workdir / "conversion_saved_model"
            archive = keras.export.ExportArchive()
            archive.track(self.model)
            archive.add_endpoint("serve", self.probabilities)
            archive.write_out(str(path), verbose=False)
            self._conversion_saved_model = path
        return self._conversion_saved_model

    def tflite(self, mode: str, calibration: np.ndarray | None, int8_io: bool) -> tuple[bytes, list[str]]:
        """The TFLite flatbuffer for a quantization mode, with labels embedded; and warnings."""
        tf = self.tf
        warnings: list[str] = []

        def converter(integer_only: bool) -> Any:
            result = tf.lite.TFLiteConverter.from_saved_model(str(self.conversion_saved_model()), signature_keys=["serve"])
            result.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            if mode != "none":
                result.optimizations = [tf.lite.Optimize.DEFAULT]
            if mode == "float16":
                result.target_spec.supported_types = [tf.float16]
            if mode == "int8":
                if calibration is None:
                    raise ValueError("int8 quantization needs calibration images")
                result.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
                if integer_only:
                    result.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                if int8_io:
                    result.inference_input_type = tf.uint8
                    result.inference_output_type = tf.uint8
            return result

        try:
            with stdout_to_stderr():
                flatbuffer = converter(integer_only=True).convert()
        except Exception as error:
            if mode != "int8" or int8_io:
                raise ModelError(f"TFLite conversion ({mode}) failed: {first_line(error)}") from error
            # Some ops have no integer kernel: keep them in float rather than fail the export.
            with stdout_to_stderr():
                flatbuffer = converter(integer_only=False).convert()
            warnings.append(f"int8: some operations have no integer kernel and stay float32 ({first_line(error)})")
        return embed_tflite_metadata(flatbuffer, self.metadata), warnings

    def saved_model(self, destination: Path) -> None:
        """The TF Serving SavedModel: encoded bytes in (``serving_default``) or float images in."""
        import keras

        tf = self.tf
        model = self.model
        height, width = self.image_size
        class_names = tf.constant(self.labels)

        def answer(images: Any) -> dict[str, Any]:
            probabilities = model(images, training=False)
            count = tf.shape(probabilities)[0]
            return {
                "probabilities": probabilities,
                "classes": tf.tile(class_names[None, :], [count, 1]),
                "predicted_class": tf.gather(class_names, tf.argmax(probabilities, axis=1)),
            }

        def decode_jpeg(data: Any) -> Any:
            # As Pillow in load_image: accurate integer IDCT (TensorFlow's default is the fast,
            # less accurate one), and a JPEG much larger than the model is decoded at 1/2, 1/4 or
            # 1/8 scale, the same reduction Pillow's draft mode picks.
            shape = tf.io.extract_jpeg_shape(data)
            longest = max(height, width)
            scale = tf.minimum(shape[1] // longest, shape[0] // longest)
            branch = tf.reduce_sum(tf.cast(scale >= tf.constant([2, 4, 8], dtype=scale.dtype), tf.int32))
            return tf.switch_case(
                branch,
                [
                    functools.partial(tf.io.decode_jpeg, data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
                    for ratio in (1, 2, 4, 8)
                ],
            )

        def decode(data: Any) -> Any:
            # As imgclf_cli.images.load_image: RGB, first frame, bilinear antialiased resize,
            # rounded back to 8-bit pixels. (EXIF orientation is not applied.)
            image = tf.cond(
                tf.io.is_jpeg(data),
                lambda: decode_jpeg(data),
                lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
            )
            image = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
            image = tf.cast(tf.saturate_cast(tf.round(image), tf.uint8), tf.float32)
            image.set_shape((height, width, 3))
            return image

        def from_bytes(image_bytes: Any) -> dict[str, Any]:
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32))
            return answer(images)

        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serving_default", from_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        archive.add_endpoint(IMAGES_SIGNATURE, answer, input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="images")])
        with stdout_to_stderr():
            archive.write_out(str(destination), verbose=False)
        (destination / "assets").mkdir(exist_ok=True)
        (destination / "assets" / LABELS_TEXT_FILE).write_text("\n".join(self.labels) + "\n", encoding="utf-8")

    def onnx(self, destination: Path) -> None:
        """ONNX through tf2onnx, from the frozen fixed-size function.

        Only the image is an input: constants the model captures (e.g. a ``Normalization``
        layer's mean and variance) are frozen into the graph, whereas
        ``tf2onnx.convert.from_function`` would turn them into extra graph inputs.
        """
        import logging

        import onnx
        import tf2onnx

        tf = self.tf
        logging.getLogger("tf2onnx").setLevel(logging.ERROR)
        concrete = self.probabilities.get_concrete_function()
        count = len(tf.nest.flatten(concrete.structured_input_signature))
        input_names = [tensor.name for tensor in concrete.inputs[:count]]
        output_names = [tensor.name for tensor in concrete.outputs]
        try:
            with stdout_to_stderr(), quiet_tensorflow_logs():
                graph_def = tf2onnx.tf_loader.from_function(concrete, input_names, output_names)
                model_proto, _ = tf2onnx.convert.from_graph_def(
                    graph_def,
                    name=f"imgclf_{self.run_id}",
                    input_names=input_names,
                    output_names=output_names,
                    opset=ONNX_OPSET,
                    tensors_to_rename=tf2onnx.convert.tensor_names_from_structed(concrete, input_names, output_names),
                )
        except Exception as error:
            raise ModelError(f"ONNX conversion failed: {first_line(error)}") from error
        entry = model_proto.metadata_props.add()
        entry.key = MODEL_METADATA_KEY
        entry.value = json.dumps(self.metadata)
        store.atomic_write(destination, lambda temporary: onnx.save(model_proto, str(temporary)), suffix=".onnx")


@contextlib.contextmanager
def quiet_tensorflow_logs() -> Iterator[None]:
    """Hide TensorFlow's Python deprecation warnings that tf2onnx triggers (not ours to fix)."""
    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def embed_tflite_metadata(flatbuffer: bytes, metadata: dict[str, Any]) -> bytes:
    """Add (or replace) the ``imgclf`` metadata entry of a TFLite flatbuffer.

    TFLite models carry named metadata buffers (the converter itself stores its version there);
    ``imgclf_cli.inference.read_tflite_metadata`` reads this one back without TensorFlow.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(flatbuffer, 0))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = MODEL_METADATA_KEY
    entry.buffer = len(model.buffers) - 1
    kept = [item for item in (model.metadata or []) if (item.name or b"").decode() != MODEL_METADATA_KEY]  # type: ignore[union-attr]
    model.metadata = [*kept, entry]
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_bytes(path: Path, data: bytes) -> None:
    store.atomic_write(path, lambda temporary: temporary.write_bytes(data), suffix=path.suffix)


def replace_directory(source: Path, destination: Path) -> None:
    """Move a freshly written folder into place, replacing an older one."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        retired = destination.with_name(f".{destination.name}.old-{time.time_ns()}")
        destination.rename(retired)
        source.rename(destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        source.rename(destination)


# ---------------------------------------------------------------------------------------------
# Verification


def run_predictor(predictor: Predictor, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Probabilities for all images (in batches) and the mean latency of one-image calls (ms)."""
    probabilities = np.concatenate(
        [np.asarray(predictor.predict_batch(images[start : start + BATCH_SIZE]), dtype=np.float32) for start in range(0, len(images), BATCH_SIZE)]
    )
    timed = images[:LATENCY_IMAGES]
    predictor.predict_batch(timed[:1])  # warm-up: first call allocates and compiles
    started = time.perf_counter()
    for image in timed:
        predictor.predict_batch(image[None])
    latency_ms = (time.perf_counter() - started) * 1000.0 / max(1, len(timed))
    return probabilities, latency_ms


def compare(artifact: ArtifactReport, probabilities: np.ndarray, reference: np.ndarray, truth: np.ndarray, threshold: Threshold) -> None:
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
            f"agrees with the Keras model on {artifact.agreement:.1%} of images, needs {threshold.min_agreement:.1%}"
        )
    if threshold.max_accuracy_drop is not None and artifact.accuracy_delta < -threshold.max_accuracy_drop - 1e-9:
        artifact.problems.append(
            f"accuracy {artifact.accuracy:.1%} is {-artifact.accuracy_delta * 100:.1f} points below the Keras model's, "
            f"at most {threshold.max_accuracy_drop * 100:.1f} allowed"
        )
    if threshold.max_abs_diff is not None and artifact.max_abs_diff > threshold.max_abs_diff:
        artifact.problems.append(
            f"a probability differs by {artifact.max_abs_diff:.4f} from the Keras model's, at most {threshold.max_abs_diff} allowed"
        )


def check_serving_bytes(
    loaded: Any, version_dir: Path, samples: Sequence[Sample], reference: np.ndarray, truth: np.ndarray
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
        np.asarray(signature(image_bytes=tf.constant(payloads[start : start + BATCH_SIZE]))["probabilities"], dtype=np.float32)
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
        path=str(version_dir),
        size_bytes=directory_size(version_dir),
        latency_ms=latency_ms,
        note=f"serving_default on the encoded bytes of {len(usable)} image(s)",
    )
    compare(artifact, np.concatenate(outputs), reference[usable], truth[usable], SERVING_BYTES_THRESHOLD)
    return artifact


def failure_message(report: ExportReport) -> tuple[str, str]:
    failures = report.failures
    lines = [
        f"{Path(artifact.path).name} ({artifact.format} {artifact.quantize}{', image bytes' if artifact.note else ''}): "
        + "; ".join(artifact.problems)
        for artifact in failures
    ]
    noun = "artifact does" if len(failures) == 1 else "artifacts do"
    message = f"{len(failures)} exported {noun} not match the trained model: " + " | ".join(lines)
    modes = {artifact.quantize for artifact in failures}
    hints = []
    if "int8" in modes:
        hints.append("int8: calibrate on more training images (--calibration-images) or use --quantize float16 or dynamic")
    if modes & {"dynamic", "float16"}:
        hints.append("prefer --quantize none or float16 for this model")
    if "none" in modes:
        hints.append("a float32 artifact should never differ: please report it, with the table above")
    hints.append(f"the files were kept in {report.output_dir}; --no-verify skips this check")
    return message, "; ".join(hints)


# ---------------------------------------------------------------------------------------------
# The entry point


def export_run(
    run: str | Path | None = None,
    *,
    formats: Sequence[str] = ("tflite",),
    quantize: Sequence[str] = (),
    output_dir: str | Path | None = None,
    verify: bool = True,
    max_verify_images: int = 200,
    calibration_images: int = 200,
    int8_io: bool = False,
    runs_dir: str | Path | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export the best model of ``run`` (id, folder or ``latest``) and verify each artifact.

    ``formats``: any of ``tflite``, ``saved_model``, ``onnx`` or ``all``; ``quantize``: the TFLite
    modes (``none``, ``dynamic``, ``float16``, ``int8``; default ``none``, every mode with
    ``all``; giving modes implies ``tflite``). ``int8_io`` makes the int8 model's input and
    output ``uint8``. Raises ``ExportVerificationError`` (with ``.report``) when an artifact
    misses its ``THRESHOLDS``; the artifacts are written either way.
    """
    progress = on_progress or (lambda message: None)
    plan = make_plan(formats, quantize, int8_io)
    if max_verify_images < 1 or calibration_images < 1:
        raise UsageError("--verify-images and --calibration-images must be at least 1")
    if "onnx" in plan.formats and (importlib.util.find_spec("tf2onnx") is None or importlib.util.find_spec("onnx") is None):
        raise ImgclfError("ONNX export needs tf2onnx and onnx, which are not installed", "pip install 'imgclf[onnx]'")
    run_dir = store.resolve_run(run, runs_dir).resolve()
    labels = store.read_labels(run_dir)
    model_path = run_dir / store.BEST_MODEL_FILE
    if not model_path.is_file():
        raise ModelError(f"Run {run_dir.name} has no {store.BEST_MODEL_FILE}", "export a run that completed at least one epoch")
    output = Path(output_dir).expanduser().resolve() if output_dir else run_dir / store.EXPORT_DIR
    meta = store.read_meta(run_dir)
    warnings: list[str] = []

    # The split and the images are read before any conversion: a run whose dataset moved
    # fails in seconds, not after minutes of work.
    needs_calibration = "int8" in plan.modes
    manifest = read_manifest(run_dir) if (verify or needs_calibration) else None

    progress(f"Loading {model_path}")
    from imgclf_cli.models import load_model

    model = load_model(model_path)
    image_size = image_size_of_keras_model(model)
    recorded = tuple(int(side) for side in meta.get("image_size") or ())
    if recorded and recorded != image_size:
        warnings.append(f"meta.json says image size {recorded}, the model resizes to {image_size}; using the model's")

    verify_images = truth = np.zeros(0)
    verify_samples: list[Sample] = []
    if verify and manifest is not None:
        progress("Decoding the validation images")
        verify_images, truth, verify_samples, skipped = load_images(select_samples(manifest.val, max_verify_images), image_size)
        if skipped:
            warnings.append(f"{len(skipped)} validation image(s) could not be read and were left out, e.g. {skipped[0]}")
        if not verify_samples:
            raise DatasetError(
                f"None of the validation images of run {run_dir.name} can be read (dataset under {manifest.root})",
                "restore the dataset, or pass --no-verify to export without checking",
            )
    calibration: np.ndarray | None = None
    if needs_calibration and manifest is not None:
        calibration, _, kept, skipped = load_images(select_samples(manifest.train, calibration_images), image_size)
        if skipped:
            warnings.append(f"{len(skipped)} calibration image(s) could not be read, e.g. {skipped[0]}")
        if not kept:
            raise DatasetError(
                f"int8 quantization needs the training images of run {run_dir.name}, and none can be read (under {manifest.root})",
                "restore the dataset, or use --quantize dynamic or float16",
            )

    output.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(output / LABELS_TEXT_FILE, "\n".join(labels) + "\n")
    artifacts: list[ArtifactReport] = []
    with tempfile.TemporaryDirectory(prefix=".imgclf-export-", dir=output) as workdir:
        exporter = Exporter(model, labels, image_size, run_dir.name, Path(workdir))
        if "saved_model" in plan.formats:
            progress("Writing the SavedModel (TF Serving layout)")
            staging = Path(workdir) / "saved_model"
            exporter.saved_model(staging)
            version_dir = output / SAVED_MODEL_DIR / str(SAVED_MODEL_VERSION)
            replace_directory(staging, version_dir)
            artifacts.append(ArtifactReport("saved_model", "none", str(version_dir), directory_size(version_dir)))
        if "onnx" in plan.formats:
            progress("Converting to ONNX")
            exporter.onnx(output / ONNX_FILE)
            artifacts.append(ArtifactReport("onnx", "none", str(output / ONNX_FILE), (output / ONNX_FILE).stat().st_size))
        for mode in plan.modes:
            progress(f"Converting to TFLite ({mode})" + (" with calibration" if mode == "int8" else ""))
            flatbuffer, conversion_warnings = exporter.tflite(mode, calibration, plan.int8_io)
            warnings.extend(conversion_warnings)
            path = output / (TFLITE_INT8_IO_FILE if mode == "int8" and plan.int8_io else TFLITE_FILES[mode])
            write_bytes(path, flatbuffer)
            artifacts.append(ArtifactReport("tflite", mode, str(path), len(flatbuffer)))

    report = ExportReport(
        run_id=run_dir.name,
        run_dir=str(run_dir),
        output_dir=str(output),
        labels=labels,
        image_size=image_size,
        artifacts=artifacts,
        verified=verify,
        warnings=warnings,
    )
    if verify:
        verify_report(report, model, model_path, verify_images, truth, verify_samples, progress)
    store.atomic_write_json(output / REPORT_FILE, report.to_record())
    if report.failures:
        message, hint = failure_message(report)
        raise ExportVerificationError(message, hint, report)
    return report


def verify_report(
    report: ExportReport,
    model: Any,
    model_path: Path,
    images: np.ndarray,
    truth: np.ndarray,
    samples: list[Sample],
    progress: Callable[[str], None],
) -> None:
    progress(f"Verifying against the Keras model on {len(images)} validation image(s)")
    keras_predictor = KerasPredictor(model, report.labels, report.image_size, str(model_path))
    reference, keras_latency = run_predictor(keras_predictor, images)
    report.num_verify_images = len(images)
    report.reference = ReferenceReport(
        path=str(model_path),
        size_bytes=model_path.stat().st_size,
        accuracy=float((reference.argmax(axis=1) == truth).mean()),
        latency_ms=keras_latency,
    )
    for artifact in report.artifacts:
        progress(f"Verifying {artifact.format} ({artifact.quantize}): {artifact.path}")
        predictor = load_predictor(model=artifact.path)
        if list(predictor.labels) != report.labels:
            artifact.problems.append(f"carries labels {list(predictor.labels)[:5]}..., expected {report.labels[:5]}...")
        if tuple(predictor.image_size) != tuple(report.image_size):
            artifact.problems.append(f"takes {predictor.image_size} images, expected {report.image_size}")
            continue
        probabilities, artifact.latency_ms = run_predictor(predictor, images)
        compare(artifact, probabilities, reference, truth, THRESHOLDS[artifact.quantize])
        if isinstance(predictor, SavedModelPredictor):
            check = check_serving_bytes(predictor.loaded, Path(artifact.path), samples, reference, truth)
            if check is not None and check.passed and (check.agreement or 0.0) < SERVING_BYTES_WARN_BELOW:
                report.warnings.append(
                    f"serving_default (encoded image bytes) agrees with the Keras model on {check.agreement:.1%} of images: "
                    "TensorFlow resamples slightly differently from Pillow and ignores EXIF orientation"
                )
            report.serving_check = check
