"""What ``inspect-dataset`` reports, and the defaults it measures with.

Plain dataclasses and constants (standard library only): the command line imports them for its
options and rendering without loading NumPy or Pillow. ``imgclf_cli.inspection.inspect_dataset``
fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_HASH_DISTANCE = 6
"""Largest Hamming distance (of 64 bits) between perceptual hashes counted as a near duplicate.

Re-encoded or resized copies of a photo are typically 0 to 4 bits apart; on flowers128, pairs
8 or more bits apart are mostly different photos."""
MAX_HASH_DISTANCE = 16
SMALL_IMAGE_SIDE = 32
"""Images whose shorter side is below this many pixels are reported as very small and left out
of the near-duplicate search (a perceptual hash of a few pixels matches unrelated images)."""


@dataclass(frozen=True)
class ImageRecord:
    """One file of a class folder that decodes as an image imgclf can train on."""

    path: str
    """Relative to the dataset root, with ``/`` separators."""
    class_name: str
    split: str | None
    format: str
    mode: str
    width: int
    height: int
    size_bytes: int
    content_hash: str
    perceptual_hash: int | None


@dataclass(frozen=True)
class Finding:
    """One problem (or notable fact) about the dataset and what to do about it."""

    severity: str
    """``error`` (training on it gives wrong or inflated results), ``warning`` or ``info``."""
    code: str
    message: str
    action: str
    count: int
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "action": self.action,
            "count": self.count,
            "examples": self.examples,
        }


@dataclass
class DuplicateGroups:
    """Groups of files (lists of relative paths) holding the same or nearly the same image.

    A group whose files lie in different classes is in ``cross_class``; one whose files lie in
    different splits is in ``cross_split`` (a group can be in both); the rest are ``within_class``.
    """

    within_class: list[list[str]] = field(default_factory=list)
    cross_class: list[list[str]] = field(default_factory=list)
    cross_split: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[list[str]]]:
        return {
            "within_class": self.within_class,
            "cross_class": self.cross_class,
            "cross_split": self.cross_split,
        }

    @property
    def num_groups(self) -> int:
        return len({tuple(group) for group in self.within_class + self.cross_class + self.cross_split})


@dataclass
class InspectionReport:
    """What ``inspect_dataset`` found. ``to_dict()`` is the ``--json`` document."""

    root: str
    layout: str
    """``folders`` (DATA_DIR/<class>/) or ``splits`` (DATA_DIR/train/<class>/ ...)."""
    num_files: int
    classes: dict[str, int]
    splits: dict[str, dict[str, int]] | None
    imbalance_ratio: float | None
    formats: dict[str, int]
    modes: dict[str, int]
    sizes: dict[str, dict[str, float]]
    per_class: dict[str, dict[str, Any]]
    per_split: dict[str, dict[str, Any]] | None
    corrupt: list[dict[str, str]]
    extension_mismatch: list[dict[str, str]]
    non_image_files: list[dict[str, str]]
    small_images: list[dict[str, Any]]
    empty_class_folders: list[str]
    hidden_files: list[str]
    ignored_paths: list[str]
    duplicates: DuplicateGroups
    near_duplicates: DuplicateGroups | None
    """``None`` when the near-duplicate search was turned off."""
    hash_distance: int
    small_side: int
    findings: list[Finding]
    seconds: float
    images: list[ImageRecord] = field(default_factory=list, repr=False)
    """Every decodable image (not part of ``to_dict``; the plots use it)."""

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_errors(self) -> int:
        return sum(1 for finding in self.findings if finding.severity == "error")

    @property
    def num_warnings(self) -> int:
        return sum(1 for finding in self.findings if finding.severity == "warning")

    @property
    def has_errors(self) -> bool:
        return self.num_errors > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "layout": self.layout,
            "num_files": self.num_files,
            "num_images": self.num_images,
            "classes": self.classes,
            "splits": self.splits,
            "imbalance_ratio": self.imbalance_ratio,
            "formats": self.formats,
            "modes": self.modes,
            "sizes": self.sizes,
            "per_class": self.per_class,
            "per_split": self.per_split,
            "corrupt": self.corrupt,
            "extension_mismatch": self.extension_mismatch,
            "non_image_files": self.non_image_files,
            "small_images": self.small_images,
            "empty_class_folders": self.empty_class_folders,
            "hidden_files": self.hidden_files,
            "ignored_paths": self.ignored_paths,
            "duplicates": self.duplicates.to_dict(),
            "near_duplicates": None if self.near_duplicates is None else self.near_duplicates.to_dict(),
            "hash_distance": self.hash_distance,
            "small_side": self.small_side,
            "findings": [finding.to_dict() for finding in self.findings],
            "num_errors": self.num_errors,
            "num_warnings": self.num_warnings,
            "seconds": round(self.seconds, 3),
        }
