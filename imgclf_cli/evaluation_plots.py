"""Evaluation figures: confusion matrix, most confidently wrong images, reliability.  [heavy]

Matplotlib's object API on the Agg backend; every figure is saved atomically (and closed) by
``imgclf_cli.plots.save_figure``. Only imported when evaluation writes its plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from imgclf_cli.plots import save_figure, thumbnail

if TYPE_CHECKING:
    from imgclf_cli.evaluation import Misclassified, ReliabilityBin

# Cell numbers are drawn only while they stay legible.
MAX_ANNOTATED_CLASSES = 25


def short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Figure:
    """Raw counts and row-normalised fractions (recall per true class), side by side."""
    matrix = np.asarray(matrix, dtype=np.int64)
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
    size = len(labels)
    side = min(max(4.5, 0.45 * size + 2.5), 30)
    figure, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    names = [short(label) for label in labels]
    panels = ((axes[0], matrix, "Counts", "d"), (axes[1], normalised, "Normalised by true class", ".2f"))
    for axis, values, title, number_format in panels:
        limit = 1.0 if number_format != "d" else max(1, int(values.max()))
        image = axis.imshow(values, cmap="Blues", vmin=0, vmax=limit, interpolation="nearest")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
        axis.set_title(title)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        crowded = size > 6
        axis.set_xticks(
            range(size), names, rotation=90 if crowded else 45, ha="center" if crowded else "right"
        )
        axis.set_yticks(range(size), names)
        if size <= MAX_ANNOTATED_CLASSES:
            for row in range(size):
                for column in range(size):
                    value = values[row, column]
                    axis.text(
                        column,
                        row,
                        format(value, number_format),
                        ha="center",
                        va="center",
                        fontsize=8 if size > 10 else 10,
                        color="white" if value > limit / 2 else "black",
                    )
    figure.suptitle(f"Confusion matrix ({int(matrix.sum())} images)")
    figure.tight_layout()
    save_figure(figure, path)
    return figure


def plot_misclassified_gallery(
    entries: Sequence[Misclassified], path: Path, total: int | None = None
) -> Figure:
    """A grid of the most confidently wrong images, each titled with its true and predicted class
    and the confidence as a percentage with one decimal, enough to rank them."""
    if not entries:
        figure, axis = plt.subplots(figsize=(4, 1.5))
        axis.axis("off")
        axis.text(0.5, 0.5, "No misclassified images", ha="center", va="center", fontsize=12)
        save_figure(figure, path)
        return figure
    columns = min(4, len(entries))
    rows = math.ceil(len(entries) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, entry in zip(axes.flat, entries, strict=False):  # more axes than entries on the last row
        picture = thumbnail(entry.path)
        if picture is not None:
            axis.imshow(picture)
        axis.set_title(
            f"true: {short(entry.true)}\npredicted: {short(entry.predicted)} ({entry.confidence:.1%})\n"
            f"{short(Path(entry.path).name, 28)}",
            fontsize=8,
        )
    shown = f"{len(entries)} of {total}" if total and total > len(entries) else f"{len(entries)}"
    figure.suptitle(f"Most confidently wrong images ({shown})")
    figure.tight_layout()
    save_figure(figure, path)
    return figure


def plot_reliability_diagram(
    bins: Sequence[ReliabilityBin], ece: float, path: Path, num_classes: int | None = None
) -> Figure:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with counts.

    The top-1 probability of ``num_classes`` classes is at least 1/``num_classes``: the
    confidence axis starts there (at 0 when the number is not given)."""
    lowest = 1.0 / num_classes if num_classes and num_classes > 1 else 0.0
    figure, (axis, counts_axis) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = bins[0].upper - bins[0].lower if bins else 1.0
    centres = [(entry.lower + entry.upper) / 2 for entry in bins]
    filled = [entry for entry in bins if entry.count]
    axis.bar(
        [(entry.lower + entry.upper) / 2 for entry in filled],
        [entry.accuracy or 0.0 for entry in filled],
        width=width,
        color="tab:blue",
        edgecolor="black",
        alpha=0.8,
        label="accuracy",
    )
    # Hatched outlines at the mean confidence: the space between them and the bars is the gap.
    axis.bar(
        [(entry.lower + entry.upper) / 2 for entry in filled],
        [entry.confidence or 0.0 for entry in filled],
        width=width,
        fill=False,
        edgecolor="tab:red",
        hatch="//",
        label="mean confidence",
    )
    axis.plot([lowest, 1], [lowest, 1], linestyle="--", color="gray", label="perfect calibration")
    axis.set_xlim(lowest, 1)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title(f"Reliability diagram (ECE = {ece:.4f}, {len(bins)} bins)")
    axis.legend(loc="upper left")
    counts = [entry.count for entry in bins]
    counts_axis.bar(centres, counts, width=width, color="tab:gray", edgecolor="black")
    floor = f"; at least 1/{num_classes} with {num_classes} classes" if lowest else ""
    counts_axis.set_xlabel(f"confidence (top-1 probability{floor})")
    counts_axis.set_ylabel("images")
    figure.tight_layout()
    save_figure(figure, path)
    return figure
