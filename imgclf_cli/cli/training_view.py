"""How ``imgclf train`` shows training as it goes: ``train()``'s events drawn on stderr."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgclf_cli.console import err, make_progress, warn
from imgclf_cli.time_budget import format_duration
from imgclf_cli.training_events import (
    EpochEnded,
    FineTuneStarted,
    TimePlan,
    TrainingListener,
    TrainingStarted,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class TrainingView(TrainingListener):
    """Draws ``train()``'s events on stderr.

    On a terminal (``live``): a spinner while images are scanned, then an epoch bar and a batch
    bar with the running loss and accuracy. Always: one aligned line per epoch (a table that
    grows as training goes; ``*`` marks a new best). ``quiet`` (``--json``) drops the notes.
    """

    header = f"{'epoch':>7} {'loss':>8} {'accuracy':>9} {'val_loss':>9} {'val_acc':>8} {'lr':>9} {'time':>7}"

    def __init__(self, live: bool, quiet: bool) -> None:
        self.live = live
        self.quiet = quiet
        self.spinner: Progress | None = None
        self.spinner_task: TaskID | None = None
        self.bars: Progress | None = None
        self.epoch_task: TaskID | None = None
        self.batch_task: TaskID | None = None
        self.steps_per_epoch = 0
        self.printed_header = False

    def print(self, text: str) -> None:
        console = self.bars.console if self.bars else err
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
        warn(message)

    def on_training_start(self, event: TrainingStarted) -> None:
        self.stop_spinner()
        if not self.quiet:
            err.print(
                f"Training {event.model_name} on {event.num_train} images ({event.num_classes} classes), "
                f"validating on {event.num_val}; run {event.run_dir}",
                highlight=False,
            )
            if event.time_budget is not None and event.seconds_left is not None:
                err.print(
                    f"Time budget {format_duration(event.time_budget)}: "
                    f"{format_duration(max(0.0, event.seconds_left))} left for training after start-up"
                    + (f", at most {event.total_epochs} epochs" if event.total_epochs else ""),
                    highlight=False,
                )
        if self.live and (not event.total_epochs or event.initial_epoch < event.total_epochs):
            self.steps_per_epoch = event.steps_per_epoch
            self.bars = make_progress(metrics=True)
            self.epoch_task = self.bars.add_task(
                "epochs", total=event.total_epochs or None, completed=event.initial_epoch, metrics=""
            )
            self.batch_task = self.bars.add_task("batches", total=event.steps_per_epoch, metrics="")
            self.bars.start()

    def on_time_plan(self, plan: TimePlan) -> None:
        if not self.quiet:
            self.print(
                f"~{plan.epochs} epochs fit in {format_duration(plan.budget_seconds)} "
                f"({plan.epoch_seconds:.1f} s each, {format_duration(max(0.0, plan.seconds_left))} left)"
            )
        if self.bars is not None and self.epoch_task is not None:
            self.bars.update(self.epoch_task, total=plan.epochs)

    def on_fine_tune_start(self, event: FineTuneStarted) -> None:
        if not self.quiet:
            self.print(
                f"Fine-tuning the backbone's last {event.layers} layers (BatchNorm stays frozen), "
                f"epochs {event.first_epoch}-{event.total_epochs} at learning rate {event.learning_rate:.2e}"
            )
        # Epochs on images may take a different number of steps than those on cached features.
        self.steps_per_epoch = event.steps_per_epoch
        if self.bars is not None and self.epoch_task is not None:
            self.bars.update(self.epoch_task, total=event.total_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        if self.bars is not None and self.batch_task is not None:
            self.bars.reset(
                self.batch_task, total=self.steps_per_epoch, description=f"epoch {epoch}", metrics=""
            )

    def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
        if self.bars is not None and self.batch_task is not None:
            self.bars.update(self.batch_task, completed=step, metrics=f"loss {loss:.4f}  acc {accuracy:.4f}")

    def on_epoch_end(self, event: EpochEnded) -> None:
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
            self.bars.update(
                self.epoch_task, completed=event.epoch, metrics=f"val_acc {event.val_accuracy:.4f}"
            )

    def on_finish(self) -> None:
        self.stop_spinner()
        if self.bars is not None:
            self.bars.stop()
            self.bars = None
