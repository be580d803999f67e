"""MLflow tracking: one MLflow run per imgclf run, kept up to date as it trains and is evaluated.

On when ``train.mlflow`` is true or ``MLFLOW_TRACKING_URI`` is set (MLflow's own variable, as
is ``MLFLOW_EXPERIMENT_NAME``; the experiment is ``imgclf`` by default); needs the optional
extra ``pip install "imgclf[mlflow]"``. ``track_with_mlflow`` wraps a ``TrainingListener``:
when training starts it opens the MLflow run (named after the imgclf run, with the resolved
config as params) and records where it is in meta.json's ``mlflow`` (``tracking_uri``,
``experiment_id``, ``run_id``), so ``--resume`` continues the same MLflow run and ``evaluate``
adds to it (``log_evaluation``). Each epoch's loss, accuracy, val_loss, val_accuracy and
learning_rate are logged as it ends (step = epoch number), then the run's files (best.keras,
labels.json, config.yaml, meta.json, history.csv, plots/) and the end status: FINISHED, FAILED,
or KILLED after Ctrl-C.

Tracking never costs the user the run: every MLflow call runs in one background thread, so a
slow or unreachable tracking server does not slow training down; the first call that fails
stops tracking and becomes one warning, and the end of a run waits for the uploads at most
``FINISH_WAIT_SECONDS``. MLflow's console output is kept out of imgclf's: its log records from
that thread are dropped, and unless the user set them, MLflow's variables are set so that it
prints no "View run" lines on stdout (which ``--json`` keeps for one JSON document), draws no
progress bars, and retries an unreachable server 3 times rather than 7 (about 4 minutes).

Only the standard library is imported here: mlflow takes about a second to import, and is
imported in the tracking thread, when a run is tracked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf_cli import store
from imgclf_cli.config import Config, flatten
from imgclf_cli.errors import ImgclfError
from imgclf_cli.training_events import (
    EpochEnded,
    FineTuneStarted,
    TimePlan,
    TrainingListener,
    TrainingStarted,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from imgclf_cli.evaluation import EvaluationReport

TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
EXPERIMENT_VARIABLE = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "imgclf"
META_KEY = "mlflow"
INSTALL_COMMAND = 'pip install "imgclf[mlflow]"'
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
# Summary numbers of the run (meta.json keys), logged at its end: columns to compare runs by.
SUMMARY_METRICS = {
    "best_val_accuracy": "val_accuracy",
    "best_val_loss": "val_loss",
    "best_epoch": "best_epoch",
    "train_seconds": "train_seconds",
}
# The headline numbers of an evaluation (``EvaluationReport.to_dict`` keys).
EVALUATION_METRICS = (
    "accuracy",
    "top_3_accuracy",
    "top_5_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "ece",
    "log_loss",
)
EVALUATION_FILE_SUFFIXES = (".png",)
EVALUATION_FILES = ("metrics.json",)
RUN_FILES = (
    store.BEST_MODEL_FILE,
    store.LABELS_FILE,
    store.CONFIG_FILE,
    store.META_FILE,
    store.HISTORY_FILE,
)
# What becomes of an imgclf status in MLflow (anything else, a failure or a crash, is FAILED).
MLFLOW_STATUSES = {store.STATUS_COMPLETED: "FINISHED", store.STATUS_INTERRUPTED: "KILLED"}
# Params and tags longer than this are cut: MLflow servers before 2.x refused params over 500
# characters (the config's one long value is a class_weights mapping; config.yaml has it whole).
MAX_PARAM_LENGTH = 500
MAX_TAG_LENGTH = 5000
PARAMS_PER_CALL = 100  # MLflow's log_batch limit
# MLflow's own settings, unless the user chose otherwise (see the module docstring).
MLFLOW_QUIET_DEFAULTS = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
}
# At its end a run waits this long at most for the tracking server to take its files.
FINISH_WAIT_SECONDS = 120.0
# The loggers MLflow configures with its own console handler, and urllib3's retry warnings.
MLFLOW_LOGGERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey")
RETRY_LOGGER = "urllib3.connectionpool"
UNSAFE_NAME_CHARACTERS = re.compile(r"[^\w.\- /]")


class MlflowNotInstalledError(ImgclfError):
    """``train.mlflow`` is on but the ``imgclf[mlflow]`` extra is not installed."""


def mlflow_installed() -> bool:
    """Whether ``import mlflow`` would find it (without importing it: that takes a second)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        return False


def tracking_uri_set() -> bool:
    return bool(os.environ.get(TRACKING_URI_VARIABLE, "").strip())


def check_mlflow_installed(config: Config) -> None:
    """Before any work: ``train.mlflow`` asks for tracking that cannot happen without MLflow.

    A ``MLFLOW_TRACKING_URI`` alone is no request (it may be set for other tools): training then
    goes on untracked, with a warning.
    """
    if config.train.mlflow and not mlflow_installed():
        raise MlflowNotInstalledError(
            "train.mlflow is on but MLflow is not installed",
            f"{INSTALL_COMMAND}, or train without it: --set train.mlflow=false",
        )


def track_with_mlflow(listener: TrainingListener, chief: bool = True) -> TrainingListener:
    """``listener``, wrapped to track the run in MLflow when the run asks for it (decided
    when training starts, from its config.yaml and the environment). Of a multi-worker
    training only the chief tracks (``chief``): the others train a private copy."""
    return MlflowTracking(listener) if chief else listener


def not_installed_warning(reason: str) -> str:
    return f"{reason} but MLflow is not installed: this run is not tracked ({INSTALL_COMMAND})"


def error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def param_text(value: Any) -> str:
    """A config value as config.yaml spells it: ``false``, ``[32, 32]``, ``{"cat": 1.5}``."""
    return value if isinstance(value, str) else json.dumps(value)


def clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def metric_name(text: str) -> str:
    """``text`` with the characters MLflow refuses in a metric or artifact name replaced."""
    return UNSAFE_NAME_CHARACTERS.sub("_", text)


def absolute_tracking_uri(uri: str) -> str:
    """A relative SQLite URI (MLflow's default is ``sqlite:///mlflow.db``, in the working
    folder) made absolute, so that a resume or evaluate run elsewhere finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


class FromThread(logging.Filter):
    """Drops the log records of one thread: the tracking thread's MLflow, SQLAlchemy and urllib3
    lines (a failure there is reported once, by imgclf)."""

    def __init__(self, thread_id: int) -> None:
        super().__init__()
        self.thread_id = thread_id

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread_id


def handlers_to_quiet() -> list[logging.Filterer]:
    handlers: list[logging.Filterer] = [logging.getLogger(RETRY_LOGGER)]
    for name in (*MLFLOW_LOGGERS, ""):
        handlers.extend(logging.getLogger(name).handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    return handlers


class TrackingThread:
    """Runs MLflow calls one after another in a daemon thread; the first that fails stops them
    (``failure`` then says why). Call ``finish`` to wait for what was submitted."""

    def __init__(self) -> None:
        self.tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.failure: str | None = None
        self.thread = threading.Thread(target=self.work, name="imgclf-mlflow", daemon=True)
        self.thread.start()

    def submit(self, task: Callable[[], None]) -> None:
        if self.failure is None:
            self.tasks.put(task)

    def finish(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the tasks submitted; ``False`` if they are not done."""
        self.tasks.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def work(self) -> None:
        for name, value in MLFLOW_QUIET_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            # First: mlflow sets up its loggers when imported, and they are quieted next.
            import mlflow  # noqa: F401
        except Exception as error:
            self.failure = error_text(error)
        quiet = FromThread(threading.get_ident())
        quieted = handlers_to_quiet()
        for handler in quieted:
            handler.addFilter(quiet)
        try:
            while (task := self.tasks.get()) is not None:
                if self.failure is None:
                    try:
                        task()
                    except Exception as error:
                        self.failure = error_text(error)
        finally:
            for handler in quieted:
                handler.removeFilter(quiet)


def wait_for(tracker: TrackingThread) -> None:
    """Wait for ``tracker``'s tasks, at most ``FINISH_WAIT_SECONDS``; what did not end in time is
    its ``failure``."""
    try:
        done = tracker.finish(FINISH_WAIT_SECONDS)
    except KeyboardInterrupt:
        # Ctrl-C while the files are uploaded means: stop waiting for MLflow, not lose the run.
        done = False
        tracker.failure = tracker.failure or "interrupted while its files were being logged"
    if not done and tracker.failure is None:
        tracker.failure = f"its files were not all logged within {FINISH_WAIT_SECONDS:.0f} s"


def new_client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """An MLflow client and the tracking URI it uses (absolute): ``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else MLflow's default."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = absolute_tracking_uri(tracking_uri or mlflow.get_tracking_uri())
    return MlflowClient(tracking_uri=uri), uri


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    metrics = [Metric(key, float(value), timestamp, step) for key, value in values.items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    return {name: float(row[name]) for name in EPOCH_METRICS if name in row}


class MlflowTracking(TrainingListener):
    """A ``TrainingListener`` that passes every event on to ``listener`` and tracks the run in
    MLflow when it asks for it (see the module docstring); it never raises."""

    def __init__(self, listener: TrainingListener) -> None:
        self.listener = listener
        self.tracker: TrackingThread | None = None
        self.run_dir: Path | None = None
        # Set by the tracking thread once the MLflow run exists; written to meta.json here.
        self.record: dict[str, str] | None = None
        self.recorded = False
        self.warned = False
        self.client: MlflowClient | None = None
        self.epochs_sent: set[int] = set()

    # The events, passed on (every method of TrainingListener; tests/test_mlflow.py checks).
    def on_status(self, message: str) -> None:
        self.listener.on_status(message)

    def on_info(self, message: str) -> None:
        self.listener.on_info(message)

    def on_warning(self, message: str) -> None:
        self.listener.on_warning(message)

    def on_training_start(self, event: TrainingStarted) -> None:
        self.listener.on_training_start(event)
        try:
            self.start(event)
        except Exception as error:
            self.warn_once(f"MLflow tracking did not start: {error_text(error)}")

    def on_time_plan(self, plan: TimePlan) -> None:
        self.listener.on_time_plan(plan)

    def on_fine_tune_start(self, event: FineTuneStarted) -> None:
        self.listener.on_fine_tune_start(event)

    def on_epoch_start(self, epoch: int) -> None:
        self.listener.on_epoch_start(epoch)
        self.catch_up()

    def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
        self.listener.on_batch_end(step, loss, accuracy)

    def on_epoch_end(self, event: EpochEnded) -> None:
        self.listener.on_epoch_end(event)
        self.catch_up()
        if self.tracker is not None:
            self.send_epoch(vars(event))

    def on_finish(self) -> None:
        try:
            self.finish()
        except Exception as error:
            self.warn_once(f"MLflow tracking stopped: {error_text(error)}")
        finally:
            self.listener.on_finish()
        self.catch_up()

    # Tracking.
    def start(self, event: TrainingStarted) -> None:
        run_dir = Path(event.run_dir)
        values = flatten(store.read_config_values(run_dir))
        meta = store.read_meta(run_dir)
        previous = meta.get(META_KEY) if isinstance(meta.get(META_KEY), dict) else None
        if not (values.get("train.mlflow") is True or tracking_uri_set() or previous):
            return
        if not mlflow_installed():
            if values.get("train.mlflow") is True:
                reason = "train.mlflow is on"
            elif previous:
                reason = f"the run was tracked in MLflow ({previous.get('tracking_uri')})"
            else:
                reason = f"{TRACKING_URI_VARIABLE} is set"
            self.warn_once(not_installed_warning(reason))
            return
        self.run_dir = run_dir
        tags = {
            "imgclf.run_id": event.run_id,
            "imgclf.run_dir": str(run_dir.resolve()),
            "imgclf.model": event.model_name,
            "imgclf.dataset": str((meta.get("dataset") or {}).get("root", "")),
            "imgclf.dataset_fingerprint": str((meta.get("dataset") or {}).get("fingerprint", "")),
        }
        params = {key: clipped(param_text(value), MAX_PARAM_LENGTH) for key, value in values.items()}
        history = store.read_history(run_dir) if event.initial_epoch else []
        self.epochs_sent = {int(row["epoch"]) for row in history}  # open_run logs those MLflow lacks
        self.tracker = TrackingThread()
        self.tracker.submit(lambda: self.open_run(event.run_id, previous, tags, params, history))

    def open_run(
        self,
        run_name: str,
        previous: dict[str, Any] | None,
        tags: dict[str, str],
        params: dict[str, str],
        history: list[dict[str, float]],
    ) -> None:
        """In the tracking thread: the run recorded in meta.json, continued, or a new one."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        client, uri = new_client(previous.get("tracking_uri") if previous else None)
        run = None
        if previous and previous.get("run_id"):
            try:
                run = client.get_run(str(previous["run_id"]))
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is not None and run.info.lifecycle_stage == "deleted":
                run = None
        if run is None:
            experiment_id = experiment_for(client)
            tags = {key: clipped(value, MAX_TAG_LENGTH) for key, value in tags.items()}
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            logged_params: dict[str, str] = {}
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            logged_params = dict(run.data.params)
        run_id = run.info.run_id
        # Params cannot change in MLflow: what a resume changed (--epochs) is recorded as a tag.
        new = [Param(key, value) for key, value in params.items() if key not in logged_params]
        changed = [
            RunTag(f"imgclf.resumed.{key}", clipped(value, MAX_TAG_LENGTH))
            for key, value in params.items()
            if key in logged_params and logged_params[key] != value
        ]
        for first in range(0, max(len(new), len(changed)), PARAMS_PER_CALL):
            client.log_batch(
                run_id,
                params=new[first : first + PARAMS_PER_CALL],
                tags=changed[first : first + PARAMS_PER_CALL],
            )
        # Epochs trained before tracking began or while it was down, so the curves are whole.
        logged = (
            {entry.step for entry in client.get_metric_history(run_id, "val_accuracy")} if history else set()
        )
        for row in history:
            if int(row["epoch"]) not in logged:
                log_metrics(client, run_id, epoch_metrics(row), int(row["epoch"]))
        self.client = client
        self.record = {"tracking_uri": uri, "experiment_id": run.info.experiment_id, "run_id": run_id}

    def send_epoch(self, row: dict[str, Any]) -> None:
        """Log an epoch's metrics (a history row or an ``EpochEnded``'s fields), step = its number."""
        if self.tracker is None:
            return
        epoch, values = int(row["epoch"]), epoch_metrics(row)
        self.epochs_sent.add(epoch)
        self.tracker.submit(lambda: self.log_epoch(values, epoch))

    def log_epoch(self, values: dict[str, float], epoch: int) -> None:
        if self.record is not None and self.client is not None:
            log_metrics(self.client, self.record["run_id"], values, epoch)

    def finish(self) -> None:
        """The run's files and end status, then a bounded wait for the tracking thread."""
        tracker, run_dir = self.tracker, self.run_dir
        if tracker is None or run_dir is None:
            return
        self.catch_up()  # meta.json names the MLflow run before it is logged as a file
        with contextlib.suppress(ImgclfError):  # a damaged history.csv: its epochs were sent live
            for row in store.read_history(run_dir):
                # An epoch that Ctrl-C cut off between its history row and its event.
                if int(row["epoch"]) not in self.epochs_sent:
                    self.send_epoch(row)
        meta = store.read_meta(run_dir)
        status = MLFLOW_STATUSES.get(str(meta.get("status")), "FAILED")
        summary = {
            name: float(meta[key])
            for name, key in SUMMARY_METRICS.items()
            if isinstance(meta.get(key), int | float)
        }
        files = [(run_dir / name, None) for name in RUN_FILES if (run_dir / name).is_file()]
        plots = run_dir / store.PLOTS_DIR
        files += [(path, store.PLOTS_DIR) for path in sorted(plots.glob("*.png"))]
        tracker.submit(lambda: self.close_run(status, summary, files))
        if tracker.failure is None:
            self.listener.on_status("Logging the run to MLflow...")
        wait_for(tracker)

    def close_run(self, status: str, summary: dict[str, float], files: list[tuple[Path, str | None]]) -> None:
        if self.record is None or self.client is None:
            return
        run_id = self.record["run_id"]
        for path, artifact_path in files:
            self.client.log_artifact(run_id, str(path), artifact_path)
        log_metrics(self.client, run_id, summary, int(summary.get("best_epoch", 0)))
        self.client.set_terminated(run_id, status)

    def catch_up(self) -> None:
        """In the training's thread: record the MLflow run in meta.json once it exists, and
        warn once if tracking stopped."""
        tracker, run_dir = self.tracker, self.run_dir
        if tracker is None or run_dir is None:
            return
        if self.record is not None and not self.recorded:
            self.recorded = True
            try:
                store.update_meta(run_dir, **{META_KEY: self.record})
            except Exception as error:
                self.warn_once(f"Could not record the MLflow run in meta.json: {error_text(error)}")
        if tracker.failure is not None:
            self.warn_once(
                f"MLflow tracking stopped: {tracker.failure} (the run itself is unaffected: {run_dir})"
            )

    def warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            self.listener.on_warning(message)


def experiment_for(client: MlflowClient) -> str:
    """The id of ``MLFLOW_EXPERIMENT_NAME`` (default ``imgclf``), created if need be."""
    from mlflow.exceptions import MlflowException

    name = os.environ.get(EXPERIMENT_VARIABLE, "").strip() or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another run
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ImgclfError(
            f"MLflow experiment {name!r} is deleted",
            f"restore it (mlflow experiments restore) or set {EXPERIMENT_VARIABLE}",
        )
    return experiment.experiment_id


def log_evaluation(report: EvaluationReport, on_warning: Callable[[str], None]) -> None:
    """Add an evaluation's headline metrics (``eval_<dataset>_accuracy``, ...) and its PNGs and
    metrics.json (under ``eval/<dataset>/``) to the run's MLflow run, if it has one; what goes
    wrong is one warning (the evaluation itself is written already)."""
    try:
        failure = send_evaluation(report, on_warning)
    except Exception as error:
        failure = error_text(error)
    if failure is not None:
        on_warning(f"The evaluation was not logged to MLflow: {failure}")


def send_evaluation(report: EvaluationReport, on_warning: Callable[[str], None]) -> str | None:
    """``log_evaluation``'s work; returns why it failed, or ``None``."""
    run_dir = Path(report.run_dir)
    try:
        meta = store.read_meta(run_dir)
    except ImgclfError:
        return None
    record = meta.get(META_KEY)
    if not isinstance(record, dict) or not record.get("run_id"):
        return None
    if not mlflow_installed():
        on_warning(
            f"Run {report.run_id} is tracked in MLflow, but MLflow is not installed: this evaluation "
            f"is not logged there ({INSTALL_COMMAND})"
        )
        return None
    document = report.to_dict()
    prefix = f"eval_{metric_name(report.dataset)}_"
    values = {
        prefix + name: float(document[name])
        for name in EVALUATION_METRICS
        if isinstance(document.get(name), int | float)
    }
    step = int(meta.get("best_epoch") or 0)
    files = sorted(
        path
        for path in Path(report.output_dir).iterdir()
        if path.is_file() and (path.suffix in EVALUATION_FILE_SUFFIXES or path.name in EVALUATION_FILES)
    )
    artifact_path = f"{store.EVAL_DIR}/{metric_name(report.dataset)}"

    def log() -> None:
        client, _ = new_client(str(record.get("tracking_uri") or "") or None)
        run_id = str(record["run_id"])
        log_metrics(client, run_id, values, step)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path)

    tracker = TrackingThread()
    tracker.submit(log)
    wait_for(tracker)
    return tracker.failure
