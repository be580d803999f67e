"""Benchmark every export format of a flowers128 model: size, accuracy, agreement, latency; and
the wall time of `imgclf predict` on one image with .keras versus .tflite (and the others).

By default imgclf-cnn is trained for ``--epochs`` epochs on ``../shared/datasets/flowers128``
(5 classes, 4,317 photos, 128x128 JPEG) into a temporary run store; pass ``--run`` (a run id
or folder, with ``--runs-dir``) to benchmark an existing run instead.

    python bench/bench_export.py [--run RUN] [--epochs 5] [--verify-images 200] [--repeat 5]

Figures:

* ``imgclf_cli.exporting.export_run(formats=["all"])``: every artifact, verified on up to
  ``--verify-images`` validation images (seeded sample) against the Keras model. Accuracy is
  on those images; latency is the mean of one-image calls over 50 of them, after a warm-up,
  through the ``imgclf_cli.inference`` predictors (what `imgclf predict` runs).
* End to end: the median wall time of ``--repeat`` runs of ``python -m imgclf_cli predict
  --model MODEL IMAGE --format json`` in a new process (start-up, imports, model loading,
  decoding, inference, output), for best.keras, the SavedModel, model.tflite, model_int8.tflite
  and model.onnx.

The machine is shared and has few cores: compare figures within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flowers128"


def train_model(data_dir: Path, runs_dir: Path, epochs: int) -> Path:
    from imgclf_cli.training import train

    started = time.perf_counter()
    result = train(
        data_dir, flags={"train.epochs": epochs}, runs_dir=runs_dir, name="bench-export", quiet=True
    )
    print(
        f"Trained {result.run_id}: {result.num_train} train / {result.num_val} val images, "
        f"best val accuracy {result.val_accuracy:.3f} after {result.epochs_run} epochs "
        f"in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    return Path(result.run_dir)


def predict_wall_time(model: Path, image: str, repeat: int) -> tuple[float, str]:
    """Median seconds of `imgclf predict --model MODEL IMAGE` in a new process, and its label."""
    command = [sys.executable, "-m", "imgclf_cli", "predict", "--model", str(model), image]
    command += ["--format", "json"]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    times: list[float] = []
    label = ""
    for _ in range(repeat):
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, env=environment)
        times.append(time.perf_counter() - started)
        if completed.returncode != 0:
            raise SystemExit(f"imgclf predict failed for {model}:\n{completed.stderr[-2000:]}")
        label = json.loads(completed.stdout)[0]["label"]
    return statistics.median(times), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="Benchmark this run (id or folder) instead of training one.")
    parser.add_argument("--runs-dir", type=Path, help="Run store for --run.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Dataset to train on without --run.")
    parser.add_argument("--epochs", type=int, default=5, help="Epochs to train without --run.")
    parser.add_argument("--verify-images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="Runs of `imgclf predict` per model (median).")
    parser.add_argument("--output", type=Path, help="Export folder (default: a temporary folder).")
    arguments = parser.parse_args()

    from imgclf_cli import store
    from imgclf_cli.errors import ExportVerificationError
    from imgclf_cli.exporting import export_run

    with tempfile.TemporaryDirectory(prefix="bench-export-") as workspace:
        if arguments.run:
            run_dir = store.resolve_run(arguments.run, arguments.runs_dir)
        else:
            run_dir = train_model(arguments.data, Path(workspace) / "runs", arguments.epochs)
        output = arguments.output or Path(workspace) / "export"
        started = time.perf_counter()
        try:
            report = export_run(
                run_dir,
                formats=["all"],
                output_dir=output,
                max_verify_images=arguments.verify_images,
                on_progress=lambda message: print(f"  {message}", file=sys.stderr),
            )
        except ExportVerificationError as error:
            report = error.report  # type: ignore[assignment]
            print(f"Verification failed: {error.message}", file=sys.stderr)
        export_seconds = time.perf_counter() - started

        import keras
        import tensorflow as tf

        print(
            f"\nRun {report.run_id}, image size {report.image_size[0]}x{report.image_size[1]}, "
            f"{len(report.labels)} classes; {report.num_verify_images} validation images; "
            f"export + verification of all formats took {export_seconds:.0f} s"
        )
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python {platform.python_version()}\n"
        )
        print(
            "| artifact | format | quantize | size | accuracy | Δ accuracy | agreement "
            "| max abs prob diff | latency ms/image |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        reference = report.reference
        if reference is not None:
            print(
                f"| best.keras | keras | - | {reference.size_bytes / 1024:.0f} KB | {reference.accuracy:.3f} "
                f"| - | - | - | {reference.latency_ms:.2f} |"
            )
        rows = list(report.artifacts)
        if report.serving_check is not None:
            position = 1 + next(index for index, row in enumerate(rows) if row.format == "saved_model")
            rows.insert(position, report.serving_check)
        for artifact in rows:
            name = Path(artifact.path).relative_to(output).as_posix()
            name += " (image bytes)" if artifact.note else ""
            print(
                f"| {name} | {artifact.format} | {artifact.quantize} | {artifact.size_bytes / 1024:.0f} KB "
                f"| {artifact.accuracy:.3f} | {artifact.accuracy_delta * 100:+.1f} pts "
                f"| {artifact.agreement:.3f} "
                f"| {artifact.max_abs_diff:.4f} | {artifact.latency_ms:.2f} |"
                + ("" if artifact.passed else " FAILED: " + "; ".join(artifact.problems))
            )

        image = validation_paths(run_dir)[0]
        print(
            "\nEnd to end: `imgclf predict --model MODEL IMAGE --format json`, "
            f"one image ({Path(image).name}), median of {arguments.repeat}\n"
        )
        print("| model | wall time (s) | predicted |")
        print("|---|---:|---|")
        models = [
            store.best_model_path(run_dir),
            output / "saved_model",
            output / "model.tflite",
            output / "model_int8.tflite",
            output / "model.onnx",
        ]
        for model in models:
            seconds, label = predict_wall_time(model, image, arguments.repeat)
            print(f"| {model.name + '/' if model.is_dir() else model.name} | {seconds:.2f} | {label} |")


def validation_paths(run_dir: Path) -> list[str]:
    from imgclf_cli import store

    return [sample.path for sample in store.read_manifest(run_dir).val]


if __name__ == "__main__":
    main()
