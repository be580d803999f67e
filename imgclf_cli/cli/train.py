"""``imgclf train``: parse options, call ``imgclf_cli.training.train``, render its events and result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from imgclf_cli import store
from imgclf_cli.cli.options import JsonOption, RunsDirOption, flag
from imgclf_cli.console import err, make_table, out, print_json, print_skipped_files, progress_enabled, warn
from imgclf_cli.errors import DatasetError, TrainingInterrupted, UsageError
from imgclf_cli.model_names import BACKBONE_NAMES, DEFAULT_MODEL

SAMPLE_DATA = Path("sample_data")
STOPPED_BY_TITLES = {"early_stopping": " (stopped early)", "time_budget": " (time budget reached)"}


def train_command(
    data_dir: Annotated[
        str | None,
        typer.Argument(
            help="Folder with one sub-folder of images per class (or train/ val/ test/ splits of them), "
            "or the s3://, gs:// or az:// URL of one. Default: ./sample_data when it exists.",
            metavar="DATA_DIR",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML config file (see --print-config).", dir_okay=False, metavar="FILE"
        ),
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
        int | None, typer.Option(help="Maximum number of epochs.", min=1, metavar="N", show_default=False)
    ] = None,
    time_budget: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="Wall time for the whole command, e.g. 90s, 5m, 1.5h: the epochs and the learning-rate "
            "schedule are fitted to it (with --epochs too, the smaller wins).",
            metavar="DURATION",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per batch.", min=1, metavar="N", show_default=False)
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Square input size in pixels.", min=8, max=4096, metavar="PIXELS", show_default=False
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help=f"{DEFAULT_MODEL} (from scratch, fast on a CPU), or a keras.applications backbone: "
            f"{', '.join(BACKBONE_NAMES)}.",
            metavar="NAME",
            show_default=False,
        ),
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak learning rate.", min=0.0, metavar="RATE", show_default=False)
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed for the split, shuffling and initialisation.", metavar="N", show_default=False
        ),
    ] = None,
    runs_dir: RunsDirOption = None,
    name: Annotated[
        str | None, typer.Option(help="A name appended to the run id.", metavar="NAME", show_default=False)
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
        bool,
        flag(
            "--print-config",
            help="Print every config key as this command would use it (defaults < --config < --set < flags), "
            "as commented YAML, and exit.",
        ),
    ] = False,
    defaults: Annotated[
        bool, flag("--defaults", help="With --print-config: print every key's default instead.")
    ] = False,
) -> None:
    """Train an image classifier on DATA_DIR and save it as a new run.

    Example:

    \b
        imgclf train sample_data --epochs 10 --set train.label_smoothing=0.05
        imgclf train my_images --time 5m
    """
    flags: dict[str, Any] = {
        "train.epochs": epochs,
        "train.time_budget": time_budget,
        "data.batch_size": batch_size,
        "data.image_size": image_size,
        "model.name": model,
        "train.learning_rate": learning_rate,
        "seed": seed,
    }
    if print_config and resume:
        raise UsageError(
            "--print-config shows a new run's config, not a resumed one's",
            "a run's config is the config.yaml in its folder",
        )
    if print_config:
        from imgclf_cli.config import documented_yaml, resolve_config

        config = None if defaults else resolve_config(config_file, overrides, flags)
        out.print(documented_yaml(config), highlight=False, markup=False, end="")
        return
    if defaults:
        raise UsageError("--defaults only applies to --print-config", "add --print-config")
    if data_dir is None and resume is None:
        if not SAMPLE_DATA.is_dir():
            raise DatasetError(
                "No DATA_DIR given and ./sample_data does not exist", "run: imgclf train PATH/TO/IMAGES"
            )
        data_dir = str(SAMPLE_DATA)
    # TensorFlow takes seconds to load: a mistake in the config or the dataset's folders is
    # reported before it does (train() checks them again, in milliseconds).
    from imgclf_cli.cluster import check_distribute, chief_run, cluster_from_environment
    from imgclf_cli.config import resolve_config
    from imgclf_cli.dataset_layout import check_dataset_folder
    from imgclf_cli.mlflow_tracking import check_mlflow_installed

    config = resolve_config(config_file, overrides, flags)
    check_mlflow_installed(config)  # train.mlflow without the imgclf[mlflow] extra
    # Another worker of a multi-worker training writes nothing in the store, and resumes the
    # run that the chief holds (imgclf_cli.cluster).
    cluster = cluster_from_environment()
    follows_chief = cluster is not None and not cluster.is_chief
    if resume is None:
        check_distribute(config, cluster)
        check_dataset_folder(data_dir, min_classes=2)
        from imgclf_cli.store import check_writable, runs_root

        if not follows_chief:
            check_writable(runs_root(runs_dir))
    else:
        from imgclf_cli.resuming import find_resumable, nothing_to_resume
        from imgclf_cli.store import check_writable

        # A completed run asked for nothing more, a run still training or a store that cannot
        # be written answer now, not after TensorFlow has loaded.
        run_dir = chief_run(resume, runs_dir) if follows_chief else find_resumable(resume, runs_dir)
        finished = nothing_to_resume(run_dir, config_file, overrides, flags, runs_dir)
        if finished is not None:
            err.print(finished.message, highlight=False, markup=False)
            err.print(f"[dim]Hint:[/dim] {finished.hint}", highlight=False)
            if json_output:
                print_json(finished.result.to_dict())
            return
        if not follows_chief:
            check_writable(run_dir)

    from imgclf_cli.cli.training_view import TrainingView
    from imgclf_cli.resources import seconds_since_process_start
    from imgclf_cli.training import train

    # The budget covers the whole command, start-up included.
    clock_start = time.monotonic() - seconds_since_process_start()

    try:
        result = train(
            data_dir=data_dir,
            config_file=config_file,
            overrides=overrides or [],
            flags=flags,
            runs_dir=runs_dir,
            name=name,
            resume=resume,
            listener=TrainingView(live=progress_enabled(), quiet=json_output),
            clock_start=clock_start,
        )
    except TrainingInterrupted as interrupted:
        # Ctrl-C is the user's choice, not an error: say where the run stands and how to go on.
        err.print(interrupted.message, highlight=False, markup=False)
        if interrupted.hint:
            err.print(interrupted.hint[:1].upper() + interrupted.hint[1:], highlight=False, markup=False)
        raise typer.Exit(interrupted.exit_code) from None
    except Exception as error:
        # A dataset on an object store is read in tf.data's threads: TensorFlow re-raises what
        # went wrong there (credentials, network) as its own error; report the original.
        from imgclf_cli.filesystems import failure_behind

        remote_failure = failure_behind(error)
        if remote_failure is None:
            raise
        resume_hint = f"{remote_failure.hint}; then go on with: imgclf train --resume latest"
        raise type(remote_failure)(remote_failure.message, resume_hint) from None
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
        title="Training finished" + STOPPED_BY_TITLES.get(result.stopped_by, ""),
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
    if result.stale_outputs:
        warn(stale_outputs_note(result.run_id, result.stale_outputs))
    err.print(f"Next: imgclf evaluate --run {result.run_id}", highlight=False)


def stale_outputs_note(run_id: str, stale: list[str]) -> str:
    """What to make again after a resumed training replaced the model ``stale`` were made from."""
    folders = " and ".join(f"{name}/" for name in stale)
    commands = " and ".join(f"{store.MODEL_OUTPUTS[name]} --run {run_id}" for name in stale)
    made = "were" if len(stale) > 1 else "was"
    return f"{folders} {made} made from the previous best model: re-run {commands}"
