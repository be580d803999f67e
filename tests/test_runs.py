"""``imgclf runs``: list, show, compare, rm and prune on a store built by hand, with a run in every
status, a damaged ``meta.json``, half-deleted runs and the trash of an interrupted ``rm``.

Runs are written through the store's own writers (``store.update_meta``, ``write_config``...),
as training writes them, without training anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf_cli import liveness, run_catalog, run_cleanup, store
from imgclf_cli.cli import runs as runs_cli
from imgclf_cli.cli.app import app
from imgclf_cli.config import Config
from imgclf_cli.dataset import Sample, SplitManifest
from imgclf_cli.liveness import TrainingLock

runner = CliRunner()
CLASSES = ["blue", "green", "red"]
FINGERPRINT = "0123456789abcdef"

COMPLETED_OLD = "20260101-090000-imgclf-cnn-baseline"
COMPLETED_NEW = "20260102-090000-imgclf-cnn-fast"
RUNNING = "20260103-090000-imgclf-cnn"
INTERRUPTED = "20260104-090000-imgclf-cnn"
FAILED = "20260105-090000-imgclf-cnn"
CRASHED = "20260106-090000-imgclf-cnn"
DAMAGED_META = "20260107-090000-imgclf-cnn"
NO_META = "20260108-090000-imgclf-cnn"
NO_MODEL = "20260109-090000-imgclf-cnn"
TRASH = f".trash-20251231-090000-imgclf-cnn-{os.getpid()}"


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def history_rows(epochs: int, best_accuracy: float) -> list[dict[str, float]]:
    return [
        {
            "epoch": epoch,
            "loss": 1.0 / epoch,
            "accuracy": best_accuracy * epoch / epochs,
            "val_loss": 1.2 / epoch,
            "val_accuracy": best_accuracy * epoch / epochs,
            "learning_rate": 0.002,
            "seconds": 1.5,
        }
        for epoch in range(1, epochs + 1)
    ]


def make_run(
    root: Path,
    run_id: str,
    status: str,
    epochs: int = 0,
    best_accuracy: float = 0.8,
    overrides: dict[str, object] | None = None,
    **meta: object,
) -> Path:
    """A run folder as ``imgclf train`` leaves it, without a model worth loading."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    config = Config()
    config.data.image_size = 32
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        setattr(getattr(config, section), key, value)
    store.write_config(run_dir, config)
    store.write_labels(run_dir, CLASSES)
    samples = [
        Sample(f"/data/colours/{name}/{index}.png", label)
        for label, name in enumerate(CLASSES)
        for index in range(4)
    ]
    store.write_manifest(
        run_dir, SplitManifest("/data/colours", "flat", CLASSES, samples[::2], samples[1::2])
    )
    fields: dict[str, object] = {
        "run_id": run_id,
        "status": status,
        "created": f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T09:00:00+0000",
        "model": "imgclf-cnn",
        "image_size": [32, 32],
        "dataset": {
            "root": "/data/colours",
            "layout": "flat",
            "fingerprint": FINGERPRINT,
            "num_images": 12,
            "num_train": 6,
            "num_val": 6,
            "num_test": 0,
            "train_per_class": dict.fromkeys(CLASSES, 2),
        },
        "skipped_files": [{"path": "/data/colours/red/bad.png", "reason": "truncated"}],
        "epochs_completed": epochs,
    }
    if epochs:
        rows = history_rows(epochs, best_accuracy)
        store.write_history(run_dir, rows)
        (run_dir / store.BEST_MODEL_FILE).write_bytes(b"\0" * 2048)
        (run_dir / store.LAST_CHECKPOINT_FILE).write_bytes(b"\0" * 4096)
        if status != store.STATUS_RUNNING:
            fields.update(
                best_epoch=epochs, val_accuracy=rows[-1]["val_accuracy"], val_loss=rows[-1]["val_loss"]
            )
            fields.update(train_seconds=1.5 * epochs, finished=fields["created"])
    fields.update(meta)
    store.update_meta(run_dir, **fields)
    return run_dir


def add_evaluation(run_dir: Path, f1: dict[str, float], accuracy: float) -> None:
    per_class = {
        name: {"precision": score, "recall": score, "f1": score, "support": 2} for name, score in f1.items()
    }
    metrics = {"dataset": "val", "num_samples": 6, "accuracy": accuracy, "f1_macro": sum(f1.values()) / 3}
    metrics.update(f1_weighted=0.7, ece=0.05, log_loss=0.4, num_misclassified=1, per_class=per_class)
    folder = store.eval_dir(run_dir, "val")
    store.atomic_write_json(folder / "metrics.json", metrics)
    (folder / "confusion_matrix.png").write_bytes(b"\x89PNG fake")


def add_export(run_dir: Path) -> None:
    folder = store.export_dir(run_dir)
    (folder / "saved_model" / "1").mkdir(parents=True)
    (folder / "saved_model" / "1" / "saved_model.pb").write_bytes(b"\0" * 300)
    (folder / "model.tflite").write_bytes(b"\0" * 1000)
    (folder / "model_int8.tflite").write_bytes(b"\0" * 500)
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    artifact = {
        "format": "tflite",
        "quantize": "none",
        "quantization": "float32",
        "path": str(folder / "model.tflite"),
    }
    artifact.update(
        size_bytes=1000, agreement=1.0, max_abs_diff=0.0001, accuracy=0.9, latency_ms=0.4, passed=True
    )
    store.atomic_write_json(
        folder / "export.json", {"passed": True, "verified": True, "artifacts": [artifact]}
    )


@pytest.fixture
def store_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A store with a run in every status; the running one's lock is held by this process."""
    root = tmp_path / "runs"
    monkeypatch.setenv(store.RUNS_DIR_ENV, str(root))
    old = make_run(
        root, COMPLETED_OLD, "completed", epochs=3, best_accuracy=0.9, overrides={"model.width": 8}
    )
    add_evaluation(old, {"blue": 1.0, "green": 0.8, "red": 0.6}, accuracy=0.85)
    add_export(old)
    new = make_run(root, COMPLETED_NEW, "completed", epochs=2, best_accuracy=0.7)
    store.update_meta(new, stale=["eval"])
    add_evaluation(new, {"blue": 0.5, "green": 0.9, "red": 0.7}, accuracy=0.7)
    running = make_run(
        root, RUNNING, "running", epochs=1, best_accuracy=0.6, process=liveness.current_owner()
    )
    make_run(root, INTERRUPTED, "interrupted", epochs=1, best_accuracy=0.5, stopped_by="interrupt")
    make_run(root, FAILED, "failed", failure="StoreWriteError: No space left on device")
    crashed = make_run(root, CRASHED, "running", epochs=2)
    dead_owner = {**liveness.current_owner(), "pid": dead_pid()}
    (crashed / liveness.LOCK_FILE).write_text(json.dumps(dead_owner))
    old_time = time.time() - 600
    os.utime(crashed / liveness.LOCK_FILE, (old_time, old_time))
    damaged = make_run(root, DAMAGED_META, "completed", epochs=1)
    (damaged / store.META_FILE).write_text('{"status": "compl')
    no_meta = make_run(root, NO_META, "completed", epochs=1)
    (no_meta / store.META_FILE).unlink()
    (no_meta / store.LABELS_FILE).unlink()
    no_model = make_run(root, NO_MODEL, "completed", epochs=1, best_accuracy=0.6)
    (no_model / store.BEST_MODEL_FILE).unlink()
    (root / TRASH).mkdir()
    (root / TRASH / store.META_FILE).write_text('{"status": "completed"}')
    (root / "notes").mkdir()  # not a run: no run file, not named like one
    lock = TrainingLock(running).acquire()
    try:
        yield root
    finally:
        lock.release()


def invoke(*args: str, **options: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), **options)  # type: ignore[arg-type]


def listed(root: Path) -> dict[str, dict[str, object]]:
    result = invoke("runs", "--json", "--runs-dir", str(root))
    assert result.exit_code == 0, result.output
    return {entry["run_id"]: entry for entry in json.loads(result.stdout)}


EXPECTED_STATUSES = {
    COMPLETED_OLD: "completed",
    COMPLETED_NEW: "completed",
    RUNNING: "running",
    INTERRUPTED: "interrupted",
    FAILED: "failed",
    CRASHED: "crashed",
    DAMAGED_META: "damaged",
    NO_META: "damaged",
    NO_MODEL: "damaged",
}


def test_list_shows_every_status_and_the_reason_a_run_is_damaged(store_root: Path) -> None:
    runs = listed(store_root)
    assert {run_id: entry["status"] for run_id, entry in runs.items()} == EXPECTED_STATUSES
    assert all(tuple(entry) == run_catalog.SUMMARY_KEYS for entry in runs.values())
    assert list(runs) == sorted(EXPECTED_STATUSES, reverse=True)  # newest first
    old = runs[COMPLETED_OLD]
    assert old["val_accuracy"] == pytest.approx(0.9) and old["epochs"] == 3 and old["best_epoch"] == 3
    assert old["dataset"] == "colours" and old["dataset_fingerprint"] == FINGERPRINT
    assert old["num_classes"] == 3 and old["image_size"] == [32, 32] and old["train_seconds"] == 4.5
    assert old["exports"] == ["model.tflite", "model_int8.tflite", "saved_model"]
    assert old["evaluations"] == ["val"] and runs[COMPLETED_NEW]["stale"] == ["eval"]
    on_disk = sum(path.stat().st_size for path in (store_root / COMPLETED_OLD).rglob("*") if path.is_file())
    assert old["size_bytes"] == on_disk > 7000
    # Running and crashed runs have no results in meta.json yet: read from their history.
    assert runs[CRASHED]["val_accuracy"] == pytest.approx(0.8) and "10 min ago" in str(
        runs[CRASHED]["last_seen"]
    )
    assert "is damaged" in str(runs[DAMAGED_META]["problem"]) and "meta.json" in str(
        runs[DAMAGED_META]["problem"]
    )
    assert runs[NO_META]["problem"] == "no meta.json"
    assert (
        runs[NO_MODEL]["problem"] == "missing best.keras" and runs[NO_MODEL]["recorded_status"] == "completed"
    )

    table = invoke("runs", "--runs-dir", str(store_root))
    assert table.exit_code == 0, table.output
    for run_id, status in EXPECTED_STATUSES.items():
        assert re.search(rf"{run_id} +│ {status}", table.stdout), run_id
    assert "tflite, tflite-int8, saved_model" in table.stdout
    assert f"{NO_META}: no meta.json" in table.stdout and "Traceback" not in table.output
    assert ".trash" not in table.stdout and "notes" not in table.stdout
    assert invoke("runs", "list", "--runs-dir", str(store_root)).stdout == table.stdout


def test_list_filters_sorts_limits_and_names_the_valid_choices(store_root: Path) -> None:
    failed = invoke("runs", "--status", "failed,crashed", "--json")
    assert [entry["run_id"] for entry in json.loads(failed.stdout)] == [CRASHED, FAILED]
    best = invoke("runs", "list", "--sort", "val_accuracy", "--limit", "3", "--json")
    assert [entry["run_id"] for entry in json.loads(best.stdout)] == [COMPLETED_OLD, CRASHED, COMPLETED_NEW]
    smallest_loss = json.loads(invoke("runs", "--sort", "val_loss", "--json").stdout)
    assert smallest_loss[0]["run_id"] == COMPLETED_OLD and smallest_loss[-1]["val_loss"] is None

    unknown_sort = invoke("runs", "--sort", "accuracy")
    assert unknown_sort.exit_code == 2
    assert "Unknown sort key 'accuracy'. Did you mean val_accuracy?" in unknown_sort.output
    assert "started, val_accuracy, val_loss, train_seconds, epochs, size" in unknown_sort.output
    unknown_status = invoke("runs", "list", "--status", "complete")
    assert unknown_status.exit_code == 2 and "Did you mean completed?" in unknown_status.output
    misplaced = invoke("runs", "--json", "show", COMPLETED_OLD)
    assert misplaced.exit_code == 2 and "put it after the command" in misplaced.output
    assert invoke("runs", "--runs-dir", str(store_root / "missing")).output.startswith("No runs in")


def test_show_a_run_its_config_differences_evaluations_exports_and_files(store_root: Path) -> None:
    shown = invoke("runs", "show", COMPLETED_OLD)
    assert shown.exit_code == 0, shown.output
    for text in (
        "Config (differences from the defaults)",
        "model.width",
        "Dataset and split",
        "0123456789abcdef",
        "skipped /data/colours/red/bad.png: truncated",
        "Metrics (history.csv)",
        "Evaluations (eval/)",
        "0.8500",
        "Exports (export/, all passed)",
        "model.tflite",
        "best.keras",
    ):
        assert text in shown.stdout, text
    document = json.loads(invoke("runs", "show", COMPLETED_OLD[:15], "--json").stdout)
    assert document["run_id"] == COMPLETED_OLD and "config" not in document
    assert document["config_differences"]["model.width"] == {"default": 32, "value": 8}
    assert document["evaluations_detail"][0]["per_class"]["red"]["f1"] == 0.6
    assert document["export"]["artifacts"][0]["agreement"] == 1.0 and document["best"]["epoch"] == 3
    assert {entry["name"] for entry in document["files"]} >= {"meta.json", "eval", "export", "best.keras"}
    full = json.loads(invoke("runs", "show", COMPLETED_OLD, "--json", "--full").stdout)
    assert full["config"]["train.epochs"] == 12 and len(full["config"]) > 30

    damaged = invoke("runs", "show", DAMAGED_META)
    assert (
        damaged.exit_code == 0
        and "meta.json is damaged" in damaged.output
        and "Traceback" not in damaged.output
    )
    half_deleted = invoke("runs", "show", NO_META, "--json")
    assert half_deleted.exit_code == 0 and json.loads(half_deleted.stdout)["status"] == "damaged"
    missing = invoke("runs", "show", "nothing-like-it")
    assert missing.exit_code == 1 and "Run not found: 'nothing-like-it'" in missing.output


def test_compare_runs_side_by_side_and_plot_their_validation_curves(store_root: Path, tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "curves.png"
    compared = invoke("runs", "compare", COMPLETED_OLD, COMPLETED_NEW, CRASHED, "--json", "--plot", str(plot))
    assert compared.exit_code == 0, compared.output
    document = json.loads(compared.stdout)
    assert [run["run_id"] for run in document["runs"]] == [COMPLETED_OLD, COMPLETED_NEW, CRASHED]
    assert document["config_differences"] == {"model.width": [8, 32, 32]}
    assert document["same_dataset"] is True
    assert document["evaluations"]["val"]["per_class_f1"]["blue"] == [1.0, 0.5, None]
    assert document["evaluations"]["val"]["accuracy"] == [0.85, 0.7, None]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    table = invoke("runs", "compare", COMPLETED_OLD, COMPLETED_NEW)
    assert table.exit_code == 0, table.output
    for text in (
        "Config differences",
        "model.width",
        "the same dataset",
        "F1 per class (eval/val)",
        "0.9000",
    ):
        assert text in table.stdout, text
    alone = invoke("runs", "compare", COMPLETED_OLD, COMPLETED_OLD)
    assert alone.exit_code == 2 and "two different runs or more" in alone.output
    with_damaged = invoke("runs", "compare", FAILED, DAMAGED_META, "--plot", str(tmp_path / "damaged.png"))
    assert with_damaged.exit_code == 0, with_damaged.output  # its history.csv is intact
    assert (tmp_path / "damaged.png").is_file()
    no_epoch = invoke("runs", "compare", FAILED, NO_META, "--plot", str(tmp_path / "none.png"))
    assert no_epoch.exit_code == 0 and (tmp_path / "none.png").is_file()


def test_rm_refuses_a_running_run_and_deletes_the_others(store_root: Path) -> None:
    refused = invoke("runs", "rm", RUNNING, "--yes")
    assert refused.exit_code == 1
    assert f"Not deleted: {RUNNING}" in refused.output and "being trained right now" in refused.output
    assert RUNNING not in refused.stdout  # not even in the table of what will be deleted
    assert (store_root / RUNNING / store.META_FILE).is_file()

    mixed = invoke("runs", "rm", RUNNING, FAILED, NO_META, "--yes")
    assert mixed.exit_code == 1, mixed.output
    assert not (store_root / FAILED).exists() and not (store_root / NO_META).exists()
    assert (store_root / RUNNING).is_dir() and "Deleted 2 run(s)" in mixed.stdout
    assert not [path.name for path in store_root.iterdir() if path.name.startswith(".trash")]
    unknown = invoke("runs", "rm", FAILED, "--yes")
    assert unknown.exit_code == 1 and "Run not found" in unknown.output


def test_rm_asks_first_and_refuses_to_guess_without_a_terminal(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_terminal = invoke("runs", "rm", COMPLETED_OLD, input="y\n")
    assert no_terminal.exit_code == 1
    assert (
        "without confirmation: stdin is not a terminal" in no_terminal.output
        and "--yes" in no_terminal.output
    )
    assert (store_root / COMPLETED_OLD).is_dir()

    monkeypatch.setattr(runs_cli, "stdin_is_terminal", lambda: True)
    declined = invoke("runs", "rm", COMPLETED_OLD, input="n\n")
    assert declined.exit_code == 1 and "Nothing deleted." in declined.output
    assert (store_root / COMPLETED_OLD).is_dir()
    accepted = invoke("runs", "rm", COMPLETED_OLD, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert COMPLETED_OLD in accepted.stdout and "Delete 1 run(s)" in accepted.output
    assert not (store_root / COMPLETED_OLD).exists()


def test_prune_deletes_exactly_what_it_showed(store_root: Path) -> None:
    before = {path.name for path in store_root.iterdir()}
    pruned = invoke("runs", "prune", "--keep", "2", "--yes")
    assert pruned.exit_code == 0, pruned.output
    shown = set(re.findall(r"^│ (\S+) ", pruned.stdout, re.MULTILINE)) - {"run"}
    deleted = before - {path.name for path in store_root.iterdir()}
    assert shown == deleted
    # Kept: the 2 newest that are not running, the running one, and what is not a run.
    assert {path.name for path in store_root.iterdir()} == {NO_MODEL, NO_META, RUNNING, "notes"}
    assert TRASH in deleted  # the leftover of an interrupted rm goes too, shown as such
    assert "leftover of an interrupted rm" in pruned.stdout


def test_prune_by_status_and_an_interrupted_rm_leaves_only_hidden_trash(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = run_cleanup.plan_prune(0, "failed,interrupted,crashed")
    assert [summary.run_id for summary in plan.runs] == [CRASHED, FAILED, INTERRUPTED]
    assert plan.leftovers == [store_root / TRASH]
    # Interrupted after the renames: the runs are gone for every reader, their trash stays hidden.
    with monkeypatch.context() as patched:
        patched.setattr(run_cleanup, "remove_trash", lambda trash: False)
        result = run_cleanup.delete_runs(plan)
    assert [summary.run_id for summary in result.deleted] == [CRASHED, FAILED, INTERRUPTED]
    trash = sorted(path.name for path in store_root.iterdir() if path.name.startswith(".trash-"))
    assert trash == sorted(
        [TRASH, *(f".trash-{run_id}-{os.getpid()}" for run_id in (CRASHED, FAILED, INTERRUPTED))]
    )
    assert sorted(path.name for path in result.left_behind) == trash
    assert not {CRASHED, FAILED, INTERRUPTED} & set(listed(store_root))
    cleaned = invoke("runs", "prune", "--keep", "0", "--status", "failed", "--yes")
    assert cleaned.exit_code == 0, cleaned.output
    assert "Deleted 0 run(s)" in cleaned.stdout
    assert not [path for path in store_root.iterdir() if path.name.startswith(".trash-")]
    everything_running = invoke("runs", "prune", "--keep", "0", "--status", "running", "--yes")
    assert everything_running.exit_code == 0 and "being trained right now" in everything_running.output
    assert (store_root / RUNNING).is_dir()


def test_a_live_lock_held_by_another_process_protects_a_run_without_meta(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run_dir = root / "20260110-090000-imgclf-cnn"
    run_dir.mkdir(parents=True)  # being set up: no meta.json yet, its lock taken
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert run_catalog.summarize_run(run_dir).status == "running"
        refused = invoke("runs", "rm", str(run_dir), "--yes", "--runs-dir", str(root))
        assert refused.exit_code == 1 and f"process {holder.pid}" in refused.output
        assert run_dir.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert run_catalog.summarize_run(run_dir).status == "damaged"
    assert invoke("runs", "rm", run_dir.name, "--yes", "--runs-dir", str(root)).exit_code == 0
    assert not run_dir.exists()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from imgclf_cli.liveness import TrainingLock
TrainingLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""
# Runs `imgclf ARGS...` in a new process and prints, last, the heavy modules it imported.
HEAVY_MODULES = ("tensorflow", "keras", "sklearn", "matplotlib", "numpy", "PIL")
RUN_IMGCLF = f"""
import sys
from imgclf_cli.cli.app import main
sys.argv = ["imgclf", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY_MODULES!r}))
print("heavy modules:", ",".join(heavy) or "none")
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args", [["runs", "--json"], ["runs"], ["runs", "--help"], ["runs", "show", "--help"]]
)
def test_runs_imports_no_tensorflow(store_root: Path, args: list[str]) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_IMGCLF,
            *args,
            *(["--runs-dir", str(store_root)] if "--help" not in args else []),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == "heavy modules: none"
    if args == ["runs", "--json"]:
        document = json.loads(completed.stdout.rsplit("heavy modules:", 1)[0])
        assert len(document) == len(EXPECTED_STATUSES)


def test_imgclf_help_lists_runs_and_every_sort_key() -> None:
    assert re.search(r"runs +List, show, compare and delete runs", invoke("--help").stdout)
    group_help = invoke("runs", "--help").stdout
    assert all(key in group_help for key in run_catalog.SORT_KEYS)
    assert all(name in group_help for name in ("list", "show", "compare", "rm", "prune"))
