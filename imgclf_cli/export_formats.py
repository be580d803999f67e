"""Writing a Keras model as TFLite, SavedModel (TF Serving) and ONNX.  [heavy]

``Exporter`` holds the loaded model and the fixed-size function every format is built from;
``imgclf_cli.exporting.export_run`` decides what to write and where. Every artifact takes RGB
pixels as floats in 0..255 (rescaling is inside the model) and carries the labels and input
size: TFLite in its metadata entry ``imgclf`` (``embed_tflite_metadata``), ONNX in its metadata
property ``imgclf``, the SavedModel in ``assets/labels.txt``.

It also holds how an output folder is written (shared with ``imgclf_cli.evaluation``): into a
hidden staging folder beside it (``staging_folder``), then moved into place whole
(``replace_directory``), so that a failure leaves the previous outputs as they were; and
``writing(path)``, which turns a failed write however it was raised (``OSError``, TensorFlow's
or h5py's wrappers) into one ``StoreWriteError`` naming the file meant, not its staging copy.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imgclf_cli import __version__, liveness, store
from imgclf_cli.errors import ModelError
from imgclf_cli.inference import IMAGES_SIGNATURE, LABELS_TEXT_FILE, MODEL_METADATA_KEY

ONNX_OPSET = 17
# The reasons a write fails for lack of room or of permission, recognised in TensorFlow's
# errors, which keep the reason's text but not its errno.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class Exporter:
    """Holds the loaded Keras model and the fixed-size functions every format is built from."""

    def __init__(
        self, model: Any, labels: list[str], image_size: tuple[int, int], run_id: str, workdir: Path
    ) -> None:
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
            result = tf.lite.TFLiteConverter.from_saved_model(
                str(self.conversion_saved_model()), signature_keys=["serve"]
            )
            result.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            if mode != "none":
                result.optimizations = [tf.lite.Optimize.DEFAULT]
            if mode == "float16":
                result.target_spec.supported_types = [tf.float16]
            if mode == "int8":
                if calibration is None:
                    raise ValueError("int8 quantization needs calibration images")
                result.representative_dataset = lambda: (
                    [image[None].astype(np.float32)] for image in calibration
                )
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
            if write_failure(error) is not None:
                raise  # the conversion's own SavedModel could not be written: not a model problem
            if mode != "int8" or int8_io:
                raise ModelError(f"TFLite conversion ({mode}) failed: {first_line(error)}") from error
            # Some ops have no integer kernel: keep them in float rather than fail the export.
            with stdout_to_stderr():
                flatbuffer = converter(integer_only=False).convert()
            warnings.append(
                f"int8: some operations have no integer kernel and stay float32 ({first_line(error)})"
            )
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
                    functools.partial(
                        tf.io.decode_jpeg, data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE"
                    )
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
            images = tf.map_fn(
                decode, image_bytes, fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32)
            )
            return answer(images)

        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default",
            from_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        )
        archive.add_endpoint(
            IMAGES_SIGNATURE,
            answer,
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="images")],
        )
        with stdout_to_stderr():
            archive.write_out(str(destination), verbose=False)
        (destination / "assets").mkdir(exist_ok=True)
        labels_text = "\n".join(self.labels) + "\n"
        (destination / "assets" / LABELS_TEXT_FILE).write_text(labels_text, encoding="utf-8")

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
                    tensors_to_rename=tf2onnx.convert.tensor_names_from_structed(
                        concrete, input_names, output_names
                    ),
                )
        except Exception as error:
            raise ModelError(f"ONNX conversion failed: {first_line(error)}") from error
        entry = model_proto.metadata_props.add()
        entry.key = MODEL_METADATA_KEY
        entry.value = json.dumps(self.metadata)
        store.atomic_write(
            destination, lambda temporary: onnx.save(model_proto, str(temporary)), suffix=".onnx"
        )


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Converters print to stdout from Python; keep stdout for results (one JSON document)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


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


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


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
    kept = [
        item
        for item in (model.metadata or [])  # type: ignore[union-attr]
        if (item.name or b"").decode() != MODEL_METADATA_KEY
    ]
    model.metadata = [*kept, entry]
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_bytes(path: Path, data: bytes) -> None:
    store.atomic_write(path, lambda temporary: temporary.write_bytes(data), suffix=path.suffix)


def replace_directory(source: Path, destination: Path) -> None:
    """Move a freshly written folder into place, replacing an older one (put back if the move
    fails). Renames only: no new space is needed, and readers see one folder or the other."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        # Named like a staging folder: one left by a writer killed between the renames is
        # removed by the next writer (``remove_dead_staging``).
        retired = destination.with_name(f".{destination.name}.{os.getpid()}.old-{time.time_ns()}")
        destination.rename(retired)
        try:
            source.rename(destination)
        except OSError:
            retired.rename(destination)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    else:
        source.rename(destination)
    store.fsync_path(destination.parent)


@contextlib.contextmanager
def staging_folder(parent: Path, name: str) -> Iterator[Path]:
    """A new hidden folder ``<parent>/.<name>.<pid>.<random>`` to write outputs into before they
    are moved into place (the same filesystem, so a rename moves them), removed with whatever is
    left in it when the block ends, however it ends (and ``parent`` too if it made it and it
    stayed empty). One left by a writer that died (``kill -9``) is removed by the next writer of
    ``name``."""
    with writing(parent / name):
        made_parent = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        remove_dead_staging(parent, name)
        folder = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", dir=parent))
        # mkdtemp makes it private to its owner; once moved into place it is a usual folder.
        umask = os.umask(0)
        os.umask(umask)
        folder.chmod(0o777 & ~umask)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):  # not empty: it holds outputs now
                parent.rmdir()


def remove_dead_staging(parent: Path, name: str) -> None:
    """Delete the staging folders of ``name`` in ``parent`` whose writing process is gone."""
    for leftover in parent.glob(f".{name}.*"):
        writer = leftover.name[len(name) + 2 :].split(".", 1)[0]
        if leftover.is_dir() and writer.isdigit() and not liveness.pid_exists(int(writer)):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report a write that fails in the block as one ``StoreWriteError`` naming ``path``: the
    file or folder the user asked for, even when the failure came from its staging copy."""
    try:
        yield
    except Exception as error:
        cause = write_failure(error)
        if cause is None:
            raise
        raise store.write_error(path, cause) from None


@contextlib.contextmanager
def write_failures_suggest(elsewhere: str) -> Iterator[None]:
    """A ``StoreWriteError`` from the block, its hint ending with the command's own way out
    (``elsewhere``): the store's suggests --runs-dir, which only says where runs are read from
    for the commands that write into a run (evaluate) or beside one (export)."""
    try:
        yield
    except store.StoreWriteError as error:
        remedy = store.write_remedy(error.errno, error.path.parent)
        raise store.StoreWriteError(
            error.message, f"{remedy}, or {elsewhere}", error.errno, error.path
        ) from None


def write_failure(error: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write, however it was wrapped: a ``StoreWriteError``, an
    errno in the exception chain (``store.os_error_in``), or a TensorFlow ``OpError``, whose
    text alone keeps it (``"<file>; No space left on device"``). ``None``: not a write failure."""
    if isinstance(error, store.StoreWriteError):
        code = error.errno or errno.EIO
        return OSError(code, os.strerror(code))
    found = store.os_error_in(error)
    if found is not None:
        return found
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for code in WRITE_ERRNOS:
            if f"; {os.strerror(code)}" in str(current):
                return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def directory_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
