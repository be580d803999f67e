"""Exporting a run for deployment, and proving each artifact gives the trained model's answers.  [heavy]

``export_run()`` is the library entry point behind ``imgclf export``. From a run's ``best.keras``
it writes, into ``<run>/export/`` (or ``output_dir``):

* ``model.tflite`` (float32, mode ``none``), ``model_dynamic.tflite`` (dynamic-range int8 weights),
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

This module plans the export, reads the run and its images, and writes the report;
``imgclf_cli.export_formats`` converts the model to each format, and
``imgclf_cli.export_verification`` compares every artifact with the Keras model on up to
``max_verify_images`` validation images of the run. When an artifact misses its threshold,
``ExportVerificationError`` is raised, carrying the full report.

The unquantized mode is ``none`` in the API and the JSON ``quantize`` field (its spelling since
the first release, kept so that scripts reading them keep working); ``float32`` is accepted as
its other spelling and is the name people read (``QUANTIZATION_NAMES``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf_cli import __version__, store
from imgclf_cli.dataset import Sample, SplitManifest
from imgclf_cli.errors import DatasetError, ExportVerificationError, ImgclfError, UsageError
from imgclf_cli.export_formats import (
    Exporter,
    directory_size,
    replace_directory,
    staging_folder,
    write_bytes,
    write_failures_suggest,
    writing,
)
from imgclf_cli.export_verification import (
    QUANTIZATION_NAMES,
    THRESHOLDS,
    ArtifactReport,
    ReferenceReport,
    failure_message,
    verify_artifacts,
)
from imgclf_cli.images import UnreadableImage, load_image
from imgclf_cli.inference import (
    LABELS_TEXT_FILE,
    best_model_of_run,
    check_output_folder,
    load_keras_predictor,
)

FORMATS = ("tflite", "saved_model", "onnx")
QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
QUANTIZE_SPELLINGS = {"float32": "none"}
TFLITE_FILES = {
    "none": "model.tflite",
    "dynamic": "model_dynamic.tflite",
    "float16": "model_float16.tflite",
    "int8": "model_int8.tflite",
}
TFLITE_INT8_IO_FILE = "model_int8_uint8.tflite"
ONNX_FILE = "model.onnx"
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_VERSION = 1
REPORT_FILE = "export.json"
SELECTION_SEED = 0
NO_MANIFEST_HINT = "pass --no-verify to export without checking (int8 also needs the training images)"
WRITE_ELSEWHERE = "write the export elsewhere with --output DIR"
OUTPUT_FOLDER_HINT = f"free some space or make it writable, or {WRITE_ELSEWHERE}"
# The hidden folder, inside the output folder, where an export is written before it is moved in.
STAGING_NAME = "imgclf-export"


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
    def checks(self) -> list[ArtifactReport]:
        """Every artifact, the SavedModel followed by its check on encoded image bytes."""
        checks: list[ArtifactReport] = []
        for artifact in self.artifacts:
            checks.append(artifact)
            if self.serving_check is not None and artifact.format == "saved_model":
                checks.append(self.serving_check)
        return checks

    @property
    def failures(self) -> list[ArtifactReport]:
        return [artifact for artifact in self.checks if not artifact.passed]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: ``passed`` (every check; ``None`` with ``verify=False``), the
        ``artifacts`` and the ``serving_check``, with fractions, not percents."""
        return {
            "passed": not self.failures if self.verified else None,
            "verified": self.verified,
            "artifacts": [artifact.to_dict() for artifact in self.artifacts],
            "serving_check": self.serving_check.to_dict() if self.serving_check else None,
        }

    def to_record(self) -> dict[str, Any]:
        """Everything, for ``export.json`` beside the artifacts."""
        return {
            **self.to_dict(),
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "labels": self.labels,
            "image_size": list(self.image_size),
            "num_verify_images": self.num_verify_images,
            "reference": asdict(self.reference) if self.reference else None,
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
    """Validate the requested formats and modes (``float32`` is read as ``none``); ``quantize``
    alone implies TFLite."""
    unknown = [name for name in formats if name not in FORMATS and name != "all"]
    if unknown:
        raise UsageError(f"Unknown export format {unknown[0]!r}", f"choose from: {', '.join(FORMATS)}")
    quantize = [QUANTIZE_SPELLINGS.get(mode, mode) for mode in quantize]
    bad_modes = [mode for mode in quantize if mode not in QUANTIZE_MODES]
    if bad_modes:
        raise UsageError(
            f"Unknown quantization mode {bad_modes[0]!r} for --quantize",
            f"choose from: {', '.join(QUANTIZATION_NAMES[mode] for mode in QUANTIZE_MODES)}",
        )
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


def load_images(
    samples: Sequence[Sample], image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[Sample], list[str]]:
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


def load_verification_images(
    manifest: SplitManifest, limit: int, image_size: tuple[int, int], run_id: str, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray, list[Sample]]:
    """Up to ``limit`` validation images of the run, their classes and samples."""
    images, truth, samples, skipped = load_images(select_samples(manifest.val, limit), image_size)
    if skipped:
        warnings.append(
            f"{len(skipped)} validation image(s) could not be read and were left out, e.g. {skipped[0]}"
        )
    if not samples:
        raise DatasetError(
            f"None of the validation images of run {run_id} can be read (dataset under {manifest.root})",
            "restore the dataset, or pass --no-verify to export without checking",
        )
    return images, truth, samples


def load_calibration_images(
    manifest: SplitManifest, limit: int, image_size: tuple[int, int], run_id: str, warnings: list[str]
) -> np.ndarray:
    """Up to ``limit`` training images of the run, for int8 quantization."""
    images, _, kept, skipped = load_images(select_samples(manifest.train, limit), image_size)
    if skipped:
        warnings.append(f"{len(skipped)} calibration image(s) could not be read, e.g. {skipped[0]}")
    if not kept:
        raise DatasetError(
            f"int8 quantization needs the training images of run {run_id}, and none can be read "
            f"(under {manifest.root})",
            "restore the dataset, or use --quantize dynamic or float16",
        )
    return images


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
    on_warning: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export the best model of ``run`` (id, folder or ``latest``) and verify each artifact.

    ``formats``: any of ``tflite``, ``saved_model``, ``onnx`` or ``all``; ``quantize``: the TFLite
    modes (``none`` or ``float32``, ``dynamic``, ``float16``, ``int8``; default ``none``, every
    mode with ``all``; giving modes implies ``tflite``). ``int8_io`` makes the int8 model's input and
    output ``uint8``. Raises ``ExportVerificationError`` (with ``.report``) when an artifact
    misses its ``THRESHOLDS``; the artifacts are written either way.

    Everything is written into a staging folder first and moved into the output folder at the
    end, under its lock (``on_warning`` hears when it waits for another export to it): the
    folder never mixes two exports' files, and a failed write (``StoreWriteError``: a full
    disk) leaves the previous export as it was. A run that did not complete (crashed, still
    training) is exported from its best.keras, with a warning in the report.
    """
    progress = on_progress or (lambda message: None)
    plan = make_plan(formats, quantize, int8_io)
    if max_verify_images < 1 or calibration_images < 1:
        raise UsageError("--verify-images and --calibration-images must be at least 1")
    if "onnx" in plan.formats and not onnx_converter_installed():
        raise ImgclfError(
            "ONNX export needs tf2onnx and onnx, which are not installed", "pip install 'imgclf[onnx]'"
        )
    run_dir = store.resolve_run(run, runs_dir).resolve()
    labels = store.read_labels(run_dir)
    warnings: list[str] = []
    model_path = best_model_of_run(run_dir, warnings.append)
    output = Path(output_dir).expanduser().resolve() if output_dir else store.export_dir(run_dir)
    meta = store.read_meta(run_dir)
    # A read-only or full store fails now, not after TensorFlow has loaded and converted.
    check_output_folder(output, "the export", OUTPUT_FOLDER_HINT)

    # The split and the images are read before any conversion: a run whose dataset moved
    # fails in seconds, not after minutes of work.
    needs_calibration = "int8" in plan.modes
    manifest = store.read_manifest(run_dir, hint=NO_MANIFEST_HINT) if (verify or needs_calibration) else None

    progress(f"Loading {model_path}")
    # The Keras model is both what the formats are converted from and the verification reference.
    reference = load_keras_predictor(model_path, labels)
    image_size = reference.image_size
    recorded = tuple(int(side) for side in meta.get("image_size") or ())
    if recorded and recorded != image_size:
        warnings.append(
            f"meta.json says image size {recorded}, the model resizes to {image_size}; using the model's"
        )

    verify_images = truth = np.zeros(0)
    verify_samples: list[Sample] = []
    if verify and manifest is not None:
        progress("Decoding the validation images")
        verify_images, truth, verify_samples = load_verification_images(
            manifest, max_verify_images, image_size, run_dir.name, warnings
        )
    calibration: np.ndarray | None = None
    if needs_calibration and manifest is not None:
        calibration = load_calibration_images(
            manifest, calibration_images, image_size, run_dir.name, warnings
        )

    with write_failures_suggest(WRITE_ELSEWHERE), staging_folder(output, STAGING_NAME) as staging:
        staged = Staged(staging / "files", output)
        exporter = Exporter(reference.model, labels, image_size, run_dir.name, workdir=staging)
        artifacts = write_artifacts(exporter, plan, staged, calibration, warnings, progress)
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
            # The staged artifacts are verified: the same bytes as the ones moved into place.
            verification = verify_artifacts(
                artifacts, reference, verify_images, truth, verify_samples, staged.shown(progress)
            )
            report.num_verify_images = verification.num_images
            report.reference = verification.reference
            report.serving_check = verification.serving_check
            report.warnings.extend(verification.warnings)
        for artifact in report.checks:
            artifact.path = str(staged.final(Path(artifact.path)))
        staged.write_text(LABELS_TEXT_FILE, "\n".join(labels) + "\n")
        staged.write_text(REPORT_FILE, json.dumps(report.to_record(), indent=2, default=str) + "\n")
        # A wait is told as a warning, shown even with --json (progress is not): it may be long.
        tell_wait = on_warning or progress
        waiting = f"another export is writing {output}; waiting for it to finish"
        with store.output_lock(output, on_wait=lambda: tell_wait(waiting)):
            staged.move_into_place()
            if output == store.export_dir(run_dir).resolve() and not report.failures:
                store.clear_stale(run_dir, "export")  # export/ now comes from the current best.keras
    if report.failures:
        message, hint = failure_message(report.failures, report.output_dir)
        raise ExportVerificationError(message, hint, report)
    return report


class Staged:
    """The export's files in a staging folder (``folder``, laid out as ``output``), and the
    order they are moved into ``output``: the artifacts, then ``labels.txt``, ``export.json`` last."""

    def __init__(self, folder: Path, output: Path) -> None:
        self.folder = folder
        self.output = output
        self.moves: list[Path] = []  # relative paths, in the order they were staged

    def final(self, staged: Path) -> Path:
        """Where a staged file or folder ends up."""
        return self.output / staged.relative_to(self.folder)

    def path(self, relative: str | Path) -> Path:
        """The staged path of ``relative`` (a file or folder of the output), to be moved into place."""
        self.moves.append(Path(relative))
        staged = self.folder / relative
        with writing(self.output / relative):
            staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def write_text(self, relative: str, text: str) -> None:
        with writing(self.output / relative):
            store.atomic_write_text(self.path(relative), text)

    def shown(self, progress: Callable[[str], None]) -> Callable[[str], None]:
        """``progress`` showing the output folder where a message names the staging folder."""
        return lambda message: progress(message.replace(str(self.folder), str(self.output)))

    def move_into_place(self) -> None:
        """Renames only: nothing more to write, so a full disk has already failed the export."""
        for relative in self.moves:
            source, destination = self.folder / relative, self.output / relative
            with writing(destination):
                if source.is_dir():
                    replace_directory(source, destination)
                else:
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, destination)
        with writing(self.output):
            store.fsync_path(self.output)


def write_artifacts(
    exporter: Exporter,
    plan: Plan,
    staged: Staged,
    calibration: np.ndarray | None,
    warnings: list[str],
    progress: Callable[[str], None],
) -> list[ArtifactReport]:
    """Convert the model to every format of ``plan`` into the staging folder; one report per
    file, at its staged path. A failed write is reported at the file's place in the output."""
    artifacts: list[ArtifactReport] = []
    if "saved_model" in plan.formats:
        progress("Writing the SavedModel (TF Serving layout)")
        relative = Path(SAVED_MODEL_DIR) / str(SAVED_MODEL_VERSION)
        version_dir = staged.path(relative)
        with writing(staged.output / relative):
            exporter.saved_model(version_dir)
        artifacts.append(ArtifactReport("saved_model", "none", str(version_dir), directory_size(version_dir)))
    if "onnx" in plan.formats:
        progress("Converting to ONNX")
        path = staged.path(ONNX_FILE)
        with writing(staged.output / ONNX_FILE):
            exporter.onnx(path)
        artifacts.append(ArtifactReport("onnx", "none", str(path), path.stat().st_size))
    for mode in plan.modes:
        name = QUANTIZATION_NAMES[mode]
        progress(f"Converting to TFLite ({name})" + (" with calibration" if mode == "int8" else ""))
        file_name = TFLITE_INT8_IO_FILE if mode == "int8" and plan.int8_io else TFLITE_FILES[mode]
        with writing(staged.output / file_name):
            flatbuffer, conversion_warnings = exporter.tflite(mode, calibration, plan.int8_io)
            path = staged.path(file_name)
            write_bytes(path, flatbuffer)
        warnings.extend(conversion_warnings)
        artifacts.append(ArtifactReport("tflite", mode, str(path), len(flatbuffer)))
    return artifacts


def onnx_converter_installed() -> bool:
    return importlib.util.find_spec("tf2onnx") is not None and importlib.util.find_spec("onnx") is not None
