"""Loading a trained model for inference, whatever its format, with its labels.

``load_predictor`` accepts a run (id, folder or ``latest``), a ``.keras`` file, a SavedModel
folder (``saved_model/`` with numbered versions, or one version), a ``.tflite`` file or an
``.onnx`` file. Every predictor takes a batch of RGB ``uint8`` images of its ``image_size`` (as
decoded by ``imgclf_cli.images.load_image``) and returns class probabilities. This module is
light: each backend imports its runtime only when used, so a ``.tflite`` model (LiteRT
interpreter) or an ``.onnx`` model (onnxruntime) never imports TensorFlow.

Labels travel with the model: ``imgclf export`` writes them into the ``.tflite`` file (model
metadata ``imgclf``), into the ONNX model (metadata property ``imgclf``), into the SavedModel's
``assets/labels.txt``, and as ``labels.txt`` beside every artifact.

Every reader of a run (predict, evaluate, export) takes its model from ``best_model_of_run``,
which warns about a run that did not complete, and the ones that write outputs check first,
before TensorFlow loads, that they can (``check_output_folder``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imgclf_cli import store
from imgclf_cli.errors import ModelError, StoreError
from imgclf_cli.resources import default_threads

# Name of the metadata entry (TFLite) / metadata property (ONNX) that ``imgclf export`` writes:
# a JSON object with "labels" (class names in index order) and "image_size" ([height, width]).
MODEL_METADATA_KEY = "imgclf"
LABELS_TEXT_FILE = "labels.txt"
SAVED_MODEL_FILE = "saved_model.pb"
# The SavedModel signature that takes float images (serving_default takes encoded image bytes).
IMAGES_SIGNATURE = "serving_images"
SUPPORTED_MODELS_HINT = "pass a run folder, a .keras, .tflite or .onnx file, or a SavedModel folder"
# A run in one of these states has no final model, but its best.keras is usable (with a warning).
UNFINISHED_STATUSES = (
    store.STATUS_RUNNING,
    store.STATUS_CRASHED,
    store.STATUS_INTERRUPTED,
    store.STATUS_FAILED,
)


def best_model_of_run(run_dir: Path, on_warning: Callable[[str], None] | None = None) -> Path:
    """The run's ``best.keras``. A run that did not complete (crashed, still training,
    interrupted, failed) is used all the same, and ``on_warning`` says so in one line:
    ``run X crashed after epoch 2 (last sign of life ...); using its best.keras``."""
    path = store.best_model_path(run_dir)
    state = store.run_state(run_dir)
    if state.status in UNFINISHED_STATUSES and on_warning is not None:
        on_warning(f"{state.describe(run_dir.name)}; using its {store.BEST_MODEL_FILE}")
    return path


def check_output_folder(folder: Path, what: str, hint: str) -> None:
    """Fail now, in one line naming ``folder`` and the reason, if ``what`` (e.g. "the export")
    cannot be written there (read-only, full, no permission), rather than after the model has
    loaded. The nearest folder that exists is probed: nothing is created."""
    probed = folder
    while not probed.exists() and probed.parent != probed:
        probed = probed.parent
    try:
        store.check_writable(probed)
    except StoreError as error:
        # check_writable words its message for the run store; its last part is the reason.
        reason = error.message.rpartition(": ")[2]
        raise StoreError(f"Cannot write {what} to {folder}: {reason}", hint) from None


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
            return read_labels_text(text_file)
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
        # predict_on_batch runs a compiled (tf.function) step: several times faster than an eager
        # model call, and without predict()'s per-call dataset set-up.
        probabilities = self.model.predict_on_batch(images.astype("float32"))
        return np.asarray(probabilities, dtype=np.float32)


def load_keras_predictor(path: Path, labels: list[str] | None = None) -> KerasPredictor:
    from imgclf_cli.models import load_model

    model = load_model(path)
    return KerasPredictor(model, labels or find_labels(path), image_size_of_keras_model(model), str(path))


def read_labels_text(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_metadata_labels(metadata: dict[str, Any], path: Path) -> list[str] | None:
    labels = metadata.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ModelError(
            f"The labels stored in {path} are malformed: {labels!r}", "re-export the model with imgclf export"
        )
    return list(labels)


# Vtable slots (4 + 2 * field id) of the fields read_tflite_metadata needs, from LiteRT's
# schema.fbs: Model.buffers (id 4) and Model.metadata (6); Metadata.name (0) and .buffer (1);
# Buffer.data (0), .offset (1) and .size (2) (offset and size for data kept after the
# flatbuffer, in models over 2 GB).
MODEL_BUFFERS, MODEL_METADATA = 12, 16
METADATA_NAME, METADATA_BUFFER = 4, 6
BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 4, 6, 8


def read_tflite_metadata(model_content: bytes) -> dict[str, Any]:
    """The ``imgclf`` metadata entry of a TFLite flatbuffer (``{}`` when it has none).

    Reads only the metadata table, with the flatbuffers runtime and the field slots of LiteRT's
    schema: the generated schema module (``ai_edge_litert.schema_py_generated``, 20,000 lines)
    would take longer to import than the whole prediction of an image.
    """
    from flatbuffers import encode, number_types, table

    def field(struct: table.Table, slot: int, flags: Any, default: int = 0) -> int:
        offset = struct.Offset(slot)
        return struct.Get(flags, struct.Pos + offset) if offset else default

    def vector_item(struct: table.Table, slot: int, index: int) -> table.Table:
        return table.Table(struct.Bytes, struct.Indirect(struct.Vector(struct.Offset(slot)) + 4 * index))

    model = table.Table(model_content, encode.Get(number_types.UOffsetTFlags.packer_type, model_content, 0))
    metadata_slot = model.Offset(MODEL_METADATA)
    for index in range(model.VectorLen(metadata_slot) if metadata_slot else 0):
        entry = vector_item(model, MODEL_METADATA, index)
        name_slot = entry.Offset(METADATA_NAME)
        if not name_slot or entry.String(entry.Pos + name_slot) != MODEL_METADATA_KEY.encode():
            continue
        buffer = vector_item(model, MODEL_BUFFERS, field(entry, METADATA_BUFFER, number_types.Uint32Flags))
        data_slot = buffer.Offset(BUFFER_DATA)
        if data_slot:
            start = buffer.Vector(data_slot)
            data = model_content[start : start + buffer.VectorLen(data_slot)]
        else:
            start = field(buffer, BUFFER_OFFSET, number_types.Uint64Flags)
            data = model_content[start : start + field(buffer, BUFFER_SIZE, number_types.Uint64Flags)]
        try:
            return dict(json.loads(bytes(data).decode("utf-8")))
        except (ValueError, TypeError):
            return {}
    return {}


@dataclass
class TFLitePredictor:
    """A ``.tflite`` model run by the LiteRT interpreter (``ai-edge-litert``), without TensorFlow.

    Float models take the ``uint8`` pixels as floats (0..255; the model rescales them itself).
    Integer-input models (``imgclf export --quantize int8 --int8-io``) get the pixels quantized
    with the input tensor's scale and zero point, and their integer output is dequantized.
    """

    interpreter: Any
    labels: list[str]
    image_size: tuple[int, int]
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        interpreter = self.interpreter
        input_detail = interpreter.get_input_details()[0]
        if tuple(input_detail["shape"]) != tuple(images.shape):
            interpreter.resize_tensor_input(input_detail["index"], list(images.shape))
            interpreter.allocate_tensors()
            input_detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(input_detail["index"], quantize(images, input_detail))
        interpreter.invoke()
        output_detail = interpreter.get_output_details()[0]
        return dequantize(interpreter.get_tensor(output_detail["index"]), output_detail)


def quantize(images: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return images.astype(dtype)
    scale, zero_point = detail["quantization"]
    values = images.astype(np.float32)
    if scale:
        values = np.round(values / scale + zero_point)
    limits = np.iinfo(dtype)
    return np.clip(values, limits.min, limits.max).astype(dtype)


def dequantize(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind != "f" and scale:
        return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return values.astype(np.float32)


def image_size_from_shape(shape: Any, path: Path) -> tuple[int, int]:
    """(height, width) from an NHWC input shape; an error for inputs of unknown size."""
    dims = list(shape)
    if len(dims) != 4 or dims[3] not in (3, "3"):
        raise ModelError(
            f"{path} does not take a batch of RGB images: its input shape is {dims}",
            "expected (batch, height, width, 3), as written by imgclf export",
        )
    height, width = dims[1], dims[2]
    sizes_known = isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))
    if not sizes_known or height < 1 or width < 1:
        raise ModelError(
            f"{path} takes images of any size ({dims}); imgclf needs a fixed input size",
            "export it with imgclf export",
        )
    return (int(height), int(width))


def load_tflite_predictor(path: Path, labels: list[str] | None = None) -> TFLitePredictor:
    from ai_edge_litert.interpreter import Interpreter

    from imgclf_cli.quiet_logs import native_stderr_filtered

    content = path.read_bytes()
    try:
        # LiteRT announces its XNNPACK delegate on stderr (from C++, once per process).
        with native_stderr_filtered():
            interpreter = Interpreter(model_content=content, num_threads=default_threads())
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as error:
        raise ModelError(f"Could not load TFLite model {path}: {str(error).splitlines()[0][:300]}") from None
    metadata = read_tflite_metadata(content)
    image_size = image_size_from_shape(interpreter.get_input_details()[0]["shape"], path)
    labels = labels or check_metadata_labels(metadata, path) or find_labels(path)
    return TFLitePredictor(interpreter, labels, image_size, str(path), metadata)


@dataclass
class OnnxPredictor:
    """An ``.onnx`` model run by onnxruntime on the CPU, without TensorFlow."""

    session: Any
    input_name: str
    output_name: str
    labels: list[str]
    image_size: tuple[int, int]
    source: str

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        (probabilities,) = self.session.run([self.output_name], {self.input_name: images.astype(np.float32)})
        return np.asarray(probabilities, dtype=np.float32)


def load_onnx_predictor(path: Path, labels: list[str] | None = None) -> OnnxPredictor:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            f"Running {path.name} needs onnxruntime, which is not installed", "pip install 'imgclf[onnx]'"
        ) from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"Could not load ONNX model {path}: {str(error).splitlines()[0][:300]}") from None
    model_input = session.get_inputs()[0]
    outputs = [output.name for output in session.get_outputs()]
    output_name = "probabilities" if "probabilities" in outputs else outputs[0]
    metadata: dict[str, Any] = {}
    stored = session.get_modelmeta().custom_metadata_map.get(MODEL_METADATA_KEY)
    if stored:
        try:
            metadata = dict(json.loads(stored))
        except ValueError:
            metadata = {}
    image_size = image_size_from_shape(model_input.shape, path)
    labels = labels or check_metadata_labels(metadata, path) or find_labels(path)
    return OnnxPredictor(session, model_input.name, output_name, labels, image_size, str(path))


@dataclass
class SavedModelPredictor:
    """A SavedModel written by ``imgclf export --saved-model``, through its float-image signature."""

    loaded: Any  # the loaded SavedModel: owns the variables the signature reads
    signature: Any
    input_name: str
    output_name: str
    labels: list[str]
    image_size: tuple[int, int]
    source: str

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        outputs = self.signature(**{self.input_name: tf.constant(images.astype(np.float32))})
        return np.asarray(outputs[self.output_name], dtype=np.float32)


def saved_model_version_dir(path: Path) -> Path | None:
    """The folder holding ``saved_model.pb``: ``path`` itself or its highest numbered version."""
    if (path / SAVED_MODEL_FILE).is_file():
        return path
    versions = [
        child
        for child in path.iterdir()
        if child.is_dir() and child.name.isdigit() and (child / SAVED_MODEL_FILE).is_file()
    ]
    return max(versions, key=lambda child: int(child.name)) if versions else None


def load_saved_model_predictor(path: Path, labels: list[str] | None = None) -> SavedModelPredictor:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as error:  # TensorFlow raises many types for unreadable SavedModels
        raise ModelError(f"Could not load SavedModel {path}: {str(error).splitlines()[0][:300]}") from None
    signature = loaded.signatures.get(IMAGES_SIGNATURE) or loaded.signatures.get("serving_default")
    specs = signature.structured_input_signature[1] if signature is not None else {}
    if signature is None or len(specs) != 1 or next(iter(specs.values())).dtype != tf.float32:
        raise ModelError(
            f"{path} has no signature taking float images "
            f"(looked for {IMAGES_SIGNATURE!r} and 'serving_default')",
            "export the model with imgclf export --saved-model",
        )
    input_name, spec = next(iter(specs.items()))
    image_size = image_size_from_shape(spec.shape.as_list(), path)
    outputs = list(signature.structured_outputs)
    output_name = "probabilities" if "probabilities" in outputs else outputs[0]
    labels_file = path / "assets" / LABELS_TEXT_FILE
    labels = labels or (read_labels_text(labels_file) if labels_file.is_file() else find_labels(path))
    return SavedModelPredictor(loaded, signature, input_name, output_name, labels, image_size, str(path))


def load_predictor(
    model: str | Path | None = None,
    run: str | None = None,
    runs_dir: str | Path | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Predictor:
    """The predictor for ``--model`` (a file or folder) or, without it, the best model of ``--run``.

    The backend follows the path: a run folder or ``.keras`` file (Keras, imports TensorFlow),
    ``.tflite`` (LiteRT interpreter), ``.onnx`` (onnxruntime), a SavedModel folder (TensorFlow).
    ``on_warning`` hears about a run that did not complete (``best_model_of_run``).
    """
    if model is None:
        run_dir = store.resolve_run(run or "latest", runs_dir)
        return load_keras_predictor(best_model_of_run(run_dir, on_warning), store.read_labels(run_dir))
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"Model not found: {path}", SUPPORTED_MODELS_HINT)
    if path.is_dir():
        if store.is_run_dir(path):
            return load_keras_predictor(best_model_of_run(path, on_warning), store.read_labels(path))
        version_dir = saved_model_version_dir(path)
        if version_dir is not None:
            return load_saved_model_predictor(version_dir)
        raise ModelError(
            f"{path} is neither a run folder nor a SavedModel (no {SAVED_MODEL_FILE})", SUPPORTED_MODELS_HINT
        )
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return load_keras_predictor(path)
    if suffix == ".tflite":
        return load_tflite_predictor(path)
    if suffix == ".onnx":
        return load_onnx_predictor(path)
    raise ModelError(f"Unsupported model file: {path}", SUPPORTED_MODELS_HINT)


__all__ = [
    "Predictor",
    "load_predictor",
    "find_labels",
    "KerasPredictor",
    "TFLitePredictor",
    "OnnxPredictor",
    "SavedModelPredictor",
    "read_tflite_metadata",
]
