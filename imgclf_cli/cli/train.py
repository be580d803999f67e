"""``imgclf train``: parse options, call ``imgclf_cli.training.train``, render its events and result."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imgclf_cli.cli.options import JsonOption, RunsDirOption, flag
from imgclf_cli.console import (
    err,
    make_progress,
    make_table,
    out,
    print_json,
    print_skipped_files,
    progress_enabled,
    warn,
)
from imgclf_cli.errors import DatasetError
from imgclf_cli.training_events import EpochEnded, TrainingListener, TrainingStarted

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

SAMPLE_DATA = Path("sample_data")


def train_command(
    data_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Folder with one sub-folder of images per class (or train/ val/ test/ splits of them). "
            "Default: ./sample_data when it exists.",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config file (see --print-config).", dir_okay=False),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a config key: --set train.epochs=5 (repeatable).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Maximum number of epochs.", min=1, show_default=False)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per batch.", min=1, show_default=False)
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Square input size in pixels.", min=8, max=4096, show_default=False)
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="imgclf-cnn, or a backbone: mobilenet_v3_small, mobilenet_v3_large, efficientnet_b0, "
            "resnet50...",
            show_default=False,
        ),
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak learning rate.", min=0.0, show_default=False)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for the split, shuffling and initialisation.", show_default=False)
    ] = None,
    runs_dir: RunsDirOption = None,
    name: Annotated[
        str | None, typer.Option(help="A name appended to the run id.", show_default=False)
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue an interrupted run (run id, folder or 'latest') from its last completed epoch.",
            metavar="RUN",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
    print_config: Annotated[
        bool, flag("--print-config", help="Print every config key with its default (YAML) and exit.")
    ] = False,
) -> None:
    """Train an image classifier on DATA_DIR and save it as a new run.

    Example:

        imgclf train sample_data --epochs 10 --set train.label_smoothing=0.05
    """
    from imgclf_cli.config import documented_yaml

    if print_config:
        out.print(documented_yaml(), highlight=False, markup=False, end="")
        return
    if data_dir is None and resume is None:
        if not SAMPLE_DATA.is_dir():
            raise DatasetError(
                "No DATA_DIR given and ./sample_data does not exist", "run: imgclf train PATH/TO/IMAGES"
            )
        data_dir = SAMPLE_DATA

    flags: dict[str, Any] = {
        "train.epochs": epochs,
        "data.batch_size": batch_size,
        "data.image_size": image_size,
        "model.name": model,
        "train.learning_rate": learning_rate,
        "seed": seed,
    }
    from imgclf_cli.training import train

    result = train(
        data_dir=data_dir,
        config_file=config_file,
        overrides=overrides or [],
        flags=flags,
        runs_dir=runs_dir,
        name=name,
        resume=resume,
        listener=TrainingView(live=progress_enabled(), quiet=json_output),
    )
    if json_output:
        print_json(result.to_dict())
        return
    print_skipped_files(result.skipped_files)
    summary = make_table(
        ["best epoch", "val accuracy", "val loss", "epochs run", "train images", "val images", "time"],
        [
            [
                f"{result.best_epoch}/{result.epochs_run}",
                result.val_accuracy,
                result.val_loss,
                result.epochs_run,
                result.num_train,
                result.num_val,
                f"{result.train_seconds:.1f}s",
            ]
        ],
        title="Training finished" + (" (stopped early)" if result.stopped_early else ""),
        numeric=[
            "best epoch",
            "val accuracy",
            "val loss",
            "epochs run",
            "train images",
            "val images",
            "time",
        ],
    )
    out.print(summary)
    out.print(f"Run: {result.run_dir}", highlight=False, markup=False)
    err.print(f"Next: imgclf evaluate --run {result.run_id}", highlight=False)


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
        if self.live and event.initial_epoch < event.total_epochs:
            self.steps_per_epoch = event.steps_per_epoch
            self.bars = make_progress(metrics=True)
            self.epoch_task = self.bars.add_task(
                "epochs", total=event.total_epochs, completed=event.initial_epoch, metrics=""
            )
            self.batch_task = self.bars.add_task("batches", total=event.steps_per_epoch, metrics="")
            self.bars.start()

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
        epoch = f"{event.epoch}/{event.total_epochs}"
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
