"""Matplotlib figures written as PNG files (Agg backend, object API).  [heavy]"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from imgclf_cli import store  # noqa: E402


def save_figure(figure: plt.Figure, path: Path) -> None:
    """Save atomically, then free the figure."""
    try:
        store.atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, bbox_inches="tight", format="png"), suffix=".png")
    finally:
        plt.close(figure)


def plot_training_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch, training and validation side by side."""
    epochs = [int(row["epoch"]) for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, title in ((loss_axis, "loss", "Loss"), (accuracy_axis, "accuracy", "Accuracy")):
        axis.plot(epochs, [row.get(metric) for row in history], marker="o", label="train")
        axis.plot(epochs, [row.get(f"val_{metric}") for row in history], marker="o", label="validation")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Training curves")
    save_figure(figure, path)
