"""The findings of ``inspect-dataset``: a table of rules, each turning part of a report into advice.

A rule names its severity and code, lists what it found (one example line each; an empty list
means the rule does not apply), and says what that means and what to do. ``make_findings``
applies every rule, in the order of ``RULES``, then orders the findings by severity (errors
first). The standard library only: this module is light to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imgclf_cli.inspection_report import Finding, InspectionReport

IMBALANCE_WARNING_RATIO = 3.0
IMBALANCE_NOTE_RATIO = 1.5  # imgclf train weights classes by inverse frequency from this ratio on
EXAMPLES_PER_FINDING = 10
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
# Modes that can hold transparency, which converting to RGB drops.
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "P", "16-bit RGBA", "16-bit LA")


@dataclass(frozen=True)
class Rule:
    """One kind of finding: when it applies, what it says and what to do about it."""

    severity: str
    code: str
    examples: Callable[[InspectionReport], list[str]]
    """Everything the rule found, one line each (all of them; the finding keeps the first few)."""
    message: Callable[[InspectionReport, int], str]
    """The message, given the report and the finding's count."""
    action: str | Callable[[InspectionReport], str]
    count: Callable[[InspectionReport], int] | None = None
    """How many things were found, when that is not the number of examples."""

    def apply(self, report: InspectionReport) -> Finding | None:
        examples = self.examples(report)
        if not examples:
            return None
        count = self.count(report) if self.count else len(examples)
        action = self.action if isinstance(self.action, str) else self.action(report)
        return Finding(
            self.severity,
            self.code,
            self.message(report, count),
            action,
            count,
            examples[:EXAMPLES_PER_FINDING],
        )


def make_findings(report: InspectionReport) -> list[Finding]:
    """Findings ordered by severity (errors first), each with what to do."""
    findings = [finding for rule in RULES if (finding := rule.apply(report)) is not None]
    findings.sort(key=lambda finding: SEVERITY_ORDER[finding.severity])
    return findings


# --- what the rules look at -------------------------------------------------------------------


def empty_classes(report: InspectionReport) -> list[str]:
    """Classes without a readable image."""
    return [name for name, count in report.classes.items() if count == 0]


def empty_class_examples(report: InspectionReport) -> list[str]:
    """The folders of the classes without a readable image (or their names when every folder
    of theirs holds files, none of them readable)."""
    empty = empty_classes(report)
    folders = [folder for folder in report.empty_class_folders if folder.split("/")[-1] in empty]
    return folders or empty


def empty_folders_of_other_classes(report: InspectionReport) -> list[str]:
    """Empty class folders of classes that have images elsewhere (another split)."""
    empty = empty_classes(report)
    return [folder for folder in report.empty_class_folders if folder.split("/")[-1] not in empty]


def missing_split_classes(report: InspectionReport) -> list[str]:
    """``split/class`` combinations without an image, for classes that have images elsewhere."""
    empty = empty_classes(report)
    return [
        f"{split}/{name}"
        for split, counts in (report.splits or {}).items()
        for name, count in counts.items()
        if count == 0 and name not in empty
    ]


def class_counts(report: InspectionReport) -> list[str]:
    return [f"{name}: {count}" for name, count in sorted(report.classes.items(), key=lambda item: item[1])]


def imbalance_examples(low: float, high: float) -> Callable[[InspectionReport], list[str]]:
    """Every class's count, smallest first, when largest/smallest is in ``[low, high)``."""

    def examples(report: InspectionReport) -> list[str]:
        ratio = report.imbalance_ratio
        return class_counts(report) if ratio is not None and low <= ratio < high else []

    return examples


def largest_and_smallest(report: InspectionReport) -> str:
    largest = max(report.classes, key=lambda name: report.classes[name])
    smallest = min(report.classes, key=lambda name: report.classes[name])
    return f"{largest} has {report.imbalance_ratio:g}x the images of {smallest}"


def exact_groups(kind: str) -> Callable[[InspectionReport], list[str]]:
    """One ``a = b`` line per group of byte-identical files of ``kind`` (``cross_class`` ...)."""
    return lambda report: [" = ".join(group) for group in getattr(report.duplicates, kind)]


def near_groups(kind: str) -> Callable[[InspectionReport], list[str]]:
    """One ``a ~ b`` line per group of near-identical files of ``kind``; none when not searched."""

    def examples(report: InspectionReport) -> list[str]:
        if report.near_duplicates is None:
            return []
        return [" ~ ".join(group) for group in getattr(report.near_duplicates, kind)]

    return examples


def split_words(report: InspectionReport) -> str:
    return "train and val/test" if report.layout == "splits" else "train and validation"


def non_rgb_modes(report: InspectionReport) -> dict[str, int]:
    return {mode: count for mode, count in report.modes.items() if mode != "RGB"}


def colour_mode_action(report: InspectionReport) -> str:
    modes = non_rgb_modes(report)
    action = "Nothing: imgclf converts every image to 8-bit RGB"
    if any(mode.startswith("16-bit") or mode in ("I", "F") for mode in modes):
        action += ", rescaling 16-bit values"
    action += "."
    if any(mode in TRANSPARENT_MODES for mode in modes):
        action += (
            " Transparency is dropped: check that transparent (and palette) images still show "
            "their subject without it."
        )
    return action


# --- the rules, worst first -------------------------------------------------------------------

RULES: tuple[Rule, ...] = (
    Rule(
        "error",
        "corrupt",
        examples=lambda report: [f"{entry['path']}: {entry['reason']}" for entry in report.corrupt],
        message=lambda report, count: (
            f"{count} file(s) with an image extension cannot be decoded (truncated, empty or not images)"
        ),
        action="Re-download or delete them: imgclf train skips files it cannot decode, "
        "so they are silently missing.",
    ),
    Rule(
        "error",
        "empty_class",
        examples=empty_class_examples,
        count=lambda report: len(empty_classes(report)),
        message=lambda report, count: (
            f"{count} class(es) have no readable image: " + ", ".join(empty_classes(report))
        ),
        action="Add images to these class folders or remove the folders: "
        "imgclf train refuses a class without images.",
    ),
    Rule(
        "error",
        "single_class",
        examples=lambda report: list(report.classes) if len(report.classes) == 1 else [],
        message=lambda report, count: f"Only one class folder was found: {next(iter(report.classes))}",
        action="A classifier needs at least two classes: add a folder of images per class.",
    ),
    Rule(
        "error",
        "duplicates_cross_class",
        examples=exact_groups("cross_class"),
        message=lambda report, count: (
            f"{count} image(s) are filed under two or more classes (byte-identical files, label conflict)"
        ),
        action="Keep each image only in the class it belongs to and delete the other copies.",
    ),
    Rule(
        "error",
        "duplicates_cross_split",
        examples=exact_groups("cross_split"),
        message=lambda report, count: (
            f"{count} image(s) appear in more than one split (byte-identical files: leakage)"
        ),
        action="Delete the copies from val/ or test/: otherwise validation and test accuracy are inflated.",
    ),
    Rule(
        "warning",
        "near_duplicates_cross_class",
        examples=near_groups("cross_class"),
        message=lambda report, count: (
            f"{count} group(s) of near-identical images are filed under different classes"
        ),
        action="Look at them (--report DIR draws them side by side); keep each in one class only.",
    ),
    Rule(
        "warning",
        "near_duplicates_cross_split",
        examples=near_groups("cross_split"),
        message=lambda report, count: (
            f"{count} group(s) of near-identical images span more than one split (likely leakage)"
        ),
        action="Look at them (--report DIR draws them side by side); move each group into a single split.",
    ),
    Rule(
        "warning",
        "duplicates_within_class",
        examples=exact_groups("within_class"),
        message=lambda report, count: (
            f"{count} image(s) are stored more than once in the same class "
            f"({sum(len(group) - 1 for group in report.duplicates.within_class)} redundant file(s))"
        ),
        action=lambda report: (
            "Delete the extra copies: they weigh the image twice and can land in "
            f"both {split_words(report)}, inflating validation accuracy."
        ),
    ),
    Rule(
        "warning",
        "imbalance",
        examples=imbalance_examples(IMBALANCE_WARNING_RATIO, float("inf")),
        message=lambda report, count: f"Classes are imbalanced: {largest_and_smallest(report)}",
        action="Collect more images of the small classes; imgclf train already weights classes by "
        "inverse frequency (train.class_weights=auto). Judge the model by per-class recall, "
        "not accuracy.",
    ),
    Rule(
        "warning",
        "class_missing_from_split",
        examples=missing_split_classes,
        message=lambda report, count: f"{count} split/class combination(s) hold no image",
        action="Give every split images of every class, or validation and test scores leave "
        "those classes out.",
    ),
    Rule(
        "warning",
        "extension_mismatch",
        examples=lambda report: [
            f"{entry['path']}: {entry['format']}" for entry in report.extension_mismatch
        ],
        message=lambda report, count: f"{count} file(s) have an extension that does not match their content",
        action="Rename them to match their format: imgclf reads the content, but other tools "
        "trust the extension.",
    ),
    Rule(
        "warning",
        "non_image_files",
        examples=lambda report: [f"{entry['path']}: {entry['reason']}" for entry in report.non_image_files],
        message=lambda report, count: f"{count} file(s) in class folders are not images imgclf can read",
        action="Move them out of the class folders (imgclf train skips them); convert images in "
        "other formats to JPEG or PNG.",
    ),
    Rule(
        "warning",
        "small_images",
        examples=lambda report: [
            f"{entry['path']}: {entry['width']}x{entry['height']}" for entry in report.small_images
        ],
        message=lambda report, count: (
            f"{count} image(s) are very small (shorter side under {report.small_side} px)"
        ),
        action="Check that they are not thumbnails or icons saved by mistake; they are upscaled for "
        "training and left out of the near-duplicate search.",
    ),
    Rule(
        "warning",
        "empty_class_folders",
        examples=empty_folders_of_other_classes,
        message=lambda report, count: f"{count} class folder(s) are empty",
        action="Add images or remove the empty folders.",
    ),
    Rule(
        "info",
        "near_duplicates_within_class",
        examples=near_groups("within_class"),
        message=lambda report, count: (
            f"{count} group(s) of near-identical images within a class (re-encoded, resized or burst shots)"
        ),
        action=lambda report: (
            f"Usually harmless; keep one per group if they could land in both {split_words(report)}."
        ),
    ),
    Rule(
        "info",
        "imbalance",
        examples=imbalance_examples(IMBALANCE_NOTE_RATIO, IMBALANCE_WARNING_RATIO),
        message=lambda report, count: (
            f"Classes are mildly imbalanced (largest/smallest = {report.imbalance_ratio:g})"
        ),
        action="Nothing: imgclf train weights classes by inverse frequency (train.class_weights=auto).",
    ),
    Rule(
        "info",
        "colour_modes",
        examples=lambda report: [image.path for image in report.images if image.mode != "RGB"],
        message=lambda report, count: (
            f"{count} image(s) are not 8-bit RGB: "
            + ", ".join(f"{mode} {number}" for mode, number in non_rgb_modes(report).items())
        ),
        action=colour_mode_action,
    ),
    Rule(
        "info",
        "hidden_files",
        examples=lambda report: report.hidden_files,
        message=lambda report, count: f"{count} hidden or system file(s) are ignored",
        action="Nothing: imgclf skips hidden files (.DS_Store, Thumbs.db, ._* ...).",
    ),
    Rule(
        "info",
        "ignored_paths",
        examples=lambda report: report.ignored_paths,
        message=lambda report, count: (
            f"{count} file(s) or folder(s) lie outside any class folder and are ignored"
        ),
        action="Move images into a class folder if they should be used.",
    ),
)
