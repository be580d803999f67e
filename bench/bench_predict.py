"""Benchmark batch prediction: images per second on 1,000 small images, model loading apart.

By default a small imgclf-cnn is trained for one epoch on 30 images per class of
``mnist_png`` (in a temporary run store) and used to predict 1,000 other MNIST images
(100 per class, 28x28 grayscale PNG, decoded to RGB and resized exactly as in training).
Pass ``--model`` (a run folder, .keras, SavedModel, .tflite or .onnx) or ``--run`` to time an
existing model instead, ``--tflite`` to also export the model to .tflite and time that.

    python bench/bench_predict.py [--images 1000] [--batch-size 32] [--model PATH] [--repeat 3]
                                  [--tflite] [--cli]
    python bench/bench_predict.py --startup [--model model.tflite] [--image photo.jpg] [--runs 21]

Reported separately: importing TensorFlow and loading the model in a new process, a first
(warm-up) pass; then the median of ``--repeat`` runs of
``imgclf_cli.prediction.predict`` over all images (decoding + inference, files in the OS
cache), of decoding alone and of inference alone; and, with ``--cli``, the wall time of the
whole ``imgclf predict`` command in a new process.

``--startup`` times only what a user waits for to classify one photo without TensorFlow:
``imgclf predict IMAGE --model MODEL.tflite`` end to end, against importing what it cannot do
without (LiteRT's interpreter, NumPy and Pillow; Typer and Rich), each the median of ``--runs``
new processes (see ``bench_startup.py``). The goal is at most 1.5 times the imports. Without
``--model`` a small model is trained and exported to .tflite first (not timed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist_png"
COLD_LOAD = """
import sys, time
started = time.perf_counter()
if sys.argv[2] == "1":
    import tensorflow
imported = time.perf_counter() - started
from imgclf_cli.inference import load_predictor
started = time.perf_counter()
load_predictor(model=sys.argv[1] or None, run=sys.argv[3] or None, runs_dir=sys.argv[4] or None)
print(imported, time.perf_counter() - started)
"""


def pick_images(data_dir: Path, count: int, skip: int) -> list[str]:
    """``count`` images spread evenly over the classes, after the first ``skip`` of each."""
    classes = sorted(child for child in data_dir.iterdir() if child.is_dir())
    per_class = -(-count // len(classes))
    chosen: list[str] = []
    for folder in classes:
        chosen += [str(path) for path in sorted(folder.iterdir())[skip : skip + per_class]]
    return chosen[:count]


def train_small_model(data_dir: Path, workspace: Path) -> Path:
    """A one-epoch imgclf-cnn on 30 images per class: enough to time prediction."""
    from imgclf_cli.training import train

    subset = workspace / "train_data"
    for folder in sorted(child for child in data_dir.iterdir() if child.is_dir()):
        (subset / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:30]:
            shutil.copy(path, subset / folder.name / path.name)
    result = train(
        subset,
        flags={"train.epochs": 1, "data.image_size": 32, "data.batch_size": 32},
        runs_dir=workspace / "runs",
    )
    return Path(result.run_dir)


def time_model(
    model: str | None, run: str | None, runs_dir: str | None, paths: list[str], arguments: argparse.Namespace
) -> None:
    """Print load, warm-up, end-to-end, decode-only and model-only figures for one model."""
    from imgclf_cli.inference import load_predictor
    from imgclf_cli.prediction import decoded_batches, predict

    # Loading in a new process: what a user waits for before the first prediction.
    needs_tensorflow = model is None or not str(model).endswith((".tflite", ".onnx"))
    cold = subprocess.run(
        [
            sys.executable, "-c", COLD_LOAD,
            model or "", "1" if needs_tensorflow else "0", run or "", runs_dir or "",
        ],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    if cold.returncode != 0:
        raise SystemExit(cold.stderr)
    import_seconds, cold_load_seconds = (float(value) for value in cold.stdout.split()[-2:])
    predictor = load_predictor(model=model, run=run, runs_dir=runs_dir)

    batch_size = arguments.batch_size
    # One untimed pass first: a model sets itself up on the first batch of each shape (the last
    # batch is smaller), which would otherwise land in whichever timing runs first.
    started = time.perf_counter()
    predict(paths, predictor=predictor, batch_size=batch_size)
    first_pass_seconds = time.perf_counter() - started

    end_to_end, decoding, inference = [], [], []
    for _ in range(arguments.repeat):
        started = time.perf_counter()
        report = predict(paths, predictor=predictor, batch_size=batch_size)
        end_to_end.append(time.perf_counter() - started)
        if report.num_predicted != len(paths):
            raise SystemExit(f"only {report.num_predicted} of {len(paths)} images were predicted")

        started = time.perf_counter()
        batches = decoded_batches(paths, predictor.image_size, batch_size)
        decoded = [item for _, batch in batches for item in batch]
        decoding.append(time.perf_counter() - started)
        images = np.stack(decoded)  # type: ignore[arg-type]

        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            predictor.predict_batch(images[start : start + batch_size])
        inference.append(time.perf_counter() - started)

    count = len(paths)
    height, width = predictor.image_size
    kind = type(predictor).__name__
    print(f"\nmodel: {predictor.source} ({kind}, input {height}x{width}, {len(predictor.labels)} classes)")
    print(f"images: {count} from {arguments.data}, batch size {batch_size}, {os.cpu_count()} CPU cores")
    tensorflow_note = "no tensorflow, "
    if needs_tensorflow:
        tensorflow_note = f"import tensorflow {import_seconds:.2f} s, then "
    print(f"new process: {tensorflow_note}load model {cold_load_seconds:.2f} s")
    print(f"first pass (untimed warm-up):    {first_pass_seconds:6.2f} s")
    figures = (("predict (decode + model)", end_to_end), ("decode only", decoding), ("model only", inference))
    for name, timings in figures:
        median = statistics.median(timings)
        print(f"{name + ':':32s} {median:6.2f} s  {count / median:7.0f} images/s  (median of {len(timings)})")

    if arguments.cli:
        command = [
            sys.executable, "-m", "imgclf_cli", "predict", *paths, "--format", "json",
            "--output", os.devnull if os.name != "nt" else "NUL", "--batch-size", str(batch_size),
        ]  # fmt: skip
        command += ["--model", str(model)] if model else ["--run", str(run)]
        if runs_dir:
            command += ["--runs-dir", runs_dir]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise SystemExit(completed.stderr)
        label = "imgclf predict, new process:"
        print(f"{label:32s} {wall:6.2f} s  {count / wall:7.0f} images/s  (start-up and model load included)")


def time_startup(tflite_model: str, image: str, runs: int) -> None:
    """Print the end-to-end ``imgclf predict`` of one image against the imports it needs."""
    from bench_startup import imgclf_command, median_times, print_table

    runtime, interface = "import ai_edge_litert.interpreter, numpy, PIL.Image", "import typer, rich.console"
    both = "both imports, one process"
    command = f"imgclf predict IMAGE --model {Path(tflite_model).name}"
    times = median_times(
        {
            runtime: [sys.executable, "-c", runtime],
            interface: [sys.executable, "-c", interface],
            both: [sys.executable, "-c", f"{runtime}, typer, rich.console"],
            command: [*imgclf_command(), "predict", image, "--model", tflite_model],
        },
        runs,
    )
    print(f"\nmodel: {tflite_model}\nimage: {image}")
    print_table(times, both, runs)
    separate = times[runtime][0] + times[interface][0]
    print(f"{command}: {times[command][0] / separate:.2f}x the two imports timed apart ({separate:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class folders to take images from")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--model", help="a run folder, .keras, SavedModel, .tflite or .onnx (default: train one)"
    )
    parser.add_argument("--run", help="a run id or folder (with --runs-dir or $IMGCLF_RUNS_DIR)")
    parser.add_argument("--runs-dir")
    parser.add_argument(
        "--tflite", action="store_true", help="also export the model (a run) to .tflite and time it"
    )
    parser.add_argument("--cli", action="store_true", help="also time the whole `imgclf predict` command")
    parser.add_argument(
        "--startup",
        action="store_true",
        help="only time `imgclf predict IMAGE --model MODEL.tflite` end to end against its imports",
    )
    parser.add_argument("--image", help="with --startup: the image to predict (default: one from --data)")
    parser.add_argument("--runs", type=int, default=21, help="with --startup: new processes per figure")
    arguments = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    workspace = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        model: str | None = arguments.model
        if arguments.startup and not (model or "").endswith(".tflite"):
            from imgclf_cli.exporting import export_run

            if model is None and arguments.run is None:
                print(f"Training a small model on {arguments.data} (not timed)...", file=sys.stderr)
                model = str(train_small_model(arguments.data, workspace))
            print("Exporting it to .tflite (not timed)...", file=sys.stderr)
            exported = export_run(
                model or arguments.run, formats=("tflite",), verify=False, runs_dir=arguments.runs_dir
            )
            model = str(exported.artifacts[0].path)
        if arguments.startup:
            image = arguments.image or pick_images(arguments.data, 1, skip=30)[0]
            time_startup(str(model), image, arguments.runs)
            return
        if model is None and arguments.run is None:
            print(f"Training a small model on {arguments.data} (not timed)...", file=sys.stderr)
            model = str(train_small_model(arguments.data, workspace))
        paths = pick_images(arguments.data, arguments.images, skip=30)
        time_model(model, arguments.run, arguments.runs_dir, paths, arguments)
        if arguments.tflite:
            from imgclf_cli.exporting import export_run

            exported = export_run(
                model or arguments.run, formats=("tflite",), verify=False, runs_dir=arguments.runs_dir
            )
            time_model(exported.artifacts[0].path, None, None, paths, arguments)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    main()
