"""Which worker of a multi-worker training this process is, and where the other workers keep
their copy of the run.  Standard library only.

A multi-worker training runs the same ``imgclf train`` on every node, each with ``TF_CONFIG``
naming the cluster and its own place in it (TensorFlow's convention, read by
``tf.distribute.MultiWorkerMirroredStrategy``; see docs/distributed.md)::

    {"cluster": {"worker": ["node-a:2222", "node-b:2222"]}, "task": {"type": "worker", "index": 0}}

The chief (a ``chief`` task, or else worker 0) writes the run into the user's store. Every other
worker trains the same steps in a private store (``private_store``): a temporary folder,
deleted when training ends, so that nothing it writes is seen, and so that the steps whose
reads involve every worker (checkpoints read the epoch's metrics from all of them) run on every
worker alike. TensorFlow's own advice for multi-worker checkpoints is the same: the chief saves
where the user asked, the others to a temporary folder.

``imgclf train`` asks these questions before TensorFlow loads: another worker resuming a run
must not be told that the run is busy, since the chief has just taken it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from imgclf_cli import store
from imgclf_cli.config import Config, time_budget_seconds
from imgclf_cli.errors import ConfigError, RunNotFoundError
from imgclf_cli.liveness import LOCK_FILE

CONFIG_VARIABLE = "TF_CONFIG"
TIMEOUT_VARIABLE = "IMGCLF_WORKER_TIMEOUT"
# How long a worker waits for the others in one collective operation (an all-reduce of the
# gradients) before it gives up: a dead or frozen peer then fails the job instead of hanging
# it. Generous, because a legitimate wait is as long as the slowest worker's longest pause
# between two steps (its checkpoint write to a slow shared disk, a validation pass).
DEFAULT_TIMEOUT_SECONDS = 300.0
TRAINING_TASK_TYPES = ("chief", "worker")
# What a private store copies of the chief's run to resume it: never its lock (the chief's),
# its cache (the chief deletes it as it starts) or the outputs made from it.
NOT_COPIED = (LOCK_FILE, store.CACHE_DIR, store.EVAL_DIR, store.EXPORT_DIR, store.PLOTS_DIR)


@dataclass(frozen=True)
class Cluster:
    """The training tasks ``TF_CONFIG`` names, chief first, and which one this process is."""

    tasks: tuple[tuple[str, int, str], ...]
    """``(task type, index, address)`` of every training task, the chief first."""
    position: int
    """This process's place in ``tasks``."""

    @property
    def num_workers(self) -> int:
        return len(self.tasks)

    @property
    def is_chief(self) -> bool:
        return self.position == 0

    def describe(self, position: int | None = None) -> str:
        """``worker 1 (node-b:2222)``: the task at ``position`` (default: this one)."""
        task_type, index, address = self.tasks[self.position if position is None else position]
        return f"{task_type} {index} ({address})"

    def position_of(self, task_type: str, index: int) -> int | None:
        """The place in ``tasks`` of TensorFlow's ``/job:<task_type>/task:<index>``."""
        for position, (known_type, known_index, _) in enumerate(self.tasks):
            if (known_type, known_index) == (task_type, index):
                return position
        return None


def cluster_from_environment(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster ``TF_CONFIG`` describes; ``None`` when it is unset or names one training task
    (then there is no one to train with)."""
    text = (environ if environ is not None else os.environ).get(CONFIG_VARIABLE, "").strip()
    if not text:
        return None
    try:
        document = json.loads(text)
        cluster = document.get("cluster") or {}
        task = document.get("task") or {}
        task_type, task_index = str(task.get("type", "")), int(task.get("index", 0))
        tasks = tuple(
            (job, index, str(address))
            for job in TRAINING_TASK_TYPES
            for index, address in enumerate(cluster.get(job) or [])
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"{CONFIG_VARIABLE} is not a valid cluster description: {error}",
            'expected {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}',
        ) from None
    if len(tasks) < 2:
        return None
    position = next(
        (place for place, (job, index, _) in enumerate(tasks) if (job, index) == (task_type, task_index)),
        None,
    )
    if position is None:
        listed = ", ".join(f"{job} {index}" for job, index, _ in tasks)
        raise ConfigError(
            f"{CONFIG_VARIABLE} names this process {task_type or '?'} {task_index}, "
            f"which is not one of its training tasks ({listed})",
            'set "task" to {"type": "worker", "index": N} with N this node\'s place in the worker list',
        )
    return Cluster(tasks, position)


def check_distribute(config: Config, cluster: Cluster | None) -> None:
    """``train.distribute`` against ``TF_CONFIG``: ``multi_worker`` needs a cluster, and a
    cluster needs ``multi_worker`` (or ``auto``), or each node would train alone; and a cluster
    takes no time budget (each worker's clock would decide alone when to stop, and a step that
    only some workers take never ends)."""
    mode = config.train.distribute
    if mode == "multi_worker" and cluster is None:
        raise ConfigError(
            f"train.distribute=multi_worker needs {CONFIG_VARIABLE} naming at least two workers",
            f"set {CONFIG_VARIABLE} on every worker (docs/distributed.md), "
            "or train on this machine alone: --set train.distribute=auto",
        )
    if cluster is None:
        return
    if mode not in ("auto", "multi_worker"):
        raise ConfigError(
            f"{CONFIG_VARIABLE} names {cluster.num_workers} workers but train.distribute is {mode}",
            f"--set train.distribute=multi_worker, or unset {CONFIG_VARIABLE} to train on this machine alone",
        )
    if time_budget_seconds(config) is not None:
        raise ConfigError(
            "train.time_budget (--time) is not supported with multi-worker training",
            "give the number of epochs instead: --epochs N",
        )


def worker_timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """``IMGCLF_WORKER_TIMEOUT`` (``90s``, ``5m``, or seconds), else ``DEFAULT_TIMEOUT_SECONDS``."""
    from imgclf_cli.time_budget import parse_duration

    text = (environ if environ is not None else os.environ).get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        return parse_duration(text)
    except ValueError:
        raise ConfigError(
            f"{TIMEOUT_VARIABLE} is not a duration: {text!r}", "expected e.g. 90s, 5m or 300"
        ) from None


def chief_run(reference: str, runs_dir: str | Path | None = None) -> Path:
    """The run the chief resumes, seen from another worker: ``reference`` resolved without
    asking whether a process holds it (the chief may hold it already); ``latest`` is the newest
    run that is not completed."""
    root = store.runs_root(runs_dir)
    hint = (
        "every worker resumes from the chief's run folder: give all of them the same --runs-dir "
        "on a shared filesystem, or copy the chief's run folder to the same path on each node"
    )
    if reference != "latest":
        try:
            return store.resolve_run(reference, runs_dir)
        except RunNotFoundError as error:
            raise RunNotFoundError(error.message, hint) from None
    unfinished = [
        run
        for run in store.list_runs(root)
        if (run / store.SPLIT_FILE).is_file() and store.run_status(run) != store.STATUS_COMPLETED
    ]
    if not unfinished:
        raise RunNotFoundError(f"No unfinished run to resume in {root}", hint)
    return unfinished[-1]


@contextlib.contextmanager
def private_store(resume: str | None, runs_dir: str | Path | None) -> Iterator[tuple[Path, str | None]]:
    """A worker other than the chief: a temporary run store (``TMPDIR``), deleted on the way out,
    and what to resume in it (a copy of the chief's run), as ``(runs_dir, resume)``."""
    root = Path(tempfile.mkdtemp(prefix="imgclf-worker-"))
    try:
        if resume is None:
            yield root, None
        else:
            chief_folder = chief_run(resume, runs_dir)
            copy = root / chief_folder.name
            shutil.copytree(chief_folder, copy, ignore=shutil.ignore_patterns(*NOT_COPIED))
            yield root, str(copy)
    finally:
        shutil.rmtree(root, ignore_errors=True)
