"""Placeholder until the command lands."""

from __future__ import annotations

from imgclf_cli.errors import ImgclfError


def inspect_dataset_command() -> None:
    """Not available yet."""
    raise ImgclfError("imgclf inspect-dataset is not available yet")
