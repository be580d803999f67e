"""Benchmark transfer learning with a frozen backbone: cached features vs the backbone every epoch.

Saves the weights of a randomly initialised backbone (no pretrained weights can be downloaded
here; the speed does not depend on the weights' values), then trains the same run twice in new
processes, ``train.cache_features=auto`` (the backbone runs once per image) and ``false`` (it
runs every epoch), and prints the time of the one-off feature pass, the median epoch after the
first, the speed-up per epoch and the whole command's wall time.

    python bench/bench_transfer.py [DATA_DIR] [--model mobilenet_v3_small] [--image-size 128] [--epochs 4]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "flowers128"


def save_random_weights(model_name: str, image_size: int, path: Path) -> None:
    import keras

    from imgclf_cli.models import BACKBONES

    spec = BACKBONES[model_name]
    backbone = getattr(keras.applications, spec.constructor)(
        include_top=False,
        weights=None,
        input_shape=(image_size, image_size, 3),
        pooling="avg",
        **dict(spec.extra_kwargs),
    )
    backbone.save_weights(path)


def train(data: Path, args: argparse.Namespace, weights: Path, cache: str, runs: Path) -> dict[str, object]:
    command = [
        sys.executable, "-m", "imgclf_cli", "train", str(data), "--model", args.model,
        "--set", f"model.weights={weights}", "--image-size", str(args.image_size),
        "--epochs", str(args.epochs), "--set", f"train.cache_features={cache}",
        "--json", "--runs-dir", str(runs),
    ]  # fmt: skip
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if completed.returncode:
        raise SystemExit(completed.stderr[-2000:])
    summary = json.loads(completed.stdout)
    run_dir = Path(summary["run_dir"])
    with (run_dir / "history.csv").open() as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    meta = json.loads((run_dir / "meta.json").read_text())
    return {
        "cache_features": cache,
        "feature_pass_s": (meta.get("feature_cache") or {}).get("seconds"),
        "first_epoch_s": round(seconds[0], 2),
        "later_epoch_s": round(statistics.median(seconds[1:] or seconds), 3),
        "wall_s": round(wall, 1),
        "val_accuracy": round(summary["val_accuracy"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-transfer-") as workdir:
        weights = Path(workdir) / "backbone.weights.h5"
        save_random_weights(args.model, args.image_size, weights)
        rows = [train(args.data, args, weights, cache, Path(workdir) / "runs") for cache in ("auto", "false")]
    for row in rows:
        print(json.dumps(row))
    cached, live = rows
    speedup = float(live["later_epoch_s"]) / max(float(cached["later_epoch_s"]), 1e-9)
    print(f"{args.data.name}, {args.model} at {args.image_size} px, {args.epochs} epochs:")
    print(
        f"  one-off feature pass {cached['feature_pass_s']} s; epochs after the first: "
        f"{cached['later_epoch_s']} s cached vs {live['later_epoch_s']} s live ({speedup:.0f}x)"
    )
    print(f"  whole command: {cached['wall_s']} s cached vs {live['wall_s']} s live")


if __name__ == "__main__":
    main()
