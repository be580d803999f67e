"""Benchmark: imgclf's default training vs. TensorFlow's image-classification tutorial CNN.

Both train on the same seeded, stratified split (imgclf's split manifest) of each dataset. The
tutorial model is re-created faithfully from https://www.tensorflow.org/tutorials/images/classification
(first version, before its augmentation section): `image_dataset_from_directory` at 180x180,
batch 32, `cache().shuffle(1000).prefetch(AUTOTUNE)`, Rescaling(1/255), three Conv2D/MaxPooling
blocks (16, 32, 64 filters), Dense(128), Adam, 10 epochs.

Usage:
    python bench/bench_train.py                       # flowers128 and hymenoptera from ../shared
    python bench/bench_train.py PATH [PATH...] --tutorial-epochs 10 --set train.epochs=20
    python bench/bench_train.py PATH --equal-time     # tutorial first, then imgclf --time <its time>

With ``--equal-time`` imgclf trains with ``train.time_budget`` set to the tutorial's wall time
(measured just before, in the same process), and the table adds how long imgclf took to first
reach the tutorial's best validation accuracy (from the start of its training call).

Prints validation accuracy, wall time and training images/s for both. Not a unit test.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATASETS = [
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flowers128",
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera",
]


def link_split(samples, classes, target: Path) -> None:  # type: ignore[no-untyped-def]
    """A class-folder tree of symlinks, so image_dataset_from_directory sees exactly our split."""
    for sample in samples:
        folder = target / classes[sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / Path(sample.path).name
        if not link.exists():
            link.symlink_to(sample.path)


def tutorial_model(num_classes: int, image_size: tuple[int, int] = (180, 180)):  # type: ignore[no-untyped-def]
    """The tutorial's CNN: three Conv2D/MaxPooling blocks (16, 32, 64 filters), Dense(128), logits."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((*image_size, 3)),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(num_classes),
        ],
        name="tutorial_cnn",
    )


def run_tutorial(manifest, epochs: int, workdir: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(123)
    started = time.perf_counter()
    link_split(manifest.train, manifest.classes, workdir / "train")
    link_split(manifest.val, manifest.classes, workdir / "val")
    image_size = (180, 180)
    train_ds = keras.utils.image_dataset_from_directory(
        workdir / "train",
        seed=123,
        image_size=image_size,
        batch_size=32,
        class_names=manifest.classes,
        verbose=False,
    )
    val_ds = keras.utils.image_dataset_from_directory(
        workdir / "val",
        seed=123,
        image_size=image_size,
        batch_size=32,
        class_names=manifest.classes,
        shuffle=False,
        verbose=False,
    )
    autotune = tf.data.AUTOTUNE
    train_ds = train_ds.cache().shuffle(1000).prefetch(buffer_size=autotune)
    val_ds = val_ds.cache().prefetch(buffer_size=autotune)
    model = tutorial_model(len(manifest.classes), image_size)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    fit_started = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0)
    fit_seconds = time.perf_counter() - fit_started
    val_accuracy = history.history["val_accuracy"]
    return {
        "val_accuracy": float(val_accuracy[-1]),
        "best_val_accuracy": float(max(val_accuracy)),
        "wall_seconds": time.perf_counter() - started,
        "images_per_second": len(manifest.train) * epochs / fit_seconds,
        "epochs": epochs,
    }


def run_imgclf(
    data_dir: Path, overrides: list[str], runs_dir: Path, target_accuracy: float | None = None
) -> dict[str, float]:
    from imgclf_cli.training import train
    from imgclf_cli.training_events import EpochEnded, TrainingListener

    started = time.perf_counter()

    class FirstToReach(TrainingListener):
        """When validation accuracy first reaches ``target_accuracy`` (seconds since the start)."""

        seconds: float | None = None

        def on_epoch_end(self, event: EpochEnded) -> None:
            reached = target_accuracy is not None and event.val_accuracy >= target_accuracy
            if reached and self.seconds is None:
                self.seconds = time.perf_counter() - started

    listener = FirstToReach()
    result = train(data_dir, runs_dir=runs_dir, overrides=overrides, listener=listener)
    return {
        "val_accuracy": result.val_accuracy,
        "best_val_accuracy": result.val_accuracy,
        "wall_seconds": time.perf_counter() - started,
        "images_per_second": result.num_train * result.epochs_run / result.train_seconds,
        "epochs": result.epochs_run,
        "reached_tutorial_best_seconds": listener.seconds if listener.seconds is not None else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("datasets", nargs="*", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--tutorial-epochs", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="imgclf config override")
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument(
        "--equal-time",
        action="store_true",
        help="train the tutorial CNN first, then imgclf with --time set to the tutorial's wall time",
    )
    parser.add_argument(
        "--tutorial-first",
        action="store_true",
        help="train the tutorial CNN first (the first model in a process pays start-up costs)",
    )
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from imgclf_cli.dataset import make_manifest, scan_dataset

    console = Console()
    table = Table(title="imgclf default vs. TensorFlow tutorial CNN (same split, this machine)")
    for column in ("dataset", "model", "epochs", "val accuracy", "best val acc", "wall time", "train img/s"):
        table.add_column(column, justify="left" if column in ("dataset", "model") else "right")
    for data_dir in args.datasets:
        manifest = make_manifest(scan_dataset(data_dir), 0.2, seed=42)
        console.print(
            f"{data_dir.name}: {len(manifest.train)} train / {len(manifest.val)} val images", highlight=False
        )
        workdir = Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
        if args.equal_time:
            try:
                tutorial_figures = run_tutorial(manifest, args.tutorial_epochs, workdir)
                console.print(f"  TF tutorial CNN: {tutorial_figures}", highlight=False)
                budget = f"{tutorial_figures['wall_seconds']:.0f}s"
                imgclf_figures = run_imgclf(
                    data_dir,
                    [*args.overrides, f"train.time_budget={budget}"],
                    workdir / "runs",
                    target_accuracy=tutorial_figures["best_val_accuracy"],
                )
                console.print(f"  imgclf --time {budget}: {imgclf_figures}", highlight=False)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            reached = imgclf_figures["reached_tutorial_best_seconds"]
            console.print(
                f"{data_dir.name}: tutorial best {tutorial_figures['best_val_accuracy']:.3f} in "
                f"{tutorial_figures['wall_seconds']:.0f} s; imgclf --time {budget}: "
                f"{imgclf_figures['val_accuracy']:.3f} in {imgclf_figures['wall_seconds']:.0f} s, "
                f"reached the tutorial's best after {reached:.0f} s "
                f"({reached / tutorial_figures['wall_seconds']:.2f} of its time)",
                highlight=False,
            )
            continue
        try:
            label = "imgclf default" + (" " + " ".join(args.overrides) if args.overrides else "")
            runs = workdir / "runs"
            jobs = [(label, functools.partial(run_imgclf, data_dir, args.overrides, runs))]
            if not args.skip_tutorial:
                tutorial = (
                    "TF tutorial CNN",
                    functools.partial(run_tutorial, manifest, args.tutorial_epochs, workdir),
                )
                jobs.insert(0 if args.tutorial_first else 1, tutorial)
            rows = []
            for name, job in jobs:
                rows.append((name, job()))
                console.print(f"  {name}: {rows[-1][1]}", highlight=False)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        for label, figures in rows:
            table.add_row(
                data_dir.name,
                label,
                str(figures["epochs"]),
                f"{figures['val_accuracy']:.3f}",
                f"{figures['best_val_accuracy']:.3f}",
                f"{figures['wall_seconds']:.0f}s",
                f"{figures['images_per_second']:.0f}",
            )
    if table.row_count:
        console.print(table)


if __name__ == "__main__":
    main()
