"""Placeholder until the command lands."""

from __future__ import annotations

from imgclf_cli.errors import ImgclfError


def evaluate_command() -> None:
    """Not available yet."""
    raise ImgclfError("imgclf evaluate is not available yet")
