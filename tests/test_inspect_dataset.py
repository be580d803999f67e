"""``imgclf inspect-dataset``: every defect is reported with its path, and nothing is modified."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgclf_cli.cli.app import app
from imgclf_cli.duplicates import band_layout, hamming_distances, near_duplicate_pairs, perceptual_hash_of
from imgclf_cli.inspection import inspect_dataset

from conftest import make_class_folders, make_image

runner = CliRunner()


def make_scene(size: int = 96) -> Image.Image:
    """A smooth picture with a shape in it: what a perceptual hash is meant for (unlike noise)."""
    y, x = np.mgrid[0:size, 0:size] / size
    red = 255 * x
    green = 255 * y
    blue = 255 * (((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.06)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8), "RGB")


def save_jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def defective_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/val splits of cat/dog (and an empty bird/) holding one of each defect."""
    root = tmp_path_factory.mktemp("defects") / "data"
    rng = np.random.default_rng(1)
    cat, dog, val_dog = root / "train" / "cat", root / "train" / "dog", root / "val" / "dog"
    for folder in (cat, dog, val_dog, root / "val" / "cat", root / "train" / "bird"):
        folder.mkdir(parents=True)
    for index in range(3):
        make_image((200, 120, 40), rng).save(cat / f"cat_{index}.png")
        make_image((40, 120, 200), rng).save(dog / f"dog_{index}.png")
        make_image((40, 120, 200), rng).save(val_dog / f"val_dog_{index}.png")
        make_image((200, 120, 40), rng).save(root / "val" / "cat" / f"val_cat_{index}.png")

    (cat / "truncated.jpg").write_bytes(save_jpeg_bytes(make_image((90, 90, 90), rng, (64, 64)))[:400])
    (cat / "empty.jpg").write_bytes(b"")
    (dog / "notes.jpg").write_text("these are not pixels\n")
    make_image((10, 200, 10), rng).save(dog / "png_named.jpg", format="PNG")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(dog / "rgba.png")
    make_image((150, 30, 90), rng).convert("CMYK").save(cat / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(dog / "deep.png")
    make_image((1, 2, 3), rng, (8, 8)).save(dog / "tiny.png")

    duplicate = make_image((220, 100, 60), rng)
    duplicate.save(cat / "dup.png")
    (cat / "dup_copy.png").write_bytes((cat / "dup.png").read_bytes())
    make_image((120, 120, 120), rng).save(cat / "shared.png")
    (dog / "shared.png").write_bytes((cat / "shared.png").read_bytes())
    make_image((30, 60, 90), rng).save(dog / "leak.png")
    (val_dog / "leak.png").write_bytes((dog / "leak.png").read_bytes())

    scene = make_scene()
    scene.save(cat / "scene.png")
    (cat / "scene_small.jpg").write_bytes(save_jpeg_bytes(scene.resize((64, 64)), quality=70))

    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / "._dup.png").write_bytes(b"\x00\x05\x16\x07")
    (cat / "readme.txt").write_text("collected in 2024\n")
    (root / "README.md").write_text("a dataset\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (hidden ones included) with its bytes and mtime."""
    return {
        path.relative_to(root).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def run_json(*arguments: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["inspect-dataset", *arguments, "--json"])
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def defect_report(defective_dataset: Path) -> dict:
    before = snapshot(defective_dataset)
    exit_code, document = run_json(str(defective_dataset))
    assert exit_code == 0
    assert snapshot(defective_dataset) == before
    return document


def finding(document: dict, code: str) -> dict:
    matches = [entry for entry in document["findings"] if entry["code"] == code]
    assert matches, f"no {code} finding in {[entry['code'] for entry in document['findings']]}"
    return matches[0]


def test_counts_classes_and_splits(defect_report: dict) -> None:
    assert defect_report["layout"] == "splits"
    assert defect_report["classes"]["bird"] == 0
    assert defect_report["splits"]["val"]["dog"] == 4
    assert set(defect_report["splits"]) == {"train", "val"}
    assert defect_report["num_images"] == sum(defect_report["classes"].values())
    assert set(defect_report["sizes"]) == {"width", "height", "aspect_ratio"}
    assert defect_report["sizes"]["width"]["min"] == 8
    assert defect_report["per_split"]["val"]["images"] == 7
    assert defect_report["per_class"]["cat"]["corrupt"] == 2
    assert defect_report["imbalance_ratio"] is None  # bird has no image


def test_undecodable_files_are_corrupt_with_a_reason(defect_report: dict) -> None:
    reasons = {entry["path"]: entry["reason"] for entry in defect_report["corrupt"]}
    assert set(reasons) == {"train/cat/truncated.jpg", "train/cat/empty.jpg", "train/dog/notes.jpg"}
    assert "truncated" in reasons["train/cat/truncated.jpg"]
    assert "empty" in reasons["train/cat/empty.jpg"]
    assert "text" in reasons["train/dog/notes.jpg"]
    assert defect_report["non_image_files"] == [
        {"path": "train/cat/readme.txt", "reason": "not an image: the file holds text"}
    ]


def test_format_comes_from_content(defect_report: dict) -> None:
    assert defect_report["extension_mismatch"] == [
        {"path": "train/dog/png_named.jpg", "extension": ".jpg", "format": "PNG"}
    ]
    assert defect_report["formats"]["JPEG"] == 2  # cmyk.jpg and scene_small.jpg


def test_colour_modes_and_small_images(defect_report: dict) -> None:
    modes = defect_report["modes"]
    assert modes["RGBA"] == 1 and modes["CMYK"] == 1 and modes["16-bit L"] == 1
    examples = finding(defect_report, "colour_modes")["examples"]
    assert {"train/dog/rgba.png", "train/cat/cmyk.jpg", "train/dog/deep.png"} <= set(examples)
    assert defect_report["small_images"] == [{"path": "train/dog/tiny.png", "width": 8, "height": 8}]


def test_exact_duplicates_are_grouped_by_kind(defect_report: dict) -> None:
    duplicates = defect_report["duplicates"]
    assert duplicates["within_class"] == [["train/cat/dup.png", "train/cat/dup_copy.png"]]
    assert duplicates["cross_class"] == [["train/cat/shared.png", "train/dog/shared.png"]]
    assert duplicates["cross_split"] == [["train/dog/leak.png", "val/dog/leak.png"]]


def test_near_duplicate_made_by_resizing_and_reencoding(defect_report: dict) -> None:
    near = defect_report["near_duplicates"]
    assert near["within_class"] == [["train/cat/scene.png", "train/cat/scene_small.jpg"]]
    assert near["cross_class"] == [] and near["cross_split"] == []


def test_empty_class_hidden_and_ignored_files(defect_report: dict) -> None:
    assert defect_report["empty_class_folders"] == ["train/bird"]
    assert "bird" in finding(defect_report, "empty_class")["message"]
    assert {"train/cat/.DS_Store", "train/cat/._dup.png"} <= set(defect_report["hidden_files"])
    assert defect_report["ignored_paths"] == ["README.md"]


def test_findings_are_ordered_by_severity_with_what_to_do(defect_report: dict) -> None:
    severities = [entry["severity"] for entry in defect_report["findings"]]
    order = {"error": 0, "warning": 1, "info": 2}
    assert severities == sorted(severities, key=order.__getitem__)
    codes = {entry["code"]: entry["severity"] for entry in defect_report["findings"]}
    assert codes["corrupt"] == codes["duplicates_cross_class"] == codes["duplicates_cross_split"] == "error"
    assert codes["duplicates_within_class"] == codes["extension_mismatch"] == "warning"
    assert all(entry["action"] for entry in defect_report["findings"])


def test_strict_exits_1_on_errors_and_0_when_clean(defective_dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect-dataset", str(defective_dataset), "--strict"])
    assert result.exit_code == 1
    assert "train/cat/truncated.jpg" in result.stdout
    assert "What to do:" in result.stdout
    exit_code, document = run_json(str(defective_dataset), "--strict")
    assert exit_code == 1 and document["num_errors"] >= 3

    clean = make_class_folders(tmp_path / "clean", per_class=4)
    result = runner.invoke(app, ["inspect-dataset", str(clean), "--strict"])
    assert result.exit_code == 0, result.output
    assert "No problems found." in result.stdout


def test_cross_class_duplicate_in_folders_layout(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", per_class=3)
    (root / "green" / "also_red.png").write_bytes((root / "red" / "red_000.png").read_bytes())
    exit_code, document = run_json(str(root), "--no-near-duplicates")
    assert exit_code == 0
    assert document["layout"] == "folders" and document["splits"] is None
    assert document["duplicates"]["cross_class"] == [["green/also_red.png", "red/red_000.png"]]
    assert document["near_duplicates"] is None
    assert document["classes"] == {"blue": 3, "green": 4, "red": 3}


def test_splits_are_listed_train_val_test(tmp_path: Path) -> None:
    for split in ("val", "test", "train"):
        make_class_folders(tmp_path / "data" / split, per_class=2, seed=len(split))
    exit_code, document = run_json(str(tmp_path / "data"))
    assert exit_code == 0
    assert list(document["splits"]) == ["train", "val", "test"]
    assert document["splits"]["test"] == {"blue": 2, "green": 2, "red": 2}
    assert document["findings"] == []


def test_report_writes_json_and_plots_without_touching_the_data(
    defective_dataset: Path, tmp_path: Path
) -> None:
    before = snapshot(defective_dataset)
    report_dir = tmp_path / "report"
    result = runner.invoke(app, ["inspect-dataset", str(defective_dataset), "--report", str(report_dir)])
    assert result.exit_code == 0, result.output
    names = {path.name for path in report_dir.iterdir()}
    assert names == {
        "inspection.json",
        "class_distribution.png",
        "image_sizes.png",
        "samples.png",
        "near_duplicates.png",
    }
    for name in names - {"inspection.json"}:
        with Image.open(report_dir / name) as image:
            assert image.format == "PNG" and image.width > 100
    assert json.loads((report_dir / "inspection.json").read_text())["num_images"] > 0
    assert snapshot(defective_dataset) == before


def test_report_inside_the_dataset_is_refused(defective_dataset: Path) -> None:
    before = snapshot(defective_dataset)
    result = runner.invoke(
        app, ["inspect-dataset", str(defective_dataset), "--report", str(defective_dataset / "out")]
    )
    assert result.exit_code == 2
    assert "inside the dataset folder" in result.stderr
    assert snapshot(defective_dataset) == before


def make_unusable_dataset(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing"
    if kind == "file":
        (tmp_path / "file.txt").write_text("x")
        return tmp_path / "file.txt"
    (tmp_path / "flat").mkdir()
    make_image((1, 2, 3), np.random.default_rng(0)).save(tmp_path / "flat" / "loose.png")
    return tmp_path / "flat"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "Dataset folder not found"),
        ("file", "Dataset path is not a folder"),
        ("no_class_folders", "No class folders"),
    ],
)
def test_unusable_dataset_is_one_clear_error(tmp_path: Path, kind: str, message: str) -> None:
    result = runner.invoke(app, ["inspect-dataset", str(make_unusable_dataset(tmp_path, kind))])
    assert result.exit_code == 1
    assert f"Error: {message}" in result.stderr
    assert "Hint:" in result.stderr
    assert "Traceback" not in result.output


def test_hash_distance_is_validated_by_the_option() -> None:
    result = runner.invoke(app, ["inspect-dataset", ".", "--hash-distance", "40"])
    assert result.exit_code == 2


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["inspect-dataset", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout and "--hash-distance" in result.stdout


def test_no_tensorflow_and_matplotlib_only_for_report(defective_dataset: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from imgclf_cli.cli.app import app

        heavy = ("tensorflow", "keras", "sklearn")
        result = CliRunner().invoke(app, ["inspect-dataset", {str(defective_dataset)!r}, "--json"])
        assert result.exit_code == 0, result.output
        print("plain", sorted(name for name in (*heavy, "matplotlib") if name in sys.modules))
        report_dir = {str(tmp_path / "report")!r}
        arguments = ["inspect-dataset", {str(defective_dataset)!r}, "--report", report_dir]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, result.output
        print("report", sorted(name for name in heavy if name in sys.modules))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "plain []" in completed.stdout
    assert "report []" in completed.stdout


def test_perceptual_hash_survives_resizing_and_reencoding() -> None:
    import io

    scene = make_scene(128)
    copy = Image.open(io.BytesIO(save_jpeg_bytes(scene.resize((80, 80)), quality=60)))
    copy.load()
    distance = (perceptual_hash_of(scene) ^ perceptual_hash_of(copy)).bit_count()
    assert distance <= 4
    other = make_scene(128).transpose(Image.Transpose.ROTATE_90)
    assert (perceptual_hash_of(scene) ^ perceptual_hash_of(other)).bit_count() > 10


@pytest.mark.parametrize("max_distance", [0, 3, 6, 10])
def test_banded_search_finds_the_same_pairs_as_all_pairs(max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, 300, dtype=np.uint64
    )
    # Plant close pairs: copies with a few bits flipped.
    for index in range(0, 60, 2):
        flips = rng.choice(64, size=int(rng.integers(0, max_distance + 3)), replace=False)
        hashes[index + 1] = hashes[index] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    distances = hamming_distances(hashes[:, None], hashes[None, :])
    first, second = np.nonzero(np.triu(distances <= max_distance, 1))
    expected = {(int(a), int(b)) for a, b in zip(first, second, strict=True)}
    found = {(int(a), int(b)) for a, b in near_duplicate_pairs(hashes, max_distance)}
    assert found == expected and expected
    assert sum(width for _, width in band_layout(max_distance)) == 64


def test_library_call_reports_progress(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", per_class=2)
    calls: list[tuple[int, int]] = []
    report = inspect_dataset(root, on_progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)
    assert report.num_images == 6 and not report.has_errors


# --- the report's plots -----------------------------------------------------------------------


def random_scene(rng: np.random.Generator, size: int = 128, grain: int = 15) -> Image.Image:
    """A smooth picture with a photograph's grain: far (in perceptual hash) from any other one."""
    grid = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), "RGB")
    pixels = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC)).astype(int)
    pixels += rng.integers(-grain, grain, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def many_duplicates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 duplicate groups: 20 near duplicates within class a (first in the file tree), then 4
    byte-identical images in classes b and c (the report's errors)."""
    root = tmp_path_factory.mktemp("duplicates") / "data"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
    for index in range(20):
        scene = random_scene(rng)
        scene.save(root / "a" / f"burst_{index:02d}.png")
        (root / "a" / f"burst_{index:02d}_small.jpg").write_bytes(save_jpeg_bytes(scene.resize((100, 100))))
    for index in range(4):
        random_scene(rng).save(root / "b" / f"shared_{index}.png")
        (root / "c" / f"shared_{index}.png").write_bytes((root / "b" / f"shared_{index}.png").read_bytes())
    return root


def test_near_duplicates_plot_shows_the_worst_groups_first_and_says_how_many(
    many_duplicates: Path, tmp_path: Path
) -> None:
    from imgclf_cli.inspection_plots import duplicate_pairs_to_draw, plot_near_duplicates

    report = inspect_dataset(many_duplicates)
    assert len(report.duplicates.cross_class) == 4 and len(report.near_duplicates.within_class) == 20
    pairs, total = duplicate_pairs_to_draw(report)
    assert (len(pairs), total) == (12, 24)
    # The byte-identical images filed under both classes (errors) come before the near duplicates.
    assert [pair.kind.description for pair in pairs[:4]] == ["same file in two classes"] * 4
    assert all(pair.first.class_name != pair.second.class_name for pair in pairs[:4])
    assert {pair.kind.description for pair in pairs[4:]} == {"near duplicates within a class"}

    figure = plot_near_duplicates(report, pairs, total, tmp_path / "near_duplicates.png")
    assert "12 of 24 groups shown" in figure.get_suptitle()
    cell_titles = [cell.get_suptitle() for cell in figure.subfigs]
    assert cell_titles[0] == "same file in two classes, identical bytes"
    assert cell_titles[4].startswith("near duplicates within a class, ") and "bits apart" in cell_titles[4]
    with Image.open(tmp_path / "near_duplicates.png") as image:
        width, height = image.size
    assert height <= 2000 and width <= 1000, (width, height)
    assert (tmp_path / "near_duplicates.png").stat().st_size < 1_000_000


def test_image_sizes_plot_of_one_size_says_so(tmp_path: Path) -> None:
    from imgclf_cli.inspection_plots import plot_image_sizes

    report = inspect_dataset(make_class_folders(tmp_path / "data", per_class=4))
    figure = plot_image_sizes(report, tmp_path / "image_sizes.png")
    (axis,) = figure.axes
    assert [text.get_text() for text in axis.texts] == ["All 12 images are 40×48 px (width × height)"]
    assert not axis.collections and not axis.lines  # no scatter of one dot, no unexplained lines
    with Image.open(tmp_path / "image_sizes.png") as image:
        assert image.height < image.width / 2


def test_image_sizes_plot_counts_each_size_and_labels_the_small_side(
    defective_dataset: Path, many_duplicates: Path, tmp_path: Path
) -> None:
    from imgclf_cli.inspection_plots import plot_image_sizes

    with_small = plot_image_sizes(inspect_dataset(defective_dataset), tmp_path / "small.png")
    (axis,) = with_small.axes
    assert len(axis.lines) == 2  # the small-side lines, drawn because an 8x8 image is there
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    assert "32 px: below it an image is reported as very small" in legend

    without_small = plot_image_sizes(inspect_dataset(many_duplicates), tmp_path / "two_sizes.png")
    (axis,) = without_small.axes
    assert not axis.lines
    assert axis.get_title() == "Image sizes: 48 images, 2 sizes\nmost common 128×128 (28 images)"
    assert sorted(text.get_text() for text in axis.texts) == ["100×100: 20", "128×128: 28"]
