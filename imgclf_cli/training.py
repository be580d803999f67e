"""Training: from a dataset folder (or an interrupted run) to a completed run.  [heavy]

``train()`` is the library entry point behind ``imgclf train``; it can be called from a
notebook. The run folder is written as training goes: the config, labels and split first, then
after every epoch ``history.csv``, ``last.keras`` and (on improvement) ``best.keras``, each
atomically, so a crash or Ctrl-C never leaves a half-written model and ``--resume`` continues
from the last completed epoch. With a frozen pretrained backbone and ``model.fine_tune_layers``,
training has two phases, the head then the backbone's tail (see ``imgclf_cli.fine_tuning``).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras

from imgclf_cli import store
from imgclf_cli.checkpointing import ResumePoint, parse_checkpoint_every
from imgclf_cli.cluster import cluster_from_environment, private_store
from imgclf_cli.config import Config, given_keys, resolve_config, time_budget_seconds
from imgclf_cli.dataset import (
    SplitManifest,
    skipped_as_dicts,
)
from imgclf_cli.errors import DatasetError, TrainingInterrupted
from imgclf_cli.feature_cache import (
    compute_features,
    feature_datasets,
    should_cache_features,
    split_at_backbone,
)
from imgclf_cli.fine_tuning import plan_fine_tuning, prepare_phase_two
from imgclf_cli.fitting import TrainingData, build_before_tracing, fit_from, stopped_reason
from imgclf_cli.liveness import TrainingLock, current_owner
from imgclf_cli.mlflow_tracking import track_with_mlflow
from imgclf_cli.models import build_model, canonical_model_name, load_model, sole_backbone
from imgclf_cli.multi_worker import custom_fit, join_team
from imgclf_cli.new_run import prepare_new_run
from imgclf_cli.pipeline import DecodeFailures, cache_fits_in_memory, make_dataset
from imgclf_cli.resuming import (
    choose_resume_point,
    find_resumable,
    nothing_to_resume,
    prepare_resume,
    recorded_result,
    resume_command,
)
from imgclf_cli.time_budget import BudgetClock
from imgclf_cli.training_callbacks import RunRecorder, TrainingState, fit_callbacks, restore_random_states
from imgclf_cli.training_events import (
    STOPPED_BY_EPOCHS,
    STOPPED_BY_INTERRUPT,
    STOPPED_BY_TIME_BUDGET,
    TrainingListener,
    TrainingStarted,
    TrainResult,
)
from imgclf_cli.training_recipe import (
    choose_strategy,
    class_weights_for,
    configure_precision,
    make_optimizer,
    replan_schedule,
)

__all__ = ["TrainResult", "train"]

# fit() needs a number of epochs: with a time budget and no epoch cap, one the clock never reaches.
UNLIMITED_EPOCHS = 100_000


def pipeline_settings(
    config: Config,
    manifest: SplitManifest,
    failures: DecodeFailures,
    cache: str,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The ``make_dataset`` arguments every stream of a run shares."""
    return dict(
        image_size=config.image_size,
        batch_size=config.data.batch_size,
        num_classes=len(manifest.classes),
        seed=config.seed,
        failures=failures,
        cache=cache,
        cache_dir=cache_dir,
    )


def make_training_data(
    config: Config,
    manifest: SplitManifest,
    replicas: int,
    failures: DecodeFailures,
    cache_dir: Path,
    listener: TrainingListener,
    skip_batches: int = 0,
    cache_name: str = "train",
) -> TrainingData:
    """The streams of a run; the training one skips its first ``skip_batches`` (a resume)."""
    common = pipeline_settings(config, manifest, failures, cache=config.data.cache, cache_dir=cache_dir)
    # With several replicas each training batch is split evenly among them: a multiple of the
    # number of replicas.
    train_batch, val_batch, val_drop = config.data.batch_size, config.data.batch_size, False
    if replicas > 1:
        wanted = config.data.batch_size * (replicas if config.data.batch_per_replica else 1)
        train_batch = max(replicas, min(wanted, len(manifest.train)) // replicas * replicas)
        val_batch = validation_batch_size(len(manifest.val), train_batch, replicas)
        val_drop = val_batch is None
        val_batch = val_batch or replicas
    # Training batches are always full (see make_dataset).
    train_data = make_dataset(
        manifest.train,
        training=True,
        cache_name=cache_name,
        skip_batches=skip_batches,
        **common | {"batch_size": train_batch},
    )
    steps_per_epoch = max(1, math.ceil(len(manifest.train) / train_batch))
    if val_drop and len(manifest.val) % val_batch:
        listener.on_info(
            f"Note: with {replicas} replicas, validation uses full batches of {val_batch} only "
            f"({len(manifest.val) % val_batch} of {len(manifest.val)} images left out)."
        )
    val_data = make_dataset(
        manifest.val,
        training=False,
        cache_name="val",
        drop_remainder=val_drop,
        **common | {"batch_size": val_batch},
    )
    return TrainingData(train_data, val_data, steps_per_epoch, train_batch, skip_batches)


def validation_batch_size(num_val: int, largest: int, replicas: int) -> int | None:
    """A validation batch size, at most ``largest``, whose batches, the last included, give every
    replica at least one image (``imgclf_cli.multi_worker.replica_batches``); ``None`` when
    none does (fewer images than replicas)."""
    for size in range(min(largest, num_val), replicas - 1, -1):
        if num_val % size == 0 or num_val % size >= replicas:
            return size
    return None


def train(
    data_dir: str | Path | None = None,
    *,
    config: Config | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    runs_dir: str | Path | None = None,
    name: str | None = None,
    resume: str | None = None,
    listener: TrainingListener | None = None,
    clock_start: float | None = None,
) -> TrainResult:
    """Train a classifier on ``data_dir`` (or continue the run ``resume``) and return its summary.

    ``config`` (a ready ``Config``) or ``config_file``/``overrides``/``flags`` describe the
    training. Nothing is printed: progress, notes and warnings go to ``listener`` (see
    ``imgclf_cli.training_events``). ``train.time_budget`` counts from ``clock_start`` (a
    ``time.monotonic()`` value; default: now; ``imgclf train`` passes its process start).
    Raises ``TrainingInterrupted`` on Ctrl-C after recording the run as interrupted.

    ``resume`` (a run id, folder or ``latest``) continues a run from its last completed epoch;
    a completed run only when asked for more epochs or a new time budget (otherwise the
    result says ``trained=False``; see ``imgclf_cli.resuming``).
    """
    listener = listener or TrainingListener()
    clock_start = time.monotonic() if clock_start is None else clock_start
    cluster = cluster_from_environment()
    # MLflow tracking (train.mlflow or MLFLOW_TRACKING_URI) follows the events; the chief's only.
    listener = track_with_mlflow(listener, chief=cluster is None or cluster.is_chief)
    # The run's training lock (and heartbeat), released however training ends.
    held = contextlib.ExitStack()
    try:
        with full_disk_reported(runs_dir), held:
            if cluster is not None and not cluster.is_chief:
                # A worker other than the chief trains in a private store (imgclf_cli.cluster).
                runs_dir, resume = held.enter_context(private_store(resume, runs_dir))
            return train_run(
                data_dir,
                config,
                config_file,
                overrides,
                flags,
                runs_dir,
                name,
                resume,
                listener,
                clock_start,
                held,
            )
    finally:
        listener.on_finish()


def train_run(
    data_dir: str | Path | None,
    config: Config | None,
    config_file: str | Path | None,
    overrides: list[str] | None,
    flags: dict[str, Any] | None,
    runs_dir: str | Path | None,
    name: str | None,
    resume: str | None,
    listener: TrainingListener,
    clock_start: float,
    held: contextlib.ExitStack,
) -> TrainResult:
    # A Config object is taken as given whole; otherwise train.epochs caps a time budget only
    # when the user set it.
    given = given_keys(config_file, overrides, flags)
    epochs_given = config is not None or "train.epochs" in given
    # Likewise early stopping under a time budget: the schedule follows the clock, and a plateau
    # at a high learning rate is not the end (the decay gains most), so the time decides.
    patience_given = config is not None or "train.early_stopping_patience" in given
    resume_point: ResumePoint | None = None
    resumed_state = ""
    if resume:
        run_dir = find_resumable(resume, runs_dir)
        finished = nothing_to_resume(run_dir, config_file, overrides, flags, runs_dir)
        if finished is not None:
            listener.on_info(finished.message)
            return finished.result
        before = store.run_state(run_dir)
        if before.status in (store.STATUS_CRASHED, store.STATUS_FAILED):
            resumed_state = before.describe(run_dir.name)
        held.enter_context(TrainingLock(run_dir))
        stored, manifest = prepare_resume(run_dir, listener)
        config = resolve_config(config_file, overrides, flags, base=stored)
        resume_point, history = choose_resume_point(run_dir, listener)
        meta = store.read_meta(run_dir)
        skipped = list(meta.get("skipped_files", []))
        fine_tune_start = (meta.get("fine_tune") or {}).get("first_epoch")
        state = TrainingState.from_history(history, fine_tune_start)
        if meta.get("status") == store.STATUS_COMPLETED:
            # Asked to train a completed run further: the new epochs get their own patience.
            state.restart_patience()
    else:
        if data_dir is None:
            raise DatasetError("No dataset folder given", "pass DATA_DIR")
        config = config or resolve_config(config_file, overrides, flags)
        canonical_model_name(config.model.name)  # fail on a typo before scanning
        run_dir, manifest, scan = prepare_new_run(data_dir, config, runs_dir, name, listener, held)
        skipped = skipped_as_dicts(scan.skipped)
        state = TrainingState()

    initial_epoch = len(state.history)
    # The seed alone fixes the data order: a resumed stream skips what was trained on, rather
    # than reseeding (see imgclf_cli.fitting).
    keras.utils.set_random_seed(config.seed)
    position = resume_point.position if resume_point is not None else None
    image_position = position if position is not None and position.images else None
    policy = configure_precision(config)
    strategy = choose_strategy(config, listener.on_status)
    team = join_team(strategy, run_dir, manifest, bool(resume), listener)  # None on one machine
    failures = DecodeFailures()
    cache_dir = store.cache_dir(run_dir)
    # A disk cache left by an interrupted run is incomplete (and locked): start it afresh.
    shutil.rmtree(cache_dir, ignore_errors=True)
    num_classes = len(manifest.classes)
    replicas = strategy.num_replicas_in_sync

    def training_data(skip_batches: int, cache_name: str = "train") -> TrainingData:
        return make_training_data(
            config, manifest, replicas, failures, cache_dir, listener, skip_batches, cache_name
        )

    data = training_data(image_position.stream_batches if image_position else 0)
    budget = time_budget_seconds(config)
    max_epochs = config.train.epochs if budget is None or epochs_given else None
    fit_epochs = max_epochs or initial_epoch + UNLIMITED_EPOCHS

    with strategy.scope():
        if resume_point is not None:
            model = load_model(resume_point.path, compile=True)
            if position is not None and not restore_random_states(model, position.random_states):
                listener.on_info("Note: dropout and augmentation draw new random numbers from here on")
        else:
            model = build_model(config, num_classes)
            model.compile(
                optimizer=make_optimizer(config, data.steps_per_epoch, budget is not None, max_epochs),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.train.label_smoothing),
                metrics=["accuracy"],
            )
    # config.yaml records what each auto became; a resume reads it back (see Config.decided).
    class_weight = class_weights_for(config, manifest)
    backbone = sole_backbone(model)  # None for imgclf-cnn
    frozen = backbone is not None and not all(layer.trainable for layer in backbone.layers)
    fits = cache_fits_in_memory(max(len(manifest.train), len(manifest.val)), config.image_size)
    decided = config.decided(policy, type(strategy).__name__, fits, frozen, class_weight, manifest.classes)
    store.write_config(run_dir, decided)
    # The same architecture, never compiled: what best.keras holds (see RunRecorder).
    deployment_model = type(model).from_config(model.get_config())
    # Two phases, head then backbone (imgclf_cli.fine_tuning): this freezes a new run's backbone.
    fine_tuning = plan_fine_tuning(config, model, replicas, store.read_meta(run_dir), bool(initial_epoch))
    fit_model, fit_data = model, data
    feature_seconds: float | None = None
    phase_one_over = fine_tuning is not None and fine_tuning.first_epoch is not None
    replanned = None
    if initial_epoch and fine_tuning is None and max_epochs and max_epochs > initial_epoch:
        with strategy.scope():
            replanned = replan_schedule(
                model.optimizer, config, data.steps_per_epoch, budget is not None, max_epochs
            )
    if should_cache_features(config, model, replicas) and not phase_one_over:
        caching_started = time.perf_counter()
        fit_model, fit_data = head_on_cached_features(model, config, manifest, failures, run_dir, listener)
        feature_seconds = time.perf_counter() - caching_started
    total_epochs = max_epochs or 0
    if fine_tuning is not None and fine_tuning.first_epoch is not None:
        fit_epochs = min(fit_epochs, fine_tuning.first_epoch - 1)  # a resumed run's phase 1 ended there
        total_epochs = fine_tuning.first_epoch - 1 + fine_tuning.epochs
    elif fine_tuning is not None and total_epochs:
        total_epochs += fine_tuning.epochs
    with strategy.scope():
        build_before_tracing(fit_model, fit_data.train)
    store.update_meta(
        run_dir,
        status=store.STATUS_RUNNING,
        process=current_owner(),
        precision_policy=policy,
        strategy=type(strategy).__name__,
        num_replicas=strategy.num_replicas_in_sync,
        parameters=int(model.count_params()),
    )
    validation_steps = math.ceil(len(manifest.val) / config.data.batch_size)
    deadline = clock_start + budget if budget is not None else None
    clock = BudgetClock(deadline, validation_steps=validation_steps) if deadline is not None else None
    later_epochs, later_seconds = 0, 0.0
    if fine_tuning is not None and fine_tuning.first_epoch is None:
        later_epochs = fine_tuning.epochs
        if clock is not None and feature_seconds is not None:
            # Phase 1's clock ends early by the time kept for phase 2, which gets its own clock.
            fine_tuning.estimate_epoch(feature_seconds)
            later_seconds = fine_tuning.reserve_seconds(clock.training_end() - clock.now())
            clock.deadline -= later_seconds
    checkpoint_every = parse_checkpoint_every(config.train.checkpoint_every)
    recorder = RunRecorder(
        run_dir,
        state,
        config.train.early_stopping_patience if budget is None or patience_given else 0,
        total_epochs,
        deployment_model,
        listener,
        clock,
        checkpoint_model=model,
        checkpoint_every=team.agreed(checkpoint_every) if team else checkpoint_every,
        steps_per_epoch=fit_data.steps_per_epoch,
    )
    plateau = config.train.lr_schedule == "plateau"
    callbacks, time_keeper = fit_callbacks(
        recorder,
        listener,
        clock,
        budget,
        max_epochs,
        plateau,
        later_epochs,
        later_seconds,
        tensorboard=config.train.tensorboard,
    )
    # Another worker's run is a private copy: it shows the chief's.
    shown_run = team.chief_run_dir if team else run_dir
    listener.on_training_start(
        TrainingStarted(
            run_id=shown_run.name,
            run_dir=str(shown_run),
            model_name=canonical_model_name(config.model.name),
            num_classes=num_classes,
            num_train=len(manifest.train),
            num_val=len(manifest.val),
            total_epochs=total_epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=fit_data.steps_per_epoch,
            batch_size=fit_data.batch_size,
            time_budget=budget,
            seconds_left=deadline - time.monotonic() if deadline is not None else None,
            initial_step=image_position.step if image_position is not None else 0,
            resumed_state=resumed_state,
        )
    )
    if replanned is not None:
        listener.on_info(
            f"Learning-rate schedule re-planned for {max_epochs} epochs "
            f"(it was for {replanned.previous_epochs}): epochs {initial_epoch + 1}-{max_epochs} "
            f"go from {replanned.first_rate:.2e} down to {replanned.last_rate:.2e}"
        )
    started = time.perf_counter()
    previous_seconds = float(store.read_meta(run_dir).get("train_seconds", 0.0)) if initial_epoch else 0.0

    def seconds_so_far() -> float:
        return previous_seconds + time.perf_counter() - started

    stopped_by = STOPPED_BY_EPOCHS
    try:
        if initial_epoch < fit_epochs:
            on_images = fit_model is model
            fit_from(
                fit_model,
                fit_data,
                fit_epochs,
                initial_epoch,
                callbacks,
                class_weight,
                recorder,
                on_images,
                image_position if on_images else None,
                lambda skip: training_data(skip, "train-rest"),
                custom_fit(strategy, team),
            )
            stopped_by = stopped_reason(recorder, time_keeper)
        if fine_tuning is not None and fine_tuning.epochs and state.history and not recorder.empty_split:
            phase = prepare_phase_two(
                fine_tuning,
                model,
                data.steps_per_epoch,
                recorder,
                deadline,
                validation_steps,
                config,
                strategy,
                run_dir,
                listener,
            )
            if phase.skipped:
                stopped_by = STOPPED_BY_TIME_BUDGET
            elif phase.callbacks:
                with strategy.scope():
                    build_before_tracing(model, data.train)
                # Phase 1 trained on features, so the image stream is new here, or (resumed
                # within phase 2) skips what phase 2 had trained on.
                fit_from(
                    model,
                    data,
                    phase.last_epoch,
                    phase.initial_epoch,
                    phase.callbacks,
                    class_weight,
                    recorder,
                    True,
                    image_position if phase.resumed else None,
                    lambda skip: training_data(skip, "train-rest"),
                )
                stopped_by = stopped_reason(recorder, phase.time_keeper)
    except KeyboardInterrupt:
        shutil.rmtree(cache_dir, ignore_errors=True)
        all_skipped = skipped + skipped_as_dicts(failures.entries())
        store.update_meta(run_dir, stopped_by=STOPPED_BY_INTERRUPT)
        finish_run(run_dir, state, store.STATUS_INTERRUPTED, seconds_so_far(), all_skipped, listener)
        if state.history:
            resume_with = resume_command(run_dir.name, runs_dir)
            message = f"Interrupted after epoch {len(state.history)}; resume with {resume_with}"
        else:
            message = "Interrupted before the first epoch ended: there is nothing to resume"
        raise TrainingInterrupted(message, f"the run is kept in {run_dir}") from None
    except BaseException as error:
        # Recorded when the disk allows (a full one may refuse even this small write).
        with contextlib.suppress(Exception):
            store.update_meta(run_dir, failure=failure_reason(error))
            finish_run(run_dir, state, store.STATUS_FAILED, seconds_so_far(), skipped, listener)
        raise
    train_seconds = seconds_so_far()
    all_skipped = skipped + skipped_as_dicts(failures.entries())
    shutil.rmtree(cache_dir, ignore_errors=True)
    if recorder.empty_split:
        finish_run(run_dir, state, store.STATUS_FAILED, train_seconds, all_skipped, listener)
        first = failures.entries()[0] if failures.entries() else None
        raise DatasetError(
            f"None of the {recorder.empty_split} images could be decoded"
            + (f" (e.g. {first.path}: {first.reason})" if first else ""),
            "check that the files are complete, readable images "
            "(imgclf inspect-dataset lists the broken ones)",
        )
    if not state.history:
        raise DatasetError("No epoch completed", "check that the dataset holds readable images")
    store.update_meta(run_dir, time_budget=budget, stopped_by=stopped_by)
    finish_run(run_dir, state, store.STATUS_COMPLETED, train_seconds, all_skipped, listener)
    result = recorded_result(run_dir, trained=True)
    return team.finished(result) if team else result


def head_on_cached_features(
    model: keras.Model,
    config: Config,
    manifest: SplitManifest,
    failures: DecodeFailures,
    run_dir: Path,
    listener: TrainingListener,
) -> tuple[keras.Model, TrainingData]:
    """The head of ``model`` compiled to train on its frozen backbone's features, computed once
    here, and the streams of those features (see ``imgclf_cli.feature_cache``)."""
    started = time.perf_counter()
    listener.on_status("Computing the frozen backbone's features once...")
    split = split_at_backbone(model)
    # One plain pass over each split: no shuffling, no augmentation, nothing kept but features.
    common = pipeline_settings(config, manifest, failures, cache="none")
    train = compute_features(split.features, make_dataset(manifest.train, training=False, **common))
    val = compute_features(split.features, make_dataset(manifest.val, training=False, **common))
    train_data, val_data, steps = feature_datasets(train, val, config.data.batch_size, config.seed)
    split.head.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    seconds = time.perf_counter() - started
    count = len(train[0]) + len(val[0])
    store.update_meta(run_dir, feature_cache={"images": count, "seconds": round(seconds, 3)})
    listener.on_info(
        f"Frozen backbone: features of {count} images computed once in {seconds:.1f} s; "
        "the head trains on them"
    )
    return split.head, TrainingData(train_data, val_data, steps, min(config.data.batch_size, len(train[0])))


def failure_reason(error: BaseException) -> str:
    lines = str(getattr(error, "message", None) or error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def full_disk_reported(runs_dir: str | Path | None) -> Iterator[None]:
    """A write that failed (a full disk) marks its run failed, if training had not yet, and
    says what of the run is safe and how to go on."""
    try:
        yield
    except store.StoreWriteError as error:
        run_dir = store.run_dir_of(error.path)
        if run_dir is None:
            raise
        if store.run_status(run_dir) == store.STATUS_RUNNING:
            with contextlib.suppress(Exception):  # the disk may refuse even this
                store.update_meta(
                    run_dir, status=store.STATUS_FAILED, failure=failure_reason(error), finished=now_text()
                )
        try:
            epochs = len(store.read_history(run_dir))
        except store.RunFileError:
            epochs = 0
        kept = (
            f"the run is marked failed; its last checkpoint (epoch {epochs}) is intact"
            if epochs
            else "the run is marked failed before its first epoch ended"
        )
        go_on = f"resume with {resume_command(run_dir.name, runs_dir)}" if epochs else "train again"
        raise store.StoreWriteError(
            error.message, f"{kept}; {error.hint}, then {go_on}", error.errno, error.path
        ) from None


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def finish_run(
    run_dir: Path,
    state: TrainingState,
    status: str,
    train_seconds: float,
    skipped: list[dict[str, str]],
    listener: TrainingListener,
) -> None:
    """Record the final status and results in meta.json and draw the training curves."""
    fields: dict[str, Any] = {
        "status": status,
        "finished": now_text(),
        "train_seconds": round(train_seconds, 3),
        "epochs_completed": len(state.history),
        "skipped_files": skipped,
    }
    if state.history:
        best = state.best_row()
        fields.update(
            best_epoch=state.best_epoch, val_accuracy=best["val_accuracy"], val_loss=best["val_loss"]
        )
        try:
            from imgclf_cli.plots import plot_training_curves

            plot_training_curves(state.history, store.training_curves_path(run_dir))
        except Exception as error:  # a plot must never cost the user the run
            listener.on_warning(f"Could not draw training curves: {error}")
    store.update_meta(run_dir, **fields)
