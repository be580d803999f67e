"""Evaluate, export and predict under faults: a full disk at each write site (injected, and for
real on a small tmpfs), a read-only store, two exports or evaluations of one run at once (real
processes), and runs whose training did not complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imgclf_cli import liveness, store
from imgclf_cli.cli.app import app

NO_SPACE = os.strerror(errno.ENOSPC)
READ_ONLY = os.strerror(errno.EROFS)
# What evaluate, export and predict read of a run (its checkpoints are not needed).
RUN_FILES = ("config.yaml", "labels.json", "split.json", "best.keras", "meta.json")
VERIFY = ["--verify-images", "4"]
EVAL_FILES = (
    "confusion_matrix.csv",
    "misclassified.csv",
    "predictions.csv",
    "confusion_matrix.png",
    "misclassified.png",
    "reliability.png",
    "metrics.json",
)
PAGE = 4096

# Runs `imgclf ARGS...` with TensorFlow and Keras unimportable: a command that loads them fails
# with an ImportError traceback.
WITHOUT_TENSORFLOW = """
import importlib.abc
import sys

class BlockTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError(f"{name} is blocked: this failure must come before TensorFlow loads")
        return None

sys.meta_path.insert(0, BlockTensorFlow())
sys.argv = ["imgclf", *sys.argv[1:]]
from imgclf_cli.cli.app import main
main()
"""


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def succeeded(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return result


def child_environment() -> dict[str, str]:
    return {**os.environ, "IMGCLF_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


def copy_run(source: Path, destination: Path) -> Path:
    """The run's files and outputs, without checkpoints, locks or temporaries."""
    shutil.copytree(
        source, destination, ignore=shutil.ignore_patterns("last.keras", "previous.keras", "plots", ".*")
    )
    return destination


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def leftovers(run_dir: Path) -> list[str]:
    """Hidden files and folders a writer left behind; lock files stay by design (a lock is a
    ``flock`` on a file that must outlive its holders)."""
    return sorted(
        path.relative_to(run_dir).as_posix()
        for path in run_dir.rglob(".*")
        if not (path.is_file() and path.name.endswith(".lock"))
    )


def assert_failed_cleanly(result: Any, message: str | re.Pattern[str], remedy: str) -> None:
    """Exit code 1, one ``Error:`` line (``message``, or matching it), a hint ending with
    ``remedy``, no traceback."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    if isinstance(message, str):
        assert errors[0] == f"Error: {message}", result.stderr
    else:
        assert message.fullmatch(errors[0]), result.stderr
    hints = [line for line in result.stderr.splitlines() if line.startswith("Hint: free some space")]
    assert len(hints) == 1 and hints[0].endswith(remedy), result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def finished_run(trained_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained run with a successful evaluation and export of every format: the
    previous outputs that a failed evaluation or export must leave as they were."""
    run_dir = copy_run(
        trained_run["run_dir"], tmp_path_factory.mktemp("outputs") / trained_run["run_dir"].name
    )
    succeeded(invoke("evaluate", "--run", str(run_dir)))
    succeeded(invoke("export", "--run", str(run_dir), "--tflite", "--saved-model", "--onnx", *VERIFY))
    return run_dir


# Injected full disks: the write runs to its end, then the disk is full (the temporary exists).


def full_disk_at_file(file_name: str) -> Callable[[pytest.MonkeyPatch], None]:
    """A full disk when the atomic write of ``file_name`` (a CSV, a plot, a model file, a report)
    flushes its temporary."""

    def inject(monkeypatch: pytest.MonkeyPatch) -> None:
        real_atomic_write = store.atomic_write

        def atomic_write(path: Path, write: Callable[[Path], None], *args: Any, **kwargs: Any) -> None:
            if path.name != file_name:
                return real_atomic_write(path, write, *args, **kwargs)

            def write_then_fill(temporary: Path) -> None:
                write(temporary)
                raise OSError(errno.ENOSPC, NO_SPACE)

            return real_atomic_write(path, write_then_fill, *args, **kwargs)

        monkeypatch.setattr(store, "atomic_write", atomic_write)

    return inject


def full_disk_in_saved_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while TensorFlow writes a SavedModel (the TF Serving one, or the one the
    TFLite converter starts from), raised as TensorFlow raises it: an ``OpError`` whose text
    alone says why, after part of the folder was written."""
    import tensorflow as tf

    def save(obj: Any, export_dir: str, *args: Any, **kwargs: Any) -> None:
        folder = Path(export_dir)
        (folder / "variables").mkdir(parents=True)
        (folder / "saved_model.pb.tmp5c1e").write_bytes(b"\0" * 10_000)
        raise tf.errors.ResourceExhaustedError(None, None, f"{folder}/saved_model.pb.tmp5c1e; {NO_SPACE}")

    monkeypatch.setattr(tf.saved_model, "save", save)


EXPORT_SITES = [
    pytest.param(["--tflite"], full_disk_at_file("labels.txt"), "labels.txt", id="labels.txt"),
    pytest.param(["--tflite"], full_disk_at_file("model.tflite"), "model.tflite", id="tflite"),
    pytest.param(["--tflite"], full_disk_in_saved_model, "model.tflite", id="tflite-conversion"),
    pytest.param(["--saved-model"], full_disk_in_saved_model, "saved_model/1", id="saved_model"),
    pytest.param(["--onnx"], full_disk_at_file("model.onnx"), "model.onnx", id="onnx"),
    pytest.param(["--tflite"], full_disk_at_file("export.json"), "export.json", id="export.json"),
]


@pytest.mark.parametrize(("arguments", "inject", "failed_file"), EXPORT_SITES)
def test_a_full_disk_fails_export_in_one_line_and_keeps_the_previous_export(
    finished_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    inject: Callable[[pytest.MonkeyPatch], None],
    failed_file: str,
) -> None:
    run_dir = copy_run(finished_run, tmp_path / finished_run.name)
    export_dir = run_dir / "export"
    previous = snapshot(export_dir)
    inject(monkeypatch)
    result = invoke("export", "--run", str(run_dir), *arguments, *VERIFY)
    assert_failed_cleanly(result, f"Cannot write {export_dir / failed_file}: {NO_SPACE}", "--output DIR")
    assert snapshot(export_dir) == previous
    assert leftovers(run_dir) == []
    record = json.loads((export_dir / "export.json").read_text())
    assert record["passed"] is True and all(Path(item["path"]).exists() for item in record["artifacts"])


@pytest.mark.parametrize("file_name", EVAL_FILES)
def test_a_full_disk_fails_evaluate_in_one_line_and_keeps_the_previous_evaluation(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_name: str
) -> None:
    run_dir = copy_run(finished_run, tmp_path / finished_run.name)
    eval_dir = run_dir / "eval" / "val"
    previous = snapshot(eval_dir)
    full_disk_at_file(file_name)(monkeypatch)
    result = invoke("evaluate", "--run", str(run_dir))
    assert_failed_cleanly(result, f"Cannot write {eval_dir / file_name}: {NO_SPACE}", "(--run PATH)")
    assert snapshot(eval_dir) == previous
    assert leftovers(run_dir) == []
    assert json.loads((eval_dir / "metrics.json").read_text())["num_samples"] > 0


# Real full and read-only filesystems: small tmpfs mounts (root with CAP_SYS_ADMIN only).


@contextlib.contextmanager
def tmpfs(mount_point: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` at ``mount_point`` for the block; skips the test where mounting
    is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (with CAP_SYS_ADMIN) and mount(8)")
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            # Busy: a descriptor of this process is still open there. Detach the mount now; the
            # kernel frees it when the descriptor closes.
            subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def footprint(paths: list[Path]) -> int:
    """The bytes a tmpfs charges for these files: whole pages."""
    return sum(-(-path.stat().st_size // PAGE) * PAGE for path in paths)


def copy_run_files(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(source / name, destination / name)
    return destination


def free_bytes(folder: Path) -> int:
    status = os.statvfs(folder)
    return status.f_bavail * status.f_frsize


@pytest.mark.parametrize(
    ("command", "output", "remedy"),
    [
        (["evaluate"], "eval/val", "(--run PATH)"),
        (["export", "--tflite", "--saved-model", *VERIFY], "export", "--output DIR"),
    ],
    ids=["evaluate", "export"],
)
def test_a_really_full_disk_fails_in_one_line_and_leaves_nothing(
    finished_run: Path, tmp_path: Path, command: list[str], output: str, remedy: str
) -> None:
    """The store has room for the run and half of what the command writes (measured on the
    finished run): the disk fills up while it writes."""
    outputs = footprint([path for path in (finished_run / output).rglob("*") if path.is_file()])
    size = footprint([finished_run / name for name in RUN_FILES]) + outputs // 2
    with tmpfs(tmp_path / "full", size) as mount_point:
        run_dir = copy_run_files(finished_run, mount_point / finished_run.name)
        assert PAGE < free_bytes(mount_point) < outputs  # room for the write check, not the outputs
        result = invoke(command[0], "--run", str(run_dir), *command[1:])
        assert_failed_cleanly(
            result,
            re.compile(rf"Error: Cannot write {re.escape(str(run_dir / output))}\S*: {NO_SPACE}"),
            remedy,
        )
        assert sorted(path.name for path in run_dir.iterdir()) == sorted(RUN_FILES)


@pytest.fixture(scope="module")
def read_only_run(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the run on a tmpfs remounted read-only."""
    mount_point = tmp_path_factory.mktemp("read-only") / "store"
    with tmpfs(mount_point, 4 * 1024 * 1024):
        run_dir = copy_run_files(finished_run, mount_point / finished_run.name)
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield run_dir


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_a_read_only_store_fails_before_tensorflow_loads(
    read_only_run: Path, trained_run: dict[str, Path], command: str
) -> None:
    run = str(read_only_run)
    store_folder = read_only_run.parent
    image = str(next((trained_run["data_dir"] / "red").iterdir()))
    arguments, message = {
        "evaluate": (["evaluate", "--run", run], f"the evaluation to {read_only_run / 'eval' / 'val'}"),
        "export": (["export", "--run", run, "--tflite"], f"the export to {read_only_run / 'export'}"),
        "predict": (
            ["predict", image, "--run", run, "--output", str(store_folder / "predictions.json")],
            f"the results to {store_folder}",
        ),
    }[command]
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_environment(),
    )
    assert completed.returncode == 1, completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: Cannot write {message}: {READ_ONLY}"], completed.stderr
    assert "Hint: free some space or make" in completed.stderr
    assert "Traceback" not in completed.stderr


# Two real processes writing the same output folder.


def run_two_at_once(
    lock_folder: Path, waiting: str, arguments: list[str], tmp_path: Path
) -> list[dict[str, Any]]:
    """Start ``imgclf ARGUMENTS`` twice while this test holds ``lock_folder``'s output lock, let
    go once both wait for it (each says ``waiting``), and return each one's JSON document."""
    calls = [tmp_path / f"call-{index}" for index in range(2)]
    processes = []
    with store.output_lock(lock_folder):
        for call in calls:
            with open(f"{call}.out", "w") as stdout, open(f"{call}.err", "w") as stderr:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "imgclf_cli", *arguments, "--json"],
                        stdout=stdout,
                        stderr=stderr,
                        env=child_environment(),
                    )
                )
        deadline = time.monotonic() + 120
        while not all(waiting in Path(f"{call}.err").read_text() for call in calls):
            finished = [process for process in processes if process.poll() is not None]
            assert not finished and time.monotonic() < deadline, [Path(f"{c}.err").read_text() for c in calls]
            time.sleep(0.2)
    documents = []
    for process, call in zip(processes, calls, strict=True):
        assert process.wait(timeout=180) == 0, Path(f"{call}.err").read_text()
        documents.append(json.loads(Path(f"{call}.out").read_text()))
    return documents


def test_two_exports_of_one_run_at_once_both_succeed_one_after_the_other(
    finished_run: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished_run, tmp_path / "runs" / finished_run.name)
    export_dir = run_dir / "export"
    shutil.rmtree(export_dir)
    arguments = ["export", "--run", str(run_dir), "--tflite", *VERIFY]
    documents = run_two_at_once(export_dir, "another export is writing", arguments, tmp_path)
    record = json.loads((export_dir / "export.json").read_text())
    # The folder is one export's, whole: its report is one call's (their latencies differ), and
    # every file it lists is there, of the size it verified.
    assert record["artifacts"] in [document["artifacts"] for document in documents]
    assert record["passed"] is True
    for artifact in record["artifacts"]:
        assert Path(artifact["path"]).stat().st_size == artifact["size_bytes"]
    assert sorted(path.name for path in export_dir.iterdir()) == ["export.json", "labels.txt", "model.tflite"]
    assert leftovers(run_dir) == []


def test_two_evaluations_of_one_run_at_once_both_succeed_one_after_the_other(
    finished_run: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished_run, tmp_path / "runs" / finished_run.name)
    eval_dir = run_dir / "eval" / "val"
    arguments = ["evaluate", "--run", str(run_dir)]
    documents = run_two_at_once(eval_dir, "another evaluation is writing", arguments, tmp_path)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics in documents  # one call's report (their timings differ), not a mix
    assert sorted(path.name for path in eval_dir.iterdir()) == sorted(metrics["files"])
    rows = (eval_dir / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + metrics["num_samples"]
    assert leftovers(run_dir) == []


# Runs whose training did not complete are read, with one warning.


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def record_training_state(run_dir: Path, status: str) -> None:
    """``crashed``: recorded as running by a process that is gone; ``running``: by this one."""
    owner = liveness.current_owner()
    if status == store.STATUS_CRASHED:
        owner["pid"] = dead_pid()  # with this process's start time: a reused pid is not it
    recorded = store.STATUS_RUNNING if status == store.STATUS_CRASHED else status
    store.update_meta(run_dir, status=recorded, process=owner)


def reader_arguments(command: str, run_dir: Path, data_dir: Path) -> list[str]:
    image = str(next((data_dir / "red").iterdir()))
    return {
        "evaluate": ["evaluate", "--run", str(run_dir)],
        "export": ["export", "--run", str(run_dir), "--tflite", "--no-verify"],
        "predict": ["predict", image, "--run", str(run_dir)],
    }[command]


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_a_crashed_run_is_read_with_one_warning_saying_when_it_was_last_alive(
    finished_run: Path, trained_run: dict[str, Path], tmp_path: Path, command: str
) -> None:
    run_dir = copy_run(finished_run, tmp_path / finished_run.name)
    record_training_state(run_dir, store.STATUS_CRASHED)
    result = succeeded(invoke(*reader_arguments(command, run_dir, trained_run["data_dir"])))
    epochs = store.read_meta(run_dir)["epochs_completed"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    expected = (
        rf"Warning: run {re.escape(run_dir.name)} crashed after epoch {epochs} "
        r"\(last sign of life \d{4}-\d\d-\d\d \d\d:\d\d:\d\d, \d+ s ago\); using its best\.keras"
    )
    assert len(warnings) == 1 and re.fullmatch(expected, warnings[0]), result.stderr


@pytest.mark.parametrize(
    ("status", "described"),
    [(store.STATUS_RUNNING, "is still training"), (store.STATUS_INTERRUPTED, "was interrupted after epoch")],
)
def test_a_run_still_training_or_interrupted_is_read_with_one_warning(
    finished_run: Path, trained_run: dict[str, Path], tmp_path: Path, status: str, described: str
) -> None:
    run_dir = copy_run(finished_run, tmp_path / finished_run.name)
    record_training_state(run_dir, status)
    result = succeeded(invoke(*reader_arguments("predict", run_dir, trained_run["data_dir"])))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(f"Warning: run {run_dir.name} {described}")
    assert warnings[0].endswith("; using its best.keras")


def test_a_completed_run_is_read_without_a_warning(finished_run: Path, trained_run: dict[str, Path]) -> None:
    result = succeeded(invoke(*reader_arguments("predict", finished_run, trained_run["data_dir"])))
    assert "Warning:" not in result.stderr
