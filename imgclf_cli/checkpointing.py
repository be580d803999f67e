"""Where a checkpoint stands, how often to write one, and which one to resume from.

``last.keras`` is a Keras model file (a zip) with one more entry, ``imgclf-checkpoint.json``:
the position of training when it was saved (the epoch, the step within it, how many batches
the training stream had delivered, the running means of the epoch's metrics, and at an epoch's
end that epoch's history row). The weights, the optimizer state (with its step count, which
drives the learning-rate schedule) and the position are thus written together, atomically: a
crash between two files can never pair one checkpoint's weights with another's position.

Before it is replaced, ``last.keras`` becomes ``previous.keras``, so that a checkpoint damaged
after it was written (a disk error, a copy cut short) still leaves one to resume from.

``train.checkpoint_every``: ``epoch`` (the default: at every epoch's end, and within a long
epoch at least every ``DEFAULT_MAX_MINUTES`` minutes), ``<N>steps``, or a duration (``<N>m``,
``30s``, ``1h``). Standard library only: ``--resume`` checks a checkpoint before TensorFlow loads.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgclf_cli.errors import RunFileError

POSITION_ENTRY = "imgclf-checkpoint.json"
PREVIOUS_CHECKPOINT_FILE = "previous.keras"
# Within a long epoch, what a crash may cost at most under the default ``epoch``.
DEFAULT_MAX_MINUTES = 10.0
STEPS_PATTERN = re.compile(r"^\s*(\d+)\s*steps?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class CheckpointEvery:
    """When to save within an epoch (an epoch's end always saves)."""

    steps: int | None = None
    seconds: float | None = DEFAULT_MAX_MINUTES * 60

    def due(self, steps_since: int, seconds_since: float) -> bool:
        return (self.steps is not None and steps_since >= self.steps) or (
            self.seconds is not None and seconds_since >= self.seconds
        )


def parse_checkpoint_every(text: str) -> CheckpointEvery:
    """``epoch``, ``<N>steps`` or a duration; ``ValueError`` for anything else."""
    from imgclf_cli.time_budget import parse_duration

    cleaned = str(text).strip().lower()
    if cleaned == "epoch":
        return CheckpointEvery()
    steps = STEPS_PATTERN.match(cleaned)
    if steps:
        count = int(steps.group(1))
        if count < 1:
            raise ValueError(f"not a positive number of steps: {text!r}")
        return CheckpointEvery(steps=count, seconds=None)
    return CheckpointEvery(steps=None, seconds=parse_duration(cleaned))


def valid_checkpoint_every(text: str) -> bool:
    try:
        parse_checkpoint_every(text)
    except ValueError:
        return False
    return True


@dataclass
class CheckpointPosition:
    """Where training stood when a checkpoint was saved."""

    epoch: int
    """Epochs completed."""
    step: int = 0
    """Training steps done in the next epoch (0: saved at an epoch's end)."""
    steps_per_epoch: int = 0
    stream_batches: int = 0
    """Batches the training image stream had delivered since it started (the run's start, or
    fine-tuning's): a resumed stream skips them, so it continues in the same order."""
    images: bool = True
    """Saved while training on images (False: the head on cached features, whose stream is
    computed again on resume)."""
    metrics: list[list[float]] = field(default_factory=list)
    """Mid-epoch: the state of the epoch's running metrics (loss and accuracy means)."""
    epoch_seconds: float = 0.0
    """Mid-epoch: the training seconds the epoch had taken so far."""
    row: dict[str, float] | None = None
    """At an epoch's end: its history row (history.csv is written after the checkpoint)."""
    random_states: list[list[int]] = field(default_factory=list)
    """The model's random generators (dropout, augmentation), which a model file omits."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CheckpointPosition:
        values = json.loads(text)
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})


def add_position(checkpoint: Path, position: CheckpointPosition) -> None:
    """Store ``position`` inside a model file just saved (before it is renamed into place)."""
    with zipfile.ZipFile(checkpoint, "a") as archive:
        archive.writestr(POSITION_ENTRY, position.to_json())


def read_position(checkpoint: Path) -> CheckpointPosition | None:
    """The position stored in ``checkpoint``; ``None`` for one saved without it (an older imgclf).

    Raises ``RunFileError`` when the file is not a complete, readable model file: every entry's
    checksum is verified, so a truncated or corrupted checkpoint is caught here, in a fraction
    of a second, rather than by Keras with a misleading message.
    """
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"entry {bad} fails its checksum")
            if POSITION_ENTRY not in archive.namelist():
                return None
            return CheckpointPosition.from_json(archive.read(POSITION_ENTRY).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, ValueError, TypeError, KeyError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunFileError(
            f"{checkpoint} is damaged ({reason})",
            "it was truncated or modified after it was written",
        ) from None


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint to resume from, its position, and what the choice cost."""

    path: Path
    position: CheckpointPosition | None
    note: str | None = None
    """Said to the user when the newest checkpoint could not be used."""


def choose_checkpoint(run_dir: Path, last: Path) -> ResumePoint:
    """``last`` (``last.keras``) when it is intact, else ``previous.keras`` (saying so), else a
    ``RunFileError`` that says what is still usable."""
    previous = run_dir / PREVIOUS_CHECKPOINT_FILE
    problem: str | None = None
    if last.is_file():
        try:
            return ResumePoint(last, read_position(last))
        except RunFileError as error:
            problem = error.message
    else:
        problem = f"{last} is missing"
    if previous.is_file():
        try:
            position = read_position(previous)
        except RunFileError:
            pass
        else:
            if position is None:
                note = f"{problem}; resuming from {previous.name}"
            else:
                step = f", step {position.step}" if position.step else ""
                where = f"{previous.name}, epoch {position.epoch}{step}"
                note = f"{problem}; resuming from the checkpoint before it ({where})"
            return ResumePoint(previous, position, note)
    raise RunFileError(
        f"Cannot resume {run_dir.name}: {problem}, and there is no intact earlier checkpoint",
        "its best.keras (if any) still works with evaluate, predict and export; "
        "start a new run to train again",
    )


def position_summary(position: CheckpointPosition | None) -> dict[str, Any]:
    """What ``meta.json`` records about the last checkpoint (for people and ``imgclf runs``)."""
    if position is None:
        return {}
    return {"epoch": position.epoch, "step": position.step, "steps_per_epoch": position.steps_per_epoch}
