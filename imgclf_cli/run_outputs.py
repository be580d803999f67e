"""What ``imgclf evaluate`` and ``imgclf export`` left in a run, read back for ``imgclf runs``:
each ``eval/<dataset>/`` with its headline numbers (``metrics.json``), and ``export/`` with its
artifacts' verification results (``export.json``). A missing or damaged file is a ``problem``
of the summary, never an exception. Standard library only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf_cli import store
from imgclf_cli.errors import RunFileError

METRICS_FILE = "metrics.json"
EXPORT_REPORT_FILE = "export.json"


def number(value: Any) -> float | None:
    """A finite number from a JSON value, else ``None`` (NaN is not valid JSON output)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass
class EvaluationSummary:
    """One ``eval/<dataset>/`` of a run: its headline numbers (``metrics.json``) and files."""

    dataset: str
    path: Path
    description: str | None = None
    num_samples: int | None = None
    accuracy: float | None = None
    f1_macro: float | None = None
    f1_weighted: float | None = None
    ece: float | None = None
    log_loss: float | None = None
    num_misclassified: int | None = None
    top_k_accuracy: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    stale: bool = False
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        document = dict(self.__dict__)
        document["path"] = str(self.path)
        return document


def summarize_evaluation(run_dir: Path, dataset: str, files: list[str], stale: bool) -> EvaluationSummary:
    folder = store.eval_dir(run_dir, dataset)
    summary = EvaluationSummary(dataset, folder, files=files, stale=stale)
    try:
        metrics = store.read_run_json(folder / METRICS_FILE)
        if not isinstance(metrics, dict):
            raise store.damaged(folder / METRICS_FILE, ValueError("expected a JSON object"))
    except RunFileError as error:
        summary.problem = error.message
        return summary
    summary.description = text(metrics.get("description"))
    summary.num_samples = integer(metrics.get("num_samples"))
    summary.accuracy = number(metrics.get("accuracy"))
    summary.f1_macro = number(metrics.get("f1_macro"))
    summary.f1_weighted = number(metrics.get("f1_weighted"))
    summary.ece = number(metrics.get("ece"))
    summary.log_loss = number(metrics.get("log_loss"))
    summary.num_misclassified = integer(metrics.get("num_misclassified"))
    summary.top_k_accuracy = {
        key: value
        for key, value in (
            (key, number(value)) for key, value in metrics.items() if re.match(r"top_\d+_accuracy$", key)
        )
        if value is not None
    }
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict):
        summary.per_class = {
            str(label): {key: number(value) for key, value in scores.items()}  # type: ignore[misc]
            for label, scores in per_class.items()
            if isinstance(scores, dict)
        }
    return summary


@dataclass
class ExportSummary:
    """A run's ``export/``: its artifacts with their verification results (``export.json``)."""

    path: Path
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    """``export.json``'s artifacts (format, quantization, size_bytes, agreement, max_abs_diff,
    accuracy, accuracy_delta, latency_ms, passed...), then its ``serving_check`` if any."""
    passed: bool | None = None
    verified: bool | None = None
    created: str | None = None
    files: list[str] = field(default_factory=list)
    stale: bool = False
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        document = dict(self.__dict__)
        document["path"] = str(self.path)
        return document


def summarize_export(run_dir: Path, files: list[str], stale: bool) -> ExportSummary:
    folder = store.export_dir(run_dir)
    summary = ExportSummary(folder, files=files, stale=stale)
    try:
        report = store.read_run_json(folder / EXPORT_REPORT_FILE)
        if not isinstance(report, dict):
            raise store.damaged(folder / EXPORT_REPORT_FILE, ValueError("expected a JSON object"))
    except RunFileError as error:
        summary.problem = error.message
        return summary
    artifacts = [item for item in report.get("artifacts") or [] if isinstance(item, dict)]
    serving = report.get("serving_check")
    summary.artifacts = [*artifacts, *([serving] if isinstance(serving, dict) else [])]
    summary.passed = report.get("passed") if isinstance(report.get("passed"), bool) else None
    summary.verified = report.get("verified") if isinstance(report.get("verified"), bool) else None
    summary.created = text(report.get("created"))
    return summary
