"""Training within a wall-time budget (``imgclf train --time 5m``): durations, the clock, the plan.

The budget covers the whole command, from the process start to the summary. Training is driven
by the clock rather than by a number of epochs fixed in advance: the learning-rate schedule
follows the share of the training time used so far (``BudgetClock.progress``), so it completes
exactly when the time for training ends, however fast this machine turns out to be; training
stops there, leaving time for the last validation pass, the checkpoint and the summary
(``BudgetClock.reserve_seconds``). Epoch and pass durations are measured as training goes, and
the number of epochs that fit is re-estimated after every epoch, for the user to see.

Standard library only: the CLI validates ``--time`` without importing TensorFlow.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The summary, plots and final bookkeeping after training ends (measured ~1-2 s on 2 cores).
FINISH_SECONDS = 2.0
# Saving last.keras (and best.keras) after an epoch, until measured.
CHECKPOINT_SECONDS_GUESS = 0.5
# Tracing the evaluation step before the first validation pass (~1 s for imgclf-cnn on 2 cores).
VALIDATION_TRACE_SECONDS = 2.0

# A number and its unit; longer unit names first, so that "5min" is not read as "5m" + "in".
DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(hours?|h|minutes?|min|m|seconds?|sec|s)?", re.IGNORECASE)
UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``5m``, ``1.5h``, ``1h30m`` or a bare number of seconds.

    Raises ``ValueError`` for anything else (including zero).
    """
    cleaned = text.strip().replace(" ", "")
    position = 0
    total = 0.0
    while position < len(cleaned):
        match = DURATION_PART.match(cleaned, position)
        if match is None or match.end() == position:
            raise ValueError(f"not a duration: {text!r}")
        unit = (match.group(2) or "s")[0].lower()
        total += float(match.group(1)) * UNIT_SECONDS[unit]
        position = match.end()
    if not cleaned or not math.isfinite(total) or total <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """``95`` -> ``1m35s``; ``300`` -> ``5m``; ``5400`` -> ``1h30m``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


@dataclass
class BudgetClock:
    """When training must end, and how far along it is.

    ``deadline`` is a ``time.monotonic()`` value: the end of the whole command's budget.
    Training's share of it ends ``reserve_seconds()`` earlier: one more validation pass (the
    last one measured, or an estimate), saving the checkpoint, and the summary.
    """

    deadline: float
    now: Callable[[], float] = time.monotonic
    training_started: float | None = None
    validation_seconds: float | None = None
    """The last validation pass, as measured."""
    checkpoint_seconds: float = CHECKPOINT_SECONDS_GUESS
    epoch_seconds: list[float] = field(default_factory=list)
    """Every completed epoch in this session, training, validation and checkpoint included."""
    step_seconds: float | None = None
    """A recent training step, as measured (for the first validation pass's estimate); the
    first step of a session, which traces the model, is not one."""
    validation_steps: int = 0

    def start(self) -> None:
        self.training_started = self.now()

    def reserve_seconds(self) -> float:
        validation = self.validation_seconds
        if validation is None:
            # Before the first validation pass: tracing, then a forward pass (about a third of a
            # training step) and decoding the images once; a generous guess, replaced once measured.
            validation = VALIDATION_TRACE_SECONDS + self.validation_steps * (self.step_seconds or 0.0) * 0.5
        return validation + self.checkpoint_seconds + FINISH_SECONDS

    def training_end(self) -> float:
        """The moment the last training step should end."""
        return self.deadline - self.reserve_seconds()

    def progress(self) -> float:
        """The share of the training time used so far, from 0 to 1."""
        started = self.training_started if self.training_started is not None else self.now()
        available = self.training_end() - started
        if available <= 0:
            return 1.0
        return min(1.0, max(0.0, (self.now() - started) / available))

    def expired(self) -> bool:
        return self.now() >= self.training_end()

    def seconds_left(self) -> float:
        return self.deadline - self.now()

    def epoch_pace(self) -> float | None:
        """Seconds per epoch over the last three (the session's first only while it is alone)."""
        if not self.epoch_seconds:
            return None
        recent = (self.epoch_seconds[1:] or self.epoch_seconds)[-3:]
        return sum(recent) / len(recent)

    def epochs_that_fit(self, epochs_done: int) -> int | None:
        """Completed epochs plus those the remaining time holds at the recent epoch speed.

        The first epoch of a session decodes every image and traces the model, so once a
        second one is measured it alone sets the pace. ``None`` before any epoch ends.
        """
        pace = self.epoch_pace()
        if pace is None:
            return None
        left = self.deadline - self.now() - FINISH_SECONDS
        return epochs_done + max(0, math.floor(left / pace)) if pace > 0 else epochs_done


@dataclass(frozen=True)
class TimePlan:
    """What the budget is expected to hold, re-estimated after every epoch."""

    budget_seconds: float
    epochs: int
    """Completed epochs plus those expected to fit (capped by ``train.epochs`` when given)."""
    epoch_seconds: float
    seconds_left: float
