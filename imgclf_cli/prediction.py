"""Predicting classes for image files: collect paths, decode in batches, run a predictor.

``predict()`` is the library entry point behind ``imgclf predict``. This module is light: it
never imports TensorFlow itself (only a Keras model's predictor does, when it is loaded), so a
``.tflite`` or ``.onnx`` model predicts without TensorFlow. Images are decoded by
``imgclf_cli.images.load_image``, exactly as in training. Paths may be object store URLs
(``s3://bucket/prefix/image.jpg``, a prefix, or a pattern): they are listed and read through
``imgclf_cli.filesystems``.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf_cli import filesystems as remote
from imgclf_cli.dataset_layout import is_hidden_or_system
from imgclf_cli.errors import DatasetError, ImgclfError, UsageError
from imgclf_cli.filesystems import RemotePath, is_url
from imgclf_cli.images import UnreadableImage, load_image, read_header
from imgclf_cli.inference import Predictor, load_predictor

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

# A file found in a folder or by a glob is predicted when its content reads as an image. One
# that does not is still reported (as unreadable) when its name says it is meant to be an
# image; anything else (README.txt, .csv files) is left out silently.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".mpo"}
)
GLOB_CHARACTERS = frozenset("*?[")
DEFAULT_TOP_K = 3
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class ClassProbability:
    label: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probability": self.probability}


@dataclass(frozen=True)
class FoundImage:
    """A file to predict, and the folder argument it was found in (``None``: named by a file
    argument or matched by a pattern)."""

    path: str
    folder: str | None = None


@dataclass
class PredictionResult:
    """The prediction for one file, or why it could not be made (``error``)."""

    path: str
    label: str | None = None
    confidence: float | None = None
    top_k: list[ClassProbability] = field(default_factory=list)
    error: str | None = None
    folder: str | None = None
    """The folder argument ``path`` was found in; ``None`` for file arguments and patterns."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def display_path(self) -> str:
        """``path`` relative to the folder argument it was found in, else as it was given: inside
        a folder, only the part below it tells the files apart."""
        if self.folder is None:
            return self.path
        if is_url(self.folder):
            return remote.relative_path(self.path, self.folder)
        return os.path.relpath(self.path, self.folder)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "confidence": self.confidence,
            "top_k": [entry.to_dict() for entry in self.top_k],
            "error": self.error,
        }


@dataclass
class PredictionReport:
    """Every result in input order, with the model that made them and how long it took."""

    results: list[PredictionResult]
    labels: list[str]
    model: str
    top_k: int
    load_seconds: float
    predict_seconds: float

    @property
    def num_predicted(self) -> int:
        return sum(1 for result in self.results if result.ok)

    @property
    def num_failed(self) -> int:
        return len(self.results) - self.num_predicted

    def to_list(self) -> list[dict[str, Any]]:
        return [result.to_dict() for result in self.results]

    def csv_columns(self) -> list[str]:
        columns = ["path", "label", "confidence"]
        for rank in range(1, self.top_k + 1):
            columns += [f"top{rank}_label", f"top{rank}_probability"]
        return columns + ["error"]

    def to_csv(self) -> str:
        """One row per file; columns ``path,label,confidence,top1_label,top1_probability,...,error``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.csv_columns())
        for result in self.results:
            row: list[Any] = [result.path, result.label or "", format_probability(result.confidence)]
            for rank in range(self.top_k):
                if rank < len(result.top_k):
                    row += [result.top_k[rank].label, format_probability(result.top_k[rank].probability)]
                else:
                    row += ["", ""]
            writer.writerow(row + [result.error or ""])
        return buffer.getvalue()


def format_probability(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def is_glob(text: str) -> bool:
    return any(character in GLOB_CHARACTERS for character in text)


def looks_like_image(path: Path | RemotePath) -> bool:
    """Content decides; the name only keeps a broken ``.jpg`` in the list (to report it)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        read_header(path)
    except UnreadableImage:
        return False
    return True


def images_in_folder(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, hidden files and folders left out, sorted by path."""
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in files:
            path = Path(directory) / name
            if not is_hidden_or_system(path) and looks_like_image(path):
                found.append(path)
    return sorted(found)


def collect_paths(inputs: Sequence[str | Path]) -> list[FoundImage | PredictionResult]:
    """Expand files, folders (recursively) and glob patterns into image paths, in input order.

    Each path appears once; an input that matches nothing appears as a result with an
    ``error``. A file named explicitly is always kept (to be predicted or reported); files
    found in folders or by patterns are kept when they are images. Files found in a folder
    argument carry it as their ``folder``.
    """
    entries: list[FoundImage | PredictionResult] = []
    seen: set[str] = set()

    def add(path: str | Path, folder: str | None = None) -> None:
        key = str(path) if is_url(path) else os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            entries.append(FoundImage(str(path), folder))

    for item in inputs:
        if is_url(item):
            entries.extend(remote_entries(str(item), add))
            continue
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.is_dir():
            for found in images_in_folder(path):
                add(found, text)
        elif path.is_file():
            add(path)
        elif is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                entries.append(PredictionResult(text, error="no file matches this pattern"))
            for match in matches:
                matched = Path(match)
                if matched.is_dir():
                    for found in images_in_folder(matched):
                        add(found)
                elif matched.is_file() and not is_hidden_or_system(matched) and looks_like_image(matched):
                    add(matched)
        else:
            entries.append(PredictionResult(text, error="file not found"))
    return entries


def remote_entries(url: str, add: Callable[[str, str | None], None]) -> list[PredictionResult]:
    """``collect_paths`` for one URL: an object, a prefix (every image under it) or a pattern.

    Found images go to ``add``; what is returned is the error result of a URL that matched
    nothing. A store that cannot be read raises ``RemoteStorageError``, before a model loads.
    """
    if is_glob(url):
        matches = remote.glob(url)
        for match in matches:
            found = match.rglob("*") if match.is_dir() else [match]
            for file in found:
                if not is_hidden_or_system(file) and looks_like_image(file):
                    add(str(file), None)
        return [] if matches else [PredictionResult(url, error="no file matches this pattern")]
    target = remote.remote_path(url)
    if target is None:
        return [PredictionResult(url, error="file not found")]
    if target.is_file():
        add(str(target), None)
        return []
    for file in target.rglob("*"):
        hidden = any(part.startswith(".") for part in file.relative_to(target).parts)
        if not hidden and not is_hidden_or_system(file) and looks_like_image(file):
            add(str(file), target.url)
    return []


def batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def decode(path: str, image_size: tuple[int, int]) -> np.ndarray | UnreadableImage:
    """One image decoded as in training, or the ``UnreadableImage`` saying why it cannot be."""
    try:
        return load_image(path, image_size)
    except UnreadableImage as error:
        return error
    except OSError as error:  # vanished or not permitted since it was listed
        return UnreadableImage(path, str(error.strerror or error))


def decode_batch(
    pool: ThreadPoolExecutor, paths: Sequence[str], image_size: tuple[int, int]
) -> list[np.ndarray | UnreadableImage]:
    """Decode ``paths`` in parallel, in order; an unreadable file gives its ``UnreadableImage``."""
    return list(pool.map(decode, paths, [image_size] * len(paths)))


def decoded_batches(
    paths: Sequence[str], image_size: tuple[int, int], batch_size: int, workers: int | None = None
) -> Iterator[tuple[Sequence[str], list[np.ndarray | UnreadableImage]]]:
    """``(paths, decoded)`` per batch, in order; the next batch is decoded while the caller
    works on the current one (the model releases the GIL while it runs)."""
    if len(paths) == 1:  # nothing to overlap: no threads to start
        yield paths, [decode(paths[0], image_size)]
        return
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    chunks = list(batches(paths, batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=1) as ahead:
        upcoming: Future[list[np.ndarray | UnreadableImage]] | None = None
        for index, chunk in enumerate(chunks):
            current = upcoming or ahead.submit(decode_batch, pool, chunk, image_size)
            upcoming = None
            if index + 1 < len(chunks):
                upcoming = ahead.submit(decode_batch, pool, chunks[index + 1], image_size)
            yield chunk, current.result()


def top_classes(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[ClassProbability]:
    # A stable sort keeps ties in label order, so equal probabilities give reproducible output.
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [ClassProbability(labels[index], float(probabilities[index])) for index in order]


def predict_decoded(predictor: Predictor, decoded: Sequence[np.ndarray | UnreadableImage]) -> np.ndarray:
    """Probabilities for the decoded images of a batch (unreadable ones left out), checked."""
    images = [item for item in decoded if isinstance(item, np.ndarray)]
    num_classes = len(predictor.labels)
    if not images:
        return np.empty((0, num_classes), dtype=np.float32)
    probabilities = np.asarray(predictor.predict_batch(np.stack(images)), dtype=np.float32)
    if probabilities.shape != (len(images), num_classes):
        raise ImgclfError(
            f"The model returned probabilities of shape {probabilities.shape} for {len(images)} images "
            f"and {num_classes} labels",
            "the labels do not belong to this model; keep the labels.json of its run beside it",
        )
    return probabilities


def predict_paths(
    predictor: Predictor,
    paths: Sequence[str],
    *,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_unreadable: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[PredictionResult]:
    """One result per path, in order: decoded in batches and run through ``predictor``."""
    if batch_size < 1:
        raise ImgclfError(f"The batch size must be at least 1, got {batch_size}", "pass --batch-size 32")
    labels = list(predictor.labels)
    k = max(1, min(top_k, len(labels)))
    results: list[PredictionResult] = []
    for chunk, decoded in decoded_batches(paths, predictor.image_size, batch_size):
        probabilities = iter(predict_decoded(predictor, decoded))
        for path, item in zip(chunk, decoded, strict=True):
            if isinstance(item, UnreadableImage):
                results.append(PredictionResult(path, error=item.reason))
                if on_unreadable:
                    on_unreadable(path, item.reason)
                continue
            ranked = top_classes(next(probabilities), labels, k)
            results.append(PredictionResult(path, ranked[0].label, ranked[0].probability, ranked))
        if on_progress:
            on_progress(len(chunk))
    return results


def predict(
    paths: Sequence[str | Path],
    *,
    model: str | Path | None = None,
    run: str | None = None,
    runs_dir: str | Path | None = None,
    predictor: Predictor | None = None,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_unreadable: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> PredictionReport:
    """Predict the class of every image in ``paths`` (files, folders, glob patterns).

    The model is ``predictor`` when given, else ``model`` (a run folder, ``.keras``,
    SavedModel, ``.tflite`` or ``.onnx``), else the best model of ``run`` (default ``latest``).
    Results come in input order; an unreadable or missing file gets a result with ``error``
    set (and a call ``on_unreadable(path, reason)``). ``on_start(total)`` and
    ``on_progress(count)`` report progress; ``on_warning(text)`` hears about a run that did not
    complete (its best.keras is used). Raises ``DatasetError`` when ``paths`` hold no image file
    at all.
    """
    if model is not None and run is not None:
        raise UsageError(
            "Both a model and a run were given", "pass either --model FILE or --run RUN, not both"
        )
    entries = collect_paths(paths)
    found = [entry.path for entry in entries if isinstance(entry, FoundImage)]
    if not found:
        for entry in entries:
            if isinstance(entry, PredictionResult) and on_unreadable:
                on_unreadable(entry.path, entry.error or "")
        shown = ", ".join(str(path) for path in list(paths)[:5]) + (", ..." if len(paths) > 5 else "")
        raise DatasetError(
            f"No image files found in: {shown}",
            "pass image files, folders that contain images, or glob patterns such as 'photos/*.jpg'",
        )
    started = time.perf_counter()
    if predictor is None:
        predictor = load_predictor(model=model, run=run, runs_dir=runs_dir, on_warning=on_warning)
    load_seconds = time.perf_counter() - started
    for entry in entries:
        if isinstance(entry, PredictionResult) and on_unreadable:
            on_unreadable(entry.path, entry.error or "")
    if on_start:
        on_start(len(found))
    started = time.perf_counter()
    predicted = predict_paths(
        predictor,
        found,
        top_k=top_k,
        batch_size=batch_size,
        on_unreadable=on_unreadable,
        on_progress=on_progress,
    )
    predict_seconds = time.perf_counter() - started
    by_path = iter(predicted)
    results = [entry if isinstance(entry, PredictionResult) else next(by_path) for entry in entries]
    for entry, result in zip(entries, results, strict=True):
        if isinstance(entry, FoundImage):
            result.folder = entry.folder
    return PredictionReport(
        results=results,
        labels=list(predictor.labels),
        model=str(getattr(predictor, "source", "") or model or run or ""),
        top_k=max(1, min(top_k, len(predictor.labels))),
        load_seconds=load_seconds,
        predict_seconds=predict_seconds,
    )
