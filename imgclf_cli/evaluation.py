"""Evaluating a run: metrics a practitioner can act on, written into the run.  [heavy]

``evaluate()`` is the library entry point behind ``imgclf evaluate``. It runs the run's best
model over the run's held-out split (``test`` when the dataset had one, else ``val``) or over
a labelled folder, in file order, and computes the metrics with scikit-learn. The images are
decoded by ``imgclf_cli.images.load_image`` exactly as in training, and every prediction stays
paired with its file and true label: nothing is shuffled or dropped silently.

Files written to ``<run>/eval/<name>/``: ``metrics.json``, ``confusion_matrix.csv``,
``confusion_matrix.png``, ``misclassified.csv``, ``misclassified.png`` (the most confidently
wrong images), ``reliability.png`` and ``predictions.csv`` (every image). They are written into
a staging folder and replace the folder whole, under its lock: it always holds one evaluation,
never a mix of two, and a failed write (a full disk) leaves the previous one as it was.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf_cli import store
from imgclf_cli.dataset import DatasetScan, Sample, scan_dataset
from imgclf_cli.errors import DatasetError, ImgclfError
from imgclf_cli.export_formats import replace_directory, staging_folder, write_failures_suggest, writing
from imgclf_cli.filesystems import exists_checker
from imgclf_cli.images import UnreadableImage
from imgclf_cli.inference import Predictor, best_model_of_run, check_output_folder, load_keras_predictor
from imgclf_cli.mlflow_tracking import log_evaluation
from imgclf_cli.prediction import decoded_batches, predict_decoded

ECE_BINS = 15
TOP_K_VALUES = (3, 5)
GALLERY_SIZE = 16
DEFAULT_BATCH_SIZE = 64
SPLIT_NAMES = ("train", "val", "test")
CSV_FILES = ("confusion_matrix.csv", "misclassified.csv", "predictions.csv")
PLOT_FILES = ("confusion_matrix.png", "misclassified.png", "reliability.png")
METRICS_FILE = "metrics.json"
WRITE_ELSEWHERE = "copy the run to another disk and evaluate it there (--run PATH)"
OUTPUT_FOLDER_HINT = f"free some space or make the run folder writable, or {WRITE_ELSEWHERE}"


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ReliabilityBin:
    """One of the equal-width confidence bins of the calibration error."""

    lower: float
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclass(frozen=True)
class Misclassified:
    path: str
    true: str
    predicted: str
    confidence: float


@dataclass
class EvaluationSet:
    """What is evaluated: labelled samples (label = index in the run's labels)."""

    name: str
    description: str
    samples: list[Sample]
    data_dir: str
    split: str | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Outcome:
    """The model's probabilities for the images that decoded, aligned with their files."""

    paths: list[str]
    true: np.ndarray  # (N,) int
    probabilities: np.ndarray  # (N, classes) float
    skipped: list[dict[str, str]]


@dataclass
class EvaluationReport:
    """Scores are fractions in [0, 1]; ``confusion_matrix`` rows are true classes in ``labels`` order."""

    run_id: str
    run_dir: str
    dataset: str
    description: str
    data_dir: str
    split: str | None
    output_dir: str
    model: str
    labels: list[str]
    num_samples: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    precision_weighted: float
    recall_weighted: float
    f1_weighted: float
    top_k_accuracy: dict[int, float]
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    ece: float
    log_loss: float
    reliability: list[ReliabilityBin]
    misclassified: list[Misclassified]
    skipped_files: list[dict[str, str]]
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def num_misclassified(self) -> int:
        return len(self.misclassified)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "dataset": self.dataset,
            "description": self.description,
            "data_dir": self.data_dir,
            "split": self.split,
            "output_dir": self.output_dir,
            "model": self.model,
            "labels": self.labels,
            "num_samples": self.num_samples,
            "accuracy": self.accuracy,
        }
        for k, value in self.top_k_accuracy.items():
            document[f"top_{k}_accuracy"] = value
        document.update(
            precision_macro=self.precision_macro,
            recall_macro=self.recall_macro,
            f1_macro=self.f1_macro,
            precision_weighted=self.precision_weighted,
            recall_weighted=self.recall_weighted,
            f1_weighted=self.f1_weighted,
            ece=self.ece,
            ece_bins=ECE_BINS,
            log_loss=self.log_loss,
            per_class={name: asdict(metrics) for name, metrics in self.per_class.items()},
            confusion_matrix=self.confusion_matrix,
            num_misclassified=self.num_misclassified,
            reliability=[asdict(entry) for entry in self.reliability],
            skipped_files=self.skipped_files,
            files=self.files,
            seconds=round(self.seconds, 3),
        )
        return document


def expected_calibration_error(
    true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[ReliabilityBin]]:
    """ECE over ``bins`` equal-width bins of top-1 confidence (bin ``i`` is ``(i/bins, (i+1)/bins]``).

    ECE = sum over bins of (images in bin / all images) * |accuracy in bin - mean confidence in bin|.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == true
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = len(true)
    ece = 0.0
    table: list[ReliabilityBin] = []
    for position in range(bins):
        members = index == position
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            ece += count / total * abs(accuracy - mean_confidence)  # type: ignore[operator]
        table.append(ReliabilityBin(position / bins, (position + 1) / bins, count, accuracy, mean_confidence))
    return float(ece), table


def compute_metrics(true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Every score of the report from true label indices and predicted probabilities."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    indices = list(range(len(labels)))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        true, predicted, labels=indices, zero_division=0
    )
    averages = {
        average: precision_recall_fscore_support(
            true, predicted, labels=indices, average=average, zero_division=0
        )
        for average in ("macro", "weighted")
    }
    top_k = {
        k: float(top_k_accuracy_score(true, probabilities, k=k, labels=indices))
        for k in TOP_K_VALUES
        if len(labels) > k
    }
    # Float32 softmax outputs sum to 1 only approximately; log_loss wants exact distributions.
    normalised = np.clip(probabilities.astype(np.float64), 1e-15, 1.0)
    normalised /= normalised.sum(axis=1, keepdims=True)
    ece, reliability = expected_calibration_error(true, probabilities)
    return {
        "accuracy": float(accuracy_score(true, predicted)),
        "precision_macro": float(averages["macro"][0]),
        "recall_macro": float(averages["macro"][1]),
        "f1_macro": float(averages["macro"][2]),
        "precision_weighted": float(averages["weighted"][0]),
        "recall_weighted": float(averages["weighted"][1]),
        "f1_weighted": float(averages["weighted"][2]),
        "top_k_accuracy": top_k,
        "per_class": {
            name: ClassMetrics(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(true, predicted, labels=indices).astype(int).tolist(),
        "ece": ece,
        "reliability": reliability,
        "log_loss": float(log_loss(true, normalised, labels=indices)),
    }


def split_samples(run_dir: Path, labels: list[str]) -> EvaluationSet:
    """The run's own held-out images: its ``test`` split when it has one, else ``val``."""
    manifest = store.read_manifest(run_dir, hint="pass a labelled folder: imgclf evaluate DATA_DIR")
    if list(manifest.classes) != labels:
        raise ImgclfError(
            f"The split manifest of {run_dir} lists classes {manifest.classes}, but labels.json has {labels}",
            "the run folder was modified; evaluate a labelled folder instead: imgclf evaluate DATA_DIR",
        )
    split = "test" if manifest.test else "val"
    samples = list(manifest.test or manifest.val)
    if not samples:
        raise DatasetError(f"The split manifest of {run_dir} holds no validation images", "pass DATA_DIR")
    exists = exists_checker(manifest.root)  # one listing, when the dataset is on an object store
    if not any(exists(sample.path) for sample in samples):
        raise DatasetError(
            f"The {split} images of this run are no longer in {manifest.root}",
            "move the dataset back, or evaluate a labelled folder: imgclf evaluate DATA_DIR",
        )
    description = f"the run's {split} split, from {manifest.root}"
    return EvaluationSet(split, description, samples, manifest.root, split)


def folder_name(root: Path, split: str | None) -> str:
    """The eval sub-folder for a labelled folder: never collides with the run's own splits."""
    name = store.slug(root.name)
    if name.lower() in SPLIT_NAMES:
        name = f"{store.slug(root.parent.name)}-{name}"
    if split:
        name = f"{name}-{split}"
    return name


def folder_samples(
    data_dir: str | Path, labels: list[str], on_progress: Callable[[int], None] | None = None
) -> EvaluationSet:
    """A labelled folder's images with their labels mapped onto the run's label indices.

    A class folder the run does not know is an error (listing the mismatch); a run class with
    no folder is allowed (its support is 0) and reported as a warning.
    """
    scan: DatasetScan = scan_dataset(data_dir, on_progress)
    unknown = [name for name in scan.classes if name not in labels]
    absent = [name for name in labels if name not in scan.classes]
    if unknown:
        raise DatasetError(
            f"The class folders of {scan.root} do not match the run's labels: "
            f"not in the run: {', '.join(unknown)}"
            + (f"; missing from the folder: {', '.join(absent)}" if absent else ""),
            f"the run was trained on: {', '.join(labels)}; "
            "rename the folders or evaluate with the right --run",
        )
    to_run = [labels.index(name) for name in scan.classes]
    if scan.layout == "splits":
        split = next(name for name in ("test", "val", "train") if scan.splits.get(name))
        chosen = scan.splits[split]
    else:
        split, chosen = None, scan.splits["all"]
    samples = [Sample(sample.path, to_run[sample.label]) for sample in chosen]
    warnings = [f"No images of class(es) {', '.join(absent)} in {scan.root}"] if absent else []
    return EvaluationSet(
        folder_name(Path(scan.root), split),
        f"{scan.root}" + (f", {split} split" if split else ""),
        samples,
        scan.root,
        split,
        warnings,
        [{"path": entry.path, "reason": entry.reason} for entry in scan.skipped],
    )


def run_model(
    predictor: Predictor,
    samples: Sequence[Sample],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Probabilities for ``samples`` in their order; files that fail to decode are listed apart."""
    paths: list[str] = []
    true: list[int] = []
    chunks: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    label_of = {sample.path: sample.label for sample in samples}
    paths_in_order = [sample.path for sample in samples]
    for chunk, decoded in decoded_batches(paths_in_order, predictor.image_size, batch_size):
        probabilities = predict_decoded(predictor, decoded)
        for path, item in zip(chunk, decoded, strict=True):
            if isinstance(item, UnreadableImage):
                skipped.append({"path": path, "reason": item.reason})
            else:
                paths.append(path)
                true.append(label_of[path])
        chunks.append(probabilities)
        if on_progress:
            on_progress(len(chunk))
    num_classes = len(predictor.labels)
    stacked = np.concatenate(chunks) if chunks else np.empty((0, num_classes), np.float32)
    return Outcome(paths, np.asarray(true, dtype=np.int64), stacked, skipped)


def misclassified_images(outcome: Outcome, labels: Sequence[str]) -> list[Misclassified]:
    """Wrong predictions, the most confident first."""
    predicted = outcome.probabilities.argmax(axis=1)
    confidence = outcome.probabilities.max(axis=1)
    wrong = [i for i in range(len(outcome.paths)) if predicted[i] != outcome.true[i]]
    wrong.sort(key=lambda i: (-float(confidence[i]), outcome.paths[i]))
    return [
        Misclassified(outcome.paths[i], labels[outcome.true[i]], labels[predicted[i]], float(confidence[i]))
        for i in wrong
    ]


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def output_files(plots: bool = True) -> list[str]:
    """The names of the files an evaluation writes."""
    return [*CSV_FILES, *(PLOT_FILES if plots else ()), METRICS_FILE]


def write_outputs(report: EvaluationReport, outcome: Outcome, folder: Path, plots: bool = True) -> None:
    """Every file of ``output_files(plots)`` into ``folder``, each written atomically; a failed
    write names the file at its place in ``report.output_dir``, where it was meant to go."""
    labels = report.labels

    def write_file(name: str, write: Callable[[Path], None]) -> None:
        with writing(Path(report.output_dir) / name):
            write(folder / name)

    def write_text(name: str, text: str) -> None:
        write_file(name, lambda path: store.atomic_write_text(path, text))

    matrix_rows = [[label, *counts] for label, counts in zip(labels, report.confusion_matrix, strict=True)]
    write_text("confusion_matrix.csv", csv_text(["true\\predicted", *labels], matrix_rows))
    write_text(
        "misclassified.csv",
        csv_text(
            ["path", "true", "predicted", "confidence"],
            [
                [entry.path, entry.true, entry.predicted, f"{entry.confidence:.6f}"]
                for entry in report.misclassified
            ],
        ),
    )
    predicted = outcome.probabilities.argmax(axis=1)
    write_text(
        "predictions.csv",
        csv_text(
            ["path", "true", "predicted", "confidence", "correct"],
            [
                [path, labels[true], labels[guess], f"{float(row.max()):.6f}", int(true == guess)]
                for path, true, guess, row in zip(
                    outcome.paths, outcome.true, predicted, outcome.probabilities, strict=True
                )
            ],
        ),
    )
    if plots:
        from imgclf_cli import evaluation_plots

        write_file(
            "confusion_matrix.png",
            lambda path: evaluation_plots.plot_confusion_matrix(
                np.asarray(report.confusion_matrix), labels, path
            ),
        )
        write_file(
            "misclassified.png",
            lambda path: evaluation_plots.plot_misclassified_gallery(
                report.misclassified[:GALLERY_SIZE], path, total=report.num_misclassified
            ),
        )
        write_file(
            "reliability.png",
            lambda path: evaluation_plots.plot_reliability_diagram(
                report.reliability, report.ece, path, num_classes=len(labels)
            ),
        )
    write_file(METRICS_FILE, lambda path: store.atomic_write_json(path, report.to_dict()))


def publish_outputs(
    report: EvaluationReport,
    outcome: Outcome,
    run_dir: Path,
    plots: bool,
    on_wait: Callable[[], None],
) -> None:
    """Write the evaluation's folder whole: staged beside it, then swapped in under its lock
    (``on_wait`` is called once if another evaluation holds it)."""
    output_dir = Path(report.output_dir)
    with (
        write_failures_suggest(WRITE_ELSEWHERE),
        staging_folder(output_dir.parent, output_dir.name) as staging,
    ):
        write_outputs(report, outcome, staging, plots)
        with store.output_lock(output_dir, on_wait):
            with writing(output_dir):
                replace_directory(staging, output_dir)
            store.clear_stale(run_dir, "eval")  # eval/ now holds an evaluation of the current best.keras


def evaluate(
    run: str | Path | None = "latest",
    data_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    plots: bool = True,
    on_warning: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EvaluationReport:
    """Evaluate the best model of ``run`` and write the results into ``<run>/eval/<name>/``.

    Without ``data_dir`` the run's ``test`` split is evaluated (``val`` when the dataset had
    no test split); with it, that labelled folder (its class names must be among the run's
    labels). ``on_warning(text)`` receives skipped files, missing classes, a run that did not
    complete (its best.keras is used) and a wait for another evaluation writing the same folder;
    ``on_start(total)``/``on_progress(count)`` report progress.
    """
    started = time.perf_counter()
    warn = on_warning or (lambda text: None)
    run_dir = store.resolve_run(run, runs_dir)
    labels = store.read_labels(run_dir)
    model_path = best_model_of_run(run_dir, warn)
    chosen = folder_samples(data_dir, labels) if data_dir is not None else split_samples(run_dir, labels)
    output_dir = store.eval_dir(run_dir, chosen.name)
    # A read-only or full store fails now, not after TensorFlow has loaded and predicted.
    check_output_folder(output_dir, "the evaluation", OUTPUT_FOLDER_HINT)
    for text in chosen.warnings:
        warn(text)
    predictor = load_keras_predictor(model_path, labels)
    num_outputs = predictor.model.outputs[0].shape[-1]
    if num_outputs != len(labels):
        raise ImgclfError(
            f"The model of {run_dir.name} predicts {num_outputs} classes, "
            f"but its {store.LABELS_FILE} lists {len(labels)}",
            "the run folder was modified; restore labels.json or train the run again",
        )
    if on_start:
        on_start(len(chosen.samples))
    outcome = run_model(predictor, chosen.samples, batch_size, on_progress)
    skipped = chosen.skipped + outcome.skipped
    for entry in skipped:
        warn(f"skipped {entry['path']}: {entry['reason']}")
    if not outcome.paths:
        raise DatasetError(f"None of the {len(chosen.samples)} images of {chosen.description} could be read")

    metrics = compute_metrics(outcome.true, outcome.probabilities, labels)
    report = EvaluationReport(
        run_id=run_dir.name,
        run_dir=str(run_dir),
        dataset=chosen.name,
        description=chosen.description,
        data_dir=chosen.data_dir,
        split=chosen.split,
        output_dir=str(output_dir),
        model=str(model_path),
        labels=labels,
        num_samples=len(outcome.paths),
        misclassified=misclassified_images(outcome, labels),
        skipped_files=skipped,
        **metrics,
    )
    report.seconds = time.perf_counter() - started
    report.files = {name: str(output_dir / name) for name in output_files(plots)}
    publish_outputs(
        report,
        outcome,
        run_dir,
        plots,
        on_wait=lambda: warn(f"another evaluation is writing {output_dir}; waiting for it to finish"),
    )
    log_evaluation(report, warn)  # to the run's MLflow run, if it has one
    from imgclf_cli.tensorboard_log import log_evaluation as log_to_tensorboard

    epochs = store.read_meta(run_dir).get("epochs_completed") or 0
    log_to_tensorboard(run_dir, chosen.name, report.to_dict(), output_dir, int(epochs), warn)
    return report
