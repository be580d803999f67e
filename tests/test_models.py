"""Model building blocks: the combined augmentation layer, the model names."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from imgclf_cli.models import RandomAffine  # noqa: E402


def gradient_images(count: int = 16, size: int = 24) -> np.ndarray:
    """Images with no symmetry, so any flip, shift or turn changes them."""
    rows, cols = np.mgrid[0:size, 0:size].astype("float32")
    image = np.stack([rows * 10, cols * 7 + rows, (rows * cols) % 255], axis=-1)
    return np.stack([image] * count)


def test_random_affine_is_identity_at_inference() -> None:
    images = gradient_images()
    layer = RandomAffine(
        horizontal_flip=True, vertical_flip=True, rotation=0.2, zoom=0.3, translation=0.2, seed=1
    )
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)


def test_random_affine_flip_only_gives_the_image_or_its_mirror() -> None:
    images = gradient_images()
    output = np.asarray(RandomAffine(horizontal_flip=True, seed=5)(images, training=True))
    kinds = []
    for picture in output:
        if np.allclose(picture, images[0], atol=1e-3):
            kinds.append("same")
        elif np.allclose(picture, images[0][:, ::-1], atol=1e-3):
            kinds.append("mirror")
        else:
            kinds.append("other")
    assert "other" not in kinds
    assert {"same", "mirror"} == set(kinds)  # 16 coin flips: both sides show up


def test_random_affine_warps_within_the_input_range_and_repeats_with_its_seed() -> None:
    images = gradient_images()

    def augment() -> np.ndarray:
        layer = RandomAffine(rotation=0.05, zoom=0.1, translation=0.1, horizontal_flip=False, seed=7)
        return np.asarray(layer(images, training=True))

    first, second = augment(), augment()
    np.testing.assert_allclose(first, second)
    changed = [not np.allclose(picture, images[0], atol=1e-3) for picture in first]
    assert sum(changed) >= 14
    assert first.min() >= images.min() - 1e-3 and first.max() <= images.max() + 1e-3  # reflect fill, bilinear


def test_random_affine_survives_a_save_and_safe_mode_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    inputs = keras.Input((24, 24, 3))
    outputs = keras.layers.GlobalAveragePooling2D()(RandomAffine(rotation=0.1, seed=3)(inputs))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    layer = next(layer for layer in loaded.layers if isinstance(layer, RandomAffine))
    assert (layer.rotation, layer.seed, layer.horizontal_flip) == (0.1, 3, True)
    np.testing.assert_allclose(np.asarray(loaded(gradient_images(2))), np.asarray(model(gradient_images(2))))


def test_the_light_name_list_is_the_architecture_registry() -> None:
    """The config checks names in ``model_names`` without Keras; ``models`` builds them."""
    from imgclf_cli import model_names, models

    assert list(models.BACKBONES) == list(model_names.BACKBONE_NAMES)
    assert models.canonical_model_name is model_names.canonical_model_name
    for name, backbone in models.BACKBONES.items():
        assert models.canonical_model_name(backbone.constructor) == name  # Keras' class names work too
        assert models.canonical_model_name(name.replace("_", "-").upper()) == name
