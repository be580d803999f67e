"""Placeholder until the command lands."""

from __future__ import annotations

from imgclf_cli.errors import ImgclfError


def predict_command() -> None:
    """Not available yet."""
    raise ImgclfError("imgclf predict is not available yet")
