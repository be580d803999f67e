"""The run store: unique run folders, atomic writes, and one clear error per missing or damaged file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf_cli import store
from imgclf_cli.cli.app import app
from imgclf_cli.errors import RunFileError

runner = CliRunner()


def test_run_dirs_are_unique_and_writes_atomic(tmp_path: Path) -> None:
    first = store.create_run_dir(tmp_path, "imgclf-cnn")
    second = store.create_run_dir(tmp_path, "imgclf-cnn")
    assert first != second and first.is_dir() and second.is_dir()
    target = tmp_path / "file.json"
    store.atomic_write_json(target, {"a": 1})

    def failing_write(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(store.StoreWriteError, match="disk full"):
        store.atomic_write(target, failing_write)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["file.json"]


def test_a_write_reaches_the_disk_before_and_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append("fsync " + ("folder" if os.path.isdir(f"/proc/self/fd/{descriptor}") else "file"))
        real_fsync(descriptor)

    def replace(source, destination) -> None:  # type: ignore[no-untyped-def]
        events.append("rename")
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.atomic_write_json(tmp_path / "meta.json", {"status": "running"})
    assert events == ["fsync file", "rename", "fsync folder"]
    assert json.loads((tmp_path / "meta.json").read_text()) == {"status": "running"}


def test_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    import os

    dead = tmp_path / ".last.4194399.x1y2.keras"  # above Linux's largest pid: no such process
    alive = tmp_path / f".last.{os.getpid()}.z3.keras"  # a write in progress: kept
    other = tmp_path / ".best.4194399.q9.keras"  # another file's temporary: not this write's
    for leftover in (dead, alive, other):
        leftover.write_bytes(b"half a checkpoint")
    store.atomic_write_text(tmp_path / "last.keras", "whole")
    assert not dead.exists() and alive.exists() and other.exists()
    assert (tmp_path / "last.keras").read_text() == "whole"


def test_an_unwritable_store_fails_before_training_in_one_line(tmp_path: Path, image_folders: Path) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_text("not a folder")
    result = runner.invoke(app, ["train", str(image_folders), "--runs-dir", str(occupied / "runs")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"Error: Cannot write runs to {occupied / 'runs'}: Not a directory")
    assert lines[1].startswith("Hint:") and "--runs-dir" in lines[1] and "Traceback" not in result.stderr


@pytest.fixture
def run_copy(trained_run: dict, tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / trained_run["run_dir"].name
    shutil.copytree(trained_run["run_dir"], run_dir)
    return run_dir


def test_accessors_read_what_training_wrote(run_copy: Path, trained_run: dict) -> None:
    summary = trained_run["summary"]
    assert store.read_labels(run_copy) == summary["classes"]
    manifest = store.read_manifest(run_copy)
    assert manifest.classes == summary["classes"] and len(manifest.val) == summary["num_val"]
    assert store.read_config_values(run_copy)["train"]["epochs"] == 10
    history = store.read_history(run_copy)
    assert [int(row["epoch"]) for row in history] == list(range(1, summary["epochs_run"] + 1))
    assert store.read_meta(run_copy)["status"] == store.STATUS_COMPLETED
    assert store.best_model_path(run_copy).name == store.BEST_MODEL_FILE
    assert store.has_checkpoint(run_copy)


@pytest.mark.parametrize(
    ("file_name", "content", "read"),
    [
        (store.LABELS_FILE, '["red", ', store.read_labels),
        (store.LABELS_FILE, '{"red": 1}', store.read_labels),
        (store.SPLIT_FILE, '{"root": "/x"}', store.read_manifest),
        (store.CONFIG_FILE, "train: [unclosed", store.read_config_values),
        (store.HISTORY_FILE, "epoch,loss\n1,not-a-number\n", store.read_history),
        (store.META_FILE, '{"status": ', store.read_meta),
    ],
)
def test_a_damaged_file_is_one_error_naming_it(run_copy: Path, file_name: str, content: str, read) -> None:  # type: ignore[no-untyped-def]
    (run_copy / file_name).write_text(content)
    with pytest.raises(RunFileError) as raised:
        read(run_copy)
    assert str(run_copy / file_name) in raised.value.message
    assert "damaged" in raised.value.message and raised.value.hint


@pytest.mark.parametrize(
    ("file_name", "read"),
    [
        (store.LABELS_FILE, store.read_labels),
        (store.SPLIT_FILE, store.read_manifest),
        (store.CONFIG_FILE, store.read_config_values),
        (store.BEST_MODEL_FILE, store.best_model_path),
    ],
)
def test_a_missing_file_is_one_error_naming_it(run_copy: Path, file_name: str, read) -> None:  # type: ignore[no-untyped-def]
    (run_copy / file_name).unlink()
    with pytest.raises(RunFileError, match=f"has no {file_name}") as raised:
        read(run_copy)
    assert str(run_copy / file_name) in raised.value.message


def test_files_that_may_not_exist_yet_read_as_empty(tmp_path: Path) -> None:
    run_dir = store.create_run_dir(tmp_path, "imgclf-cnn")
    assert store.read_meta(run_dir) == {}
    assert store.read_history(run_dir) == []
    assert not store.has_checkpoint(run_dir)
    store.write_history(
        run_dir,
        [
            {
                "epoch": 1,
                "loss": 0.5,
                "accuracy": 0.75,
                "val_loss": 0.25,
                "val_accuracy": 1.0,
                "learning_rate": 0.001,
                "seconds": 2.0,
            }
        ],
    )
    assert store.read_history(run_dir)[0]["val_accuracy"] == 1.0


def test_a_damaged_meta_does_not_break_the_listing(run_copy: Path) -> None:
    other = run_copy.parent / (run_copy.name + "-copy")
    shutil.copytree(run_copy, other)
    (other / store.META_FILE).write_text("{")
    assert store.run_status(other) is None
    assert store.resolve_run("latest", run_copy.parent) == run_copy


def test_the_cli_reports_a_damaged_run_file_in_one_line(run_copy: Path) -> None:
    (run_copy / store.LABELS_FILE).write_text("[")
    result = runner.invoke(app, ["evaluate", "--run", str(run_copy)])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error:") and "labels.json is damaged" in result.stderr
    assert "Traceback" not in result.output


def test_outputs_of_a_replaced_best_model_are_stale_until_made_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store.update_meta(run, status="running")
    assert store.mark_outputs_stale(run) == [] and "stale" not in store.read_meta(run)  # a new run
    (run / store.EXPORT_DIR).mkdir()
    assert store.mark_outputs_stale(run) == []  # an empty folder holds nothing made from the model
    (run / store.EXPORT_DIR / "model.tflite").write_bytes(b"old")
    assert store.mark_outputs_stale(run) == ["export"]
    (run / store.EVAL_DIR / "val").mkdir(parents=True)
    assert store.mark_outputs_stale(run) == ["eval", "export"] == store.read_meta(run)["stale"]
    store.clear_stale(run, "export")
    assert store.stale_outputs(run) == ["eval"] == store.read_meta(run)["stale"]


def test_a_run_being_deleted_is_not_a_run(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    kept = store.create_run_dir(root, "imgclf-cnn", name="kept")
    store.update_meta(kept, status=store.STATUS_COMPLETED)
    # `imgclf runs rm` renames a run to a hidden trash folder before removing it.
    trash = root / ".trash-20991231-000000-imgclf-cnn-123"
    trash.mkdir()
    store.atomic_write_json(trash / store.META_FILE, {"status": store.STATUS_COMPLETED})
    assert store.list_runs(root) == [kept]
    assert store.resolve_run("latest", root) == kept
