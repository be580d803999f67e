"""Benchmark ``imgclf --help`` start-up against a bare ``import typer, rich.console``.

Every figure is the median over ``--runs`` new processes (each command once per round, rounds
interleaved so that a busy moment does not land on one command only, after one untimed warm-up
round): wall seconds, and CPU seconds (user + system of the child, which depend less on what
else the machine runs). The ratio is to the bare import of Typer and Rich; the goal is at most
1.5. The last line is for reference: what Typer's Rich help panels alone would cost
(``typer.rich_utils`` imports ``rich.markdown``, markdown-it, Pygments and ``rich.traceback``),
which is why ``imgclf`` uses plain help (``rich_markup_mode=None``).

    python bench/bench_startup.py [--runs 21]
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


def run_once(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``command`` in a new process; fails loudly."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy()
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr.decode()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def median_times(commands: dict[str, list[str]], runs: int) -> dict[str, tuple[float, float]]:
    """``{label: (median wall, median CPU)}`` over ``runs`` interleaved rounds, after a warm-up."""
    for command in commands.values():
        run_once(command)
    walls: dict[str, list[float]] = {label: [] for label in commands}
    cpus: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, command in commands.items():
            wall, cpu = run_once(command)
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


def command_names() -> list[str]:
    from imgclf_cli.cli.app import app

    return [info.name for info in app.registered_commands if info.name and not info.hidden]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="timed runs per command (default 21)")
    arguments = parser.parse_args()

    imgclf = imgclf_command()
    commands = {BARE_IMPORT: [sys.executable, "-c", BARE_IMPORT], "imgclf --help": [*imgclf, "--help"]}
    for name in command_names():
        commands[f"imgclf {name} --help"] = [*imgclf, name, "--help"]
    commands[f"{HELP_FLOOR} (Rich help, unused)"] = [sys.executable, "-c", HELP_FLOOR]
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; imgclf = {' '.join(imgclf)}"
    )
    print_table(median_times(commands, arguments.runs), BARE_IMPORT, arguments.runs)


if __name__ == "__main__":
    main()
