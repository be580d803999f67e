"""Transfer learning on cached features: a frozen backbone runs once per image, the head trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgclf_cli import store
from imgclf_cli.cli.app import app

from conftest import make_class_folders

BACKBONE = "mobilenet_v3_small"
SIZE = 32


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Backbone weights saved from a random model: stands in for downloaded ImageNet weights."""
    import keras

    from imgclf_cli.models import BACKBONES

    spec = BACKBONES[BACKBONE]
    backbone = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg", **dict(spec.extra_kwargs)
    )
    # Like trained ones, BatchNorm statistics that normalise: with the initial ones (mean 0,
    # variance 1) activations fade layer after layer to nothing, and so would the gradients.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    images = np.random.default_rng(0).uniform(0, 255, (16, SIZE, SIZE, 3)).astype("float32")
    backbone(images, training=True)
    path = tmp_path_factory.mktemp("weights") / "backbone.weights.h5"
    backbone.save_weights(path)
    return path


def backbone_config(weights_file: Path, *overrides: str):  # type: ignore[no-untyped-def]
    from imgclf_cli.config import resolve_config

    return resolve_config(
        overrides=[
            f"model.name={BACKBONE}",
            f"model.weights={weights_file}",
            f"data.image_size={SIZE}",
            *overrides,
        ]
    )


def test_the_head_on_cached_features_answers_as_the_full_model(weights_file: Path) -> None:
    from imgclf_cli.feature_cache import should_cache_features, split_at_backbone
    from imgclf_cli.models import build_model

    model = build_model(backbone_config(weights_file), 3)
    assert should_cache_features(backbone_config(weights_file), model, replicas=1)
    split = split_at_backbone(model)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (SIZE, SIZE, 3)).astype("float32") for _ in range(6)]
    batch = np.stack(images)
    full = np.asarray(model(batch, training=False))
    parts = np.asarray(split.head(split.features(batch, training=False), training=False))
    np.testing.assert_allclose(parts, full, atol=1e-5)
    # The head's layers are the full model's: training one trains the other.
    head_weights = {id(weight) for weight in split.head.weights}
    assert head_weights and head_weights <= {id(weight) for weight in model.weights}


def test_features_are_not_cached_when_the_backbone_trains(weights_file: Path) -> None:
    from imgclf_cli.config import resolve_config
    from imgclf_cli.feature_cache import should_cache_features
    from imgclf_cli.models import build_model

    for config in (
        backbone_config(weights_file, "train.cache_features=false"),
        # As built, its tail training; phase 1 freezes it whole first (imgclf_cli.fine_tuning).
        backbone_config(weights_file, "model.fine_tune_layers=10"),
        backbone_config(weights_file, "model.freeze_backbone=false"),
        resolve_config(overrides=[f"data.image_size={SIZE}", "model.width=8"]),
    ):
        assert not should_cache_features(config, build_model(config, 3), replicas=1)


def test_training_on_cached_features_gives_a_complete_run(
    weights_file: Path, tmp_path: Path, runs_dir: Path
) -> None:
    from imgclf_cli.images import load_image
    from imgclf_cli.models import load_model

    data = make_class_folders(tmp_path / "data", per_class=6)
    args = [
        "train",
        str(data),
        "--model",
        BACKBONE,
        "--set",
        f"model.weights={weights_file}",
        "--image-size",
        str(SIZE),
        "--batch-size",
        "4",
        "--epochs",
        "3",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = Path(summary["run_dir"])
    meta = store.read_meta(run_dir)
    assert meta["feature_cache"]["images"] == summary["num_train"] + summary["num_val"]
    assert summary["epochs_run"] == 3
    # best.keras is the whole model (image in, probabilities out) with the head's trained weights.
    model = load_model(store.best_model_path(run_dir))
    manifest = store.read_manifest(run_dir)
    images = np.stack([load_image(sample.path, (SIZE, SIZE)) for sample in manifest.val]).astype("float32")
    predicted = np.asarray(model(images, training=False)).argmax(axis=1)
    accuracy = float(np.mean(predicted == np.array([sample.label for sample in manifest.val])))
    assert accuracy == pytest.approx(summary["val_accuracy"], abs=1e-6)

    resumed = CliRunner().invoke(app, ["train", "--resume", run_dir.name, "--epochs", "4", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs_run"] == 4


def train_args(data: Path, weights_file: Path, *settings: str) -> list[str]:
    # fmt: off
    return [
        "train", str(data), "--model", BACKBONE, "--set", f"model.weights={weights_file}",
        "--image-size", str(SIZE), "--batch-size", "4", "--json",
        *[part for setting in settings for part in ("--set", setting)],
    ]
    # fmt: on


def backbone_changes(model_path: Path, weights_file: Path) -> dict[str, bool]:
    """For each backbone layer with weights: whether the saved model holds other weights than
    the pretrained ones it started from."""
    import keras

    from imgclf_cli.models import BACKBONES, load_model, sole_backbone

    spec = BACKBONES[BACKBONE]
    pretrained = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg", **dict(spec.extra_kwargs)
    )
    pretrained.load_weights(weights_file)
    trained = sole_backbone(load_model(model_path))
    assert trained is not None
    return {
        layer.name: any(
            not np.array_equal(before, after)
            for before, after in zip(
                pretrained.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True
            )
        )
        for layer in trained.layers
        if layer.weights
    }


def test_fine_tuning_follows_the_head_and_trains_only_the_backbone_tail(
    weights_file: Path, tmp_path: Path, runs_dir: Path
) -> None:
    import keras

    from imgclf_cli.models import load_model, sole_backbone
    from imgclf_cli.training_callbacks import TrainingState

    data = make_class_folders(tmp_path / "data", per_class=6)
    args = train_args(
        data, weights_file, "train.epochs=2", "model.fine_tune_layers=10", "train.fine_tune_epochs=1"
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = Path(summary["run_dir"])
    meta = store.read_meta(run_dir)
    # Phase 1 on cached features (epochs 1-2), then one fine-tune epoch numbered after them.
    assert meta["feature_cache"]["images"] == summary["num_train"] + summary["num_val"]
    assert meta["fine_tune"]["first_epoch"] == 3
    history = store.read_history(run_dir)
    assert [int(row["epoch"]) for row in history] == [1, 2, 3] and summary["epochs_run"] == 3
    assert history[2]["learning_rate"] < 0.1 * 0.002 + 1e-12
    # best.keras is the best epoch of both phases.
    assert summary["best_epoch"] == TrainingState.from_history(history).best_epoch

    backbone = sole_backbone(load_model(store.last_checkpoint_path(run_dir)))
    assert backbone is not None
    tail = {
        layer.name
        for layer in backbone.layers[-10:]
        if not isinstance(layer, keras.layers.BatchNormalization)
    }
    # Every layer of the tail with weights trained (BatchNorm excepted); no other layer did.
    changes = backbone_changes(store.last_checkpoint_path(run_dir), weights_file)
    changed = {name for name, differs in changes.items() if differs}
    assert changed and changed == {name for name in changes if name in tail}
    best_changes = backbone_changes(store.best_model_path(run_dir), weights_file)
    assert best_changes == (changes if summary["best_epoch"] == 3 else dict.fromkeys(changes, False))

    # Resumed in phase 2 with one more fine-tune epoch: it continues fine-tuning from epoch 4.
    resumed = CliRunner().invoke(
        app, ["train", "--resume", run_dir.name, "--set", "train.fine_tune_epochs=2", "--json"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs_run"] == 4
    assert store.read_meta(run_dir)["fine_tune"]["first_epoch"] == 3


def test_no_fine_tune_epochs_leaves_the_run_at_the_head(
    weights_file: Path, tmp_path: Path, runs_dir: Path
) -> None:
    data = make_class_folders(tmp_path / "data", per_class=6)
    args = train_args(
        data, weights_file, "train.epochs=2", "model.fine_tune_layers=10", "train.fine_tune_epochs=0"
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run_dir = Path(summary["run_dir"])
    meta = store.read_meta(run_dir)
    assert summary["epochs_run"] == 2 and "fine_tune" not in meta and "feature_cache" in meta
    assert not any(backbone_changes(store.last_checkpoint_path(run_dir), weights_file).values())
