"""The ``imgclf`` Typer app: command registration, the one error boundary, ``main()``.

Known errors (``ImgclfError``) become ``Error: ...`` / ``Hint: ...`` on stderr with exit code 1
(2 for usage errors); set ``IMGCLF_DEBUG=1`` to see tracebacks (and TensorFlow's start-up
logs) instead.

Every command module is imported here, for every command and for ``--help``: they import only
Typer, Rich and light ``imgclf_cli`` modules at module level, and the library (TensorFlow,
NumPy, Pillow...) inside the command function.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperCommand

from imgclf_cli import __version__, quiet_logs
from imgclf_cli.cli import evaluate, export, inspect_dataset, predict, runs, train
from imgclf_cli.cli.options import HelpOption, flag
from imgclf_cli.console import err
from imgclf_cli.errors import ImgclfError

Command = TypeVar("Command", bound=Callable[..., Any])

app = typer.Typer(
    name="imgclf",
    help="Train, evaluate, export and run image classifiers from a folder of images "
    "(one sub-folder per class).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help, as Click formats it: Typer's Rich help panels import rich.markdown, Pygments
    # and rich.traceback, which alone made --help 1.5x slower than importing Typer and Rich.
    rich_markup_mode=None,
    # Typer's own --help is replaced by options.HelpOption, on the group and on every command.
    context_settings={"help_option_names": []},
)
HELP_PARAMETER = inspect.Parameter(
    "show_help", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=HelpOption
)


class PlainUsageCommand(TyperCommand):
    """A command whose usage line writes a required argument as ``DATA_DIR`` or ``PATH...``.

    Typer writes ``{DATA_DIR}``: braces read as a placeholder, and beside the ``[DATA_DIR]`` of
    an optional argument they spell one argument two ways.
    """

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece for piece in pieces]


def render_error(error: ImgclfError) -> None:
    # Escaped: messages quote paths and commands, and "imgclf[s3]" or "photo[1].jpg" is not markup.
    message, hint = escape(error.message), escape(error.hint or "")
    err.print(f"[bold red]Error:[/bold red] {message}", highlight=False, markup=True, soft_wrap=True)
    if hint:
        err.print(f"[dim]Hint:[/dim] {hint}", highlight=False, markup=True, soft_wrap=True)


def error_boundary(command: Command) -> Command:
    """Register every command through this: it turns known errors into one clear message and an
    exit code, never a traceback, and gives the command its ``--help`` (``HELP_PARAMETER``)."""

    @functools.wraps(command)
    def wrapper(*args: Any, show_help: bool = False, **kwargs: Any) -> Any:
        # show_help is always False here: --help prints the help and exits while parsing.
        try:
            return command(*args, **kwargs)
        except ImgclfError as error:
            if os.environ.get("IMGCLF_DEBUG"):
                raise
            render_error(error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None

    signature = inspect.signature(command, eval_str=True)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), HELP_PARAMETER]
    )
    return wrapper  # type: ignore[return-value]


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"imgclf {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        flag("--version", callback=show_version, is_eager=True, help="Show the version and exit."),
    ] = False,
    show_help: HelpOption = False,
) -> None:
    """Turn a folder of images (one sub-folder per class) into a trained, evaluated, exported classifier."""


# Each command's line in `imgclf --help`: Click would cut a longer first docstring line short
# with "..." at 80 columns.
COMMANDS = {
    "train": (train.train_command, "Train a classifier on DATA_DIR, saved as a new run."),
    "evaluate": (evaluate.evaluate_command, "Per-class metrics and confusion matrix of a run."),
    "predict": (predict.predict_command, "Predict the class of images with a trained model."),
    "export": (export.export_command, "Export a run (TFLite, SavedModel, ONNX) and verify it."),
    "export-tflite": (export.export_tflite_command, "Export a run as TFLite and verify it."),
    "inspect-dataset": (inspect_dataset.inspect_dataset_command, "Find what is wrong with a dataset."),
}
for command_name, (function, summary) in COMMANDS.items():
    app.command(command_name, cls=PlainUsageCommand, short_help=summary)(error_boundary(function))
# A group: `imgclf runs` alone lists the runs; its commands and the group's own options go
# through the same error boundary.
app.add_typer(
    runs.build_runs_app(error_boundary, PlainUsageCommand),
    name="runs",
    short_help="List, show, compare and delete runs.",
)


def main() -> None:
    quiet_logs.install()
    app()


if __name__ == "__main__":
    sys.exit(main())
