"""How ``imgclf train`` shows training as it goes: ``train()``'s events drawn on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.markup import escape

from imgclf_cli.console import err, make_progress, make_training_progress, warn
from imgclf_cli.time_budget import format_duration
from imgclf_cli.training_events import (
    EpochEnded,
    FineTuneStarted,
    TimePlan,
    TrainingListener,
    TrainingStarted,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID


def header_lines(event: TrainingStarted) -> list[str]:
    """What is trained, on what, and where the run is written (on a line of its own: a long path
    would wrap the sentence before it)."""
    lines = []
    if event.resumed_state:
        lines.append(event.resumed_state[:1].upper() + event.resumed_state[1:])
    if event.initial_epoch or event.initial_step:
        if event.total_epochs and event.initial_epoch >= event.total_epochs:
            lines.append(f"Resuming {event.run_id}: its {event.total_epochs} epochs are done, finishing it")
        else:
            planned = f" of {event.total_epochs}" if event.total_epochs else ""
            step = f", step {event.initial_step + 1} of {event.steps_per_epoch}" if event.initial_step else ""
            lines.append(f"Resuming {event.run_id} from epoch {event.initial_epoch + 1}{planned}{step}")
    lines.append(
        f"Training {event.model_name} on {event.num_train} images ({event.num_classes} classes), "
        f"validating on {event.num_val}"
    )
    lines.append(f"Run: {event.run_dir}")
    return lines


def format_rate(per_second: float, unit: str) -> str:
    return f"{per_second:.0f} {unit}/s" if per_second >= 10 else f"{per_second:.1f} {unit}/s"


class TrainingView(TrainingListener):
    """Draws ``train()``'s events on stderr.

    On a terminal (``live``): a spinner while images are scanned, then an epoch bar and a batch
    bar with the time left, the speed and the running loss and accuracy. Always: one aligned
    line per epoch (a table that grows as training goes; ``*`` marks a new best). ``quiet``
    (``--json``) drops the notes. ``console`` and ``clock`` are for tests.
    """

    header = f"{'epoch':>7} {'loss':>8} {'accuracy':>9} {'val_loss':>9} {'val_acc':>8} {'lr':>9} {'time':>7}"

    def __init__(
        self,
        live: bool,
        quiet: bool,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live = live
        self.quiet = quiet
        self.console = console or err
        self.clock = clock
        self.spinner: Progress | None = None
        self.spinner_task: TaskID | None = None
        self.bars: Progress | None = None
        self.epoch_task: TaskID | None = None
        self.batch_task: TaskID | None = None
        self.steps_per_epoch = 0
        self.batch_size = 0
        self.total_epochs = 0
        self.epoch = 0
        self.printed_header = False
        # The pace, measured in this phase of training for the estimates of the time left.
        self.first_step_ended = 0.0
        self.step_seconds: float | None = None
        self.epoch_seconds: list[float] = []
        self.deadline: float | None = None

    def print(self, text: str) -> None:
        console = self.bars.console if self.bars else self.console
        console.print(text, highlight=False, markup=False)

    def stop_spinner(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def on_status(self, message: str) -> None:
        if self.quiet or not self.live:
            return
        if self.spinner is None:
            self.spinner = make_progress(counts=False)
            self.spinner_task = self.spinner.add_task(message, total=None)
            self.spinner.start()
        elif self.spinner_task is not None:
            self.spinner.update(self.spinner_task, description=message)

    def on_info(self, message: str) -> None:
        self.stop_spinner()
        if not self.quiet:
            self.print(message)

    def on_warning(self, message: str) -> None:
        self.stop_spinner()
        warn(escape(message))  # library text, not Rich markup: "imgclf[mlflow]" must stay

    def on_training_start(self, event: TrainingStarted) -> None:
        self.stop_spinner()
        if not self.quiet:
            for line in header_lines(event):
                self.print(line)
            if event.time_budget is not None and event.seconds_left is not None:
                self.print(
                    f"Time budget {format_duration(event.time_budget)}: "
                    f"{format_duration(max(0.0, event.seconds_left))} left for training after start-up"
                    + (f", at most {event.total_epochs} epochs" if event.total_epochs else "")
                )
        self.steps_per_epoch = event.steps_per_epoch
        self.batch_size = event.batch_size
        self.total_epochs = event.total_epochs
        if event.seconds_left is not None:
            self.deadline = self.clock() + event.seconds_left
        if self.live and (not event.total_epochs or event.initial_epoch < event.total_epochs):
            self.bars = make_training_progress(self.console)
            self.epoch_task = self.bars.add_task(
                "epochs",
                total=event.total_epochs or None,
                completed=event.initial_epoch,
                remaining="",
                rate="",
                metrics="",
            )
            self.batch_task = self.bars.add_task(
                "batches", total=event.steps_per_epoch, remaining="", rate="", metrics=""
            )
            self.bars.start()

    def on_time_plan(self, plan: TimePlan) -> None:
        if not self.quiet:
            self.print(
                f"~{plan.epochs} epochs fit in {format_duration(plan.budget_seconds)} "
                f"({plan.epoch_seconds:.1f} s each, {format_duration(max(0.0, plan.seconds_left))} left)"
            )
        self.total_epochs = plan.epochs
        if self.bars is not None and self.epoch_task is not None:
            self.bars.update(self.epoch_task, total=plan.epochs)

    def on_fine_tune_start(self, event: FineTuneStarted) -> None:
        if not self.quiet:
            self.print(
                f"Fine-tuning the backbone's last {event.layers} layers (BatchNorm stays frozen), "
                f"epochs {event.first_epoch}-{event.total_epochs} at learning rate {event.learning_rate:.2e}"
            )
        # Epochs on images take other steps, far slower, than those on cached features: the pace
        # is measured again.
        self.steps_per_epoch = event.steps_per_epoch
        self.total_epochs = event.total_epochs
        self.step_seconds = None
        self.epoch_seconds = []
        if self.bars is not None and self.epoch_task is not None:
            self.bars.update(self.epoch_task, total=event.total_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        if self.bars is not None and self.batch_task is not None:
            self.bars.reset(
                self.batch_task,
                total=self.steps_per_epoch,
                description=f"epoch {epoch}",
                remaining=self.remaining_text(self.seconds_left_in_epoch(0)),
                rate=self.step_rate_text(),
                metrics="",
            )

    def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
        now = self.clock()
        if step == 1:
            # A session's first step also traces the model: the pace starts after it.
            self.first_step_ended = now
        else:
            self.step_seconds = (now - self.first_step_ended) / (step - 1)
        if self.bars is not None and self.batch_task is not None:
            self.bars.update(
                self.batch_task,
                completed=step,
                metrics=f"loss {loss:.4f}  acc {accuracy:.4f}",
                remaining=self.remaining_text(self.seconds_left_in_epoch(step)),
                rate=self.step_rate_text(),
            )
        if self.bars is not None and self.epoch_task is not None:
            self.bars.update(self.epoch_task, remaining=self.remaining_text(self.seconds_left_in_run(step)))

    def on_epoch_end(self, event: EpochEnded) -> None:
        self.epoch_seconds.append(event.seconds)
        if not self.printed_header:
            self.print(self.header)
            self.printed_header = True
        epoch = f"{event.epoch}/{event.total_epochs or '?'}"
        self.print(
            f"{epoch:>7} {event.loss:8.4f} {event.accuracy:9.4f} {event.val_loss:9.4f} "
            f"{event.val_accuracy:8.4f} {event.learning_rate:9.2e} {event.seconds:6.1f}s"
            + ("  *" if event.improved else "")
        )
        if self.bars is not None and self.epoch_task is not None:
            pace = self.epoch_pace()
            self.bars.update(
                self.epoch_task,
                completed=event.epoch,
                metrics=f"val_acc {event.val_accuracy:.4f}",
                remaining=self.remaining_text(self.seconds_left_in_run(self.steps_per_epoch)),
                rate=f"{format_duration(pace)}/epoch" if pace is not None else "",
            )

    def on_finish(self) -> None:
        self.stop_spinner()
        if self.bars is not None:
            self.bars.stop()
            self.bars = None

    def epoch_pace(self) -> float | None:
        """Seconds per epoch, validation included: the last three, the phase's first (which
        decodes every image and traces the model) only while it is alone."""
        recent = (self.epoch_seconds[1:] or self.epoch_seconds)[-3:]
        return sum(recent) / len(recent) if recent else None

    def seconds_left_in_epoch(self, step: int) -> float | None:
        """The training steps left in this epoch at the measured pace (``None``: not measured)."""
        if self.step_seconds is None:
            return None
        return max(0, self.steps_per_epoch - step) * self.step_seconds

    def seconds_left_in_run(self, step: int) -> float | None:
        """This epoch's steps left, then the epochs left at the measured pace (before the first
        epoch ends: its training steps alone); no later than the time budget's end."""
        in_epoch = self.seconds_left_in_epoch(step)
        if not self.total_epochs:
            return None
        later = max(0, self.total_epochs - self.epoch)
        pace = self.epoch_pace()
        if pace is None and self.step_seconds is not None:
            pace = self.steps_per_epoch * self.step_seconds
        if pace is None or (in_epoch is None and step < self.steps_per_epoch):
            return None
        left = (in_epoch or 0.0) + later * pace
        if self.deadline is not None:
            left = min(left, max(0.0, self.deadline - self.clock()))
        return left

    def step_rate_text(self) -> str:
        if not self.step_seconds:
            return ""
        if self.batch_size:
            return format_rate(self.batch_size / self.step_seconds, "img")
        return format_rate(1.0 / self.step_seconds, "step")

    @staticmethod
    def remaining_text(seconds: float | None) -> str:
        return "" if seconds is None else f"~{format_duration(seconds)} left"
