"""Several runs side by side (``imgclf runs compare``): the config keys that differ, whether they
trained on the same dataset, their best metrics and times, per-class F1 of the evaluations they
share, and an overlay plot of their validation curves (matplotlib, imported when called).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf_cli import store
from imgclf_cli.errors import ImgclfError, RunFileError, UsageError
from imgclf_cli.run_catalog import RunSummary, summarize_run
from imgclf_cli.run_outputs import EvaluationSummary, number, summarize_evaluation


@dataclass
class RunComparison:
    """Several runs side by side (``imgclf runs compare``)."""

    runs: list[RunSummary]
    config_differences: dict[str, list[Any]]
    """The config keys whose values differ among the runs: ``{key: [value of each run]}``."""
    same_dataset: bool
    """Every run trained on the same files (same dataset fingerprint)."""
    evaluations: dict[str, list[EvaluationSummary | None]]
    """Each evaluation dataset name found in two runs or more: its summary in each run."""
    problems: list[str]

    def per_class_f1(self, dataset: str) -> dict[str, list[float | None]]:
        """``{class: [F1 in each run]}`` of the evaluation ``dataset``."""
        entries = self.evaluations.get(dataset, [])
        labels: list[str] = []
        for entry in entries:
            labels += [label for label in (entry.per_class if entry else {}) if label not in labels]
        return {
            label: [number(entry.per_class.get(label, {}).get("f1")) if entry else None for entry in entries]
            for label in labels
        }

    def to_dict(self) -> dict[str, Any]:
        """The ``runs compare --json`` document."""
        return {
            "runs": [summary.to_dict() for summary in self.runs],
            "config_differences": self.config_differences,
            "same_dataset": self.same_dataset,
            "evaluations": {
                dataset: {
                    "accuracy": [entry.accuracy if entry else None for entry in entries],
                    "f1_macro": [entry.f1_macro if entry else None for entry in entries],
                    "per_class_f1": self.per_class_f1(dataset),
                }
                for dataset, entries in self.evaluations.items()
            },
            "problems": self.problems,
        }


def compare_runs(run_dirs: Sequence[Path]) -> RunComparison:
    """Compare two runs or more (each named once): config, dataset, metrics, evaluations."""
    from imgclf_cli import config  # PyYAML: not needed to list runs

    unique = list(dict.fromkeys(run_dirs))
    if len(unique) < 2:
        raise UsageError("runs compare needs two different runs or more", "name at least two run ids")
    summaries, configs, problems = [], [], []
    for run_dir in unique:
        summaries.append(summarize_run(run_dir))
        try:
            configs.append(config.flatten(store.read_config_values(run_dir)))
        except RunFileError as error:
            configs.append({})
            problems.append(error.message)
    keys = sorted({key for values in configs for key in values})
    differences = {
        key: [values.get(key) for values in configs]
        for key in keys
        if len({json.dumps(values.get(key), sort_keys=True, default=str) for values in configs}) > 1
    }
    fingerprints = {summary.dataset_fingerprint for summary in summaries}
    names = sorted({name for summary in summaries for name in summary.evaluations})
    evaluations: dict[str, list[EvaluationSummary | None]] = {}
    for name in names:
        if sum(name in summary.evaluations for summary in summaries) < 2:
            continue
        evaluations[name] = [
            summarize_evaluation(summary.path, name, [], store.EVAL_DIR in summary.stale)
            if name in summary.evaluations
            else None
            for summary in summaries
        ]
        problems += [entry.problem for entry in evaluations[name] if entry and entry.problem]
    return RunComparison(
        runs=summaries,
        config_differences=differences,
        same_dataset=len(fingerprints) == 1 and None not in fingerprints,
        evaluations=evaluations,
        problems=problems,
    )


def plot_validation_curves(run_dirs: Sequence[Path], output: Path) -> Path:
    """Write ``output`` (PNG): validation accuracy and loss per epoch, one line per run."""
    histories = {}
    for run_dir in dict.fromkeys(run_dirs):
        try:
            histories[run_dir.name] = store.read_history(run_dir)
        except RunFileError:
            histories[run_dir.name] = []
    if not any(histories.values()):
        raise ImgclfError(
            "None of these runs has a completed epoch: there are no validation curves to plot",
            "compare runs that trained at least one epoch",
        )
    from matplotlib.ticker import MaxNLocator

    from imgclf_cli.plots import plt, save_figure

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, metric, title in (
        (accuracy_axis, "val_accuracy", "Validation accuracy"),
        (loss_axis, "val_loss", "Validation loss"),
    ):
        for run_id, history in histories.items():
            if history:
                epochs = [int(row["epoch"]) for row in history if "epoch" in row]
                axis.plot(
                    epochs, [row.get(metric) for row in history if "epoch" in row], marker="o", label=run_id
                )
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize="small")
    figure.suptitle(f"Validation curves of {len(histories)} runs")
    save_figure(figure, output)
    return output
