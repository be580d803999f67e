"""Benchmark: one process against two local workers (``train.distribute: multi_worker``).

Trains the same run as one process, then as two worker processes on 127.0.0.1 (``TF_CONFIG``,
free ports) with the same global batch: sharing both cores, then with one core each. A last
run, one process on one core with half the batch, is what one worker computes in a step when
nothing else runs: a worker's step minus that is what working in a team costs. Then times what
the workers exchange every step, on its own, between two fresh worker processes: an all-reduce
of tensors shaped like the model's gradients, and of one number (the latency of a collective
operation).

Usage:
    python bench/bench_distributed.py                    # flowers128 from ../shared, 64 px, 2 epochs
    python bench/bench_distributed.py PATH --image-size 64 --epochs 2 --batch-size 32

Prints a Markdown table: epoch times (the first one decodes and caches the images; the last
one is the steady state), seconds per step and images per second, and the all-reduce times.
On one machine two workers share the cores one process had: they cannot be faster; the table
shows by how much they are slower, and where the time goes. Not a unit test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flowers128"

# Two worker processes time the exchange of one step: all-reduces of tensors shaped like the
# model's trainable variables (what the optimizer all-reduces), and of one number.
ALL_REDUCE = """
import json, sys, time
import numpy as np
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
from imgclf_cli.config import resolve_config
from imgclf_cli.models import build_model
config = resolve_config(None, [f"data.image_size={sys.argv[1]}"], {})
shapes = [v.shape for v in build_model(config, int(sys.argv[2])).trainable_variables]
gradients = [tf.ones(shape) for shape in shapes]
one = [tf.ones(())]

def timed(values, repeats=50):
    @tf.function
    def exchange():
        context = lambda: tf.distribute.get_replica_context().all_reduce("sum", values)
        return strategy.run(context)
    for _ in range(5):
        exchange()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), strategy.experimental_local_results(exchange()))
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000

result = {
    "gradients_mb": sum(int(np.prod(shape)) for shape in shapes) * 4 / 1e6,
    "gradients_ms": timed(gradients),
    "one_number_ms": timed(one),
}
print("RESULT " + json.dumps(result), flush=True)
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for held in sockets:
        held.bind(("127.0.0.1", 0))
    ports = [held.getsockname()[1] for held in sockets]
    for held in sockets:
        held.close()
    return ports


def worker_environments(count: int, base: Path) -> list[dict[str, str]]:
    ports = free_ports(count)
    workers = [f"127.0.0.1:{port}" for port in ports]
    environments = []
    for index in range(count):
        temporary = base / f"tmp{index}"
        temporary.mkdir(parents=True, exist_ok=True)
        config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        environments.append(
            {**os.environ, "TF_CONFIG": config, "TMPDIR": str(temporary), "IMGCLF_PROGRESS": "0"}
        )
    return environments


def run_all(
    commands: list[list[str]],
    environments: list[dict[str, str]],
    timeout: float,
    cores: list[int] | None = None,
) -> list[str]:
    """Start every command at once (the i-th on core ``cores[i]`` alone, if given); their
    outputs once all have ended (killed after ``timeout``)."""

    def pinned(index: int):  # type: ignore[no-untyped-def]
        if cores is None:
            return None
        return lambda: os.sched_setaffinity(0, {cores[index]})

    processes = [
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=pinned(index),
        )
        for index, (command, env) in enumerate(zip(commands, environments, strict=True))
    ]
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            if process.returncode != 0:
                raise SystemExit(f"a process failed ({process.returncode}):\n{output[-3000:]}")
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def run_figures(runs: Path, wall_seconds: float) -> dict[str, float]:
    (run_dir,) = [child for child in runs.iterdir() if child.is_dir()]
    meta = json.loads((run_dir / "meta.json").read_text())
    lines = (run_dir / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, map(float, line.split(",")), strict=True)) for line in lines[1:]]
    return {
        "wall": wall_seconds,
        "epochs": [row["seconds"] for row in rows],
        "val_accuracy": rows[-1]["val_accuracy"],
        "num_train": meta["dataset"]["num_train"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    arguments = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    train = [
        sys.executable, "-m", "imgclf_cli", "train", str(arguments.dataset),
        "--epochs", str(arguments.epochs), "--image-size", str(arguments.image_size),
        "--seed", "1",
    ]  # fmt: skip
    halved = [*train, "--batch-size", str(arguments.batch_size // 2)]
    train = [*train, "--batch-size", str(arguments.batch_size)]

    figures = {}
    plain = {**os.environ, "IMGCLF_PROGRESS": "0"}
    runs = [
        ("1 process", [train], [plain], None),
        ("2 local workers", [train, train], worker_environments(2, base / "two"), None),
        ("2 local workers, one core each", [train, train], worker_environments(2, base / "pinned"), [0, 1]),
        # What one worker computes in a step (half the batch on one core), alone.
        ("1 process, one core, half the batch", [halved], [plain], [0]),
    ]
    for name, commands, environments, cores in runs:
        folder = base / name.replace(" ", "-").replace(",", "")
        with_store = [
            [*command, "--runs-dir", str(folder / str(index))] for index, command in enumerate(commands)
        ]
        started = time.perf_counter()
        run_all(with_store, environments, 1800, cores)
        figures[name] = run_figures(folder / "0", time.perf_counter() - started)
    exchange = [[sys.executable, "-c", ALL_REDUCE, str(arguments.image_size), "5"]] * 2
    outputs = run_all(exchange, worker_environments(2, base / "exchange"), 600)
    result = json.loads(next(line for line in outputs[0].splitlines() if line.startswith("RESULT "))[7:])
    shutil.rmtree(base, ignore_errors=True)

    print(
        f"{arguments.dataset.name}, imgclf-cnn at {arguments.image_size} px, global batch "
        f"{arguments.batch_size}, {arguments.epochs} epochs\n"
    )
    print("| | wall time | epoch 1 | last epoch | s/step (last epoch) | images/s | val accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, figure in figures.items():
        batch = arguments.batch_size // 2 if "half" in name else arguments.batch_size
        steps = -(-figure["num_train"] // batch)
        last = figure["epochs"][-1]
        print(
            f"| {name} | {figure['wall']:.1f} s | {figure['epochs'][0]:.1f} s | {last:.1f} s "
            f"| {last / steps:.3f} | {figure['num_train'] / last:.0f} | {figure['val_accuracy']:.3f} |"
        )
    print(
        f"\nAll-reduce between the two workers: gradients of imgclf-cnn "
        f"({result['gradients_mb']:.2f} MB) {result['gradients_ms']:.2f} ms, one number "
        f"{result['one_number_ms']:.2f} ms (medians of 50)."
    )


if __name__ == "__main__":
    main()
