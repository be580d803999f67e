"""Benchmark ``imgclf_cli.inspection.inspect_dataset``: images per second on real datasets.

Runs the library (not the CLI, so start-up time is left out) on flowers128 and hymenoptera,
with and without the near-duplicate search, and times the banded near-duplicate search alone
on synthetic hashes to show that it does not grow with the square of the number of images.

    python bench/bench_inspect.py [--datasets-dir ../shared/datasets] [--repeat 3]

Each figure is the median of ``--repeat`` runs after one warm-up run, so files are in the
operating system's cache: the figures measure decoding and hashing, not the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from imgclf_cli.duplicates import near_duplicate_pairs
from imgclf_cli.inspection import inspect_dataset
from imgclf_cli.inspection_report import DEFAULT_HASH_DISTANCE

DEFAULT_DATASETS_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = ("flowers128", "hymenoptera")


def time_inspection(data_dir: Path, near_duplicates: bool, repeat: int) -> tuple[int, float, float, int, int]:
    """(images, median wall seconds, median CPU seconds, exact groups, near-duplicate groups).

    CPU seconds (all threads) are reported too because wall time depends on what else runs.
    """
    inspect_dataset(data_dir, near_duplicates=near_duplicates)
    wall_times, cpu_times = [], []
    for _ in range(max(1, repeat)):
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        report = inspect_dataset(data_dir, near_duplicates=near_duplicates)
        wall_times.append(time.perf_counter() - wall_started)
        cpu_times.append(time.process_time() - cpu_started)
    near_groups = report.near_duplicates.num_groups if report.near_duplicates else 0
    return (
        report.num_images,
        statistics.median(wall_times),
        statistics.median(cpu_times),
        report.duplicates.num_groups,
        near_groups,
    )


def time_hash_search(num_hashes: int, max_distance: int) -> tuple[float, int]:
    """Seconds to find near pairs among random 64-bit hashes with 1% planted near copies."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, np.iinfo(np.int64).max, size=num_hashes, dtype=np.int64).astype(np.uint64)
    planted = num_hashes // 100
    for index in range(planted):
        flips = rng.choice(64, size=max_distance // 2, replace=False)
        hashes[num_hashes - 1 - index] = hashes[index] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    started = time.perf_counter()
    pairs = near_duplicate_pairs(hashes, max_distance)
    return time.perf_counter() - started, len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets-dir", type=Path, default=DEFAULT_DATASETS_DIR)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU cores: {os.cpu_count()}; load average {load:.1f}; median of {arguments.repeat} warm runs")
    print(
        f"{'dataset':<14}{'near dups':>10}{'images':>8}{'seconds':>9}{'images/s':>10}"
        f"{'CPU s':>8}{'CPU ms/image':>14}{'exact':>7}{'near':>6}"
    )
    for name in DATASETS:
        data_dir = arguments.datasets_dir / name
        if not data_dir.is_dir():
            print(f"{name:<14} missing: {data_dir}")
            continue
        for near_duplicates in (True, False):
            images, seconds, cpu_seconds, exact_groups, near_groups = time_inspection(
                data_dir, near_duplicates, arguments.repeat
            )
            print(
                f"{name:<14}{'on' if near_duplicates else 'off':>10}{images:>8}{seconds:>9.2f}"
                f"{images / seconds:>10.0f}{cpu_seconds:>8.2f}{1000 * cpu_seconds / images:>14.2f}"
                f"{exact_groups:>7}{near_groups if near_duplicates else '-':>6}"
            )

    print(f"\nNear-duplicate search alone (random hashes, distance {DEFAULT_HASH_DISTANCE})")
    print(f"{'hashes':>8}{'seconds':>9}{'pairs':>7}")
    for num_hashes in (5_000, 50_000, 200_000):
        seconds, pairs = time_hash_search(num_hashes, DEFAULT_HASH_DISTANCE)
        print(f"{num_hashes:>8}{seconds:>9.3f}{pairs:>7}")


if __name__ == "__main__":
    main()
