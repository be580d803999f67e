"""The ``inspect-dataset --report DIR`` files: the JSON report and PNG plots.  [heavy: matplotlib]

Only imported when ``--report`` is given. Images are read, never written, in the dataset.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from PIL import Image

from imgclf_cli import store
from imgclf_cli.errors import UsageError
from imgclf_cli.filesystems import is_url, join
from imgclf_cli.images import image_source
from imgclf_cli.inspection_report import DuplicateGroups, ImageRecord, InspectionReport
from imgclf_cli.plots import THUMBNAIL_SIDE, save_figure, thumbnail

REPORT_JSON = "inspection.json"
CLASS_DISTRIBUTION_PNG = "class_distribution.png"
IMAGE_SIZES_PNG = "image_sizes.png"
SAMPLES_PNG = "samples.png"
NEAR_DUPLICATES_PNG = "near_duplicates.png"
SAMPLES_PER_CLASS = 6
MAX_CLASSES_IN_GRID = 30
MAX_PAIRS = 12
# Two duplicate groups (four images) a row, each image in a cell of this many inches: twelve
# groups make a figure about 700 x 1400 pixels, under 1 MB with photographs.
GROUPS_PER_ROW = 2
DUPLICATE_CELL_INCHES = 1.25
DUPLICATE_THUMBNAIL_SIDE = 140
# With this many different image sizes or fewer, each is labelled with its number of images.
MAX_LABELLED_SIZES = 8


def write_report(report: InspectionReport, output_dir: str | Path) -> list[Path]:
    """Write ``inspection.json`` and the PNG plots to ``output_dir``; return the files written.

    ``near_duplicates.png`` is written only when duplicates (exact or near) were found. Raises
    ``UsageError`` when ``output_dir`` lies inside the dataset (it is never written to).
    """
    output_dir = check_report_dir(output_dir, report.root)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    json_path = output_dir / REPORT_JSON
    text = json.dumps(report.to_dict(), indent=2, default=str) + "\n"

    def write_json(temporary: Path) -> None:
        temporary.write_text(text, encoding="utf-8")

    store.atomic_write(json_path, write_json, suffix=".json")
    written.append(json_path)

    plot_class_distribution(report, output_dir / CLASS_DISTRIBUTION_PNG)
    written.append(output_dir / CLASS_DISTRIBUTION_PNG)
    if report.images:
        plot_image_sizes(report, output_dir / IMAGE_SIZES_PNG)
        written.append(output_dir / IMAGE_SIZES_PNG)
        plot_samples(report, output_dir / SAMPLES_PNG)
        written.append(output_dir / SAMPLES_PNG)
    pairs, total = duplicate_pairs_to_draw(report)
    if pairs:
        plot_near_duplicates(report, pairs, total, output_dir / NEAR_DUPLICATES_PNG)
        written.append(output_dir / NEAR_DUPLICATES_PNG)
    return written


def check_report_dir(output_dir: str | Path, data_dir: str | Path) -> Path:
    """``output_dir`` resolved; ``UsageError`` when it lies inside the dataset folder."""
    output_dir = Path(output_dir).expanduser().resolve()
    if is_url(data_dir):
        return output_dir  # a local folder is never inside a dataset on an object store
    root = Path(data_dir).expanduser().resolve()
    if output_dir == root or root in output_dir.parents:
        raise UsageError(
            f"--report {output_dir} is inside the dataset folder {root}",
            "inspect-dataset never writes into DATA_DIR: choose a folder outside it",
        )
    return output_dir


def plot_class_distribution(report: InspectionReport, path: Path) -> None:
    """Images per class, stacked by split when the dataset has splits."""
    names = list(report.classes)
    figure, axis = plt.subplots(layout="constrained", figsize=(max(6.0, 0.5 * len(names) + 2), 4))
    positions = list(range(len(names)))
    if report.splits:
        bottoms = [0] * len(names)
        for split, counts in report.splits.items():
            heights = [counts[name] for name in names]
            axis.bar(positions, heights, bottom=bottoms, label=split)
            bottoms = [bottom + height for bottom, height in zip(bottoms, heights, strict=True)]
        axis.legend()
    else:
        axis.bar(positions, [report.classes[name] for name in names], color="tab:blue")
    axis.set_xticks(positions)
    axis.set_xticklabels(
        names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
    )
    axis.set_ylabel("images")
    ratio = "-" if report.imbalance_ratio is None else f"{report.imbalance_ratio:g}"
    axis.set_title(f"Images per class (largest/smallest: {ratio})")
    axis.grid(axis="y", alpha=0.3)
    save_figure(figure, path)


def plot_image_sizes(report: InspectionReport, path: Path) -> Figure:
    """Width against height of the images, one colour per class, a dot's area by how many share
    that size; a sentence when every image has the same size (one dot would answer nothing)."""
    sizes = Counter((image.width, image.height) for image in report.images)
    (common_width, common_height), common_count = sizes.most_common(1)[0]
    if len(sizes) == 1:
        figure, axis = plt.subplots(layout="constrained", figsize=(5, 1.2))
        axis.axis("off")
        axis.text(
            0.5,
            0.5,
            f"All {report.num_images} images are {common_width}×{common_height} px (width × height)",
            ha="center",
            va="center",
            fontsize=11,
        )
        axis.set_title("Image sizes")
        save_figure(figure, path)
        return figure
    figure, axis = plt.subplots(layout="constrained", figsize=(6, 5))
    by_class: dict[str, Counter[tuple[int, int]]] = defaultdict(Counter)
    for image in report.images:
        by_class[image.class_name][(image.width, image.height)] += 1
    largest = max(count for counts in by_class.values() for count in counts.values())
    for name, counts in by_class.items():
        # Many images share a size: the dot's area grows with their number.
        axis.scatter(
            [width for width, _ in counts],
            [height for _, height in counts],
            s=[8 + 150 * count / largest for count in counts.values()],
            alpha=0.5,
            label=name if len(by_class) <= 12 else None,
        )
    if len(sizes) <= MAX_LABELLED_SIZES:
        for (width, height), count in sizes.items():
            axis.annotate(
                f"{width}×{height}: {count}",
                (width, height),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
    if report.small_images:
        # Drawn only when some image is that small: otherwise the lines only stretch the axes.
        axis.axvline(report.small_side, color="grey", linestyle=":", linewidth=1)
        axis.axhline(
            report.small_side,
            color="grey",
            linestyle=":",
            linewidth=1,
            label=f"{report.small_side} px: below it an image is reported as very small",
        )
    if len(by_class) <= 12 or report.small_images:
        legend = axis.legend(fontsize="small")
        for handle in legend.legend_handles:
            if hasattr(handle, "set_sizes"):  # one dot size for every class, whatever their counts
                handle.set_sizes([30])
    axis.margins(0.15)
    axis.set_xlabel("width (px)")
    axis.set_ylabel("height (px)")
    axis.set_title(
        f"Image sizes: {report.num_images} images, {len(sizes)} sizes\n"
        f"most common {common_width}×{common_height} ({common_count} images)"
    )
    axis.grid(alpha=0.3)
    save_figure(figure, path)
    return figure


def evenly_spaced(items: Sequence[ImageRecord], count: int) -> list[ImageRecord]:
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(index * step)] for index in range(count)]


def thumbnail_of(root: str, relative: str, size: int = THUMBNAIL_SIDE) -> Image.Image | None:
    """``plots.thumbnail`` of a dataset's image (read in one GET on an object store)."""
    path = join(root, relative)
    try:
        return thumbnail(image_source(path), size)
    except FileNotFoundError:  # gone from the store since it was inspected
        return None


def plot_samples(report: InspectionReport, path: Path) -> None:
    """A grid: one row per class, a few images spread over each class's file list."""
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for image in report.images:
        by_class[image.class_name].append(image)
    names = [name for name in report.classes if by_class.get(name)][:MAX_CLASSES_IN_GRID]
    columns = min(SAMPLES_PER_CLASS, max(len(by_class[name]) for name in names))
    figure, axes = plt.subplots(
        len(names),
        columns,
        layout="constrained",
        figsize=(1.6 * columns + 1, 1.6 * len(names)),
        squeeze=False,
    )
    for row, name in enumerate(names):
        samples = evenly_spaced(by_class[name], columns)
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if column < len(samples):
                picture = thumbnail_of(report.root, samples[column].path)
                if picture is not None:
                    axis.imshow(picture)
            if column == 0:
                axis.set_ylabel(name, rotation=0, ha="right", va="center")
    title = "Sample images per class"
    if len(report.classes) > len(names):
        title += f" (first {len(names)} classes)"
    figure.suptitle(title)
    save_figure(figure, path)


@dataclass(frozen=True)
class DuplicateKind:
    """What a duplicate group is: byte-identical (``exact``) or near, and across what."""

    exact: bool
    across: str | None
    """``"class"`` or ``"split"``: the files lie in different ones; ``None``: within a class."""

    @property
    def description(self) -> str:
        what = "same file" if self.exact else "near duplicates"
        where = {"class": "in two classes", "split": "in two splits"}.get(self.across or "", "within a class")
        return f"{what} {where}"


@dataclass(frozen=True)
class DuplicatePair:
    """Two files of a duplicate group to draw side by side."""

    first: ImageRecord
    second: ImageRecord
    distance: int
    """Perceptual-hash bits apart (0 for byte-identical files)."""
    kind: DuplicateKind


def duplicate_groups_by_severity(report: InspectionReport) -> list[tuple[list[str], DuplicateKind]]:
    """Every duplicate group once, in the order of the findings' severity: exact copies across
    classes, across splits (errors), near duplicates across classes, across splits, exact copies
    within a class, near duplicates within a class."""
    exact, near = report.duplicates, report.near_duplicates or DuplicateGroups()
    ordered = [
        (exact.cross_class, DuplicateKind(exact=True, across="class")),
        (exact.cross_split, DuplicateKind(exact=True, across="split")),
        (near.cross_class, DuplicateKind(exact=False, across="class")),
        (near.cross_split, DuplicateKind(exact=False, across="split")),
        (exact.within_class, DuplicateKind(exact=True, across=None)),
        (near.within_class, DuplicateKind(exact=False, across=None)),
    ]
    groups: list[tuple[list[str], DuplicateKind]] = []
    seen: set[tuple[str, ...]] = set()
    for kind_groups, kind in ordered:
        for group in kind_groups:
            if tuple(group) not in seen:
                seen.add(tuple(group))
                groups.append((group, kind))
    return groups


def duplicate_pairs_to_draw(report: InspectionReport) -> tuple[list[DuplicatePair], int]:
    """The pair that shows each duplicate group best, most severe groups first, at most
    ``MAX_PAIRS``; and how many groups there are in all."""
    record_of = {image.path: image for image in report.images}
    groups = duplicate_groups_by_severity(report)
    pairs: list[DuplicatePair] = []
    for paths, kind in groups:
        if len(pairs) >= MAX_PAIRS:
            break
        pair = best_pair([record_of[path] for path in paths if path in record_of], kind)
        if pair is not None:
            pairs.append(pair)
    return pairs, len(groups)


def best_pair(members: Sequence[ImageRecord], kind: DuplicateKind) -> DuplicatePair | None:
    """Two members that show the group's problem: in different classes (or splits) when that is
    the problem, and for near duplicates the closest two different contents."""
    best: DuplicatePair | None = None
    for index, first in enumerate(members):
        for second in members[index + 1 :]:
            if kind.across == "class" and first.class_name == second.class_name:
                continue
            if kind.across == "split" and first.split == second.split:
                continue
            if kind.exact:
                return DuplicatePair(first, second, 0, kind)
            if first.content_hash == second.content_hash:
                continue
            if first.perceptual_hash is None or second.perceptual_hash is None:
                continue
            distance = (first.perceptual_hash ^ second.perceptual_hash).bit_count()
            if best is None or distance < best.distance:
                best = DuplicatePair(first, second, distance, kind)
    return best


def shorten_path(path: str, limit: int = 34) -> str:
    """The end of a path (its class folder and file name), which is what a title has room for."""
    return path if len(path) <= limit else "…" + path[-(limit - 1) :]


def plot_near_duplicates(
    report: InspectionReport, pairs: Sequence[DuplicatePair], total: int, path: Path
) -> Figure:
    """Duplicate pairs side by side, two groups a row, each titled with its kind and distance
    and each image with its path and size. The figure says how many of ``total`` groups it shows."""
    rows = math.ceil(len(pairs) / GROUPS_PER_ROW)
    columns = min(len(pairs), GROUPS_PER_ROW)
    figure = plt.figure(
        layout="constrained",
        figsize=(2 * DUPLICATE_CELL_INCHES * columns, (DUPLICATE_CELL_INCHES + 0.55) * rows + 0.5),
    )
    cells = figure.subfigures(rows, columns, squeeze=False)
    for cell in cells.flat[len(pairs) :]:
        cell.set_visible(False)
    for cell, pair in zip(cells.flat, pairs, strict=False):  # the last row may have an empty cell
        apart = "identical bytes" if pair.kind.exact else f"{pair.distance} bits apart"
        cell.suptitle(f"{pair.kind.description}, {apart}", fontsize=8)
        for axis, image in zip(cell.subplots(1, 2), (pair.first, pair.second), strict=True):
            axis.set_xticks([])
            axis.set_yticks([])
            picture = thumbnail_of(report.root, image.path, DUPLICATE_THUMBNAIL_SIDE)
            if picture is not None:
                axis.imshow(picture)
            axis.set_title(f"{shorten_path(image.path)}\n{image.width}×{image.height}", fontsize=6)
    shown = f"{len(pairs)} of {total} groups shown" if total > len(pairs) else f"all {total} groups shown"
    searched = (
        f"near duplicates: perceptual hash within {report.hash_distance} bits"
        if report.near_duplicates is not None
        else "exact copies only (the near-duplicate search was off)"
    )
    figure.suptitle(f"Duplicates, most severe first ({shown})\n{searched}", fontsize=10)
    save_figure(figure, path)
    return figure
