"""Benchmark ``imgclf runs`` on a store of many runs: the goal is under a second for 200 runs.

Builds a store of ``--runs`` run folders as training, ``evaluate`` and ``export`` leave them:
meta.json, config.yaml, labels.json, split.json, history.csv (12 epochs), plots/, best.keras,
last.keras and previous.keras of 1-5 MB (sparse files: the listing only stats them), an
``eval/val/`` in every third run and an ``export/`` (TFLite files, a SavedModel folder,
export.json) in every fifth; statuses mixed (completed, failed, interrupted, crashed, damaged).

Then times, as new processes (median of ``--repeats`` after one warm-up; the files are in the
page cache, as they are after any recent use of the store): ``imgclf runs`` (the table, 200
and 80 columns wide), ``imgclf runs --json``, and for reference ``python -c "import typer, rich.console"``;
and in this process: ``run_catalog.list_catalog`` and its two parts, reading every meta.json and
walking every folder for its size. It also checks that ``imgclf runs --json`` imports no
TensorFlow.

    python bench/bench_runs.py [--runs 200] [--repeats 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf_cli import liveness, run_catalog, store
from imgclf_cli.config import Config
from imgclf_cli.dataset import Sample, SplitManifest

CLASSES = [f"class_{index:02d}" for index in range(10)]
MEGABYTE = 1024 * 1024


def sparse_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no disk space (what the listing sees: its size)."""
    with path.open("wb") as handle:
        handle.truncate(size)


def history(epochs: int, rng: random.Random) -> list[dict[str, float]]:
    accuracy = rng.uniform(0.5, 0.95)
    return [
        {
            "epoch": epoch,
            "loss": 2.0 / epoch,
            "accuracy": accuracy * epoch / epochs,
            "val_loss": 2.2 / epoch,
            "val_accuracy": accuracy * epoch / epochs - 0.02,
            "learning_rate": 0.002 * (1 - epoch / (epochs + 1)),
            "seconds": rng.uniform(5, 60),
        }
        for epoch in range(1, epochs + 1)
    ]


def add_evaluation(run_dir: Path, rng: random.Random) -> None:
    folder = store.eval_dir(run_dir, "val")
    folder.mkdir(parents=True)
    per_class = {
        name: {"precision": 0.8, "recall": 0.8, "f1": rng.random(), "support": 40} for name in CLASSES
    }
    metrics = {
        "dataset": "val",
        "num_samples": 400,
        "accuracy": rng.random(),
        "f1_macro": 0.8,
        "per_class": per_class,
    }
    metrics.update(confusion_matrix=[[4] * len(CLASSES)] * len(CLASSES), reliability=[{"count": 40}] * 15)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name, size in (
        ("confusion_matrix.csv", 400),
        ("misclassified.csv", 5_000),
        ("predictions.csv", 40_000),
    ):
        (folder / name).write_bytes(b"x" * size)
    for name in ("confusion_matrix.png", "misclassified.png", "reliability.png"):
        sparse_file(folder / name, rng.randint(30_000, 400_000))


def add_export(run_dir: Path, rng: random.Random) -> None:
    folder = store.export_dir(run_dir)
    variables = folder / "saved_model" / "1" / "variables"
    variables.mkdir(parents=True)
    (folder / "saved_model" / "1" / "assets").mkdir()
    (folder / "saved_model" / "1" / "assets" / "labels.txt").write_text("\n".join(CLASSES))
    sparse_file(folder / "saved_model" / "1" / "saved_model.pb", 400_000)
    sparse_file(variables / "variables.data-00000-of-00001", rng.randint(MEGABYTE, 5 * MEGABYTE))
    sparse_file(variables / "variables.index", 8_000)
    for name in ("model.tflite", "model_int8.tflite"):
        sparse_file(folder / name, rng.randint(MEGABYTE // 4, 5 * MEGABYTE))
    (folder / "labels.txt").write_text("\n".join(CLASSES))
    artifacts = [{"format": "tflite", "quantization": "float32", "agreement": 1.0, "passed": True}] * 3
    (folder / "export.json").write_text(
        json.dumps({"passed": True, "verified": True, "artifacts": artifacts})
    )


def build_store(root: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    samples = [
        Sample(f"/data/flowers/{CLASSES[index % 10]}/{index}.jpg", index % 10) for index in range(2000)
    ]
    manifest = SplitManifest("/data/flowers", "folders", CLASSES, samples[:1600], samples[1600:])
    versions = {"imgclf": "0.9.0", "python": "3.11.7", "tensorflow": "2.21.0", "keras": "3.15.0"}
    dead_owner = {**liveness.current_owner(), "pid": 2**22 + 17}  # no such process
    for index in range(count):
        started = time.localtime(1_790_000_000 + index * 3_600)
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S', started)}-imgclf-cnn-run{index:03d}"
        run_dir.mkdir(parents=True)
        config = Config()
        config.data.image_size = rng.choice([64, 96, 128])
        config.train.learning_rate = rng.choice([0.001, 0.002, 0.004])
        store.write_config(run_dir, config)
        store.write_labels(run_dir, CLASSES)
        store.write_manifest(run_dir, manifest)
        rows = history(12, rng)
        store.write_history(run_dir, rows)
        (run_dir / "plots").mkdir()
        sparse_file(run_dir / "plots" / "training_curves.png", 60_000)
        for name in ("best.keras", "last.keras", "previous.keras"):
            sparse_file(run_dir / name, rng.randint(MEGABYTE, 5 * MEGABYTE))
        status = rng.choices(["completed", "failed", "interrupted", "crashed"], [85, 5, 5, 5])[0]
        best = max(rows, key=lambda row: row["val_accuracy"])
        meta = {
            "run_id": run_dir.name,
            "status": "running" if status == "crashed" else status,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", started),
            "model": "imgclf-cnn",
            "image_size": [config.data.image_size] * 2,
            "versions": versions,
            "dataset": {"root": "/data/flowers", "layout": "folders", "fingerprint": "5f0c2a9d81e4b7c3"},
            "skipped_files": [{"path": f"/data/flowers/x/{n}.jpg", "reason": "truncated"} for n in range(3)],
            "epochs_completed": 12,
        }
        meta["dataset"].update(
            num_images=2000, num_train=1600, num_val=400, train_per_class=dict.fromkeys(CLASSES, 160)
        )
        if status == "crashed":
            (run_dir / liveness.LOCK_FILE).write_text(json.dumps(dead_owner))
        else:
            meta.update(
                best_epoch=int(best["epoch"]), val_accuracy=best["val_accuracy"], val_loss=best["val_loss"]
            )
            meta.update(train_seconds=sum(row["seconds"] for row in rows), finished=meta["created"])
        store.atomic_write_json(run_dir / store.META_FILE, meta)
        if index % 3 == 0:
            add_evaluation(run_dir, rng)
        if index % 5 == 0:
            add_export(run_dir, rng)
    (root / sorted(path.name for path in root.iterdir())[count // 2] / store.META_FILE).write_text("{damaged")


def imgclf_command() -> list[str]:
    script = Path(sys.executable).with_name("imgclf")
    return [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "imgclf_cli"]


def median_seconds(command: list[str], repeats: int, environment: dict[str, str]) -> float:
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True, env=environment)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True, env=environment)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def median_in_process(function, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


IMPORTS_TENSORFLOW = """
import sys
from imgclf_cli.cli.app import main
sys.argv = ["imgclf", "runs", "--json", "--runs-dir", sys.argv[1]]
try:
    main()
except SystemExit:
    pass
print("tensorflow" in sys.modules, file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build the store in DIR and keep it")
    options = parser.parse_args()
    root = options.keep or Path(tempfile.mkdtemp(prefix="bench-runs-")) / "runs"
    try:
        started = time.perf_counter()
        build_store(root, options.runs)
        print(f"Built {options.runs} runs in {root} ({time.perf_counter() - started:.1f} s)")
        summaries = run_catalog.list_catalog(root)
        statuses = {
            status: sum(item.status == status for item in summaries) for status in run_catalog.STATUSES
        }
        print("statuses:", ", ".join(f"{name} {count}" for name, count in statuses.items() if count))
        environment = {**os.environ, "COLUMNS": "200"}
        imgclf = [*imgclf_command(), "runs", "--runs-dir", str(root)]
        rows = [
            ("imgclf runs (table, 200 columns)", median_seconds(imgclf, options.repeats, environment)),
            (
                "imgclf runs (table, 80 columns)",
                median_seconds(imgclf, options.repeats, {**environment, "COLUMNS": "80"}),
            ),
            ("imgclf runs --json", median_seconds([*imgclf, "--json"], options.repeats, environment)),
            (
                'python -c "import typer, rich.console" (reference)',
                median_seconds(
                    [sys.executable, "-c", "import typer, rich.console"], options.repeats, environment
                ),
            ),
            (
                "in process: list_catalog()",
                median_in_process(lambda: run_catalog.list_catalog(root), options.repeats),
            ),
            (
                "in process: read every meta.json",
                median_in_process(
                    lambda: [run_catalog.read_meta_leniently(path) for path in run_catalog.run_folders(root)],
                    options.repeats,
                ),
            ),
            (
                "in process: walk every folder (os.scandir)",
                median_in_process(
                    lambda: [run_catalog.scan_folder(path) for path in run_catalog.run_folders(root)],
                    options.repeats,
                ),
            ),
        ]
        checked = subprocess.run(
            [sys.executable, "-c", IMPORTS_TENSORFLOW, str(root)], capture_output=True, text=True, check=True
        )
        width = max(len(label) for label, _ in rows)
        print(f"\n{'':{width}}  median of {options.repeats} (s)")
        for label, seconds in rows:
            print(f"{label:{width}}  {seconds:.3f}")
        print(f"\nimgclf runs --json imported TensorFlow: {checked.stderr.strip().splitlines()[-1]}")
    finally:
        if options.keep is None:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
