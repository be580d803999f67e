"""Finding images in a dataset folder without TensorFlow: layout, classes, bad files, splits.

Two layouts are understood:

* ``DATA_DIR/<class>/<images>``: one folder per class; a seeded, stratified validation split
  is drawn by ``split_samples``.
* ``DATA_DIR/{train,val|validation|valid,test}/<class>/<images>``: the given splits are used.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imgclf_cli.errors import DatasetError
from imgclf_cli.images import ImageHeader, UnreadableImage, read_header

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "icon\r"})


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class."""

    path: str
    label: int


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class DatasetScan:
    """The images found under ``root``, by split (``train``/``val``/``test``, or ``all``)."""

    root: str
    layout: str  # "folders" or "splits"
    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped: list[SkippedFile] = field(default_factory=list)
    median_short_side: int = 0
    """Median of min(width, height) over readable images (from headers)."""

    @property
    def num_images(self) -> int:
        return sum(len(samples) for samples in self.splits.values())

    def fingerprint(self) -> str:
        """A hash of the file list (relative paths, sizes, labels): tells if the data changed."""
        digest = hashlib.sha256()
        root = Path(self.root)
        for split in sorted(self.splits):
            for sample in self.splits[split]:
                path = Path(sample.path)
                relative = path.relative_to(root).as_posix()
                size = path.stat().st_size if path.exists() else -1
                digest.update(f"{split}\t{relative}\t{size}\t{sample.label}\n".encode())
        return digest.hexdigest()[:16]


def is_hidden_or_system(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILES


def detect_split_dirs(root: Path) -> dict[str, Path]:
    """Map ``train``/``val``/``test`` to folders of ``root`` when it uses the splits layout."""
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        split = SPLIT_ALIASES.get(child.name.lower())
        if child.is_dir() and split and split not in found:
            found[split] = child
    return found if "train" in found else {}


def class_dirs(folder: Path) -> list[Path]:
    return sorted(
        (child for child in folder.iterdir() if child.is_dir() and not is_hidden_or_system(child)),
        key=lambda child: child.name,
    )


def candidate_files(class_dir: Path) -> list[Path]:
    """Every non-hidden file under a class folder (recursively), in a stable order."""
    files = [
        path
        for path in class_dir.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(class_dir).parts)
        and not is_hidden_or_system(path)
    ]
    return sorted(files)


def probe_files(
    paths: Sequence[Path], on_progress: Callable[[int], None] | None = None
) -> list[ImageHeader | str]:
    """For each path, its ``ImageHeader`` if it reads as a supported image, else the reason."""

    def probe(path: Path) -> ImageHeader | str:
        try:
            return read_header(path)
        except UnreadableImage as error:
            return error.reason

    results: list[ImageHeader | str] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for result in pool.map(probe, paths, chunksize=64):
            results.append(result)
            if on_progress:
                on_progress(1)
    return results


def resolve_dataset_root(data_dir: str | Path) -> Path:
    """The absolute dataset folder; a ``DatasetError`` when it is missing or not a folder."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DatasetError(
            f"Dataset folder not found: {root}",
            "pass a folder that holds one sub-folder of images per class",
        )
    if not root.is_dir():
        raise DatasetError(f"Dataset path is not a folder: {root}", "pass the folder that holds the class folders")
    return root.resolve()


def scan_dataset(
    data_dir: str | Path, on_progress: Callable[[int], None] | None = None
) -> DatasetScan:
    """Find classes and readable images under ``data_dir``.

    Files whose header is not a supported image are skipped and listed in ``skipped``; a class
    folder without a readable image, a single class, or no images at all is a ``DatasetError``.
    """
    root = resolve_dataset_root(data_dir)
    split_dirs = detect_split_dirs(root)
    layout = "splits" if split_dirs else "folders"
    split_roots = split_dirs or {"all": root}

    class_names = sorted({child.name for folder in split_roots.values() for child in class_dirs(folder)})
    if not class_names:
        raise DatasetError(
            f"No class folders in {root}",
            "expected DATA_DIR/<class>/<images> or DATA_DIR/train/<class>/<images>",
        )
    if len(class_names) < 2:
        raise DatasetError(
            f"Only one class found in {root}: {class_names[0]!r}",
            "a classifier needs at least two class folders",
        )
    label_of = {name: index for index, name in enumerate(class_names)}

    pending: list[tuple[str, Path, int]] = []
    for split, folder in split_roots.items():
        for class_dir in class_dirs(folder):
            for path in candidate_files(class_dir):
                pending.append((split, path, label_of[class_dir.name]))

    probes = probe_files([path for _, path, _ in pending], on_progress)
    splits: dict[str, list[Sample]] = {split: [] for split in split_roots}
    skipped: list[SkippedFile] = []
    short_sides: list[int] = []
    for (split, path, label), probe in zip(pending, probes):
        if isinstance(probe, ImageHeader):
            splits[split].append(Sample(str(path), label))
            short_sides.append(min(probe.width, probe.height))
        else:
            skipped.append(SkippedFile(str(path), probe))

    readable_per_class = count_per_class(
        (sample for samples in splits.values() for sample in samples), len(class_names)
    )
    empty = [name for name, count in zip(class_names, readable_per_class) if count == 0]
    if len(empty) == len(class_names):
        raise DatasetError(
            f"No readable images in {root}",
            "supported formats are JPEG, PNG, BMP, GIF, WebP and TIFF",
        )
    if empty:
        raise DatasetError(
            f"Class folder(s) with no readable images: {', '.join(empty)} (in {root})",
            "add images to them or remove the folders",
        )
    if layout == "splits" and not splits.get("train"):
        raise DatasetError(f"The train split of {root} holds no readable images", "add images to train/<class>/")
    median_short_side = sorted(short_sides)[len(short_sides) // 2]
    return DatasetScan(str(root), layout, class_names, splits, skipped, median_short_side)


def count_per_class(samples: Iterable[Sample], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for sample in samples:
        counts[sample.label] += 1
    return counts


def stratified_split(
    samples: Sequence[Sample], validation_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split per class, seeded: each class keeps its share in both parts.

    Every class with at least two images gets at least one validation image and keeps at
    least one training image.
    """
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda sample: sample.path)
        rng.shuffle(members)
        count = round(len(members) * validation_fraction)
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        val.extend(members[:count])
        train.extend(members[count:])
    return train, val


@dataclass
class SplitManifest:
    """Which file went to which split: written to the run so evaluation reuses the same split."""

    root: str
    layout: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)

    def to_json(self) -> str:
        def encode(samples: list[Sample]) -> list[list[object]]:
            return [[Path(sample.path).relative_to(self.root).as_posix(), sample.label] for sample in samples]

        return json.dumps(
            {
                "root": self.root,
                "layout": self.layout,
                "classes": self.classes,
                "train": encode(self.train),
                "val": encode(self.val),
                "test": encode(self.test),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> SplitManifest:
        document = json.loads(text)
        root = document["root"]

        def decode(rows: list[list[object]]) -> list[Sample]:
            return [Sample(str(Path(root) / str(path)), int(label)) for path, label in rows]  # type: ignore[call-overload]

        return cls(
            root=root,
            layout=document["layout"],
            classes=list(document["classes"]),
            train=decode(document["train"]),
            val=decode(document["val"]),
            test=decode(document.get("test", [])),
        )


def make_manifest(scan: DatasetScan, validation_fraction: float, seed: int) -> SplitManifest:
    """Train/val(/test) lists for a scanned dataset: given splits are kept, missing val drawn."""
    if scan.layout == "folders":
        train, val = stratified_split(scan.splits["all"], validation_fraction, seed)
        test: list[Sample] = []
    else:
        train = list(scan.splits.get("train", []))
        val = list(scan.splits.get("val", []))
        test = list(scan.splits.get("test", []))
        if not val:
            train, val = stratified_split(train, validation_fraction, seed)
    if not val:
        raise DatasetError(
            f"Not enough images in {scan.root} to hold out a validation split",
            "add images (at least two per class) or set data.validation_split",
        )
    return SplitManifest(scan.root, scan.layout, scan.classes, train, val, test)


def skipped_as_dicts(skipped: Iterable[SkippedFile]) -> list[dict[str, str]]:
    return [asdict(entry) for entry in skipped]
