"""Benchmark ``imgclf train --time``: does the whole command end within its budget (+5%)?

Runs ``imgclf train DATA --time T --json`` in a new process for each (dataset, budget) pair and
prints the wall time from launch to exit (start-up, training, summary and TensorFlow's
teardown), its ratio to the budget, the epochs run, what stopped training and the validation
accuracy.

    python bench/bench_time_budget.py                       # sample_data 20s, flowers128 30s and 2m
    python bench/bench_time_budget.py ../shared/datasets/flowers128:10m sample_data:20s
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
DEFAULT_CASES = [
    f"{ROOT / 'sample_data'}:20s",
    f"{DATASETS / 'flowers128'}:30s",
    f"{DATASETS / 'flowers128'}:2m",
]
TOLERANCE = 1.05


def run_case(data_dir: Path, budget: str, runs_dir: Path) -> dict[str, object]:
    from imgclf_cli.time_budget import parse_duration

    command = [
        sys.executable,
        "-m",
        "imgclf_cli",
        "train",
        str(data_dir),
        "--time",
        budget,
        "--json",
        "--runs-dir",
        str(runs_dir),
    ]
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    summary = json.loads(completed.stdout)
    seconds = parse_duration(budget)
    return {
        "dataset": data_dir.name,
        "budget": budget,
        "wall_s": round(wall, 1),
        "ratio": round(wall / seconds, 3),
        "within": wall <= seconds * TOLERANCE,
        "epochs": summary["epochs_run"],
        "stopped_by": summary["stopped_by"],
        "val_accuracy": round(summary["val_accuracy"], 4),
        "train_s": summary["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES, help="DATA_DIR:DURATION pairs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-time-") as runs:
        for case in args.cases:
            data, _, budget = case.rpartition(":")
            rows.append(run_case(Path(data), budget, Path(runs)))
            print(json.dumps(rows[-1]), flush=True)
    columns = ("dataset", "budget", "wall_s", "ratio", "epochs", "stopped_by", "val_accuracy")
    print(" ".join(f"{name:>13}" for name in columns))
    for row in rows:
        cells = " ".join(f"{row[name]!s:>13}" for name in columns)
        print(cells + ("" if row["within"] else "  OVER +5%"))


if __name__ == "__main__":
    main()
