"""Matplotlib figures written as PNG files (Agg backend, object API).  [heavy]

The helpers every figure module uses (``evaluation_plots``, ``inspection_plots``) live here:
``save_figure`` writes a figure atomically and frees it, ``thumbnail`` decodes an image for
display. Importing this module selects the Agg backend, so figures never need a display.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from imgclf_cli import store  # noqa: E402
from imgclf_cli.images import DECODE_ERRORS, image_source, to_rgb  # noqa: E402

THUMBNAIL_SIDE = 160


def save_figure(figure: plt.Figure, path: Path) -> None:
    """Save as PNG atomically (readers never see half a file), then free the figure."""
    try:
        store.atomic_write(
            path,
            lambda temporary: figure.savefig(temporary, dpi=110, bbox_inches="tight", format="png"),
            suffix=".png",
        )
    finally:
        plt.close(figure)


def thumbnail(path: str | Path | BinaryIO, size: int = THUMBNAIL_SIDE) -> Image.Image | None:
    """The image as a person sees it, at most ``size`` pixels a side: first frame, EXIF
    orientation applied, 8-bit RGB, aspect ratio kept. ``None`` when it cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = image_source(path) if isinstance(path, (str, Path)) else path  # a URL: one GET
            with Image.open(source) as image:
                image.seek(0)
                if image.format in ("JPEG", "MPO"):
                    # libjpeg decodes at a reduced scale: much faster for camera photos.
                    image.draft("RGB", (2 * size, 2 * size))
                image.load()
                picture = to_rgb(ImageOps.exif_transpose(image) or image)
                picture.thumbnail((size, size), Image.Resampling.BILINEAR)
                return picture
    except DECODE_ERRORS:
        return None


def plot_training_curves(
    history: Sequence[dict[str, float]], path: Path, best_epoch: int | None = None
) -> plt.Figure:
    """Loss and accuracy per epoch, training and validation side by side, with the epoch whose
    model was kept (``best_epoch``; by default the one training picks: highest validation
    accuracy, then lowest validation loss) marked."""
    from matplotlib.ticker import MaxNLocator

    if best_epoch is None and history:
        from imgclf_cli.training_callbacks import TrainingState

        best_epoch = TrainingState.from_history(list(history)).best_epoch
    epochs = [int(row["epoch"]) for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, title in ((loss_axis, "loss", "Loss"), (accuracy_axis, "accuracy", "Accuracy")):
        axis.plot(epochs, [row.get(metric) for row in history], marker="o", label="train")
        validation = [row.get(f"val_{metric}") for row in history]
        axis.plot(epochs, validation, marker="o", label="validation")
        if best_epoch in epochs:
            axis.axvline(best_epoch, color="tab:green", linestyle="--", linewidth=1)
            axis.plot(
                [best_epoch],
                [validation[epochs.index(best_epoch)]],
                marker="*",
                markersize=14,
                color="tab:green",
                linestyle="none",
                label=f"best epoch ({best_epoch}): best.keras",
            )
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Training curves" + (f" (best epoch {best_epoch})" if best_epoch in epochs else ""))
    save_figure(figure, path)
    return figure
