"""The ``inspect-dataset --report DIR`` files: the JSON report and PNG plots.  [heavy: matplotlib]

Only imported when ``--report`` is given. Images are read, never written, in the dataset.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from matplotlib import pyplot as plt

from imgclf_cli import store
from imgclf_cli.errors import UsageError
from imgclf_cli.inspection_report import ImageRecord, InspectionReport
from imgclf_cli.plots import save_figure, thumbnail

REPORT_JSON = "inspection.json"
CLASS_DISTRIBUTION_PNG = "class_distribution.png"
IMAGE_SIZES_PNG = "image_sizes.png"
SAMPLES_PNG = "samples.png"
NEAR_DUPLICATES_PNG = "near_duplicates.png"
SAMPLES_PER_CLASS = 6
MAX_CLASSES_IN_GRID = 30
MAX_PAIRS = 12


def write_report(report: InspectionReport, output_dir: str | Path) -> list[Path]:
    """Write ``inspection.json`` and the PNG plots to ``output_dir``; return the files written.

    ``near_duplicates.png`` is written only when near duplicates were found. Raises
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
    pairs = near_duplicate_pairs_to_draw(report)
    if pairs:
        plot_near_duplicates(report, pairs, output_dir / NEAR_DUPLICATES_PNG)
        written.append(output_dir / NEAR_DUPLICATES_PNG)
    return written


def check_report_dir(output_dir: str | Path, data_dir: str | Path) -> Path:
    """``output_dir`` resolved; ``UsageError`` when it lies inside the dataset folder."""
    output_dir = Path(output_dir).expanduser().resolve()
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


def plot_image_sizes(report: InspectionReport, path: Path) -> None:
    """Width against height of every image, one colour per class."""
    figure, axis = plt.subplots(layout="constrained", figsize=(6, 5))
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for image in report.images:
        by_class[image.class_name].append(image)
    for name, members in by_class.items():
        axis.scatter(
            [image.width for image in members],
            [image.height for image in members],
            s=8,
            alpha=0.5,
            label=name if len(by_class) <= 12 else None,
        )
    if len(by_class) <= 12:
        axis.legend(markerscale=2, fontsize="small")
    axis.axvline(report.small_side, color="grey", linestyle=":", linewidth=1)
    axis.axhline(report.small_side, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("width (px)")
    axis.set_ylabel("height (px)")
    axis.set_title(f"Image sizes ({report.num_images} images)")
    axis.grid(alpha=0.3)
    save_figure(figure, path)


def evenly_spaced(items: Sequence[ImageRecord], count: int) -> list[ImageRecord]:
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(index * step)] for index in range(count)]


def plot_samples(report: InspectionReport, path: Path) -> None:
    """A grid: one row per class, a few images spread over each class's file list."""
    root = Path(report.root)
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
                picture = thumbnail(root / samples[column].path)
                if picture is not None:
                    axis.imshow(picture)
            if column == 0:
                axis.set_ylabel(name, rotation=0, ha="right", va="center")
    title = "Sample images per class"
    if len(report.classes) > len(names):
        title += f" (first {len(names)} classes)"
    figure.suptitle(title)
    save_figure(figure, path)


def near_duplicate_pairs_to_draw(report: InspectionReport) -> list[tuple[ImageRecord, ImageRecord, int]]:
    """The closest pair of different contents in each near-duplicate group, worst kind first."""
    near = report.near_duplicates
    if near is None:
        return []
    record_of = {image.path: image for image in report.images}
    pairs: list[tuple[ImageRecord, ImageRecord, int]] = []
    seen: set[tuple[str, ...]] = set()
    for group in near.cross_class + near.cross_split + near.within_class:
        if tuple(group) in seen:
            continue
        seen.add(tuple(group))
        members = [record_of[path] for path in group if path in record_of]
        best: tuple[ImageRecord, ImageRecord, int] | None = None
        for index, first in enumerate(members):
            for second in members[index + 1 :]:
                if first.content_hash == second.content_hash:
                    continue
                if first.perceptual_hash is None or second.perceptual_hash is None:
                    continue
                distance = (first.perceptual_hash ^ second.perceptual_hash).bit_count()
                if best is None or distance < best[2]:
                    best = (first, second, distance)
        if best is not None:
            pairs.append(best)
        if len(pairs) >= MAX_PAIRS:
            break
    return pairs


def plot_near_duplicates(
    report: InspectionReport, pairs: Sequence[tuple[ImageRecord, ImageRecord, int]], path: Path
) -> None:
    """Near-duplicate pairs side by side, with their paths and hash distance."""
    root = Path(report.root)
    figure, axes = plt.subplots(
        len(pairs), 2, layout="constrained", figsize=(6.5, 3.0 * len(pairs)), squeeze=False
    )
    for row, (first, second, distance) in enumerate(pairs):
        for column, image in enumerate((first, second)):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            picture = thumbnail(root / image.path)
            if picture is not None:
                axis.imshow(picture)
            axis.set_title(f"{image.path}\n{image.width}x{image.height}", fontsize=7)
        axes[row][0].set_ylabel(f"{distance} bits apart", fontsize=8)
    figure.suptitle(f"Near duplicates (perceptual hash within {report.hash_distance} bits)")
    save_figure(figure, path)
