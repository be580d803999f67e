"""TensorBoard event files (``train.tensorboard``): per-epoch scalars from training, evaluate's
metrics and images, read back with TensorFlow's own event reader; a failing write is a warning."""

from __future__ import annotations

import errno
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgclf_cli import store
from imgclf_cli.cli.app import app

from conftest import make_class_folders

# One short training for the tests that train (the others use the session's trained_run).
# fmt: off
QUICK = ["--epochs", "2", "--image-size", "16", "--batch-size", "8", "--set", "model.width=8"]
# fmt: on


def read_events(folder: Path) -> dict[str, dict[int, object]]:
    """``{tag: {step: value}}`` of every event file in ``folder``; a value is a float for a
    scalar, the list of encoded images (bytes) for an image summary."""
    import tensorflow as tf

    found: dict[str, dict[int, object]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                plugin = value.metadata.plugin_data.plugin_name
                decoded = float(array) if plugin == "scalars" else list(array[2:])
                found.setdefault(value.tag, {})[event.step] = decoded
    return found


def run_copy(trained_run: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / trained_run["run_dir"].name
    shutil.copytree(trained_run["run_dir"], copy)
    return copy


def test_training_logs_every_epochs_scalars(trained_run: dict[str, Path]) -> None:
    run_dir = trained_run["run_dir"]
    history = store.read_history(run_dir)
    epochs = list(range(len(history)))
    train = read_events(run_dir / "tensorboard" / "train")
    validation = read_events(run_dir / "tensorboard" / "validation")
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate"):
        assert sorted(train[tag]) == epochs, tag
    # Only the epoch's curves: Keras' per-iteration validation scalars would fold back when
    # fine-tuning's new optimizer counts from 0 again.
    assert set(validation) == {"epoch_loss", "epoch_accuracy"}
    for tag in ("epoch_loss", "epoch_accuracy"):
        assert sorted(validation[tag]) == epochs, tag
    # The values are the run's own history, epoch by epoch.
    for epoch, row in enumerate(history):
        assert train["epoch_loss"][epoch] == pytest.approx(row["loss"], rel=1e-5)
        assert validation["epoch_accuracy"][epoch] == pytest.approx(row["val_accuracy"], rel=1e-5)
    assert train["epoch_learning_rate"][0] > train["epoch_learning_rate"][len(history) - 1]  # cosine


def test_a_resumed_run_continues_the_same_curves(trained_run: dict[str, Path], tmp_path: Path) -> None:
    run_dir = run_copy(trained_run, tmp_path)
    epochs = len(store.read_history(run_dir))
    args = ["train", "--resume", str(run_dir), "--runs-dir", str(run_dir.parent), "--epochs", str(epochs + 1)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(store.read_history(run_dir)) == epochs + 1
    train = read_events(run_dir / "tensorboard" / "train")
    # A second event file in the same folder, the new epoch numbered after the others.
    assert len(list((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 2
    assert sorted(train["epoch_loss"]) == list(range(epochs + 1))
    assert sorted(read_events(run_dir / "tensorboard" / "validation")["epoch_loss"]) == list(
        range(epochs + 1)
    )


def test_evaluate_adds_its_metrics_and_images_under_the_datasets_tag(
    trained_run: dict[str, Path], tmp_path: Path
) -> None:
    from PIL import Image

    run_dir = run_copy(trained_run, tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert "TensorBoard" not in result.output
    events = read_events(run_dir / "tensorboard" / "evaluate")
    epochs = len(store.read_history(run_dir))
    metrics = store.read_json(run_dir / "eval" / "val" / "metrics.json")
    assert events["val/accuracy"] == {epochs: pytest.approx(metrics["accuracy"], rel=1e-6)}
    assert events["val/f1_macro"] == {epochs: pytest.approx(metrics["f1_macro"], rel=1e-6)}
    for tag in ("val/confusion_matrix", "val/misclassified"):
        (images,) = events[tag].values()
        with Image.open(io.BytesIO(images[0])) as image:
            assert image.format == "PNG" and image.size[0] > 50
    # A dataset folder given by path has a tag of its own.
    folder = make_class_folders(tmp_path / "holdout", per_class=3)
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), str(folder)])
    assert result.exit_code == 0, result.output
    assert "holdout/accuracy" in read_events(run_dir / "tensorboard" / "evaluate")


def test_tensorboard_false_writes_no_event_files(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", per_class=6)
    args = [
        "train",
        str(data),
        "--runs-dir",
        str(tmp_path / "runs"),
        *QUICK,
        "--set",
        "train.tensorboard=false",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = store.list_runs(tmp_path / "runs")
    assert not (run_dir / "tensorboard").exists()
    # Nor does evaluate start one.
    assert CliRunner().invoke(app, ["evaluate", "--run", str(run_dir)]).exit_code == 0
    assert not (run_dir / "tensorboard").exists()


def test_a_failing_tensorboard_write_is_one_warning_and_the_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgclf_cli.tensorboard_log import CoreSummaries
    from imgclf_cli.training import train
    from imgclf_cli.training_events import TrainingListener

    calls = []

    def disk_full(*args: object, **kwargs: object) -> None:
        calls.append(args[0])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CoreSummaries, "scalar", staticmethod(disk_full))
    warnings: list[str] = []

    class Warnings(TrainingListener):
        def on_warning(self, message: str) -> None:
            warnings.append(message)

    data = make_class_folders(tmp_path / "data", per_class=6)
    overrides = ["train.epochs=2", "data.image_size=16", "data.batch_size=8", "model.width=8"]
    result = train(data, overrides=overrides, runs_dir=tmp_path / "runs", listener=Warnings())
    run_dir = Path(result.run_dir)
    assert store.read_meta(run_dir)["status"] == store.STATUS_COMPLETED
    assert len(store.read_history(run_dir)) == 2
    assert len(calls) == 1  # nothing tried after the first failure
    assert [text for text in warnings if "TensorBoard" in text] == [
        "TensorBoard logging stopped (No space left on device); training goes on"
    ]
    assert np.isfinite(store.read_meta(run_dir)["val_loss"])
