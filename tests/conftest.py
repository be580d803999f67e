"""Shared fixtures: tiny generated image folders, a temporary run store, one tiny trained run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("COLUMNS", "200")
os.environ["IMGCLF_PROGRESS"] = "0"

# Each class is a solid colour with noise: learnable in a couple of epochs by a tiny model.
CLASS_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}

# The tiny, fast training every test that needs a model uses.
# fmt: off
TINY_TRAINING = [
    "--epochs", "10",
    "--image-size", "48",
    "--batch-size", "8",
    "--set", "model.width=8",
    "--set", "train.learning_rate=0.01",
    "--set", "train.warmup_epochs=0",
]
# fmt: on


def make_image(
    colour: tuple[int, int, int], rng: np.random.Generator, size: tuple[int, int] = (40, 48)
) -> Image.Image:
    noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
    pixels = np.clip(np.asarray(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_class_folders(
    root: Path,
    per_class: int = 12,
    classes: dict[str, tuple[int, int, int]] | None = None,
    seed: int = 0,
) -> Path:
    """``root/<class>/<n>.png`` for each class colour."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or CLASS_COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            make_image(colour, rng).save(folder / f"{name}_{index:03d}.png")
    return root


@pytest.fixture
def image_folders(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "data")


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "runs"
    monkeypatch.setenv("IMGCLF_RUNS_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One tiny model trained once per test session; tests must not modify its run folder."""
    from typer.testing import CliRunner

    from imgclf_cli.cli.app import app

    base = tmp_path_factory.mktemp("trained")
    data_dir = make_class_folders(base / "data", per_class=16)
    runs = base / "runs"
    result = CliRunner().invoke(
        app, ["train", str(data_dir), "--runs-dir", str(runs), "--json", *TINY_TRAINING]
    )
    assert result.exit_code == 0, result.output
    import json

    summary = json.loads(result.stdout)
    yield {"data_dir": data_dir, "runs_dir": runs, "run_dir": Path(summary["run_dir"]), "summary": summary}  # type: ignore[dict-item]
