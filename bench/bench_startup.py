"""Benchmark ``imgclf --help``, and commands that fail on a mistake, against ``import typer, rich.console``.

Every figure is the median over ``--runs`` new processes (each command once per round, rounds
interleaved so that a busy moment does not land on one command only, after one untimed warm-up
round): wall seconds, and CPU seconds (user + system of the child, which depend less on what
else the machine runs). The ratio is to the bare import of Typer and Rich; the goal is at most
1.5. The last line is for reference: what Typer's Rich help panels alone would cost
(``typer.rich_utils`` imports ``rich.markdown``, markdown-it, Pygments and ``rich.traceback``),
which is why ``imgclf`` uses plain help (``rich_markup_mode=None``).

The rows after it are the usual mistakes (a YAML typo, ``--set train.epochs=abc``, an unknown
model, a missing folder...), one or two per command, each expected to fail with its exit code:
they are reported before TensorFlow loads, so they cost a few tenths of a second, not the
seven of ``import tensorflow`` (``--no-mistakes`` leaves them out).

    python bench/bench_startup.py [--runs 21] [--no-mistakes]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE_IMPORT = "import typer, rich.console"
HELP_FLOOR = "import typer, rich.console, typer.rich_utils"


def imgclf_command() -> list[str]:
    """The console script beside this interpreter (what users run), else ``python -m imgclf_cli``."""
    script = Path(sys.executable).with_name("imgclf")
    if script.is_file():
        return [sys.executable, str(script)]
    found = shutil.which("imgclf")
    return [sys.executable, found] if found else [sys.executable, "-m", "imgclf_cli"]


def run_once(command: list[str], expected_code: int = 0) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``command`` in a new process; fails loudly
    when it exits with another code than ``expected_code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy()
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != expected_code:
        raise SystemExit(
            f"{' '.join(command)} exited {completed.returncode}, not {expected_code}:\n"
            f"{completed.stderr.decode()}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def median_times(
    commands: dict[str, list[str]], runs: int, expected_codes: dict[str, int] | None = None
) -> dict[str, tuple[float, float]]:
    """``{label: (median wall, median CPU)}`` over ``runs`` interleaved rounds, after a warm-up;
    ``expected_codes``: the exit code of each label that must fail (default 0)."""
    codes = expected_codes or {}
    for label, command in commands.items():
        run_once(command, codes.get(label, 0))
    walls: dict[str, list[float]] = {label: [] for label in commands}
    cpus: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, command in commands.items():
            wall, cpu = run_once(command, codes.get(label, 0))
            walls[label].append(wall)
            cpus[label].append(cpu)
    return {label: (statistics.median(walls[label]), statistics.median(cpus[label])) for label in commands}


def print_table(times: dict[str, tuple[float, float]], baseline: str, runs: int) -> None:
    base_wall, base_cpu = times[baseline]
    width = max(len(label) for label in times) + 2
    print(f"median of {runs} runs, each in a new process; ratio to {baseline!r}")
    print(f"{'':{width}s} {'wall s':>7s} {'ratio':>6s}   {'CPU s':>6s} {'ratio':>6s}")
    for label, (wall, cpu) in times.items():
        print(f"{label:{width}s} {wall:7.3f} {wall / base_wall:5.2f}x   {cpu:6.3f} {cpu / base_cpu:5.2f}x")


def mistakes(folder: Path) -> dict[str, tuple[list[str], int]]:
    """``{label: (imgclf arguments, exit code)}`` for the usual mistakes, with the files they
    need written under ``folder``: a dataset of two (empty) class folders, a folder of images
    without class folders, a YAML file with a syntax error and an empty run store."""
    data = folder / "data"
    for name in ("cats", "dogs"):
        (data / name).mkdir(parents=True)
        (data / name / "1.png").write_bytes(b"")
    flat = folder / "flat"
    flat.mkdir()
    (flat / "1.png").write_bytes(b"")
    bad_yaml = folder / "bad.yaml"
    bad_yaml.write_text("train: [oops\n")
    missing, no_runs, image = str(folder / "missing"), str(folder / "no-runs"), str(data / "cats" / "1.png")
    return {
        "train DATA --config bad.yaml (YAML typo)": (["train", str(data), "--config", str(bad_yaml)], 2),
        "train DATA --set train.epochs=abc": (["train", str(data), "--set", "train.epochs=abc"], 2),
        "train DATA --model resnet5": (["train", str(data), "--model", "resnet5"], 2),
        "train MISSING": (["train", missing], 1),
        "train FOLDER (no class folders)": (["train", str(flat)], 1),
        "evaluate MISSING": (["evaluate", missing, "--runs-dir", no_runs], 2),
        "evaluate (no completed run)": (["evaluate", "--runs-dir", no_runs], 1),
        "predict MISSING": (["predict", missing, "--runs-dir", no_runs], 1),
        "predict IMAGE --model MISSING": (["predict", image, "--model", missing], 2),
        "export --tflite (no completed run)": (["export", "--tflite", "--runs-dir", no_runs], 1),
        "export --quantize int4": (["export", "--quantize", "int4", "--runs-dir", no_runs], 2),
        "export-tflite (no completed run)": (["export-tflite", "--runs-dir", no_runs], 1),
        "inspect-dataset MISSING": (["inspect-dataset", missing], 1),
        "inspect-dataset FOLDER (no class folders)": (["inspect-dataset", str(flat)], 1),
    }


def command_names() -> list[str]:
    from imgclf_cli.cli.app import app

    return [info.name for info in app.registered_commands if info.name and not info.hidden]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="timed runs per command (default 21)")
    parser.add_argument("--no-mistakes", action="store_true", help="time --help only")
    arguments = parser.parse_args()

    imgclf = imgclf_command()
    commands = {BARE_IMPORT: [sys.executable, "-c", BARE_IMPORT], "imgclf --help": [*imgclf, "--help"]}
    for name in command_names():
        commands[f"imgclf {name} --help"] = [*imgclf, name, "--help"]
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; imgclf = {' '.join(imgclf)}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        expected_codes: dict[str, int] = {}
        if not arguments.no_mistakes:
            for label, (args, code) in mistakes(Path(folder)).items():
                commands[f"imgclf {label}: exit {code}"] = [*imgclf, *args]
                expected_codes[f"imgclf {label}: exit {code}"] = code
        commands[f"{HELP_FLOOR} (Rich help, unused)"] = [sys.executable, "-c", HELP_FLOOR]
        times = median_times(commands, arguments.runs, expected_codes)
    print_table(times, BARE_IMPORT, arguments.runs)


if __name__ == "__main__":
    main()
