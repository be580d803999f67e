"""Scanning a dataset for training and evaluation without TensorFlow: classes, readable images, splits.

The files come from ``imgclf_cli.dataset_layout.list_dataset`` (the walk ``inspect-dataset``
shares); each file's header is read here to keep only images imgclf can decode. With the
``DATA_DIR/<class>/<images>`` layout a seeded, stratified validation split is drawn by
``stratified_split``; with ``DATA_DIR/{train,val,test}/<class>/<images>`` the given splits are used.
``DATA_DIR`` may be an object store URL (``s3://bucket/prefix``): sample paths are then URLs.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imgclf_cli.dataset_layout import list_dataset
from imgclf_cli.errors import DatasetError
from imgclf_cli.filesystems import RemotePath, is_url, join, relative_path
from imgclf_cli.images import ImageHeader, UnreadableImage, read_header


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
    versions: dict[str, str] = field(default_factory=dict)
    """On an object store: each image's size and ETag (or modification time), from the listing."""

    @property
    def num_images(self) -> int:
        return sum(len(samples) for samples in self.splits.values())

    def fingerprint(self) -> str:
        """A hash of the file list (relative paths, sizes, labels): tells if the data changed.

        On an object store the sizes (and ETags) come from the listing: nothing is read again.
        """
        digest = hashlib.sha256()
        if is_url(self.root):
            for split in sorted(self.splits):
                for sample in self.splits[split]:
                    relative = relative_path(sample.path, self.root)
                    version = self.versions.get(sample.path, "-1")
                    digest.update(f"{split}\t{relative}\t{version}\t{sample.label}\n".encode())
            return digest.hexdigest()[:16]
        root = Path(self.root)
        for split in sorted(self.splits):
            for sample in self.splits[split]:
                path = Path(sample.path)
                relative = path.relative_to(root).as_posix()
                size = path.stat().st_size if path.exists() else -1
                digest.update(f"{split}\t{relative}\t{size}\t{sample.label}\n".encode())
        return digest.hexdigest()[:16]


def probe_files(
    paths: Sequence[Path | RemotePath], on_progress: Callable[[int], None] | None = None
) -> list[ImageHeader | str]:
    """For each path, its ``ImageHeader`` if it reads as a supported image, else the reason.

    On an object store each header is one ranged GET, made by the same pool of threads.
    """

    def probe(path: Path | RemotePath) -> ImageHeader | str:
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


def scan_dataset(data_dir: str | Path, on_progress: Callable[[int], None] | None = None) -> DatasetScan:
    """Find classes and readable images under ``data_dir``.

    Files whose header is not a supported image are skipped and listed in ``skipped``; a class
    folder without a readable image, a single class, or no images at all is a ``DatasetError``.
    """
    listing = list_dataset(data_dir)
    root, class_names = listing.root, listing.classes
    if len(class_names) < 2:
        raise DatasetError(
            f"Only one class found in {root}: {class_names[0]!r}",
            "a classifier needs at least two class folders",
        )
    label_of = {name: index for index, name in enumerate(class_names)}
    # Splits in the order of their folder names (test, train, val), as scan_dataset listed them
    # before the walk was shared with inspect-dataset: ``skipped`` keeps its order in run files.
    split_names = sorted(listing.split_folders, key=listing.split_folders.__getitem__) or ["all"]
    rank = {split: index for index, split in enumerate(split_names)}
    files = sorted(listing.files, key=lambda file: rank[file.split or "all"])

    probes = probe_files([file.path for file in files], on_progress)
    splits: dict[str, list[Sample]] = {split: [] for split in split_names}
    skipped: list[SkippedFile] = []
    short_sides: list[int] = []
    for file, probe in zip(files, probes, strict=True):
        if isinstance(probe, ImageHeader):
            splits[file.split or "all"].append(Sample(str(file.path), label_of[file.class_name]))
            short_sides.append(min(probe.width, probe.height))
        else:
            skipped.append(SkippedFile(str(file.path), probe))

    readable_per_class = count_per_class(
        (sample for samples in splits.values() for sample in samples), len(class_names)
    )
    empty = [name for name, count in zip(class_names, readable_per_class, strict=True) if count == 0]
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
    if listing.layout == "splits" and not splits.get("train"):
        raise DatasetError(
            f"The train split of {root} holds no readable images", "add images to train/<class>/"
        )
    median_short_side = sorted(short_sides)[len(short_sides) // 2]
    versions = {
        str(file.path): f"{file.path.size}\t{file.path.version}"
        for file in files
        if isinstance(file.path, RemotePath)
    }
    return DatasetScan(str(root), listing.layout, class_names, splits, skipped, median_short_side, versions)


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
            return [[relative_path(sample.path, self.root), sample.label] for sample in samples]

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
            return [Sample(join(root, str(path)), int(label)) for path, label in rows]  # type: ignore[call-overload]

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
