"""Training on several machines: ``train.distribute: multi_worker`` (docs/distributed.md).  [heavy]

Every node runs the same ``imgclf train`` with ``TF_CONFIG`` naming the cluster
(``imgclf_cli.cluster``); TensorFlow's ``MultiWorkerMirroredStrategy`` keeps one replica of the
model per worker and all-reduces the gradients of every step. Keras 3's ``model.fit`` cannot run
under that strategy (keras-team/keras#20585: its data adapter fails on the per-replica batches),
so ``DistributedFit`` runs fit's epochs itself (and, see ``custom_fit``, for ``mirrored`` too),
with fit's own parts: the model's ``train_step``/``test_step`` (loss, label smoothing, class
weights as sample weights, optimizer and schedule, metrics, augmentation inside the model) and
the run's callbacks, called as fit calls them (``RunRecorder``: history, checkpoints, early
stopping). It plugs into ``imgclf_cli.fitting.fit_from`` in place of ``fit``, so resuming within
an epoch is shared too.

Data order: every worker builds the run's one seeded training stream of global batches
(``data.batch_size`` images) and keeps its own slice of each (``replica_batches``). A step thus
trains on exactly the images a single process would, whatever the number of workers, and a
checkpoint's stream position means the same on any cluster: a run continues on another number
of workers. The price: each worker decodes (and caches) the whole training set rather than its
share of it. What still depends on the split of a batch is what any data-parallel training
computes per replica: BatchNormalization's batch statistics (over the replica's images, as in
MirroredStrategy), and the random draws of augmentation and dropout. Without those, results
match one process up to float rounding (tests/test_distributed.py).

What every worker must do alike: the metrics are summed over all workers when read, and
assigning them reads them, so every read or reset is a collective operation that every worker
must join in the same order. Hence all workers run the same callbacks (the others into a
private store, see ``imgclf_cli.cluster``), decisions come from values all workers share
(validation results are global), and the one decision taken on a clock, a mid-epoch checkpoint
every N minutes, is agreed on at every step (``AgreedCheckpointEvery``).

A worker that dies or freezes: TensorFlow's coordination service notices a worker whose
heartbeats stop (within seconds), a closed connection fails at once, and every collective
operation has a timeout (``IMGCLF_WORKER_TIMEOUT``, default 5 minutes) for a worker that lives
but no longer takes part. The error becomes ``WorkerLostError``, naming the worker and how to
restart with ``--resume``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from imgclf_cli.checkpointing import CheckpointEvery
from imgclf_cli.cluster import TIMEOUT_VARIABLE, Cluster, cluster_from_environment, worker_timeout_seconds
from imgclf_cli.dataset import SplitManifest
from imgclf_cli.errors import ConfigError, DatasetError, ImgclfError
from imgclf_cli.fitting import TrainingData
from imgclf_cli.training_events import TrainingListener, TrainResult

# The longest run folder path the chief can tell the others (bytes of its UTF-8 text).
PATH_BYTES = 4096
# Words of the split's digest that the workers compare.
DIGEST_WORDS = 4
# Phrases of TensorFlow's errors when a collective operation lost a peer.
LOST_PEER_SIGNS = (
    "collective",
    "heartbeat",
    "unhealthy",
    "connection reset",
    "socket closed",
    "failed to connect",
    "coordination service",
    "recvmsg",
)
# How often the workers compare their clocks for a checkpoint due after some minutes.
AGREE_EVERY_STEPS = 16
TASK_PATTERN = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")

# One strategy per process: TensorFlow configures collective operations once, at start-up.
_strategy: tf.distribute.MultiWorkerMirroredStrategy | None = None


class WorkerLostError(ImgclfError):
    """Another worker of a multi-worker training stopped answering; the job must restart."""


def cluster_strategy(
    cluster: Cluster, timeout_seconds: float, on_status: Callable[[str], None] | None = None
) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The process's ``MultiWorkerMirroredStrategy``, created on first use (which waits until
    every worker of ``cluster`` has started)."""
    global _strategy
    if _strategy is not None:
        return _strategy
    if on_status is not None:
        others = ", ".join(
            cluster.describe(place) for place in range(cluster.num_workers) if place != cluster.position
        )
        on_status(f"Waiting for the other workers to join ({others})...")
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    try:
        _strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as error:
        if "program startup" not in str(error):
            raise
        raise ImgclfError(
            "Multi-worker training must be the first TensorFlow work of its process",
            "run imgclf train in a new process on each worker (not after other TensorFlow "
            "work in a notebook)",
        ) from None
    return _strategy


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def split_digest(manifest: SplitManifest) -> np.ndarray:
    """A fingerprint of the split that does not depend on where a node mounts the dataset."""
    digest = hashlib.sha256()
    for name, samples in (("train", manifest.train), ("val", manifest.val)):
        digest.update(name.encode())
        for sample in samples:
            digest.update(f"{Path(sample.path).name}\0{sample.label}\n".encode())
    words = np.frombuffer(digest.digest()[: DIGEST_WORDS * 2], dtype=np.uint16)
    return words.astype(np.float64)


def gathered_from_all(strategy: tf.distribute.Strategy) -> Callable[[np.ndarray], np.ndarray]:
    """A function giving every replica's ``values`` as the rows of one array, in the replicas'
    order (the chief's first): one collective operation per call, which every worker must make
    alike."""

    @tf.function
    def gather(local: tf.Tensor) -> tf.Tensor:
        def in_replica() -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            return context.all_gather(local[tf.newaxis], axis=0)

        return strategy.experimental_local_results(strategy.run(in_replica))[0]

    return lambda values: gather(tf.constant(values, dtype=tf.float64)).numpy()


@dataclass
class Team:
    """This worker's place in a multi-worker training, as agreed with the others at its start."""

    strategy: tf.distribute.MultiWorkerMirroredStrategy
    cluster: Cluster
    timeout_seconds: float
    chief_run_dir: Path
    """The run the chief writes (on the chief's filesystem)."""
    gather: Callable[[np.ndarray], np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.gather = gathered_from_all(self.strategy)

    def agreed(self, every: CheckpointEvery) -> CheckpointEvery:
        """``every`` as all workers decide it together (see ``AgreedCheckpointEvery``)."""
        if every.seconds is None:  # counted in steps: every worker decides alike already
            return every
        return AgreedCheckpointEvery(every.steps, every.seconds, agree=self.any_worker)

    def any_worker(self, local: bool) -> bool:
        return bool(self.gather(np.asarray([float(local)])).max())

    def finished(self, result: TrainResult) -> TrainResult:
        """Once every worker has finished: ``result`` as the chief's run (another worker's run
        was a private copy). Waiting for the slowest, the workers leave together: a chief that
        ended first would take TensorFlow's coordination service with it, and the others would
        print its missing heartbeats."""
        with self.lost_worker_reported():
            self.gather(np.zeros(1))
        return replace(result, run_id=self.chief_run_dir.name, run_dir=str(self.chief_run_dir))

    def restart_hint(self) -> str:
        run_id = self.chief_run_dir.name
        return (
            f"the job cannot go on without it: restart imgclf train --resume {run_id} on every "
            "worker, with the same TF_CONFIG; training continues from the chief's last checkpoint"
        )

    @contextlib.contextmanager
    def lost_worker_reported(self) -> Iterator[None]:
        """TensorFlow's error when a peer is gone, as one line naming it and how to go on."""
        try:
            yield
        except tf.errors.OpError as error:
            text = str(error.message or error)
            # "expected type ... but got": the workers ran different collective operations,
            # a fault of this program rather than a lost worker.
            if not any(sign in text.lower() for sign in LOST_PEER_SIGNS) or "expected type" in text:
                raise
            # An eager all-reduce that failed leaves its thread pool to the frames of this
            # error: freed and collected now, it closes quietly instead of printing a traceback
            # as the interpreter exits.
            traceback.clear_frames(error.__traceback__)
            gc.collect()
            raise WorkerLostError(self.lost_message(text), self.restart_hint()) from error

    def lost_message(self, text: str) -> str:
        lost = lost_task(text, self.cluster)
        if lost is not None:
            who = self.cluster.describe(lost).capitalize()
        elif self.cluster.num_workers == 2:
            who = self.cluster.describe(1 - self.cluster.position).capitalize()
        else:
            who = f"One of the other {self.cluster.num_workers - 1} workers"
        lowered = text.lower()
        if "heartbeat" in lowered or "unhealthy" in lowered:
            why = "it stopped sending heartbeats (its process is frozen or gone, or its machine is down)"
        elif "timed out" in lowered or "deadline" in lowered:
            why = f"no reply within {self.timeout_seconds:g} s ({TIMEOUT_VARIABLE})"
        else:
            why = "its connection closed (its process ended, or its machine is unreachable)"
        return f"{who} stopped answering: {why}; this is {self.cluster.describe()}"


def lost_task(text: str, cluster: Cluster) -> int | None:
    """The place in ``cluster`` of the task TensorFlow's error names as gone, if it names one."""
    lowered = text.lower()
    # Where TensorFlow says which task failed: after "unhealthy", or the remote end of a call.
    for phrase in ("unhealthy", "remote target"):
        start = lowered.find(phrase)
        if start < 0:
            continue
        for job, index in TASK_PATTERN.findall(text[start:]):
            place = cluster.position_of(job, int(index))
            if place is not None and place != cluster.position:
                return place
    return None


def join_team(
    strategy: tf.distribute.MultiWorkerMirroredStrategy,
    run_dir: Path,
    manifest: SplitManifest,
    resumed: bool,
    listener: TrainingListener,
) -> Team | None:
    """One exchange before multi-worker training (``None``: ``strategy`` is not multi-worker):
    every worker learns the chief's run folder, and checks that all of them train on the same
    split (and, resuming, the same run)."""
    cluster = cluster_from_environment()
    if cluster is None or not is_multi_worker(strategy):
        return None
    path = np.zeros(PATH_BYTES)
    encoded = np.frombuffer(str(run_dir).encode()[:PATH_BYTES], dtype=np.uint8)
    path[: len(encoded)] = encoded
    # Resuming, each worker's run is a copy of the chief's (imgclf_cli.cluster): the same name.
    name = np.frombuffer(hashlib.sha256(run_dir.name.encode()).digest()[:4], dtype=np.uint16)
    checked = np.concatenate([split_digest(manifest), name.astype(np.float64) if resumed else np.zeros(2)])
    team = Team(strategy, cluster, worker_timeout_seconds(), run_dir)
    with team.lost_worker_reported():
        rows = team.gather(np.concatenate([path, checked]))
    chief_path = bytes(rows[0, :PATH_BYTES].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
    team.chief_run_dir = Path(chief_path)
    differs = (rows[:, PATH_BYTES:] != rows[0, PATH_BYTES:]).any(axis=0)
    if differs[:DIGEST_WORDS].any():
        raise DatasetError(
            "The workers do not all hold the same dataset split",
            "every worker needs the same DATA_DIR (same files and classes) and the same config",
        )
    if differs[DIGEST_WORDS:].any():
        raise ConfigError(
            "The workers are resuming different runs", "pass the chief's run id to --resume on every worker"
        )
    if not cluster.is_chief:
        listener.on_info(
            f"This is {cluster.describe()}, one of {cluster.num_workers} workers; the chief, "
            f"{cluster.describe(0)}, writes the run, and this worker keeps nothing"
        )
    return team


@dataclass(frozen=True)
class AgreedCheckpointEvery(CheckpointEvery):
    """A checkpoint every N minutes, due on every worker at the same step: due when it is due on
    any worker's clock. The workers compare clocks every ``AGREE_EVERY_STEPS`` steps since the
    last checkpoint (one small collective operation, ~2 ms between two local workers), so a
    checkpoint may come that many steps late."""

    agree: Callable[[bool], bool] | None = None

    def due(self, steps_since: int, seconds_since: float) -> bool:
        if self.steps is not None and steps_since >= self.steps:
            return True
        if self.agree is None or steps_since % AGREE_EVERY_STEPS:
            return False
        return self.agree(super().due(steps_since, seconds_since))


def with_class_weights(class_weight: dict[int, float]) -> Callable[..., tuple[tf.Tensor, ...]]:
    """Keras fit's conversion of ``class_weight`` into per-image sample weights."""
    weights = tf.constant([class_weight.get(index, 1.0) for index in range(max(class_weight) + 1)])

    def add(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return images, labels, tf.gather(weights, tf.argmax(labels, axis=-1, output_type=tf.int32))

    return add


def replica_batches(
    dataset: tf.data.Dataset, num_replicas: int
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """For ``distribute_datasets_from_function``: a worker's share of ``dataset``'s global
    batches, one slice per local replica (the replicas of a worker take consecutive elements).
    A batch that does not divide evenly (validation's last) is split into slices whose sizes
    differ by at most one image: every replica's loss is weighted by its number of images, so
    the results are those of the whole batch. A batch smaller than the number of replicas (the
    last, when images failed to decode) is left out: an empty slice would give a NaN loss."""
    batch_size = dataset.element_spec[0].shape[0]
    even = batch_size is not None and batch_size % num_replicas == 0

    def for_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = num_replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def even_slices(*batch: tf.Tensor) -> tf.data.Dataset:
            split = tuple(
                tf.reshape(part, [num_replicas, -1, *part.shape[1:]])[first : first + local] for part in batch
            )
            return tf.data.Dataset.from_tensor_slices(split)

        def uneven_slices(*batch: tf.Tensor) -> tf.data.Dataset:
            size = tf.shape(batch[0], out_type=tf.int64)[0]
            base, extra = size // num_replicas, size % num_replicas

            def replica_slice(replica: tf.Tensor) -> tuple[tf.Tensor, ...]:
                start = replica * base + tf.minimum(replica, extra)
                end = start + base + tf.cast(replica < extra, tf.int64)
                return tuple(part[start:end] for part in batch)

            return tf.data.Dataset.range(first, first + local).map(replica_slice)

        if even:
            sliced = dataset.flat_map(even_slices)
        else:
            enough = dataset.filter(lambda *batch: tf.shape(batch[0])[0] >= num_replicas)
            sliced = enough.flat_map(uneven_slices)
        if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
            # Known to be endless (flat_map cannot tell), a worker's iterator takes each batch
            # without first asking all workers whether they still have one: a collective
            # operation less per step.
            sliced = sliced.repeat()
        return sliced

    return for_worker


def custom_fit(strategy: tf.distribute.Strategy, team: Team | None) -> Callable[..., None] | None:
    """What runs the epochs under ``strategy`` in place of Keras fit (``None``: fit itself,
    on one device). Several workers: the team's loop. Several devices of one machine: the same
    loop, rather than fit's own distribution of the stream, which deals the seeded batches to
    the replicas in another order (a mirrored run then trains on other batches than one device
    would) and needs validation batches that divide evenly."""
    if team is None and strategy.num_replicas_in_sync < 2:
        return None
    loops: dict[int, DistributedFit] = {}
    # Several workers: TensorFlow's error when a peer is gone becomes one line naming it.
    guard = team.lost_worker_reported if team is not None else contextlib.nullcontext

    def fit(
        model: keras.Model,
        data: TrainingData,
        epochs: int,
        initial_epoch: int,
        callbacks: list[keras.callbacks.Callback],
        class_weight: dict[int, float] | None,
    ) -> None:
        if id(model) not in loops:  # its traced step functions serve every fit of a resume
            loops[id(model)] = DistributedFit(strategy, model)
        with guard():
            loops[id(model)].run(data, epochs, initial_epoch, callbacks, class_weight)

    return fit


class DistributedFit:
    """Keras fit's loop over epochs and steps, for one model, on all replicas of ``strategy``
    together (every worker's, in multi-worker training)."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model) -> None:
        self.strategy = strategy
        self.model = model
        self.num_replicas = strategy.num_replicas_in_sync

        def local_means(logs: dict) -> dict[str, tf.Tensor]:
            # This worker's running means: shown while an epoch runs. An epoch's results are
            # read from the metrics themselves, summed over all workers.
            return {
                name: tf.reduce_mean(tf.stack(strategy.experimental_local_results(value)))
                for name, value in logs.items()
            }

        @tf.function
        def train_step(iterator: Iterator) -> dict[str, tf.Tensor]:
            # The batch is taken inside the function, as fit does: no eager round trip per step.
            return local_means(strategy.run(model.train_step, args=(next(iterator),)))

        @tf.function
        def test_step(batch: tuple[tf.Tensor, ...]) -> dict[str, tf.Tensor]:
            return local_means(strategy.run(model.test_step, args=(batch,)))

        self.train_step = train_step
        self.test_step = test_step

    def distribute(self, dataset: tf.data.Dataset) -> tf.distribute.DistributedDataset:
        return self.strategy.distribute_datasets_from_function(replica_batches(dataset, self.num_replicas))

    def run(
        self,
        data: TrainingData,
        epochs: int,
        initial_epoch: int,
        callbacks: list[keras.callbacks.Callback],
        class_weight: dict[int, float] | None,
    ) -> None:
        """``model.fit(data.train, validation_data=data.val, epochs, initial_epoch,
        steps_per_epoch, class_weight, callbacks)``, as Keras 3.15's fit runs it."""
        model = self.model
        train = data.train.map(with_class_weights(class_weight)) if class_weight else data.train
        train_stream = iter(self.distribute(train))
        val = self.distribute(data.val)
        callback_list = keras.callbacks.CallbackList(
            callbacks, model=model, epochs=epochs, steps=data.steps_per_epoch
        )
        model.stop_training = False
        callback_list.on_train_begin()
        logs: dict[str, float] = {}
        epoch_logs: dict[str, float] | None = None
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch)
            for step in range(data.steps_per_epoch):
                callback_list.on_train_batch_begin(step)
                try:
                    logs = as_floats(self.train_step(train_stream))
                except tf.errors.OutOfRangeError:
                    break  # no decodable image at all: the recorder sees an empty epoch
                callback_list.on_train_batch_end(step, logs)
                if model.stop_training:
                    break
            epoch_logs = as_floats(model.get_metrics_result())
            epoch_logs.update(
                {f"val_{name}": value for name, value in self.evaluate(val, callback_list).items()}
            )
            callback_list.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
        if epochs > 0:
            model.optimizer.finalize_variable_values(model.trainable_weights)
        callback_list.on_train_end(logs=epoch_logs)

    def evaluate(
        self, val: tf.distribute.DistributedDataset, callback_list: keras.callbacks.CallbackList
    ) -> dict[str, float]:
        """``model.evaluate`` within fit: one pass over the validation batches."""
        callback_list.on_test_begin()
        self.model.reset_metrics()
        logs: dict[str, float] = {}
        for step, batch in enumerate(val):
            callback_list.on_test_batch_begin(step)
            logs = as_floats(self.test_step(batch))
            callback_list.on_test_batch_end(step, logs)
        logs = as_floats(self.model.get_metrics_result())
        callback_list.on_test_end(logs)
        return logs


def as_floats(logs: dict) -> dict[str, float]:
    return {name: float(np.asarray(value)) for name, value in logs.items()}
