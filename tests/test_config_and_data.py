"""Config precedence and validation, image decoding, dataset scanning and splitting (no TensorFlow)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf_cli.config import Config, all_keys, documented_yaml, resolve_config
from imgclf_cli.dataset import SplitManifest, make_manifest, scan_dataset, stratified_split
from imgclf_cli.dataset_layout import list_dataset
from imgclf_cli.errors import ConfigError, DatasetError, UsageError
from imgclf_cli.images import UnreadableImage, load_image, read_header

from conftest import make_class_folders

# --- config ---------------------------------------------------------------------------------


def test_precedence_defaults_yaml_set_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("train:\n  epochs: 7\n  learning_rate: 0.5\ndata:\n  batch_size: 4\nseed: 3\n")
    config = resolve_config(
        config_file,
        overrides=["train.epochs=9", "data.batch_size=6"],
        flags={"data.batch_size": 12, "seed": None},
    )
    assert config.train.learning_rate == 0.5  # YAML beats default
    assert config.train.epochs == 9  # --set beats YAML
    assert config.data.batch_size == 12  # flag beats --set
    assert config.seed == 3  # a flag not given (None) changes nothing
    assert config.train.label_smoothing == Config().train.label_smoothing


def test_unknown_key_suggests_the_closest_keys_not_all_of_them(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("train:\n  epoks: 7\n")
    with pytest.raises(ConfigError) as caught:
        resolve_config(config_file)
    assert (
        caught.value.message
        == f"Unknown config key 'train.epoks' in {config_file}. Did you mean train.epochs?"
    )
    assert caught.value.hint == "imgclf train --print-config lists every key"
    assert caught.value.exit_code == 2  # a usage error, as the same mistake in --set is
    for override, expected in [
        ("train.epoch=3", "Did you mean train.epochs?"),
        ("train.optimzer=adam", "Did you mean train.optimizer?"),
        ("train.batch_size=8", "Did you mean data.batch_size?"),  # the right key in another section
        ("epochs=3", "Did you mean train.epochs?"),
    ]:
        with pytest.raises(UsageError) as caught:
            resolve_config(overrides=[override])
        assert caught.value.message.endswith(expected), caught.value.message
        assert "learning_rate" not in str(caught.value)  # no list of every key
    with pytest.raises(UsageError) as caught:
        resolve_config(overrides=["zzz=1"])
    assert caught.value.message == "Unknown config key 'zzz' (--set zzz=1)"  # nothing close


def test_bad_choice_and_model_name_suggest_the_closest() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_config(overrides=["train.optimizer=adamx"])
    assert "expects adamw | adam | sgd, got 'adamx'. Did you mean adam or adamw?" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        resolve_config(overrides=["data.cache=memroy"])
    assert caught.value.message.endswith("Did you mean memory?")
    with pytest.raises(ConfigError) as caught:
        resolve_config(flags={"model.name": "resnet5"})
    assert caught.value.message == "Unknown model 'resnet5'. Did you mean resnet50 or resnet50_v2?"
    assert caught.value.hint == "imgclf train --help lists every model"
    assert caught.value.exit_code == 2
    assert resolve_config(flags={"model.name": "ResNet50V2"}).model.name == "ResNet50V2"  # Keras' spelling


def test_config_errors_are_usage_errors() -> None:
    """A bad key and a bad value exit alike, from --set, a flag or a config file."""
    assert (
        issubclass(ConfigError, UsageError) and ConfigError("x").exit_code == UsageError("x").exit_code == 2
    )


def test_wrong_type_names_expected_type() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_config(overrides=["train.epochs=many"])
    assert (
        "train.epochs" in caught.value.message
        and "int" in caught.value.message
        and "'many'" in caught.value.message
    )
    with pytest.raises(ConfigError):
        resolve_config(overrides=["train.lr_schedule=linear"])
    with pytest.raises(ConfigError):
        resolve_config(overrides=["augment.horizontal_flip=3"])


def test_bad_set_is_usage_error() -> None:
    with pytest.raises(UsageError):
        resolve_config(overrides=["train.epochs"])
    with pytest.raises(UsageError):
        resolve_config(overrides=["nope.key=1"])


def test_set_values_are_yaml_typed() -> None:
    config = resolve_config(
        overrides=[
            "data.image_size=[64, 96]",
            "train.class_weights={a: 2, b: 1}",
            "model.freeze_backbone=true",
        ]
    )
    assert config.image_size == (64, 96)
    assert config.train.class_weights == {"a": 2.0, "b": 1.0}
    assert config.model.freeze_backbone == "true"


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    config_file = tmp_path / "broken.yaml"
    config_file.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as caught:
        resolve_config(config_file)
    assert "Invalid YAML" in caught.value.message and "line" in caught.value.message


def test_documented_yaml_lists_every_key_and_round_trips() -> None:
    import yaml

    text = documented_yaml()
    for key in all_keys():
        assert f"{key.split('.')[-1]}:" in text
    reloaded = yaml.safe_load(text)
    assert resolve_config(base=reloaded).to_dict() == Config().to_dict()


def test_documented_yaml_of_a_config_shows_its_values_with_the_same_comments(tmp_path: Path) -> None:
    import yaml

    config_file = tmp_path / "c.yaml"
    config_file.write_text("train:\n  epochs: 3\n")
    config = resolve_config(
        config_file, overrides=["data.image_size=[64, 96]", "train.class_weights={a: 2}"], flags={"seed": 7}
    )
    text = documented_yaml(config)
    assert resolve_config(base=yaml.safe_load(text)).to_dict() == config.to_dict()
    assert "  epochs: 3  # int. With train.time_budget" in text
    assert "  image_size: [64, 96]  # auto | int | list of int. Input size:" in text
    comments = [line.partition("  # ")[2] for line in text.splitlines()[2:]]
    assert comments == [line.partition("  # ")[2] for line in documented_yaml().splitlines()[2:]]


def test_decided_config_records_what_each_auto_became() -> None:
    backbone = resolve_config(flags={"model.name": "MobileNetV3Small", "data.image_size": 96})
    decided = backbone.decided(
        "mixed_bfloat16", "MirroredStrategy", False, True, {0: 0.5, 1: 2.0}, ["a", "b"]
    )
    assert (decided.model.name, decided.model.weights) == ("mobilenet_v3_small", "imagenet")
    assert (decided.data.cache, decided.model.freeze_backbone) == ("disk", "true")
    assert (decided.train.mixed_precision, decided.train.distribute) == ("true", "mirrored")
    assert decided.train.class_weights == {"a": 0.5, "b": 2.0}
    assert decided.train.cache_features == "auto"  # no spelling for "cache" yet
    assert backbone.model.freeze_backbone == "auto"  # a copy: training goes on deciding as before
    # What a resumed run reads back: the same values, valid.
    assert resolve_config(base=decided.to_dict()).to_dict() == decided.to_dict()

    scratch = resolve_config(overrides=["data.cache=none", "train.mixed_precision=true"])
    decided = scratch.decided("float32", "_DefaultDistributionStrategy", True, False, None, ["a", "b"])
    assert (decided.model.weights, decided.model.freeze_backbone) == ("none", "false")
    assert (decided.data.cache, decided.train.mixed_precision) == ("none", "true")  # given: kept
    assert (decided.train.distribute, decided.train.class_weights) == ("none", "none")
    assert decided.train.cache_features == "false"


def test_auto_image_size() -> None:
    config = Config()
    config.resolve_image_size(28)
    assert config.image_size == (32, 32)
    config = Config()
    config.resolve_image_size(1000)
    assert config.image_size == (128, 128)
    config = resolve_config(overrides=["model.name=mobilenet_v3_small"])
    config.resolve_image_size(28)
    assert config.image_size == (224, 224)


# --- image decoding -------------------------------------------------------------------------


def solid(mode: str, size: tuple[int, int] = (20, 10), colour: object = None) -> Image.Image:
    return Image.new(mode, size, colour if colour is not None else 128)


def test_png_named_jpg_is_decoded_by_content(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    solid("RGB", colour=(255, 0, 0)).save(path, format="PNG")
    assert read_header(path).format == "PNG"
    pixels = load_image(path, (8, 8))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[4, 4]) == (255, 0, 0)


@pytest.mark.parametrize(
    ("mode", "fmt", "colour"),
    [
        ("L", "PNG", 200),
        ("P", "GIF", 3),
        ("RGBA", "PNG", (10, 20, 30, 0)),
        ("CMYK", "JPEG", (0, 255, 255, 0)),
        ("RGB", "BMP", (1, 2, 3)),
        ("RGB", "WEBP", (0, 0, 255)),
        ("I;16", "PNG", 40000),
    ],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str, fmt: str, colour: object) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    solid(mode, colour=colour).save(path, format=fmt)
    pixels = load_image(path, (12, 12))
    assert pixels.shape == (12, 12, 3)


def test_cmyk_red_decodes_as_red(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    solid("CMYK", colour=(0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    red, green, blue = load_image(path, (4, 4))[2, 2].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_gif_uses_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "animated.gif"
    frames = [solid("RGB", colour=(255, 0, 0)), solid("RGB", colour=(0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    red, _, blue = load_image(path, (4, 4))[2, 2].astype(int)
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 20 wide, 10 high, left half red, right half blue; EXIF 6 = rotate 90 degrees clockwise.
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    pixels = load_image(path, (20, 10)).astype(int)  # (height, width): now portrait
    top, bottom = pixels[2, 5], pixels[17, 5]
    assert top[0] > 200 and top[2] < 60  # red on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60


def test_truncated_and_non_images_are_unreadable(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableImage):
        load_image(truncated, (8, 8))
    with pytest.raises(UnreadableImage, match="not an image"):
        read_header(text)
    with pytest.raises(UnreadableImage, match="empty"):
        read_header(empty)


# --- scanning and splitting -----------------------------------------------------------------


def test_scan_skips_bad_files_and_reports_them(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", per_class=5)
    (root / "red" / "broken.jpg").write_text("garbage")
    (root / "red" / ".hidden.png").write_text("ignored")
    (root / "green" / "empty.png").write_bytes(b"")
    scan = scan_dataset(root)
    assert scan.classes == ["blue", "green", "red"]
    assert scan.num_images == 15
    skipped = {Path(entry.path).name: entry.reason for entry in scan.skipped}
    assert set(skipped) == {"broken.jpg", "empty.png"}
    assert "empty" in skipped["empty.png"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "not found"),
        (lambda root: root.mkdir(), "No class folders"),
        (lambda root: make_class_folders(root, per_class=2, classes={"only": (1, 2, 3)}), "Only one class"),
    ],
)
def test_unusable_datasets_are_errors(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DatasetError, match=message):
        scan_dataset(root)


def test_class_without_readable_images_is_an_error(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", per_class=3)
    (root / "empty_class").mkdir()
    (root / "empty_class" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="empty_class"):
        scan_dataset(root)


def test_training_and_inspection_share_one_listing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_class_folders(root / "train", per_class=2)
    make_class_folders(root / "val", per_class=1, seed=1)
    (root / "train" / "red" / "nested").mkdir()
    (root / "train" / "red" / "red_000.png").rename(root / "train" / "red" / "nested" / "deep.png")
    (root / "train" / "red" / ".DS_Store").write_bytes(b"x")
    (root / "val" / "grey").mkdir()
    (root / "README.md").write_text("a dataset")
    listing = list_dataset(root)
    assert (listing.layout, listing.splits) == ("splits", ["train", "val"])
    assert listing.classes == ["blue", "green", "grey", "red"]
    assert "train/red/nested/deep.png" in [file.relative_path for file in listing.files]
    assert listing.empty_class_folders == ["val/grey"]
    assert listing.hidden_files == ["train/red/.DS_Store"]
    assert listing.ignored_paths == ["README.md"]
    with pytest.raises(DatasetError, match="grey"):  # training refuses the class without images
        scan_dataset(root)
    (root / "val" / "grey").rmdir()
    scan = scan_dataset(root)
    assert sorted(sample.path for samples in scan.splits.values() for sample in samples) == sorted(
        str(file.path) for file in list_dataset(root).files
    )


def test_stratified_split_is_seeded_and_keeps_class_shares(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", per_class=20, classes={"a": (1, 1, 1), "b": (9, 9, 9)})
    make_class_folders(root, per_class=5, classes={"c": (50, 50, 50)})
    samples = scan_dataset(root).splits["all"]
    train, val = stratified_split(samples, 0.2, seed=1)
    per_class_val = {label: sum(1 for s in val if s.label == label) for label in range(3)}
    assert per_class_val == {0: 4, 1: 4, 2: 1}
    assert not {s.path for s in train} & {s.path for s in val}
    assert stratified_split(samples, 0.2, seed=1) == (train, val)
    assert stratified_split(samples, 0.2, seed=2)[1] != val


def test_split_layout_uses_given_splits_and_manifest_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_class_folders(root / "train", per_class=6)
    make_class_folders(root / "valid", per_class=2, seed=1)
    make_class_folders(root / "test", per_class=3, seed=2)
    scan = scan_dataset(root)
    assert scan.layout == "splits"
    manifest = make_manifest(scan, 0.2, seed=0)
    assert (len(manifest.train), len(manifest.val), len(manifest.test)) == (18, 6, 9)
    assert all("/valid/" in s.path for s in manifest.val)
    assert SplitManifest.from_json(manifest.to_json()) == manifest


def test_light_commands_do_not_import_tensorflow() -> None:
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from imgclf_cli.cli.app import app\n"
        "runner = CliRunner()\n"
        "for args in (['--help'], ['--version'], ['train', '--help'], ['evaluate', '--help'],"
        " ['predict', '--help'], ['export', '--help'], ['inspect-dataset', '--help'],"
        " ['train', '--print-config'],"
        " ['train', '--print-config', '--model', 'resnet50', '--epochs', '3']):\n"
        "    result = runner.invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "heavy = [name for name in ('tensorflow', 'keras', 'sklearn', 'matplotlib') if name in sys.modules]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_readme_config_reference_is_current() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert documented_yaml() in readme, (
        "README's config reference is stale: paste `imgclf train --print-config`"
    )
