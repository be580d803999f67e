"""Benchmark: the run store under ``kill -9`` (issue 12, "The run store under faults").

One uninterrupted reference run first, with the same settings: how long a run takes, when its
training starts, its pace. Then each cycle starts ``imgclf train DATA`` in a new process group,
kills the whole group with SIGKILL at a random moment of its training, checks the store the dead
process left behind, and runs ``imgclf train --resume RUN`` to completion (``--kills-per-cycle
K``: the resumes are killed too, K kills in all, before the last resume runs to the end).

After every kill: the run folder exists, ``meta.json`` parses, the run reads as ``crashed``, and
every checkpoint file (``last.keras``, ``previous.keras``, ``best.keras``) passes its zip
checksums and loads with ``keras.saving.load_model(..., compile=True)``; temporaries left by the
dead writer (``.<stem>.<pid>.*``) are listed. After every cycle: the resume exited 0 and the run
is ``completed`` with all its epochs in ``history.csv``, once each, and its models load.

Kill moments are ``--seed``-reproducible fractions of the reference run's training time (from
its "Training ..." line to its exit), counted from the killed process's own "Training ..." line;
where they land in training still depends on the machine's speed that day.

Work lost per kill, in seconds: the kill's time minus the time the checkpoint a resume starts
from was written (its mtime), or minus the killed process's launch when that process had not
written one yet (its start-up is lost too). In steps, an estimate: those seconds times the
reference run's steady pace, for kills after a checkpoint of the killed process only. What a
kill costs in all (lost work, the resume's start-up and tracing): the cycle's training processes'
time minus the reference run's.

    python bench/bench_faults.py                               # 20 cycles on hymenoptera
    python bench/bench_faults.py --cycles 2 --keep --json      # a smoke test, store kept
    python bench/bench_faults.py --checkpoint-every epoch --kills-per-cycle 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
CHECKPOINT_FILES = ("last.keras", "previous.keras", "best.keras")
POSITION_ENTRY = "imgclf-checkpoint.json"
TRAINING_LINE = "Training "
# "<stem>.<pid>.<random><suffix>" behind a dot: imgclf_cli.store.atomic_write's temporaries.
TEMPORARY = re.compile(r"^\.(?P<stem>[^/]+?)\.(?P<pid>\d+)\.")
CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
LIVE_CHILDREN: set[Child] = set()


class Child:
    """One ``imgclf`` process in its own process group, its stderr lines timestamped."""

    def __init__(self, arguments: list[str], log_path: Path, role: str) -> None:
        self.role = role
        self.lines: list[tuple[float, str]] = []
        self.log = log_path.open("w", encoding="utf-8")
        self.launched = time.time()
        self.ended: float | None = None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgclf_cli", "train", *arguments],
            cwd=ROOT,
            env={**os.environ, **CHILD_ENV},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        LIVE_CHILDREN.add(self)
        self.reader = threading.Thread(target=self.read_stderr, daemon=True)
        self.reader.start()

    def read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.time(), line.rstrip("\n")))
            self.log.write(line)
            self.log.flush()

    def line_time(self, prefix: str) -> float | None:
        return next((at for at, line in list(self.lines) if line.startswith(prefix)), None)

    def wait_for_line(self, prefix: str, deadline: float) -> float | None:
        """When the process printed a line starting with ``prefix``; ``None`` if it exited or the
        deadline passed first."""
        while time.time() < deadline:
            at = self.line_time(prefix)
            if at is not None:
                return at
            if self.process.poll() is not None:
                self.reader.join(timeout=5)
                return self.line_time(prefix)
            time.sleep(0.02)
        return None

    def sleep_until(self, moment: float) -> bool:
        """Sleep until ``moment``; ``False`` when the process exited first."""
        while time.time() < moment:
            if self.process.poll() is not None:
                return False
            time.sleep(min(0.01, max(0.0, moment - time.time())))
        return self.process.poll() is None

    def kill(self) -> float:
        """SIGKILL the whole process group; the moment of the kill."""
        killed_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.finish(timeout=60)
        return killed_at

    def wait(self, timeout: float) -> int:
        """The exit status; a process past ``timeout`` is killed and reads as 124."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return 124
        self.finish(timeout=60)
        return self.process.returncode

    def finish(self, timeout: float) -> None:
        self.process.wait(timeout=timeout)
        self.ended = self.ended or time.time()
        self.reader.join(timeout=10)
        self.log.close()
        LIVE_CHILDREN.discard(self)

    def error_line(self) -> str:
        errors = [line for _, line in self.lines if line.startswith("Error")]
        tail = [line for _, line in self.lines if line.strip()][-1:]
        return (errors or tail or [""])[0][:300]

    def warnings(self) -> list[str]:
        return [line for _, line in self.lines if "previous.keras" in line or "trained again" in line]


def kill_children() -> None:
    for child in list(LIVE_CHILDREN):
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired, OSError):
            os.killpg(child.process.pid, signal.SIGKILL)
            child.finish(timeout=30)


def checkpoint_every_known(data: Path, every: str) -> bool:
    """Whether this imgclf accepts ``train.checkpoint_every`` (checked with --print-config, no
    TensorFlow)."""
    completed = subprocess.run(
        [sys.executable, "-m", "imgclf_cli", "train", str(data), "--print-config"]
        + ["--set", f"train.checkpoint_every={every}"],
        cwd=ROOT,
        env={**os.environ, **CHILD_ENV},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode == 0:
        return True
    if "checkpoint_every" in completed.stderr:
        return False
    raise SystemExit(f"imgclf train --print-config failed:\n{completed.stderr[-2000:]}")


def read_position(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's position entry (``None`` when it has none) and the zip's damage if any."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                return None, f"entry {bad} fails its checksum"
            if POSITION_ENTRY not in archive.namelist():
                return None, None
            position = json.loads(archive.read(POSITION_ENTRY).decode("utf-8"))
            return (position if isinstance(position, dict) else None), None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as error:
        return None, f"{type(error).__name__}: {error}"[:300]


def load_error(path: Path) -> str | None:
    """Why ``path`` does not load as a compiled Keras model; ``None`` when it does."""
    from imgclf_cli import quiet_logs

    quiet_logs.install()
    import keras

    # imgclf's custom layers and learning-rate schedule register themselves on import.
    import imgclf_cli.models  # noqa: F401
    import imgclf_cli.training_recipe  # noqa: F401

    try:
        keras.saving.load_model(path, compile=True, safe_mode=True)
    except Exception as error:  # every failure is a finding, whatever Keras raises
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    finally:
        keras.backend.clear_session()
    return None


def read_meta(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"[:300]
    if not isinstance(meta, dict):
        return None, f"not a JSON object: {type(meta).__name__}"
    return meta, None


def run_status(run_dir: Path) -> str | None:
    """The status a reader of the store shows (``crashed`` for a dead ``running`` run)."""
    try:
        from imgclf_cli.store import run_state
    except ImportError:
        meta, _ = read_meta(run_dir)
        return None if meta is None else meta.get("status")
    return run_state(run_dir).status


def dead_temporaries(run_dir: Path) -> list[str]:
    """Temporaries in the run folder whose writing process is gone."""
    found = []
    for path in sorted(run_dir.rglob(".*")):
        match = TEMPORARY.match(path.name)
        if match and path.is_file() and not pid_alive(int(match.group("pid"))):
            found.append(str(path.relative_to(run_dir)))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def history_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return []
    column = lines[0].split(",").index("epoch") if "epoch" in lines[0].split(",") else 0
    return [int(float(line.split(",")[column])) for line in lines[1:] if line.strip()]


def history_seconds(run_dir: Path) -> list[float]:
    path = run_dir / "history.csv"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    if not lines or "seconds" not in lines[0].split(","):
        return []
    column = lines[0].split(",").index("seconds")
    return [float(line.split(",")[column]) for line in lines[1:] if line.strip()]


def the_run(runs: Path, known: set[str]) -> Path | None:
    """The run folder under ``runs`` that is not in ``known`` (the newest if several)."""
    new = sorted(path for path in runs.iterdir() if path.is_dir() and path.name not in known)
    return new[-1] if new else None


class Settings:
    def __init__(self, args: argparse.Namespace, checkpoint_every: str | None) -> None:
        self.data = args.data.resolve()
        self.epochs = args.epochs
        self.image_size = args.image_size
        self.checkpoint_every = checkpoint_every
        self.timeout = args.timeout
        self.kills_per_cycle = args.kills_per_cycle

    def new_run(self, runs: Path) -> list[str]:
        arguments = [str(self.data), "--runs-dir", str(runs), "--epochs", str(self.epochs)]
        arguments += ["--image-size", str(self.image_size)]
        # Early stopping would end some runs before their epochs: every run must reach them all.
        arguments += ["--set", "train.early_stopping_patience=0"]
        if self.checkpoint_every is not None:
            arguments += ["--set", f"train.checkpoint_every={self.checkpoint_every}"]
        return arguments

    @staticmethod
    def resume(run_dir: Path) -> list[str]:
        return ["--resume", str(run_dir), "--runs-dir", str(run_dir.parent)]


def reference_run(settings: Settings, runs: Path) -> dict[str, Any]:
    """One run without faults: its duration, when training starts, its steady pace."""
    runs.mkdir(parents=True)
    child = Child(settings.new_run(runs), runs / "reference.log", "new")
    code = child.wait(settings.timeout)
    ended = time.time()
    run_dir = the_run(runs, set())
    if code != 0 or run_dir is None:
        raise SystemExit(f"The reference run failed (exit {code}): {child.error_line()}")
    meta, _ = read_meta(run_dir)
    meta = meta or {}
    if run_status(run_dir) != "completed" or len(history_epochs(run_dir)) != settings.epochs:
        raise SystemExit(f"The reference run {run_dir} did not complete its {settings.epochs} epochs")
    training = child.line_time(TRAINING_LINE)
    if training is None:
        print(
            f"Note: no '{TRAINING_LINE}...' line on stderr: kill moments count from launch", file=sys.stderr
        )
    position, _ = read_position(run_dir / "last.keras")
    steps = (position or {}).get("steps_per_epoch") or math.ceil(
        int((meta.get("dataset") or {}).get("num_train") or 0) / int(meta.get("batch_size") or 32)
    )
    epoch_seconds = history_seconds(run_dir)[1:] or history_seconds(run_dir)
    steady = statistics.median(epoch_seconds) if epoch_seconds else None
    return {
        "run_dir": str(run_dir),
        "wall_s": round(ended - child.launched, 2),
        "training_line_s": round(training - child.launched, 2) if training else None,
        "window_s": round(ended - (training or child.launched), 2),
        "steps_per_epoch": steps,
        "steady_epoch_s": round(steady, 3) if steady else None,
        "steps_per_s": round(steps / steady, 3) if steady and steps else None,
        "val_accuracy": meta.get("val_accuracy"),
        "history_epochs": history_epochs(run_dir),
    }


def inspect_kill(
    run_dir: Path | None, child: Child, killed_at: float, steps_per_epoch: int, steps_per_s: float | None
) -> dict[str, Any]:
    """The store as the killed process left it, and the work the kill cost."""
    record: dict[str, Any] = {"process": child.role, "life_s": round(killed_at - child.launched, 2)}
    if run_dir is None or not run_dir.is_dir():
        record.update(folder=False, checkpoint=None, lost_s=round(killed_at - child.launched, 2))
        return record
    meta, meta_error = read_meta(run_dir)
    record.update(folder=True, meta_error=meta_error, status_after_kill=run_status(run_dir))
    epochs_completed = int((meta or {}).get("epochs_completed") or 0)
    checkpoints, surviving = {}, None
    for name in CHECKPOINT_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        position, zip_error = read_position(path)
        error = zip_error or load_error(path)
        checkpoints[name] = {"mtime": path.stat().st_mtime, "position": position, "error": error}
        if surviving is None and name != "best.keras" and error is None:
            surviving = name
    record["checkpoints"] = {
        name: {"position": brief_position(entry["position"]), "error": entry["error"]}
        for name, entry in checkpoints.items()
    }
    record["unreadable"] = sorted(name for name, entry in checkpoints.items() if entry["error"])
    record["dead_temporaries"] = dead_temporaries(run_dir)
    record["checkpoint"] = surviving
    if surviving is None:
        record.update(lost_s=round(killed_at - child.launched, 2), lost_since="process start")
        return record
    entry = checkpoints[surviving]
    position = entry["position"]
    if position is not None:
        epoch, step = int(position.get("epoch", 0)), int(position.get("step", 0))
        steps_per_epoch = int(position.get("steps_per_epoch") or steps_per_epoch)
        record["position_source"] = POSITION_ENTRY
    else:
        epoch, step = epochs_completed, 0
        record["position_source"] = "meta.json epochs_completed"
    record["position"] = {"epoch": epoch, "step": step, "global_step": epoch * steps_per_epoch + step}
    since = max(entry["mtime"], child.launched)
    record["lost_since"] = "checkpoint" if entry["mtime"] >= child.launched else "process start"
    record["lost_s"] = round(killed_at - since, 2)
    if record["lost_since"] == "checkpoint" and steps_per_s:
        record["lost_steps_estimate"] = round((killed_at - since) * steps_per_s, 1)
    return record


def brief_position(position: dict[str, Any] | None) -> dict[str, Any] | None:
    keys = ("epoch", "step", "steps_per_epoch")
    return None if position is None else {key: position[key] for key in keys if key in position}


def check_finished(run_dir: Path, expected_epochs: list[int]) -> dict[str, Any]:
    """What a completed run must be: status, all its epochs (the reference run's history.csv
    epochs, once each), loadable models."""
    epochs = len(expected_epochs)
    meta, meta_error = read_meta(run_dir)
    status = run_status(run_dir)
    recorded = history_epochs(run_dir)
    problems = []
    if meta_error:
        problems.append(f"meta.json: {meta_error}")
    if status != "completed":
        problems.append(f"status {status}")
    if meta is not None and meta.get("epochs_completed") != epochs:
        problems.append(f"epochs_completed {meta.get('epochs_completed')} (expected {epochs})")
    if recorded != expected_epochs:
        problems.append(f"history.csv epochs {recorded} (expected {expected_epochs})")
    for name in ("best.keras", "last.keras"):
        path = run_dir / name
        if path.is_file():
            _, zip_error = read_position(path)
            error = zip_error or load_error(path)
            if error:
                problems.append(f"{name}: {error}")
        elif name == "best.keras":
            problems.append("no best.keras")
    return {
        "problems": problems,
        "val_accuracy": (meta or {}).get("val_accuracy"),
        "leftover_temporaries": dead_temporaries(run_dir),
    }


def run_cycle(
    index: int, settings: Settings, store: Path, reference: dict[str, Any], rng: random.Random
) -> dict[str, Any]:
    """Start a run, kill it (and its resumes, ``--kills-per-cycle`` times in all), resume it to
    the end; a run killed before its first checkpoint, which ``--resume`` refuses, is trained
    again as a new run."""
    runs = store / f"cycle-{index:02d}"
    runs.mkdir(parents=True)
    started = time.time()
    kills: list[dict[str, Any]] = []
    resumes: list[tuple[dict[str, Any], Child]] = []
    cycle: dict[str, Any] = {"cycle": index, "kills": kills, "missed": 0, "refused": 0, "lost": None}
    known: set[str] = set()
    children: list[Child] = []

    def launch(arguments: list[str], role: str) -> Child:
        children.append(Child(arguments, runs / f"process-{len(children) + 1}-{role}.log", role))
        return children[-1]

    child = launch(settings.new_run(runs), "new")
    run_dir: Path | None = None
    kills_left = settings.kills_per_cycle
    total_steps = settings.epochs * reference["steps_per_epoch"]
    while True:
        killed_at: float | None = None
        fraction = rng.random() if kills_left > 0 else None
        if fraction is not None:
            done = (kills[-1].get("position") or {}).get("global_step", 0) if kills else 0
            left = max(0.1, 1 - done / total_steps) if child.role == "resume" and total_steps else 1.0
            if reference["training_line_s"] is None:
                start: float | None = child.launched
            else:
                start = child.wait_for_line(TRAINING_LINE, child.launched + settings.timeout)
            if start is not None and child.sleep_until(start + fraction * reference["window_s"] * left):
                killed_at = child.kill()
        if killed_at is None:
            code = child.wait(max(1.0, child.launched + settings.timeout - time.time()))
            if child.role == "new":
                run_dir = the_run(runs, known) or run_dir
            if code == 0:
                cycle["missed"] += 1 if fraction is not None else 0
                break
            nothing_saved = bool(kills) and kills[-1]["checkpoint"] is None
            if child.role == "resume" and nothing_saved and child.error_line().startswith("Error"):
                cycle["refused"] += 1
                kills[-1]["resume_refused"] = child.error_line()
                known.add(run_dir.name if run_dir else "")
                child = launch(settings.new_run(runs), "new")
                continue
            cycle["lost"] = f"{child.role} exited {code}: {child.error_line()}"
            break
        if child.role == "new":
            run_dir = the_run(runs, known)
        record = inspect_kill(
            run_dir, child, killed_at, reference["steps_per_epoch"], reference["steps_per_s"]
        )
        record["fraction"] = round(fraction or 0.0, 4)
        kills.append(record)
        kills_left -= 1
        if run_dir is None:
            cycle["lost"] = "no run folder after the kill"
            break
        child = launch(settings.resume(run_dir), "resume")
        resumes.append((record, child))
    for record, resumed in resumes:
        record["resume_warnings"] = resumed.warnings()
    cycle["wall_s"] = round(time.time() - started, 2)
    # The training processes' own time, without this script's checks between them.
    cycle["processes_s"] = round(sum((child.ended or time.time()) - child.launched for child in children), 2)
    cycle["extra_s"] = round(cycle["processes_s"] - reference["wall_s"], 2)
    cycle["run_dir"] = str(run_dir) if run_dir else None
    if run_dir is not None and run_dir.is_dir():
        cycle.update(check_finished(run_dir, reference["history_epochs"]))
        if cycle["lost"] is None and cycle["problems"]:
            cycle["lost"] = "; ".join(cycle["problems"])
    elif cycle["lost"] is None:
        cycle["lost"] = "the run folder is gone"
    return cycle


def median_max(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2), "n": len(values)}


def summarize(cycles: list[dict[str, Any]], reference: dict[str, Any], total_s: float) -> dict[str, Any]:
    kills = [kill for cycle in cycles for kill in cycle["kills"]]
    after_checkpoint = [kill for kill in kills if kill.get("lost_since") == "checkpoint"]
    steps = [kill["lost_steps_estimate"] for kill in after_checkpoint if "lost_steps_estimate" in kill]
    return {
        "cycles": len(cycles),
        "kills": len(kills),
        "missed_kills": sum(cycle["missed"] for cycle in cycles),
        "runs_lost": sum(1 for cycle in cycles if cycle["lost"]),
        "checkpoints_checked": sum(len(kill.get("checkpoints", {})) for kill in kills),
        "checkpoints_unreadable": sum(len(kill.get("unreadable", [])) for kill in kills),
        "meta_unreadable": sum(1 for kill in kills if kill.get("meta_error")),
        "status_not_crashed": sum(
            1 for kill in kills if kill.get("status_after_kill") not in (None, "crashed")
        ),
        "killed_before_first_checkpoint": sum(1 for kill in kills if kill.get("checkpoint") is None),
        "resumes_refused": sum(cycle["refused"] for cycle in cycles),
        "resumed_from_previous": sum(
            1 for kill in kills if any("previous.keras" in line for line in kill.get("resume_warnings", []))
        ),
        "kills_with_dead_temporaries": sum(1 for kill in kills if kill.get("dead_temporaries")),
        "cycles_with_leftover_temporaries": sum(1 for cycle in cycles if cycle.get("leftover_temporaries")),
        "lost_s_all_kills": median_max([kill["lost_s"] for kill in kills]),
        "lost_s_after_a_checkpoint": median_max([kill["lost_s"] for kill in after_checkpoint]),
        "lost_steps_estimate": median_max(steps),
        "reference_wall_s": reference["wall_s"],
        "cycle_processes_s": median_max([cycle["processes_s"] for cycle in cycles]),
        "extra_s_per_cycle": median_max([cycle["extra_s"] for cycle in cycles]),
        "val_accuracy": median_max([c["val_accuracy"] for c in cycles if c.get("val_accuracy") is not None]),
        "total_s": round(total_s, 1),
    }


def print_table(summary: dict[str, Any], settings: Settings, reference: dict[str, Any]) -> None:
    def spread(key: str, unit: str = "") -> str:
        value = summary[key]
        if not value["n"]:
            return "-"
        return f"{value['median']}{unit} (max {value['max']}{unit}, n={value['n']})"

    every = settings.checkpoint_every or "epoch (the tool's default; checkpoint_every unknown)"
    rows = [
        ("dataset", settings.data.name),
        ("epochs, image size, checkpoint every", f"{settings.epochs}, {settings.image_size} px, {every}"),
        ("reference run (no kill)", f"{reference['wall_s']} s, val accuracy {reference['val_accuracy']}"),
        ("cycles", summary["cycles"]),
        ("kills", summary["kills"]),
        ("missed kills (process ended first)", summary["missed_kills"]),
        ("runs lost", summary["runs_lost"]),
        (
            "checkpoints unreadable",
            f"{summary['checkpoints_unreadable']} of {summary['checkpoints_checked']}",
        ),
        ("meta.json unreadable after a kill", summary["meta_unreadable"]),
        ("status not 'crashed' after a kill", summary["status_not_crashed"]),
        ("killed before the first checkpoint", summary["killed_before_first_checkpoint"]),
        ("resumes refused (nothing saved)", summary["resumes_refused"]),
        ("resumes from previous.keras", summary["resumed_from_previous"]),
        ("kills leaving dead temporaries", summary["kills_with_dead_temporaries"]),
        ("cycles ending with dead temporaries", summary["cycles_with_leftover_temporaries"]),
        ("work lost per kill, all kills", spread("lost_s_all_kills", " s")),
        ("work lost per kill, after a checkpoint", spread("lost_s_after_a_checkpoint", " s")),
        ("  in steps (estimate)", spread("lost_steps_estimate")),
        ("training processes per cycle", spread("cycle_processes_s", " s")),
        ("  more than the reference run", spread("extra_s_per_cycle", " s")),
        ("final val accuracy", spread("val_accuracy")),
        ("total time", f"{summary['total_s']} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value!s:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: hymenoptera)"
    )
    parser.add_argument("--cycles", type=int, default=20, help="start, kill, resume cycles (default 20)")
    parser.add_argument(
        "--kills-per-cycle", type=int, default=1, help="kills before the last resume (default 1)"
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every run (default 5)")
    parser.add_argument("--image-size", type=int, default=96, help="input size in pixels (default 96)")
    parser.add_argument(
        "--checkpoint-every",
        default="3steps",
        help="train.checkpoint_every (default 3steps, ~10 steps an epoch)",
    )
    parser.add_argument("--seed", type=int, default=12, help="seed of the kill moments (default 12)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any one process may take")
    parser.add_argument("--keep", action="store_true", help="keep the run store (its path is printed)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args()
    if args.cycles < 1 or args.kills_per_cycle < 0 or args.epochs < 1:
        parser.error("--cycles and --epochs must be at least 1, --kills-per-cycle at least 0")

    checkpoint_every: str | None = args.checkpoint_every
    if not checkpoint_every_known(args.data, args.checkpoint_every):
        print(
            f"Note: this imgclf rejects train.checkpoint_every={args.checkpoint_every}: "
            "checkpoints at every epoch's end only",
            file=sys.stderr,
        )
        checkpoint_every = None
    settings = Settings(args, checkpoint_every)
    rng = random.Random(args.seed)
    store = Path(tempfile.mkdtemp(prefix="imgclf-bench-faults-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    cycles: list[dict[str, Any]] = []
    try:
        reference = reference_run(settings, store / "reference")
        print(f"reference: {json.dumps(reference)}", file=sys.stderr, flush=True)
        for index in range(1, args.cycles + 1):
            cycle = run_cycle(index, settings, store, reference, rng)
            cycles.append(cycle)
            kills = ", ".join(
                f"{kill['life_s']} s into {kill['process']}: lost {kill['lost_s']} s "
                f"({kill.get('checkpoint') or 'no checkpoint'})"
                for kill in cycle["kills"]
            )
            print(
                f"cycle {index}: {cycle['wall_s']} s; {kills or 'no kill'}; "
                + (f"LOST: {cycle['lost']}" if cycle["lost"] else "completed"),
                file=sys.stderr,
                flush=True,
            )
    finally:
        kill_children()
        if args.keep:
            print(f"Store kept: {store}", file=sys.stderr)
        else:
            shutil.rmtree(store, ignore_errors=True)
    summary = summarize(cycles, reference, time.time() - started)
    if args.json:
        settings_out = {key: str(value) for key, value in vars(settings).items()}
        print(
            json.dumps(
                {"settings": settings_out, "reference": reference, "summary": summary, "cycles": cycles},
                indent=2,
                default=str,
            )
        )
    else:
        print_table(summary, settings, reference)


if __name__ == "__main__":
    main()
