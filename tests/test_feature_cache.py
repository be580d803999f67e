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
        backbone_config(weights_file, "model.fine_tune_layers=3"),
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
