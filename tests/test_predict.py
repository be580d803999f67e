"""``imgclf predict``: paths, formats, options, unreadable files, and no TensorFlow in the light path."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgclf_cli.cli.app import app
from imgclf_cli.console import shorten_from_left
from imgclf_cli.prediction import FoundImage, collect_paths

from conftest import CLASS_COLOURS, make_class_folders

runner = CliRunner()
LABELS = sorted(CLASS_COLOURS)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images per class, a nested folder, a hidden file, a text file and a truncated PNG."""
    root = make_class_folders(tmp_path_factory.mktemp("predict") / "images", per_class=2, seed=3)
    nested = root / "red" / "more" / "deeper"
    nested.mkdir(parents=True)
    (nested / "red_nested.png").write_bytes((root / "red" / "red_000.png").read_bytes())
    (root / "green" / ".hidden.png").write_bytes((root / "green" / "green_000.png").read_bytes())
    (root / "green" / "notes.txt").write_text("not an image")
    good = (root / "blue" / "blue_000.png").read_bytes()
    (root / "blue" / "blue_000b.png").write_bytes(good[: len(good) // 2])
    # No extension: found by its content.
    (root / "blue" / "blue_noext").write_bytes(good)
    return root


def invoke(*args: str) -> object:
    return runner.invoke(app, ["predict", *args])


def predict_json(*args: str) -> tuple[object, list[dict]]:
    result = invoke(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout)


def test_collect_paths_recursive_hidden_globs_and_duplicates(images: Path) -> None:
    pattern = str(images / "blue" / "*.png")
    entries = collect_paths([images / "green", images / "red", pattern, images / "red" / "red_000.png"])
    paths = [Path(entry.path) for entry in entries if isinstance(entry, FoundImage)]
    names = [path.name for path in paths]
    assert names == [
        "green_000.png", "green_001.png",
        "red_nested.png", "red_000.png", "red_001.png",
        "blue_000.png", "blue_000b.png", "blue_001.png",
    ]  # fmt: skip
    assert ".hidden.png" not in names and "notes.txt" not in names
    assert len(set(paths)) == len(paths)
    # Found in a folder argument: the folder is kept to show paths relative to it; by a pattern: not.
    assert [entry.folder for entry in entries[:2]] == [str(images / "green")] * 2  # type: ignore[union-attr]
    assert {entry.folder for entry in entries[5:]} == {None}  # type: ignore[union-attr]
    found = collect_paths([images / "blue"])
    assert "blue_noext" in [Path(entry.path).name for entry in found]  # type: ignore[union-attr]
    missing = collect_paths([images / "absent.png", str(images / "*.nothing")])
    assert [(entry.path, entry.error) for entry in missing] == [  # type: ignore[union-attr]
        (str(images / "absent.png"), "file not found"),
        (str(images / "*.nothing"), "no file matches this pattern"),
    ]


def test_json_results_match_the_model_one_image_at_a_time(trained_run: dict[str, Path], images: Path) -> None:
    import keras

    from imgclf_cli.images import load_image
    from imgclf_cli.inference import image_size_of_keras_model

    result, entries = predict_json(str(images), "--model", str(trained_run["run_dir"]), "--batch-size", "3")
    assert [Path(entry["path"]).name for entry in entries] == [
        "blue_000.png", "blue_000b.png", "blue_001.png", "blue_noext",
        "green_000.png", "green_001.png",
        "red_nested.png", "red_000.png", "red_001.png",
    ]  # fmt: skip
    broken = entries[1]
    assert broken["path"] == str(images / "blue" / "blue_000b.png")
    assert (broken["label"], broken["confidence"], broken["top_k"]) == (None, None, [])
    assert broken["error"] and "blue_000b.png" in result.stderr and "Warning" in result.stderr

    model = keras.saving.load_model(trained_run["run_dir"] / "best.keras", compile=False)
    size = image_size_of_keras_model(model)
    for entry in entries:
        assert set(entry) == {"path", "label", "confidence", "top_k", "error"}
        if entry["error"]:
            continue
        image = load_image(entry["path"], size)[None].astype("float32")
        expected = np.asarray(model(image, training=False))[0]
        assert entry["label"] == LABELS[int(expected.argmax())], entry["path"]
        assert entry["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert [item["label"] for item in entry["top_k"]] == [LABELS[i] for i in np.argsort(-expected)]
        assert entry["top_k"][0] == {"label": entry["label"], "probability": entry["confidence"]}
        probabilities = [item["probability"] for item in entry["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)


def test_default_table_output(trained_run: dict[str, Path], images: Path) -> None:
    broken = str(images / "blue" / "blue_000b.png")
    result = invoke(str(images / "red"), broken, "--model", str(trained_run["run_dir"]))
    assert result.exit_code == 0, result.output
    for name in ("red_000.png", "red_001.png", "red_nested.png", "blue_000b.png"):
        assert name in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == f"Images in {images / 'red'}"
    header = lines[2]
    assert all(column in header for column in ("path", "label", "confidence", "top 3"))
    # Inside the folder argument, paths are relative to it; a file argument is shown as given.
    assert any(line.startswith("│ more/deeper/red_nested.png ") for line in lines)
    assert any(line.startswith(f"│ {broken} ") for line in lines)
    assert "error:" in result.stdout
    assert "Predicted 3 of 4 images" in result.stderr
    assert "Predicted" not in result.stdout


LONG_FOLDERS = ("a_folder_name_long_enough_to_need_shortening", "and_another_one_below_it") * 3


@pytest.fixture
def deep_image(images: Path) -> Iterator[Path]:
    """An image whose path relative to ``images`` is longer than any test terminal (200 columns)."""
    folder = images.joinpath(*LONG_FOLDERS)
    folder.mkdir(parents=True)
    target = folder / "deep_file_name_kept_visible.png"
    target.write_bytes((images / "red" / "red_000.png").read_bytes())
    yield target
    target.unlink()
    for parent in [folder, *folder.parents][: len(LONG_FOLDERS)]:
        parent.rmdir()


def test_piped_table_is_never_shortened(trained_run: dict[str, Path], images: Path, deep_image: Path) -> None:
    relative = deep_image.relative_to(images).as_posix()
    assert len(relative) > 200
    result = invoke(str(images), "--model", str(trained_run["run_dir"]), "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert f"│ {relative} │" in result.stdout
    assert "…" not in result.stdout
    assert str(images / "red") not in result.stdout  # only the heading names the folder


def test_terminal_table_shortens_paths_from_the_left(
    trained_run: dict[str, Path], images: Path, deep_image: Path
) -> None:
    """An 80-column terminal (Rich honours TTY_COMPATIBLE) keeps the end of every path."""
    environment = {**os.environ, "COLUMNS": "80", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "imgclf_cli", "predict", str(images), "--top-k", "2"]
        + ["--model", str(trained_run["run_dir"])],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr
    stdout = re.sub(r"\x1b\[[0-9;]*m", "", completed.stdout)  # NO_COLOR leaves bold headers
    lines = stdout.splitlines()
    assert lines[0] == f"Images in {images}"
    assert max(len(line) for line in lines[1:]) <= 80, stdout
    assert "│ …/deep_file_name_kept_visible.png │" in stdout
    assert re.search(r"│ red/more/deeper/red_nested\.png +│", stdout)
    for name in ("blue/blue_000.png", "green/green_001.png", "red/red_000.png"):
        assert f"│ {name} " in stdout


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (40, "a/b/rose/9633056561_6d.jpg"),
        (25, "…/rose/9633056561_6d.jpg"),
        (22, "…/9633056561_6d.jpg"),
        (12, "…6561_6d.jpg"),  # not even the file name fits: its end is kept
    ],
)
def test_shorten_from_left_drops_folders_before_the_file_name(width: int, expected: str) -> None:
    shortened = shorten_from_left("a/b/rose/9633056561_6d.jpg", width)
    assert shortened == expected and len(shortened) <= width


def test_csv_output_has_stable_columns(trained_run: dict[str, Path], images: Path) -> None:
    model = str(trained_run["run_dir"])
    result = invoke(str(images / "green"), "--model", model, "--format", "csv", "--top-k", "2")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == [
        "path", "label", "confidence",
        "top1_label", "top1_probability", "top2_label", "top2_probability",
        "error",
    ]  # fmt: skip
    assert len(rows) == 3
    for row in rows[1:]:
        assert row[1] in LABELS and row[3] == row[1] and row[2] == row[4] and row[-1] == ""
        assert 0.0 < float(row[2]) <= 1.0


def test_top_k_and_batch_size(trained_run: dict[str, Path], images: Path) -> None:
    model = str(trained_run["run_dir"])
    _, one = predict_json(str(images), "--model", model, "--top-k", "1", "--batch-size", "1")
    _, clamped = predict_json(str(images), "--model", model, "--top-k", "10", "--batch-size", "64")
    readable = [index for index, entry in enumerate(one) if not entry["error"]]
    assert all(len(one[i]["top_k"]) == 1 for i in readable)
    assert all(len(clamped[i]["top_k"]) == len(LABELS) for i in readable)
    assert [entry["label"] for entry in one] == [entry["label"] for entry in clamped]
    assert [entry["path"] for entry in one] == [entry["path"] for entry in clamped]
    assert invoke(str(images), "--model", model, "--top-k", "0").exit_code == 2
    assert invoke(str(images), "--model", model, "--batch-size", "0").exit_code == 2


@pytest.mark.parametrize(
    ("file_name", "extra", "kind"),
    [
        ("out.json", [], "json"),
        ("out.csv", [], "csv"),
        ("out.txt", [], "table"),
        ("out.txt", ["--format", "csv"], "csv"),
    ],
)
def test_output_file(
    trained_run: dict[str, Path], images: Path, tmp_path: Path, file_name: str, extra: list[str], kind: str
) -> None:
    target = tmp_path / file_name
    model = str(trained_run["run_dir"])
    result = invoke(str(images / "red"), "--model", model, "--output", str(target), *extra)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"Wrote 3 results ({kind})" in result.stderr
    text = target.read_text()
    if kind == "json":
        entries = json.loads(text)
        names = [Path(entry["path"]).name for entry in entries]
        assert names == ["red_nested.png", "red_000.png", "red_001.png"]
        assert all(entry["label"] in LABELS for entry in entries)
    elif kind == "csv":
        assert text.startswith("path,label,confidence,top1_label")
    else:
        assert "red_nested.png" in text and "\x1b[" not in text
    assert [path.name for path in tmp_path.iterdir()] == [file_name]  # no temporary file left behind


def test_model_file_run_id_and_latest(trained_run: dict[str, Path], images: Path) -> None:
    image = str(images / "green" / "green_000.png")
    _, by_file = predict_json(image, "--model", str(trained_run["run_dir"] / "best.keras"))
    runs_dir = str(trained_run["runs_dir"])
    _, by_id = predict_json(image, "--run", trained_run["run_dir"].name, "--runs-dir", runs_dir)
    _, by_latest = predict_json(image, "--runs-dir", str(trained_run["runs_dir"]))
    assert by_file[0]["label"] == by_id[0]["label"] == by_latest[0]["label"]
    assert by_file[0]["confidence"] == pytest.approx(by_latest[0]["confidence"])


def test_usage_errors(trained_run: dict[str, Path], images: Path, tmp_path: Path) -> None:
    image = str(images / "green" / "green_000.png")
    both = invoke(image, "--model", str(trained_run["run_dir"]), "--run", "latest")
    assert both.exit_code == 2 and "either --model FILE or --run RUN" in both.stderr
    assert invoke(image, "--model", str(tmp_path / "absent.keras")).exit_code == 2
    assert invoke(image, "--format", "xml", "--model", str(trained_run["run_dir"])).exit_code == 2
    assert invoke("--model", str(trained_run["run_dir"])).exit_code == 2  # no PATH
    no_run = invoke(image, "--runs-dir", str(tmp_path / "empty"))
    assert no_run.exit_code == 1 and "No completed run" in no_run.stderr


def test_missing_path_among_readable_ones(trained_run: dict[str, Path], images: Path, tmp_path: Path) -> None:
    result, entries = predict_json(
        str(images / "red" / "red_000.png"),
        str(tmp_path / "absent.png"),
        "--model",
        str(trained_run["run_dir"]),
    )
    assert [entry["error"] for entry in entries] == [None, "file not found"]
    assert "absent.png: file not found" in result.stderr


def test_none_readable_exits_1(trained_run: dict[str, Path], images: Path) -> None:
    result = invoke(
        str(images / "blue" / "blue_000b.png"), str(images / "green" / "notes.txt"),
        "--model", str(trained_run["run_dir"]), "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 1
    assert [entry["error"] is not None for entry in json.loads(result.stdout)] == [True, True]
    assert "Error: None of the 2 files could be read" in result.stderr


def test_folder_without_images_exits_1(trained_run: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("hello")
    result = invoke(str(tmp_path / "empty"), "--model", str(trained_run["run_dir"]))
    assert result.exit_code == 1
    assert "No image files found in" in result.stderr and "Hint:" in result.stderr


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["predict", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    for option in ("--run", "--model", "--top-k", "--format", "--output", "--batch-size"):
        assert option in result.stdout


def tflite_flatbuffer(metadata: dict[str, bytes], external: bool = False) -> bytes:
    """A model flatbuffer with only buffers and named metadata, as the LiteRT schema writes it;
    ``external`` keeps the metadata's bytes after the flatbuffer (as models over 2 GB do)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    def pack(offset: int = 0) -> bytes:
        model = schema.ModelT()
        model.version, model.buffers, model.metadata = 3, [schema.BufferT()], []
        for name, payload in metadata.items():
            buffer = schema.BufferT()
            if external:
                buffer.offset, buffer.size = offset, len(payload)
            else:
                buffer.data = np.frombuffer(payload, dtype=np.uint8)
            model.buffers.append(buffer)
            entry = schema.MetadataT()
            entry.name, entry.buffer = name, len(model.buffers) - 1
            model.metadata.append(entry)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    if not external:
        return pack()
    (payload,) = metadata.values()
    head = pack(offset=1)  # same size whatever the offset: only its value changes
    return pack(offset=len(head)) + payload


def test_read_tflite_metadata_reads_the_imgclf_entry() -> None:
    from imgclf_cli.inference import read_tflite_metadata

    stored = {"labels": ["b", "a"], "image_size": [8, 6]}
    encoded = json.dumps(stored).encode()
    with_others = tflite_flatbuffer({"min_runtime_version": b"1.5.0", "imgclf": encoded})
    assert read_tflite_metadata(with_others) == stored
    assert read_tflite_metadata(tflite_flatbuffer({"imgclf": encoded}, external=True)) == stored
    assert read_tflite_metadata(tflite_flatbuffer({"CONVERSION_METADATA": b"x"})) == {}
    assert read_tflite_metadata(tflite_flatbuffer({"imgclf": b"not json"})) == {}


LIGHT_PREDICTION = """
import sys
import numpy as np
from imgclf_cli.cli import app  # the whole CLI, as `imgclf predict` loads it
from imgclf_cli.prediction import predict

class FakePredictor:
    labels = ["blue", "green", "red"]
    image_size = (16, 16)
    source = "fake"

    def predict_batch(self, images):
        # Mean colour, reordered from (red, green, blue) to the label order (blue, green, red).
        means = images.reshape(len(images), -1, 3).mean(axis=1)[:, ::-1]
        return (means / means.sum(axis=1, keepdims=True)).astype(np.float32)

report = predict([sys.argv[1]], predictor=FakePredictor(), batch_size=4)
assert report.num_predicted > 0, report
assert all(r.label == r.path.split("/")[-2] for r in report.results if r.ok and "more" not in r.path), report
heavy = [name for name in ("tensorflow", "keras", "sklearn", "matplotlib") if name in sys.modules]
print("heavy:", heavy)
"""


def test_prediction_path_never_imports_tensorflow(images: Path) -> None:
    """A .tflite/.onnx predictor must run without TensorFlow: only the Keras backend imports it."""
    completed = subprocess.run(
        [sys.executable, "-c", LIGHT_PREDICTION, str(images)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "heavy: []" in completed.stdout
