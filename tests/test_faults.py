"""The run store under faults: kill -9 mid-epoch and resume, crashed runs, locks, damaged and
unwritable checkpoints. Killed trainings are real processes killed with SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from imgclf_cli import liveness, store
from imgclf_cli.checkpointing import PREVIOUS_CHECKPOINT_FILE, choose_checkpoint, read_position
from imgclf_cli.errors import RunFileError
from imgclf_cli.liveness import RunBusyError, TrainingLock

from conftest import make_class_folders

# Augmentation and dropout stay on: a checkpoint keeps their random generators' states, so even
# they draw what the uninterrupted run drew.
# fmt: off
EXACT_TRAINING = [
    "--epochs", "3", "--image-size", "32", "--batch-size", "8", "--seed", "7",
    "--set", "model.width=8", "--set", "train.warmup_epochs=0", "--set", "train.checkpoint_every=2steps",
]
# fmt: on

# Runs the CLI in this process, SIGKILLing it right after training step STEP (1-based) of
# epoch EPOCH (1-based) ended: a real kill -9 at a chosen moment, with no hook in the product.
CRASH_AT_STEP = """
import os, signal, sys
from imgclf_cli import training_callbacks
epoch_to_kill, step_to_kill = int(sys.argv[1]), int(sys.argv[2])
original = training_callbacks.RunRecorder.on_train_batch_end
def on_train_batch_end(self, batch, logs=None):
    original(self, batch, logs)
    if len(self.state.history) + 1 == epoch_to_kill and self.step_in_epoch == step_to_kill:
        os.kill(os.getpid(), signal.SIGKILL)
training_callbacks.RunRecorder.on_train_batch_end = on_train_batch_end
sys.argv = ["imgclf", *sys.argv[3:]]
from imgclf_cli.cli.app import main
main()
"""


def imgclf(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgclf_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
    )


def env() -> dict[str, str]:
    return {**os.environ, "IMGCLF_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


def train_killed_at(epoch: int, step: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CRASH_AT_STEP, str(epoch), str(step), "train", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env(),
    )


def final_weights(run_dir: Path) -> list[np.ndarray]:
    from imgclf_cli.models import load_model

    return load_model(store.last_checkpoint_path(run_dir), compile=False).get_weights()


def only_run(runs: Path) -> Path:
    (run,) = store.list_runs(runs)
    return run


@pytest.fixture(scope="module")
def exact_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("faults") / "data", per_class=14)


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(exact_data: Path, tmp_path: Path) -> None:
    whole = imgclf("train", str(exact_data), "--runs-dir", str(tmp_path / "whole"), *EXACT_TRAINING)
    assert whole.returncode == 0, whole.stderr
    killed_store = tmp_path / "killed"
    killed = train_killed_at(2, 3, str(exact_data), "--runs-dir", str(killed_store), *EXACT_TRAINING)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = only_run(killed_store)

    # The kill came one step after the checkpoint of step 2 of epoch 2: that step is all it cost.
    position = read_position(store.last_checkpoint_path(run_dir))
    assert position is not None and (position.epoch, position.step) == (1, 2)
    assert store.read_meta(run_dir)["status"] == store.STATUS_RUNNING
    state = store.run_state(run_dir)
    assert state.status == store.STATUS_CRASHED and state.last_seen
    # Readers say so: `latest` names the crashed run, and evaluate's error too.
    with pytest.raises(Exception, match="crashed after epoch 1") as raised:
        store.resolve_run("latest", killed_store)
    assert f"--resume {run_dir.name}" in str(raised.value)
    evaluate = imgclf("evaluate", "--runs-dir", str(killed_store))
    assert evaluate.returncode == 1 and "crashed after epoch 1" in evaluate.stderr
    assert "Traceback" not in evaluate.stderr

    resumed = imgclf("train", "--resume", run_dir.name, "--runs-dir", str(killed_store))
    assert resumed.returncode == 0, resumed.stderr
    said = resumed.stderr + resumed.stdout
    assert f"Run {run_dir.name} crashed after epoch 1 (last sign of life" in said
    assert "from epoch 2 of 3, step 3 of" in said
    assert store.read_meta(run_dir)["status"] == store.STATUS_COMPLETED
    whole_dir = only_run(tmp_path / "whole")
    # The same steps on the same batches with the same random draws, from the same weights and
    # optimizer state: equal to the last bit here (measured: max difference 0.0). The tolerance
    # leaves room for CPU kernels whose multi-threaded sums may be ordered differently elsewhere,
    # far below what one step more or less changes (an AdamW step moves a weight by up to about
    # the learning rate, 2e-3).
    for expected, got in zip(final_weights(whole_dir), final_weights(run_dir), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The interrupted epoch's loss and accuracy cover all its steps, as the uninterrupted one's.
    for expected, got in zip(store.read_history(whole_dir), store.read_history(run_dir), strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            assert got[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-5), key


# --- liveness and locks ---------------------------------------------------------------------


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def test_a_process_is_alive_only_while_it_is_the_same_process() -> None:
    owner = liveness.current_owner()
    assert liveness.owner_alive(owner, heartbeat_age=0.0)
    assert not liveness.owner_alive({**owner, "pid": dead_pid()}, heartbeat_age=0.0)
    if owner["process_start"] is not None:  # Linux: a reused pid is another process
        assert not liveness.owner_alive({**owner, "process_start": owner["process_start"] + 1}, 0.0)
    elsewhere = {**owner, "host": "another-host", "pid": 1}
    assert liveness.owner_alive(elsewhere, heartbeat_age=5.0)
    assert not liveness.owner_alive(elsewhere, heartbeat_age=liveness.STALE_AFTER_SECONDS + 1)


def running_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "20260101-000000-imgclf-cnn"
    run_dir.mkdir(parents=True)
    store.update_meta(run_dir, run_id=run_dir.name, status=store.STATUS_RUNNING, epochs_completed=2)
    return run_dir


def test_a_running_run_whose_process_died_is_crashed(tmp_path: Path) -> None:
    run_dir = running_run(tmp_path)
    lock = TrainingLock(run_dir).acquire()
    assert store.run_state(run_dir).status == store.STATUS_RUNNING
    # As a kill -9 leaves it: the lock file stays, its owner gone (here: a pid that has exited).
    lock.release(remove=False)
    owner = json.loads((run_dir / liveness.LOCK_FILE).read_text())
    (run_dir / liveness.LOCK_FILE).write_text(json.dumps({**owner, "pid": dead_pid()}))
    old = time.time() - 600
    os.utime(run_dir / liveness.LOCK_FILE, (old, old))
    state = store.run_state(run_dir)
    assert state.status == store.STATUS_CRASHED
    assert state.last_seen is not None and "10 min ago" in state.last_seen
    assert "crashed after epoch 2" in state.describe(run_dir.name)
    # A run from another host is judged by its heartbeat alone.
    (run_dir / liveness.LOCK_FILE).write_text(json.dumps({**owner, "host": "another-host"}))
    os.utime(run_dir / liveness.LOCK_FILE)
    assert store.run_state(run_dir).status == store.STATUS_RUNNING
    os.utime(run_dir / liveness.LOCK_FILE, (old, old))
    assert store.run_state(run_dir).status == store.STATUS_CRASHED


HOLD_LOCK = """
import sys, time
from collections.abc import Callable, Iterator
from pathlib import Path
from imgclf_cli.liveness import TrainingLock
TrainingLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_one_trainer_per_run_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    from imgclf_cli.resuming import find_resumable

    run_dir = running_run(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunBusyError, match=f"process {holder.pid}"):
            TrainingLock(run_dir).acquire()
        with pytest.raises(RunBusyError, match="being trained right now"):
            find_resumable(run_dir.name, tmp_path / "runs")
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left the lock file behind; its owner is gone, so the lock is free.
    assert (run_dir / liveness.LOCK_FILE).exists()
    assert store.run_state(run_dir).status == store.STATUS_CRASHED
    assert find_resumable(run_dir.name, tmp_path / "runs") == run_dir
    with TrainingLock(run_dir):
        assert liveness.read_owner(run_dir / liveness.LOCK_FILE)["pid"] == os.getpid()
    assert not (run_dir / liveness.LOCK_FILE).exists()


def test_two_resumes_of_one_run_cannot_both_proceed(trained_run: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy = copied_run(trained_run["run_dir"], runs)
    store.update_meta(copy, status=store.STATUS_INTERRUPTED)
    resume = ["train", "--resume", copy.name, "--runs-dir", str(runs), "--epochs", "60"]
    first = subprocess.Popen(
        [sys.executable, "-m", "imgclf_cli", *resume],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        # The second starts once the first holds the run (its lock file appears).
        deadline = time.monotonic() + 60
        while not (copy / liveness.LOCK_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = imgclf(*resume)
        assert second.returncode == 1, second.stderr
        assert "being trained right now" in second.stderr and "Traceback" not in second.stderr
        assert first.wait(timeout=180) == 0, first.stderr.read() if first.stderr else ""
    finally:
        first.kill()
        first.communicate()
    assert store.read_meta(copy)["status"] == store.STATUS_COMPLETED
    assert len(store.read_history(copy)) > 10  # trained further once (early stopping may end it)


# --- damaged runs ---------------------------------------------------------------------------


def copied_run(run_dir: Path, runs: Path) -> Path:
    import shutil

    runs.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run_dir, runs / run_dir.name))


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(
    trained_run: dict[str, Path], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    copy = copied_run(trained_run["run_dir"], runs)
    last = store.last_checkpoint_path(copy)
    epochs = len(store.read_history(copy))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    point = choose_checkpoint(copy, last)
    assert point.path.name == PREVIOUS_CHECKPOINT_FILE and point.position is not None
    assert point.position.epoch == epochs - 1
    assert point.note is not None and "last.keras is damaged" in point.note

    resumed = imgclf("train", "--resume", copy.name, "--runs-dir", str(runs), "--epochs", str(epochs + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint before it" in resumed.stderr
    assert f"Epochs {epochs}-{epochs} are trained again" in resumed.stderr
    assert len(store.read_history(copy)) == epochs + 1
    assert read_position(last) is not None  # a new, intact last.keras

    for checkpoint in (last, copy / PREVIOUS_CHECKPOINT_FILE):
        checkpoint.write_bytes(b"not a zip")
    with pytest.raises(RunFileError, match="no intact earlier checkpoint"):
        choose_checkpoint(copy, last)
    refused = imgclf("train", "--resume", copy.name, "--runs-dir", str(runs), "--epochs", str(epochs + 5))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "last.keras is damaged" in refused.stderr


@pytest.mark.parametrize("damaged", [store.META_FILE, store.CONFIG_FILE])
def test_a_damaged_meta_or_config_is_named_not_a_traceback(
    trained_run: dict[str, Path], tmp_path: Path, damaged: str
) -> None:
    runs = tmp_path / "runs"
    copy = copied_run(trained_run["run_dir"], runs)
    store.update_meta(copy, status=store.STATUS_INTERRUPTED)
    (copy / damaged).write_text('{"status": "runn' if damaged == store.META_FILE else "train: [epochs: 3\n")
    result = imgclf("train", "--resume", copy.name, "--runs-dir", str(runs), "--epochs", "20")
    assert result.returncode == 1, result.stderr
    assert str(copy / damaged) in result.stderr and "damaged" in result.stderr
    assert "Traceback" not in result.stderr


# --- a full disk, a read-only store -----------------------------------------------------------


TINY_FLAGS = {"train.epochs": 3, "data.image_size": 32, "data.batch_size": 8, "model.width": 8}


def fill_disk_on(monkeypatch: pytest.MonkeyPatch, file_name: str, on_write: int) -> None:
    """The ``on_write``-th atomic write of ``file_name`` finds the disk full, once its data is
    partly written (as ENOSPC strikes in the middle of a real write)."""
    original = store.atomic_write
    writes = {"count": 0}

    def atomic_write(path: Path, write, suffix: str = "", **options) -> None:  # type: ignore[no-untyped-def]
        if path.name == file_name:
            writes["count"] += 1
            if writes["count"] == on_write:

                def write_then_fill(temporary: Path) -> None:
                    write(temporary)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                return original(path, write_then_fill, suffix, **options)
        return original(path, write, suffix, **options)

    monkeypatch.setattr(store, "atomic_write", atomic_write)


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files, a lock or a cache left in a run folder."""
    return sorted(path.name for path in run_dir.rglob(".*"))


@pytest.mark.parametrize(
    ("file_name", "on_write"),
    [
        (store.LAST_CHECKPOINT_FILE, 2),
        (store.BEST_MODEL_FILE, 2),
        (store.HISTORY_FILE, 2),
        (store.META_FILE, 7),
    ],
)
def test_a_full_disk_during_training_fails_the_run_cleanly(
    exact_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_name: str, on_write: int
) -> None:
    from imgclf_cli.training import train

    fill_disk_on(monkeypatch, file_name, on_write)
    runs = tmp_path / "runs"
    with pytest.raises(store.StoreWriteError) as raised:
        train(exact_data, flags=TINY_FLAGS, runs_dir=runs)
    error = raised.value
    assert error.errno == errno.ENOSPC and "No space left on device" in error.message
    assert file_name in error.message and error.hint is not None and "--resume" in error.hint
    run_dir = only_run(runs)
    meta = store.read_meta(run_dir)
    assert meta["status"] == store.STATUS_FAILED and "No space left" in meta["failure"]
    assert leftovers(run_dir) == []
    position = read_position(store.last_checkpoint_path(run_dir))
    assert position is not None and position.epoch >= 1  # the checkpoint before the failure

    if file_name == store.LAST_CHECKPOINT_FILE:
        # Space freed, the run goes on from the checkpoint the full disk left intact.
        monkeypatch.undo()
        assert position.epoch == 1
        result = train(resume=run_dir.name, runs_dir=runs)
        assert result.status == store.STATUS_COMPLETED and result.epochs_run == 3


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount(options)``: a tmpfs mounted with ``options`` (e.g. ``size=1m``); unmounted after.

    A real full or read-only filesystem, as only root can make one (file modes do not stop
    root's writes); skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_disk_that_fills_during_training_ends_the_run_cleanly(
    exact_data: Path, small_disk: Callable[[str], Path]
) -> None:
    # 1 MiB holds epoch 1 (best.keras ~250 kB, last.keras ~440 kB) but not epoch 2's last.keras
    # beside its predecessor: the disk fills while a checkpoint is written.
    runs = small_disk("size=1m")
    tiny = ["--epochs", "4", "--image-size", "32", "--batch-size", "8", "--set", "model.width=8"]
    result = imgclf("train", str(exact_data), "--runs-dir", str(runs), *tiny)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "intact" in result.stderr
    run_dir = only_run(runs)
    assert store.read_meta(run_dir)["status"] == store.STATUS_FAILED
    assert leftovers(run_dir) == []
    position = read_position(store.last_checkpoint_path(run_dir))
    assert position is not None and position.epoch >= 1
    assert len(store.read_history(run_dir)) == position.epoch


def test_a_read_only_store_fails_before_training(
    trained_run: dict[str, Path], exact_data: Path, small_disk: Callable[[str], Path]
) -> None:
    runs = small_disk("size=8m")
    copy = copied_run(trained_run["run_dir"], runs)
    store.update_meta(copy, status=store.STATUS_INTERRUPTED)
    remount = subprocess.run(["mount", "-o", "remount,ro", str(runs)], capture_output=True, text=True)
    assert remount.returncode == 0, remount.stderr
    for args in (
        ["train", str(exact_data), "--runs-dir", str(runs)],
        ["train", "--resume", copy.name, "--runs-dir", str(runs), "--epochs", "20"],
    ):
        started = time.monotonic()
        result = imgclf(*args)
        assert result.returncode == 1, result.stderr
        assert "Read-only file system" in result.stderr and "Traceback" not in result.stderr
        assert time.monotonic() - started < 3.0  # before TensorFlow loads (~4 s here)


# --- concurrency ------------------------------------------------------------------------------


def test_two_trainings_into_one_store_and_a_prediction_meanwhile(
    trained_run: dict[str, Path], exact_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    tiny = ["--epochs", "3", "--image-size", "32", "--batch-size", "8", "--set", "model.width=8"]
    command = [sys.executable, "-m", "imgclf_cli", "train", str(exact_data), "--runs-dir", str(runs), *tiny]
    trainings = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        for _ in range(2)
    ]
    try:
        image = next((exact_data / "red").iterdir())
        prediction = imgclf(
            "predict",
            str(image),
            "--run",
            trained_run["run_dir"].name,
            "--runs-dir",
            str(trained_run["runs_dir"]),
        )
        assert prediction.returncode == 0, prediction.stderr
        for training in trainings:
            assert training.wait(timeout=180) == 0, training.stderr.read() if training.stderr else ""
    finally:
        for training in trainings:
            training.kill()
            training.communicate()
    first, second = store.list_runs(runs)
    assert first.name != second.name
    for run_dir in (first, second):
        assert store.read_meta(run_dir)["status"] == store.STATUS_COMPLETED
        assert len(store.read_history(run_dir)) == 3
        assert read_position(store.last_checkpoint_path(run_dir)) is not None
    assert store.resolve_run("latest", runs) == second


# --- settings and the heartbeat ---------------------------------------------------------------


def test_checkpoint_every_values() -> None:
    from imgclf_cli.checkpointing import DEFAULT_MAX_MINUTES, parse_checkpoint_every
    from imgclf_cli.config import resolve_config
    from imgclf_cli.errors import ConfigError

    every_epoch = parse_checkpoint_every("epoch")
    assert every_epoch.steps is None and every_epoch.seconds == DEFAULT_MAX_MINUTES * 60
    assert not every_epoch.due(steps_since=10_000, seconds_since=599) and every_epoch.due(0, 600)
    steps = parse_checkpoint_every("50steps")
    assert (steps.steps, steps.seconds) == (50, None) and steps.due(50, 0) and not steps.due(49, 1e6)
    assert parse_checkpoint_every("5m").seconds == 300
    for wrong in ("often", "0steps", "-3steps", ""):
        with pytest.raises(ValueError):
            parse_checkpoint_every(wrong)
    with pytest.raises(ConfigError, match="train.checkpoint_every' expects epoch, a number of steps"):
        resolve_config(overrides=["train.checkpoint_every=often"])


def test_the_heartbeat_beats_while_the_lock_is_held(tmp_path: Path) -> None:
    run_dir = running_run(tmp_path)
    lock_file = run_dir / liveness.LOCK_FILE
    with TrainingLock(run_dir, heartbeat_seconds=0.05):
        old = time.time() - 600
        os.utime(lock_file, (old, old))
        time.sleep(0.3)
        assert time.time() - lock_file.stat().st_mtime < 5
    assert not lock_file.exists()


def test_a_run_killed_before_its_first_checkpoint_trains_again_in_its_folder(
    exact_data: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    tiny = ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--set", "model.width=8"]
    killed = train_killed_at(1, 2, str(exact_data), "--runs-dir", str(runs), *tiny)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = only_run(runs)
    assert not store.has_checkpoint(run_dir)
    assert store.run_state(run_dir).status == store.STATUS_CRASHED
    resumed = imgclf("train", "--resume", "latest", "--runs-dir", str(runs))
    assert resumed.returncode == 0, resumed.stderr
    assert "has no checkpoint yet: training it from the start" in resumed.stderr
    assert only_run(runs) == run_dir and store.read_meta(run_dir)["status"] == store.STATUS_COMPLETED
    assert len(store.read_history(run_dir)) == 2
