"""`imgclf train` end to end on tiny generated folders, the run store, resume after Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgclf_cli import store
from imgclf_cli.cli.app import app

from conftest import TINY_TRAINING, make_class_folders

runner = CliRunner()


def train_cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["train", *args])
    return result.exit_code, result.stdout, result.stderr


def test_trained_run_is_self_describing(trained_run: dict) -> None:
    run_dir: Path = trained_run["run_dir"]
    summary = trained_run["summary"]
    for key in (
        "run_id",
        "run_dir",
        "classes",
        "num_train",
        "num_val",
        "epochs_run",
        "best_epoch",
        "val_accuracy",
        "val_loss",
        "train_seconds",
        "skipped_files",
    ):
        assert key in summary
    assert summary["classes"] == ["blue", "green", "red"]
    assert summary["num_train"] + summary["num_val"] == 48
    assert summary["val_accuracy"] >= 0.8  # solid colours: a working pipeline learns them
    for name in (
        store.CONFIG_FILE,
        store.LABELS_FILE,
        store.SPLIT_FILE,
        store.BEST_MODEL_FILE,
        store.LAST_CHECKPOINT_FILE,
        store.HISTORY_FILE,
        store.META_FILE,
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / store.PLOTS_DIR / "training_curves.png").stat().st_size > 1000
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"
    meta = json.loads((run_dir / store.META_FILE).read_text())
    assert meta["status"] == "completed"
    assert meta["versions"]["tensorflow"] and meta["dataset"]["fingerprint"]
    assert json.loads((run_dir / store.LABELS_FILE).read_text()) == summary["classes"]
    with (run_dir / store.HISTORY_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == summary["epochs_run"]
    saved_config = (run_dir / store.CONFIG_FILE).read_text()
    assert "image_size: 48" in saved_config and "epochs: 10" in saved_config
    assert store.resolve_run("latest", trained_run["runs_dir"]) == run_dir


def test_best_model_loads_in_safe_mode_and_matches_val_accuracy(trained_run: dict) -> None:
    from imgclf_cli.dataset import SplitManifest
    from imgclf_cli.images import load_image
    from imgclf_cli.models import load_model

    run_dir: Path = trained_run["run_dir"]
    model = load_model(run_dir / store.BEST_MODEL_FILE)
    manifest = SplitManifest.from_json((run_dir / store.SPLIT_FILE).read_text())
    images = np.stack([load_image(s.path, (48, 48)) for s in manifest.val]).astype("float32")
    predicted = np.asarray(model(images, training=False)).argmax(axis=1)
    accuracy = float(np.mean(predicted == np.array([s.label for s in manifest.val])))
    assert accuracy == pytest.approx(trained_run["summary"]["val_accuracy"], abs=1e-6)


def test_bad_images_are_skipped_and_reported(tmp_path: Path, runs_dir: Path) -> None:
    root = make_class_folders(tmp_path / "data", per_class=8)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        root / "red" / "png_named.jpg", format="PNG"
    )
    Image.new("RGBA", (30, 30), (220, 40, 40, 128)).save(root / "red" / "rgba.png")
    Image.new("L", (30, 30), 90).save(root / "blue" / "gray.png")
    (root / "green" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "blue" / "truncated.jpg").write_bytes(buffer.getvalue()[:400])
    code, stdout, stderr = train_cli(
        str(root), "--json", *TINY_TRAINING[:2], "--image-size", "32", "--set", "model.width=8"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    skipped = {Path(entry["path"]).name: entry["reason"] for entry in summary["skipped_files"]}
    assert set(skipped) == {"corrupt.jpg", "truncated.jpg"}
    assert all(reason for reason in skipped.values())
    assert summary["num_train"] + summary["num_val"] == 24 + 3  # every readable image used


def test_dataset_whose_images_all_fail_to_decode_is_a_clear_error(tmp_path: Path, runs_dir: Path) -> None:
    """Truncated JPEGs pass the header scan; training must then fail cleanly, not crash."""
    rng = np.random.default_rng(2)
    for name in ("ants", "bees"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(5):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
            encoded = buffer.getvalue()
            (tmp_path / "data" / name / f"{index}.jpg").write_bytes(encoded[: len(encoded) // 2])
    exit_code, _, stderr = train_cli(str(tmp_path / "data"), *TINY_TRAINING[:2], "--image-size", "32")
    assert exit_code == 1, stderr
    assert "Error: None of the training images could be decoded" in stderr
    assert "Traceback" not in stderr
    (run_dir,) = runs_dir.iterdir()
    assert json.loads((run_dir / store.META_FILE).read_text())["status"] == "failed"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["/definitely/not/here"], 1, "not found"),
        (["{data}", "--model", "resnet5O"], 2, "Unknown model 'resnet5O'. Did you mean resnet50"),
        (["{data}", "--set", "train.epochs"], 2, "KEY=VALUE"),
        (
            ["{data}", "--set", "train.epochz=3"],
            2,
            "Did you mean train.epochs?\nHint: imgclf train --print-config",
        ),
        (["{data}", "--set", "train.epochs=ten"], 2, "expects int"),
        (["{data}", "--set", "train.optimizer=adamx"], 2, "Did you mean adam or adamw?\n"),
        (
            ["{data}", "--config", "{bad_key}"],
            2,
            "Did you mean train.epochs?\nHint: imgclf train --print-config",
        ),
        (["{data}", "--config", "{bad_yaml}"], 2, "Invalid YAML"),
        (["{single}"], 1, "Only one class"),
        (["{empty}"], 1, "No class folders"),
    ],
)
def test_errors_are_one_clear_line(
    tmp_path: Path, runs_dir: Path, args: list[str], code: int, message: str
) -> None:
    data = make_class_folders(tmp_path / "data", per_class=2)
    single = make_class_folders(tmp_path / "single", per_class=2, classes={"cats": (1, 2, 3)})
    (tmp_path / "empty").mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [oops\n")
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("train:\n  epoch: 3\n")
    places = dict(data=data, single=single, empty=tmp_path / "empty", bad_yaml=bad_yaml, bad_key=bad_key)
    exit_code, _, stderr = train_cli(*[a.format(**places) for a in args])
    assert exit_code == code, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("Error:")
    assert len(stderr.splitlines()) <= 2  # one line, and at most one hint
    assert not list(runs_dir.glob("*")) or not any(runs_dir.iterdir())


def test_print_config_is_valid_yaml_with_every_section() -> None:
    import yaml

    result = runner.invoke(app, ["train", "--print-config"])
    assert result.exit_code == 0
    document = yaml.safe_load(result.stdout)
    assert set(document) == {"seed", "data", "model", "augment", "train"}


def test_print_config_prints_the_merged_config_and_defaults_on_request(tmp_path: Path) -> None:
    import yaml

    from imgclf_cli.config import documented_yaml

    config_file = tmp_path / "c.yaml"
    config_file.write_text("train:\n  epochs: 3\n  learning_rate: 0.5\n")
    for args in (["--epochs", "3"], ["--set", "train.epochs=3"], ["--config", str(config_file)]):
        result = runner.invoke(app, ["train", "--print-config", *args])
        assert result.exit_code == 0, result.output
        assert yaml.safe_load(result.stdout)["train"]["epochs"] == 3, args
        assert "  epochs: 3  # int. With train.time_budget" in result.stdout  # the comments stay
    # defaults < file < --set < flags
    args = ["--config", str(config_file), "--set", "train.epochs=5", "--set", "seed=1", "--seed", "2"]
    merged = yaml.safe_load(runner.invoke(app, ["train", "--print-config", *args]).stdout)
    assert (merged["train"]["epochs"], merged["train"]["learning_rate"], merged["seed"]) == (5, 0.5, 2)

    defaults = runner.invoke(app, ["train", "--print-config", "--defaults", "--epochs", "3"])
    assert defaults.exit_code == 0 and defaults.stdout == documented_yaml()
    assert "epochs: 12" in defaults.stdout
    alone = runner.invoke(app, ["train", "--defaults"])
    assert alone.exit_code == 2 and "--defaults only applies to --print-config" in alone.stderr
    typo = runner.invoke(app, ["train", "--print-config", "--set", "train.epoch=3"])
    assert typo.exit_code == 2 and "Did you mean train.epochs?" in typo.stderr


def auto_keys(values: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose value is still ``auto``."""
    found = []
    for key, value in values.items():
        if isinstance(value, dict):
            found += auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(f"{prefix}{key}")
    return found


def test_saved_config_is_fully_resolved(trained_run: dict) -> None:
    import yaml

    saved = yaml.safe_load((trained_run["run_dir"] / store.CONFIG_FILE).read_text())
    assert auto_keys(saved) == []
    assert saved["model"] | {"dropout": 0, "width": 0} == {
        "name": "imgclf-cnn",
        "weights": "none",  # imgclf-cnn loads no pretrained weights
        "freeze_backbone": "false",
        "fine_tune_layers": 0,
        "dropout": 0,
        "width": 0,
    }
    assert saved["data"]["image_size"] == 48 and saved["data"]["cache"] == "memory"
    train = saved["train"]
    assert (train["mixed_precision"], train["distribute"]) == ("false", "none")  # one CPU device
    assert (train["class_weights"], train["cache_features"]) == ("none", "false")  # balanced; no backbone


@pytest.mark.parametrize(("while_saving", "epochs_kept"), [("save_checkpoint", 1), ("update_meta", 2)])
def test_ctrl_c_while_an_epoch_is_saved_leaves_history_meta_and_checkpoint_agreeing(
    tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch, while_saving: str, epochs_kept: int
) -> None:
    from imgclf_cli import training_callbacks
    from imgclf_cli.checkpointing import read_position

    data = make_class_folders(tmp_path / "data", per_class=6)
    calls = {"save_checkpoint": 0, "update_meta": 0}

    def interrupted_at_epoch_2(name: str, original):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            if name == "update_meta" and "epochs_completed" not in kwargs:
                return original(*args, **kwargs)
            calls[name] += 1
            if calls[name] == 2:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        return wrapper

    if while_saving == "save_checkpoint":
        original = training_callbacks.save_checkpoint
        monkeypatch.setattr(
            training_callbacks, "save_checkpoint", interrupted_at_epoch_2(while_saving, original)
        )
    else:
        original = training_callbacks.store.update_meta
        monkeypatch.setattr(
            training_callbacks.store, "update_meta", interrupted_at_epoch_2(while_saving, original)
        )
    args = ["--epochs", "3", "--image-size", "16", "--batch-size", "8", "--set", "model.width=8"]
    code, _, stderr = train_cli(str(data), *args)
    monkeypatch.undo()
    assert code == 130
    (run_dir,) = store.list_runs(runs_dir)
    meta = store.read_meta(run_dir)
    # The epoch counts only once last.keras holds it, and then history.csv says so too.
    assert len(store.read_history(run_dir)) == epochs_kept
    assert meta["epochs_completed"] == epochs_kept and meta["best_epoch"] <= epochs_kept
    position = read_position(store.last_checkpoint_path(run_dir))
    assert position is not None and position.epoch == epochs_kept
    assert f"Interrupted after epoch {epochs_kept};" in stderr


def test_interrupt_then_resume_continues_from_last_epoch(
    tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgclf_cli import training

    data = make_class_folders(tmp_path / "data", per_class=6)
    original = training.RunRecorder.on_epoch_end

    def interrupt_after_second_epoch(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.RunRecorder, "on_epoch_end", interrupt_after_second_epoch)
    args = ["--epochs", "4", "--image-size", "32", "--batch-size", "8", "--set", "model.width=8"]
    code, _, stderr = train_cli(str(data), *args)
    assert code == 130
    (run_dir,) = store.list_runs(runs_dir)
    # Ctrl-C is a notice saying how to go on, not an error.
    assert "Error:" not in stderr and "Traceback" not in stderr
    assert stderr.splitlines()[-2:] == [
        f"Interrupted after epoch 2; resume with imgclf train --resume {run_dir.name}",
        f"The run is kept in {run_dir}",
    ]
    assert store.read_meta(run_dir)["status"] == "interrupted"
    interrupted_config = (run_dir / store.CONFIG_FILE).read_text()
    assert "auto" not in interrupted_config  # resolved values are what the resume reads back
    assert (run_dir / store.LAST_CHECKPOINT_FILE).is_file()
    assert len(store.read_history(run_dir)) == 2
    with pytest.raises(Exception, match="No completed run"):
        store.resolve_run("latest", runs_dir)  # an interrupted run is not "latest"

    monkeypatch.setattr(training.RunRecorder, "on_epoch_end", original)
    code, stdout, stderr = train_cli("--resume", run_dir.name, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["run_dir"] == str(run_dir)
    assert summary["epochs_run"] == 4
    assert [row["epoch"] for row in store.read_history(run_dir)] == [1, 2, 3, 4]
    assert store.read_meta(run_dir)["status"] == "completed"
    assert (run_dir / store.CONFIG_FILE).read_text() == interrupted_config


def test_pretrained_backbone_with_random_weights_trains(tmp_path: Path, runs_dir: Path) -> None:
    data = make_class_folders(tmp_path / "data", per_class=4)
    code, stdout, stderr = train_cli(
        str(data),
        "--json",
        "--model",
        "mobilenet_v3_small",
        "--set",
        "model.weights=none",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "4",
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    config = (Path(summary["run_dir"]) / store.CONFIG_FILE).read_text()
    assert "name: mobilenet_v3_small" in config
    assert "freeze_backbone: 'false'" in config  # auto trains a random backbone


def test_pretrained_backbone_is_recorded_frozen(tmp_path: Path, runs_dir: Path) -> None:
    import keras
    import yaml

    from imgclf_cli.models import BACKBONES

    spec = BACKBONES["mobilenet_v3_small"]
    backbone = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", **dict(spec.extra_kwargs)
    )
    weights = tmp_path / "backbone.weights.h5"  # stands in for downloaded ImageNet weights
    backbone.save_weights(weights)
    data = make_class_folders(tmp_path / "data", per_class=3)
    code, stdout, stderr = train_cli(
        str(data), "--json", "--model", "MobileNetV3Small", "--set", f"model.weights={weights}",
        "--epochs", "1", "--image-size", "32", "--batch-size", "4",
    )  # fmt: skip
    assert code == 0, stderr
    saved = yaml.safe_load((Path(json.loads(stdout)["run_dir"]) / store.CONFIG_FILE).read_text())
    assert saved["model"]["name"] == "mobilenet_v3_small" and saved["model"]["weights"] == str(weights)
    assert saved["model"]["freeze_backbone"] == "true"  # what auto did with pretrained weights
    # The one auto left: it means "cache the frozen backbone's features", and has no other spelling.
    assert auto_keys(saved) == ["train.cache_features"]


def test_missing_weights_file_is_a_clear_error(tmp_path: Path, runs_dir: Path) -> None:
    data = make_class_folders(tmp_path / "data", per_class=2)
    code, _, stderr = train_cli(
        str(data), "--model", "efficientnet_b0", "--set", f"model.weights={tmp_path}/nope.h5"
    )
    assert code == 1
    assert "weights file not found" in stderr


def test_class_weights() -> None:
    from imgclf_cli.config import resolve_config
    from imgclf_cli.dataset import Sample, SplitManifest
    from imgclf_cli.errors import ImgclfError
    from imgclf_cli.training_recipe import class_weights_for

    train = [Sample(f"a{i}", 0) for i in range(30)] + [Sample(f"b{i}", 1) for i in range(10)]
    manifest = SplitManifest("/", "folders", ["a", "b"], train, [])
    weights = class_weights_for(resolve_config(), manifest)
    assert weights is not None and weights[1] == pytest.approx(3 * weights[0])
    assert class_weights_for(resolve_config(overrides=["train.class_weights=none"]), manifest) is None
    explicit = class_weights_for(resolve_config(overrides=["train.class_weights={b: 5}"]), manifest)
    assert explicit == {0: 1.0, 1: 5.0}
    with pytest.raises(ImgclfError, match="unknown class"):
        class_weights_for(resolve_config(overrides=["train.class_weights={c: 5}"]), manifest)


def test_same_seed_gives_same_split(tmp_path: Path, trained_run: dict) -> None:
    from imgclf_cli.dataset import make_manifest, scan_dataset

    manifest = make_manifest(scan_dataset(trained_run["data_dir"]), 0.2, seed=42)
    stored = (trained_run["run_dir"] / store.SPLIT_FILE).read_text()
    assert manifest.to_json() == stored


def test_mirrored_strategy_over_two_logical_cpus(tmp_path: Path) -> None:
    # 7 per class: 18 training images (4 full batches of 4 and a remainder), 3 validation images.
    data = make_class_folders(tmp_path / "data", per_class=7)
    script = f"""
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from imgclf_cli.training import train
result = train({str(data)!r}, runs_dir={str(tmp_path / "runs")!r}, overrides=[
    "train.distribute=mirrored", "train.epochs=1", "data.image_size=32", "data.batch_size=4",
    "model.width=8"])
from imgclf_cli.store import read_meta
from pathlib import Path
meta = read_meta(Path(result.run_dir))
print(meta["strategy"], meta["num_replicas"], result.status)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split()[-3:] == ["MirroredStrategy", "2", "completed"]


def test_best_model_has_no_optimizer_state_and_last_checkpoint_has(trained_run: dict) -> None:
    import zipfile

    import h5py

    run_dir: Path = trained_run["run_dir"]

    def saved_groups(name: str) -> set[str]:
        with zipfile.ZipFile(run_dir / name) as archive:
            with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
                return set(weights.keys())

    assert "optimizer" not in saved_groups(store.BEST_MODEL_FILE)
    assert "optimizer" in saved_groups(store.LAST_CHECKPOINT_FILE)
    best_size = (run_dir / store.BEST_MODEL_FILE).stat().st_size
    assert best_size < 0.7 * (run_dir / store.LAST_CHECKPOINT_FILE).stat().st_size


def test_train_library_prints_nothing_and_reports_through_the_listener(
    tmp_path: Path, runs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imgclf_cli.training import train
    from imgclf_cli.training_events import EpochEnded, TrainingListener, TrainingStarted

    class Recorder(TrainingListener):
        def __init__(self) -> None:
            self.events: list[str] = []
            self.epochs: list[EpochEnded] = []
            self.batches = 0

        def on_status(self, message: str) -> None:
            self.events.append("status")

        def on_training_start(self, event: TrainingStarted) -> None:
            self.events.append(f"start {event.num_train}+{event.num_val} {event.total_epochs}")

        def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
            self.batches += 1

        def on_epoch_end(self, event: EpochEnded) -> None:
            self.epochs.append(event)

        def on_finish(self) -> None:
            self.events.append("finish")

    data = make_class_folders(tmp_path / "data", per_class=5)
    capsys.readouterr()
    listener = Recorder()
    result = train(
        data,
        overrides=["train.epochs=2", "data.image_size=32", "data.batch_size=4", "model.width=8"],
        listener=listener,
    )
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert listener.events == ["status", "start 12+3 2", "finish"]
    assert [event.epoch for event in listener.epochs] == [1, 2]
    assert listener.epochs[0].improved  # the first epoch is always the best so far
    assert listener.batches == 2 * 3  # 12 training images in batches of 4
    assert result.best_epoch in (1, 2) and result.epochs_run == 2


def test_resume_says_what_it_does_replans_the_schedule_and_marks_old_outputs_stale(
    tmp_path: Path, runs_dir: Path
) -> None:
    data = make_class_folders(tmp_path / "data", per_class=6)
    args = ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--set", "model.width=8"]
    code, _, stderr = train_cli(str(data), *args)
    assert code == 0, stderr
    (run_dir,) = store.list_runs(runs_dir)
    lines = stderr.splitlines()
    # The model as the config spells it; the run path on its own line.
    assert any(line.startswith("Training imgclf-cnn on ") for line in lines), stderr
    assert f"Run: {run_dir}" in lines and "imgclf_cnn" not in stderr

    # A completed run asked for nothing more: nothing to resume, at once.
    code, stdout, stderr = train_cli("--resume", run_dir.name)
    assert code == 0, stderr
    assert stderr.startswith(f"Nothing to resume: run {run_dir.name} completed all 2 epochs; best epoch")
    assert f"imgclf train --resume {run_dir.name} --epochs N (N > 2)" in stderr
    assert stdout == "" and "Resuming" not in stderr
    code, stdout, stderr = train_cli("--resume", run_dir.name, "--epochs", "2", "--json")
    assert code == 0, stderr
    assert "the settings given ask for 2" in stderr
    summary = json.loads(stdout)
    assert (summary["trained"], summary["epochs_run"], summary["run_id"]) == (False, 2, run_dir.name)

    # Outputs made from the current best model, and a recorded best that any new epoch beats.
    (run_dir / store.EXPORT_DIR).mkdir()
    (run_dir / store.EXPORT_DIR / "model.tflite").write_bytes(b"made from the old best model")
    (run_dir / store.EVAL_DIR / "val").mkdir(parents=True)
    rows = store.read_history(run_dir)
    store.write_history(run_dir, [row | {"val_accuracy": 0.0, "val_loss": 99.0} for row in rows])
    code, stdout, stderr = train_cli("--resume", run_dir.name, "--epochs", "4")
    assert code == 0, stderr
    lines = stderr.splitlines()
    replanned = "Learning-rate schedule re-planned for 4 epochs (it was for 2): epochs 3-4 go from "
    assert lines[0] == f"Resuming {run_dir.name} from epoch 3 of 4", stderr
    assert [line for line in lines if line.startswith(replanned)] == [lines[3]]  # after the header
    history = store.read_history(run_dir)
    assert [int(row["epoch"]) for row in history] == [1, 2, 3, 4]
    # Epoch 2 ended the 2-epoch cosine at its floor; epochs 3-4 anneal again instead of staying there.
    assert history[2]["learning_rate"] > 10 * history[1]["learning_rate"]
    assert history[3]["learning_rate"] == pytest.approx(history[1]["learning_rate"], rel=0.05)
    assert store.read_meta(run_dir)["stale"] == ["eval", "export"]
    assert (
        "eval/ and export/ were made from the previous best model: "
        f"re-run imgclf evaluate --run {run_dir.name} and imgclf export --run {run_dir.name}"
    ) in " ".join(stderr.split())
    assert "Run:" in stdout


def test_resuming_a_completed_run_answers_before_tensorflow_loads(trained_run: dict) -> None:
    run_dir: Path = trained_run["run_dir"]
    argv = ["imgclf", "train", "--resume", run_dir.name, "--runs-dir", str(trained_run["runs_dir"])]
    script = (
        "import sys\n"
        "from imgclf_cli.cli.app import main\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code or 0\n"
        "print('tensorflow' in sys.modules, code)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.stdout.split() == ["False", "0"], completed.stderr
    assert completed.stderr.startswith(f"Nothing to resume: run {run_dir.name} ")


def test_progress_shows_time_left_and_speed() -> None:
    from rich.console import Console

    from imgclf_cli.cli.training_view import TrainingView
    from imgclf_cli.training_events import EpochEnded, TrainingStarted

    now = [100.0]
    output = io.StringIO()
    view = TrainingView(live=True, quiet=False, console=Console(file=output, width=110), clock=lambda: now[0])
    # "Training ... validating on 733; run <this>" was 151 columns: it wrapped at 110.
    run_dir = "/home/someone/projects/image-classifiers/runs/20261128-170000-imgclf-cnn-flowers"
    view.on_training_start(
        TrainingStarted(
            run_id="20261128-170000-imgclf-cnn-flowers",
            run_dir=run_dir,
            model_name="imgclf-cnn",
            num_classes=5,
            num_train=2931,
            num_val=733,
            total_epochs=4,
            initial_epoch=0,
            steps_per_epoch=10,
            batch_size=8,
        )
    )
    assert output.getvalue().splitlines() == [
        "Training imgclf-cnn on 2931 images (5 classes), validating on 733",
        f"Run: {run_dir}",
    ]

    def bars() -> tuple[str, str]:
        assert view.bars is not None
        screen = Console(file=io.StringIO(), width=110)
        screen.print(view.bars.get_renderable())
        epochs, batches = screen.file.getvalue().splitlines()  # type: ignore[attr-defined]
        return epochs, batches

    view.on_epoch_start(1)
    now[0] += 3.0  # the first step traces the model: not a measure of speed
    view.on_batch_end(1, 1.0, 0.5)
    assert "left" not in bars()[1] and "img/s" not in bars()[1]
    for step in (2, 3):
        now[0] += 0.4
        view.on_batch_end(step, 1.0, 0.5)
    epochs, batches = bars()
    # 7 steps of 0.4 s left in this epoch; 8 images a step; then 3 epochs of 10 steps.
    assert "3/10" in batches and "~3s left" in batches and "20 img/s" in batches
    assert "0/4" in epochs and "~15s left" in epochs
    now[0] += 2.8
    view.on_epoch_end(EpochEnded(1, 4, 1.0, 0.5, 1.0, 0.5, 0.002, 6.0, True))
    epochs, _ = bars()
    assert "1/4" in epochs and "~18s left" in epochs and "6s/epoch" in epochs
    view.on_finish()
    assert view.bars is None
