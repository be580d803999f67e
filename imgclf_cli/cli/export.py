"""Placeholder until the command lands."""

from __future__ import annotations

from imgclf_cli.errors import ImgclfError


def export_command() -> None:
    """Not available yet."""
    raise ImgclfError("imgclf export is not available yet")
