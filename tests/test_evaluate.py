"""``imgclf evaluate``: metrics, files, known answers, class mismatches, unreadable files."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgclf_cli.cli.app import app
from imgclf_cli.dataset import Sample, SplitManifest
from imgclf_cli.evaluation import ECE_BINS, compute_metrics, expected_calibration_error

from conftest import CLASS_COLOURS, make_class_folders, make_image

runner = CliRunner()
EVAL_FILES = {
    "metrics.json",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "misclassified.csv",
    "misclassified.png",
    "reliability.png",
    "predictions.csv",
}


@pytest.fixture(scope="module")
def run_copy(trained_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private copy of the trained run: evaluation writes into the run, the original stays untouched."""
    runs = tmp_path_factory.mktemp("evaluate") / "runs"
    run_dir = runs / trained_run["run_dir"].name
    shutil.copytree(trained_run["run_dir"], run_dir)
    return {"runs_dir": runs, "run_dir": run_dir, "data_dir": trained_run["data_dir"]}


def invoke(*args: str) -> object:
    return runner.invoke(app, ["evaluate", *args])


def reference_probabilities(run_dir: Path, paths: list[str]) -> np.ndarray:
    """The model's probabilities computed one image at a time, without imgclf's batching."""
    import keras

    from imgclf_cli.images import load_image
    from imgclf_cli.inference import image_size_of_keras_model

    model = keras.saving.load_model(run_dir / "best.keras", compile=False)
    size = image_size_of_keras_model(model)
    return np.concatenate(
        [np.asarray(model(load_image(path, size)[None].astype("float32"), training=False)) for path in paths]
    )


@pytest.fixture(scope="module")
def split_evaluation(run_copy: dict[str, Path]) -> dict[str, object]:
    result = invoke("--run", run_copy["run_dir"].name, "--runs-dir", str(run_copy["runs_dir"]), "--json")
    assert result.exit_code == 0, result.output
    return {"result": result, "report": json.loads(result.stdout)}


def test_evaluates_the_validation_split_by_default(run_copy: dict[str, Path], split_evaluation: dict) -> None:
    report = split_evaluation["report"]
    manifest = SplitManifest.from_json((run_copy["run_dir"] / "split.json").read_text())
    assert report["dataset"] == "val" and report["split"] == "val"
    assert report["num_samples"] == len(manifest.val)
    assert report["labels"] == sorted(CLASS_COLOURS)
    assert report["run_id"] == run_copy["run_dir"].name
    matrix = np.asarray(report["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == len(manifest.val)
    supports = [report["per_class"][label]["support"] for label in report["labels"]]
    assert matrix.sum(axis=1).tolist() == supports
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "ece"):
        assert 0.0 <= report[key] <= 1.0, key
    assert "top_3_accuracy" not in report  # three classes: top-3 would always be 1
    output_dir = run_copy["run_dir"] / "eval" / "val"
    assert {path.name for path in output_dir.iterdir()} == EVAL_FILES
    assert json.loads((output_dir / "metrics.json").read_text())["accuracy"] == report["accuracy"]
    for name in EVAL_FILES - {"metrics.json"}:
        assert (output_dir / name).stat().st_size > 0, name
    assert (output_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_json_output_is_one_object_on_stdout(split_evaluation: dict) -> None:
    result = split_evaluation["result"]
    document = json.loads(result.stdout)  # fails on anything else on stdout
    assert isinstance(document, dict)
    assert "Files written" not in result.stdout


def test_rich_report_has_tables_and_summary(run_copy: dict[str, Path]) -> None:
    result = invoke("--run", str(run_copy["run_dir"]))
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "Per class" in stdout and "Confusion matrix" in stdout
    number = r"\d\.\d{4}"
    summary = rf"Accuracy {number}, macro F1 {number}, weighted F1 {number}, ECE {number} on \d+ images"
    assert re.search(summary, stdout)
    for label in CLASS_COLOURS:
        row = next(line for line in stdout.splitlines() if line.startswith(f"│ {label} "))
        # Right-aligned numbers: the support is pushed against the right border of its cell.
        assert re.search(r"│\s{2,}\d+ │$", row), row
    assert "macro avg" in stdout and "weighted avg" in stdout
    assert "Files written to" in result.stderr


def make_known_answer_folder(root: Path) -> Path:
    """Colour classes, plus images filed under the wrong class and a truncated file mid-listing."""
    make_class_folders(root, per_class=7, seed=11)
    rng = np.random.default_rng(12)
    for index in range(3):
        make_image(CLASS_COLOURS["blue"], rng).save(root / "red" / f"red_{index:03d}_blue.png")
    for index in range(2):
        make_image(CLASS_COLOURS["green"], rng).save(root / "blue" / f"blue_{index:03d}_green.png")
    good = (root / "green" / "green_000.png").read_bytes()
    (root / "green" / "green_002b.png").write_bytes(good[: len(good) // 2])
    return root


def test_known_answer_matches_an_independent_computation(run_copy: dict[str, Path], tmp_path: Path) -> None:
    data = make_known_answer_folder(tmp_path / "known")
    result = invoke(str(data), "--run", str(run_copy["run_dir"]), "--batch-size", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    labels = report["labels"]
    files = [
        (str(path), labels.index(folder.name))
        for folder in sorted(data.iterdir())
        for path in sorted(folder.iterdir())
        if path.name != "green_002b.png"
    ]
    probabilities = reference_probabilities(run_copy["run_dir"], [path for path, _ in files])
    true = np.asarray([label for _, label in files])
    predicted = probabilities.argmax(axis=1)
    expected = np.zeros((3, 3), dtype=int)
    for truth, guess in zip(true, predicted, strict=True):
        expected[truth, guess] += 1
    # The mislabelled images must give errors for this test to mean anything.
    assert expected.trace() < expected.sum()

    assert report["num_samples"] == len(files)
    assert report["confusion_matrix"] == expected.tolist()
    assert report["accuracy"] == pytest.approx(float((predicted == true).mean()))
    for index, label in enumerate(labels):
        column, row = expected[:, index].sum(), expected[index].sum()
        precision = expected[index, index] / column if column else 0.0
        recall = expected[index, index] / row
        assert report["per_class"][label]["precision"] == pytest.approx(precision)
        assert report["per_class"][label]["recall"] == pytest.approx(recall)
        assert report["per_class"][label]["support"] == row
    ece, _ = expected_calibration_error(true, probabilities)
    assert report["ece"] == pytest.approx(ece, abs=1e-4)

    wrong = {path for (path, truth), guess in zip(files, predicted, strict=True) if guess != truth}
    output_dir = Path(report["output_dir"])
    assert output_dir == run_copy["run_dir"] / "eval" / "known"
    with (output_dir / "misclassified.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["path"] for row in rows} == wrong
    assert list(rows[0]) == ["path", "true", "predicted", "confidence"]
    confidences = [float(row["confidence"]) for row in rows]
    assert confidences == sorted(confidences, reverse=True)
    with (output_dir / "confusion_matrix.csv").open() as handle:
        matrix_rows = list(csv.reader(handle))
    assert matrix_rows[0] == ["true\\predicted", *labels]
    assert [[int(value) for value in row[1:]] for row in matrix_rows[1:]] == expected.tolist()

    # The unreadable file among readable ones: skipped, listed, warned about.
    assert [entry["path"] for entry in report["skipped_files"]] == [str(data / "green" / "green_002b.png")]
    assert "green_002b.png" in result.stderr and "Warning" in result.stderr


def test_class_name_mismatch_is_an_error_listing_it(run_copy: dict[str, Path], tmp_path: Path) -> None:
    colours = {"red": CLASS_COLOURS["red"], "green": CLASS_COLOURS["green"], "purple": (160, 40, 200)}
    data = make_class_folders(tmp_path / "other", per_class=2, classes=colours)
    result = invoke(str(data), "--run", str(run_copy["run_dir"]))
    assert result.exit_code == 1
    assert "Error:" in result.stderr
    assert "not in the run: purple" in result.stderr
    assert "missing from the folder: blue" in result.stderr
    assert "Hint:" in result.stderr and "blue, green, red" in result.stderr
    assert not (run_copy["run_dir"] / "eval" / "other").exists()


def test_folder_with_a_subset_of_classes_warns_and_counts_zero_support(
    run_copy: dict[str, Path], tmp_path: Path
) -> None:
    colours = {name: CLASS_COLOURS[name] for name in ("red", "green")}
    data = make_class_folders(tmp_path / "test", per_class=3, classes=colours, seed=5)
    result = invoke(str(data), "--run", str(run_copy["run_dir"]), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["per_class"]["blue"]["support"] == 0
    assert report["num_samples"] == 6
    assert "No images of class(es) blue" in result.stderr
    # A folder named like a split does not overwrite the run's own split evaluation.
    assert report["dataset"] == f"{tmp_path.name}-test"


def test_uses_the_test_split_when_the_manifest_has_one(run_copy: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "with-test"
    shutil.copytree(run_copy["run_dir"], run_dir, ignore=shutil.ignore_patterns("eval"))
    manifest = SplitManifest.from_json((run_dir / "split.json").read_text())
    manifest.test = [Sample(sample.path, sample.label) for sample in manifest.train[:5]]
    (run_dir / "split.json").write_text(manifest.to_json())
    result = invoke("--run", str(run_dir), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "test" and report["num_samples"] == 5
    assert (run_dir / "eval" / "test" / "metrics.json").is_file()
    assert not (run_dir / "eval" / "val").exists()


def test_none_readable_is_an_error(run_copy: dict[str, Path], tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "broken", per_class=2)
    for path in data.rglob("*.png"):
        path.write_bytes(path.read_bytes()[:60])
    result = invoke(str(data), "--run", str(run_copy["run_dir"]))
    assert result.exit_code == 1
    assert "Error: None of the 6 images" in result.stderr


def test_unknown_run_and_missing_folder(run_copy: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("--run", "no-such-run", "--runs-dir", str(run_copy["runs_dir"]))
    assert result.exit_code == 1
    assert "Run not found: 'no-such-run'" in result.stderr
    result = invoke(str(tmp_path / "absent"), "--run", str(run_copy["run_dir"]))
    assert result.exit_code == 2
    empty_store = invoke("--runs-dir", str(tmp_path / "empty"))
    assert empty_store.exit_code == 1 and "No completed run" in empty_store.stderr


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout and "--json" in result.stdout


def test_compute_metrics_on_a_known_example() -> None:
    labels = ["a", "b", "c", "d", "e", "f"]
    true = np.array([0, 0, 1, 1, 2, 2, 3, 4, 5, 5])
    predicted = np.array([0, 1, 1, 1, 2, 0, 3, 4, 5, 4])
    probabilities = np.full((10, 6), 0.02)
    probabilities[np.arange(10), predicted] = 0.9
    # The true class second for two of the wrong ones, last for the third.
    probabilities[1, 0], probabilities[5, 2], probabilities[9, 5] = 0.05, 0.05, 0.0
    metrics = compute_metrics(true, probabilities, labels)
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["per_class"]["a"].precision == pytest.approx(0.5)
    assert metrics["per_class"]["a"].recall == pytest.approx(0.5)
    assert metrics["per_class"]["b"].precision == pytest.approx(2 / 3)
    assert metrics["per_class"]["b"].recall == pytest.approx(1.0)
    assert metrics["per_class"]["f"].recall == pytest.approx(0.5)
    assert metrics["confusion_matrix"][0] == [1, 1, 0, 0, 0, 0]
    assert metrics["confusion_matrix"][5] == [0, 0, 0, 0, 1, 1]
    assert metrics["top_k_accuracy"][3] == pytest.approx(0.9)
    assert set(metrics["top_k_accuracy"]) == {3, 5}
    # Every image has confidence 0.9: ECE = |0.7 - 0.9|.
    assert metrics["ece"] == pytest.approx(0.2)


def test_expected_calibration_error_bins() -> None:
    # Two bins used: confidence 0.95 (all right) and 0.55 (half right).
    probabilities = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    true = np.array([0, 0, 0, 0, 0, 1, 0, 1])
    ece, bins = expected_calibration_error(true, probabilities)
    assert len(bins) == ECE_BINS
    assert ece == pytest.approx(0.5 * abs(1.0 - 0.95) + 0.5 * abs(0.5 - 0.55))
    assert sum(entry.count for entry in bins) == 8
    assert [entry.count for entry in bins if entry.count] == [4, 4]


def test_labels_that_do_not_match_the_model_are_an_error(run_copy: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "relabelled"
    shutil.copytree(run_copy["run_dir"], run_dir, ignore=shutil.ignore_patterns("eval"))
    labels = json.loads((run_dir / "labels.json").read_text())
    (run_dir / "labels.json").write_text(json.dumps([*labels, "purple"]))
    result = invoke(str(run_copy["data_dir"]), "--run", str(run_dir))
    assert result.exit_code == 1
    assert "predicts 3 classes" in result.stderr and "lists 4" in result.stderr
    assert "Traceback" not in result.output


# --- the plots --------------------------------------------------------------------------------


def test_misclassified_gallery_confidence_has_enough_digits_to_rank(
    image_folders: Path, tmp_path: Path
) -> None:
    from imgclf_cli.evaluation import Misclassified
    from imgclf_cli.evaluation_plots import plot_misclassified_gallery

    paths = sorted(str(path) for path in (image_folders / "red").iterdir())
    entries = [
        Misclassified(paths[0], "red", "blue", 0.5011),
        Misclassified(paths[1], "red", "green", 0.5004),
    ]
    figure = plot_misclassified_gallery(entries, tmp_path / "misclassified.png", total=7)
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert "predicted: blue (50.1%)" in titles[0] and "predicted: green (50.0%)" in titles[1]
    assert figure.get_suptitle() == "Most confidently wrong images (2 of 7)"
    assert (tmp_path / "misclassified.png").stat().st_size > 0


def test_reliability_diagram_starts_at_one_over_the_number_of_classes(tmp_path: Path) -> None:
    from imgclf_cli.evaluation_plots import plot_reliability_diagram

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=200)
    ece, bins = expected_calibration_error(rng.integers(0, 3, 200), probabilities)
    figure = plot_reliability_diagram(bins, ece, tmp_path / "reliability.png", num_classes=3)
    axis, counts_axis = figure.axes
    assert axis.get_xlim() == pytest.approx((1 / 3, 1.0))
    assert "at least 1/3 with 3 classes" in counts_axis.get_xlabel()
    unknown = plot_reliability_diagram(bins, ece, tmp_path / "reliability.png")
    assert unknown.axes[0].get_xlim() == pytest.approx((0.0, 1.0))


def test_training_curves_have_whole_epochs_and_mark_the_best(tmp_path: Path) -> None:
    from imgclf_cli.plots import plot_training_curves

    # Best = highest validation accuracy (epoch 3), not lowest validation loss (epoch 4).
    history = [
        {
            "epoch": epoch,
            "loss": 1.0 / epoch,
            "accuracy": 0.5,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }
        for epoch, val_loss, val_accuracy in [
            (1, 0.9, 0.5),
            (2, 0.8, 0.6),
            (3, 0.7, 0.8),
            (4, 0.6, 0.7),
            (5, 0.65, 0.7),
        ]
    ]
    figure = plot_training_curves(history, tmp_path / "training_curves.png")
    assert figure.get_suptitle() == "Training curves (best epoch 3)"
    for axis in figure.axes:
        ticks = [tick for tick in axis.get_xticks() if 1 <= tick <= 5]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
        best = [line for line in axis.get_lines() if line.get_label().startswith("best epoch")]
        assert [line.get_label() for line in best] == ["best epoch (3): best.keras"]
        assert list(best[0].get_xdata()) == [3]
    with Image.open(tmp_path / "training_curves.png") as image:
        assert image.size[0] > image.size[1] > 300
    chosen = plot_training_curves(history, tmp_path / "training_curves.png", best_epoch=4)
    assert chosen.get_suptitle() == "Training curves (best epoch 4)"
