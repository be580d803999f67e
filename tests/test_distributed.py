"""Multi-worker training (``train.distribute: multi_worker``): the same steps as one process,
only the chief writes the run, a lost worker fails the job within the timeout, ``--resume``.

Workers are real ``imgclf train`` processes on 127.0.0.1 (free ports), each bounded in time and
killed (with its process group) whatever happens to the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from imgclf_cli import store
from imgclf_cli.cluster import (
    CONFIG_VARIABLE,
    TIMEOUT_VARIABLE,
    Cluster,
    check_distribute,
    cluster_from_environment,
)
from imgclf_cli.config import Config
from imgclf_cli.errors import ConfigError

from conftest import make_class_folders

# The default model, without batch statistics (see TEST_CLI). Everything else is the
# real recipe: AdamW, the cosine schedule, label smoothing, class weights (auto: off for these
# balanced classes), checkpoints within epochs. No augmentation and no dropout: their random
# draws are per replica (each replica draws for its half of the batch).
# fmt: off
EXACT_TRAINING = [
    "--epochs", "3", "--image-size", "32", "--batch-size", "8", "--seed", "7", "--learning-rate", "0.01",
    "--set", "model.width=8", "--set", "train.warmup_epochs=0", "--set", "model.dropout=0",
    "--set", "augment.horizontal_flip=false", "--set", "augment.rotation=0", "--set", "augment.zoom=0",
    "--set", "augment.translation=0", "--set", "train.checkpoint_every=2steps",
]
# fmt: on
# Every run here ends in well under a minute; a hung collective operation gives up after this.
WORKER_TIMEOUT_SECONDS = 8
RUN_TIMEOUT_SECONDS = 150

# The CLI, in a process where the model normalises each image alone (LayerNormalization where
# imgclf-cnn has BatchNormalization). BatchNormalization in training normalises with the mean
# and variance of the replica's batch, so one device (8 images) and two replicas (4 and 4)
# compute different steps by design, in MirroredStrategy as in multi-worker training (see
# docs/distributed.md); without it, every difference left is the order of float additions.
# IMGCLF_TEST_TWO_CPUS: train.distribute mirrored over two logical CPU devices (on a machine
# with GPUs, mirrored uses those). IMGCLF_TEST_FREEZE=EPOCH:STEP:FILE: once training step STEP
# of epoch EPOCH ended, write the time to FILE and stop the process (SIGSTOP: a frozen machine,
# which closes no connection).
TEST_CLI = """
import os, signal, sys, time
import keras
import tensorflow as tf
if os.environ.get("IMGCLF_TEST_TWO_CPUS"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from imgclf_cli import training
    two_cpus = lambda config, on_status=None: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    training.choose_strategy = two_cpus
keras.layers.BatchNormalization = lambda **options: keras.layers.LayerNormalization()
if os.environ.get("IMGCLF_TEST_FREEZE"):
    from imgclf_cli import training_callbacks
    epoch, step, marker = os.environ["IMGCLF_TEST_FREEZE"].split(":", 2)
    original = training_callbacks.RunRecorder.on_train_batch_end
    def on_train_batch_end(self, batch, logs=None):
        original(self, batch, logs)
        if len(self.state.history) + 1 == int(epoch) and self.step_in_epoch == int(step):
            with open(marker, "w") as file:
                file.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
    training_callbacks.RunRecorder.on_train_batch_end = on_train_batch_end
sys.argv = ["imgclf", *sys.argv[1:]]
from imgclf_cli.cli.app import main
main()
"""


def environment(**extra: str) -> dict[str, str]:
    base = {key: value for key, value in os.environ.items() if key != CONFIG_VARIABLE}
    return {**base, "IMGCLF_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (bound to port 0, read, closed; held together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for held in sockets:
            held.bind(("127.0.0.1", 0))
        return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()


def tf_config(ports: list[int], index: int) -> str:
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


@contextlib.contextmanager
def started(commands: list[list[str]], environments: list[dict[str, str]], logs: Path) -> Iterator[list]:
    """The processes of ``commands``, output to ``logs``; each killed with its group on the way out."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for index, (command, env) in enumerate(zip(commands, environments, strict=True)):
            output = open(logs / f"worker{index}.log", "w")  # closed with its process, below
            processes.append(
                (
                    subprocess.Popen(command, stdout=output, stderr=output, env=env, start_new_session=True),
                    output,
                )
            )
        yield [process for process, _ in processes]
    finally:
        for process, output in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            output.close()


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [process.wait(timeout=max(0.1, deadline - time.monotonic())) for process in processes]


def log(logs: Path, index: int) -> str:
    return (logs / f"worker{index}.log").read_text()


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-c", TEST_CLI, *args]


def two_workers(
    data: Path | None, stores: list[Path], logs: Path, *args: str, freeze: str = ""
) -> tuple[list[list[str]], list[dict[str, str]]]:
    """The commands and environments of ``imgclf train`` as worker 0 (into ``stores[0]``) and
    worker 1 (``stores[1]``); with ``freeze`` (``EPOCH:STEP:FILE``), worker 1 freezes there."""
    ports = free_ports(2)
    commands, environments = [], []
    for index in range(2):
        commands.append(
            cli_command("train", *([str(data)] if data else []), "--runs-dir", str(stores[index]), *args)
        )
        # Each worker's temporary files (worker 1's private store) in a folder of its own.
        temporary = logs / f"tmp{index}"
        temporary.mkdir(parents=True, exist_ok=True)
        settings = {CONFIG_VARIABLE: tf_config(ports, index), TIMEOUT_VARIABLE: str(WORKER_TIMEOUT_SECONDS)}
        settings["TMPDIR"] = str(temporary)
        if freeze and index == 1:
            settings["IMGCLF_TEST_FREEZE"] = freeze
        environments.append(environment(**settings))
    return commands, environments


def final_weights(run_dir: Path) -> list[np.ndarray]:
    from imgclf_cli.models import load_model

    return load_model(store.last_checkpoint_path(run_dir), compile=False).get_weights()


def only_run(runs: Path) -> Path:
    (run,) = store.list_runs(runs)
    return run


def run_files(run_dir: Path) -> set[str]:
    """The run's files; TensorBoard's event files by folder (their names hold host, pid, time)."""
    return {
        str(path.relative_to(run_dir).parent / "events")
        if path.name.startswith("events.")
        else str(path.relative_to(run_dir))
        for path in run_dir.rglob("*")
        if path.is_file()
    }


def assert_same_weights(expected: list[np.ndarray], got: list[np.ndarray]) -> None:
    # Each step sums the gradients of the same 8 images in another order: in two halves of 4,
    # added by the all-reduce, instead of in one pass (and oneDNN picks other kernels for 4
    # images than for 8). float32 rounds each order differently (about 6e-8 relative per
    # addition), and AdamW's normalised steps carry such differences on. Measured after 12
    # steps: at most 1.0e-6, on weights that move by up to the learning rate per step (7.5e-3
    # in epoch 1), and still moved by 1e-3 in the last 2 steps (near the schedule's floor,
    # 1e-4). The tolerance, 2e-5, is 20 times the measured rounding and 50 times less than
    # those last 2 steps.
    assert len(expected) == len(got)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 13 a class: 9 validation images, which 2 replicas cannot split evenly in batches of 8.
    return make_class_folders(tmp_path_factory.mktemp("distributed") / "data", per_class=13)


@dataclass
class ThreeWays:
    """The same training (a) in one process on one device, (b) mirrored over two logical CPU
    devices, (c) on two worker processes, run at once (four processes on two cores)."""

    one_device: Path
    mirrored: Path
    chief: Path
    worker_store: Path
    logs: Path


@pytest.fixture(scope="module")
def three_ways(data: Path, tmp_path_factory: pytest.TempPathFactory) -> ThreeWays:
    base = tmp_path_factory.mktemp("three-ways")
    logs = base / "logs"
    commands, environments = two_workers(data, [base / "chief", base / "worker"], logs, *EXACT_TRAINING)
    common = ["train", str(data), *EXACT_TRAINING, "--runs-dir"]
    commands += [cli_command(*common, str(base / "mirrored")), cli_command(*common, str(base / "one-device"))]
    environments += [environment(IMGCLF_TEST_TWO_CPUS="1"), environment()]
    with started(commands, environments, logs) as processes:
        codes = wait_all(processes, RUN_TIMEOUT_SECONDS)
    assert codes == [0, 0, 0, 0], "\n".join(log(logs, index)[-3000:] for index in range(4))
    return ThreeWays(
        only_run(base / "one-device"),
        only_run(base / "mirrored"),
        only_run(base / "chief"),
        base / "worker",
        logs,
    )


def assert_same_training(one_device: Path, other: Path) -> None:
    assert_same_weights(final_weights(one_device), final_weights(other))
    # Every epoch's row too: training and validation metrics are over all replicas' images.
    for want, got in zip(store.read_history(one_device), store.read_history(other), strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_one_device_and_two_workers_end_with_equal_weights(three_ways: ThreeWays) -> None:
    chief = three_ways.chief
    assert store.read_config_values(chief)["train"]["distribute"] == "multi_worker"
    assert store.read_meta(chief)["num_replicas"] == 2
    assert_same_training(three_ways.one_device, chief)


def test_mirrored_over_two_cpus_ends_with_the_weights_of_one_device(three_ways: ThreeWays) -> None:
    mirrored = three_ways.mirrored
    assert store.read_config_values(mirrored)["train"]["distribute"] == "mirrored"
    assert store.read_meta(mirrored)["num_replicas"] == 2
    assert_same_training(three_ways.one_device, mirrored)


def test_only_the_chief_writes_a_run(three_ways: ThreeWays) -> None:
    chief, logs = three_ways.chief, three_ways.logs
    # The files a single process writes; worker 1 left nothing in its store or its temporary
    # folder, and both workers name the chief's run.
    assert run_files(chief) == run_files(three_ways.one_device)
    assert store.read_meta(chief)["status"] == store.STATUS_COMPLETED
    assert not three_ways.worker_store.exists()
    assert not any((logs / "tmp1").iterdir())
    for index in range(2):
        assert f"Run: {chief}" in log(logs, index)
    assert "This is worker 1 (127.0.0.1:" in log(logs, 1)


def test_a_frozen_worker_fails_the_job_within_the_timeout_and_resume_continues(
    data: Path, three_ways: ThreeWays, tmp_path: Path
) -> None:
    chief_runs, logs = tmp_path / "runs", tmp_path / "logs"
    marker = tmp_path / "frozen-at"
    # Worker 1 freezes after step 3 of epoch 2 (a checkpoint was written after step 2).
    commands, environments = two_workers(
        data, [chief_runs, tmp_path / "worker"], logs, *EXACT_TRAINING, freeze=f"2:3:{marker}"
    )
    with started(commands, environments, logs) as (chief, frozen):
        code = chief.wait(timeout=RUN_TIMEOUT_SECONDS)
        ended = time.time()
        assert frozen.poll() is None  # still frozen: only the timeout could end the chief's wait
    said = log(logs, 0)
    assert code == 1, said[-3000:]
    # TensorFlow's coordination service notices the missing heartbeats first (after about 7 s
    # here), or else the collective operation's timeout ends the wait.
    waited = ended - float(marker.read_text())
    assert waited <= WORKER_TIMEOUT_SECONDS + 15, waited
    error = next(line for line in said.splitlines() if line.startswith("Error:"))
    run_dir = only_run(chief_runs)
    assert error.startswith("Error: Worker 1 (127.0.0.1:") and "stopped answering" in error
    assert f"--resume {run_dir.name} on every worker" in said
    assert "Traceback" not in said
    assert store.read_meta(run_dir)["status"] == store.STATUS_FAILED

    # The whole job again, with --resume: on from the chief's checkpoint (epoch 2, step 2), to
    # the weights of the uninterrupted single process.
    commands, environments = two_workers(
        None, [chief_runs, chief_runs], tmp_path / "resumed", "--resume", run_dir.name
    )
    with started(commands, environments, tmp_path / "resumed") as processes:
        codes = wait_all(processes, RUN_TIMEOUT_SECONDS)
    assert codes == [0, 0], log(tmp_path / "resumed", 0)[-3000:] + log(tmp_path / "resumed", 1)[-3000:]
    assert "from epoch 2 of 3, step 3 of" in log(tmp_path / "resumed", 0)
    assert store.read_meta(run_dir)["status"] == store.STATUS_COMPLETED
    assert len(store.read_history(run_dir)) == 3
    assert_same_weights(final_weights(three_ways.one_device), final_weights(run_dir))
    assert store.list_runs(chief_runs) == [run_dir]


# --- TF_CONFIG and the lost-worker message, without processes ------------------------------------


def cluster_of(document: dict) -> Cluster | None:
    return cluster_from_environment({CONFIG_VARIABLE: json.dumps(document)})


def test_tf_config_names_the_chief_and_this_worker() -> None:
    workers = {"worker": ["a:1", "b:2"]}
    assert cluster_from_environment({}) is None
    assert cluster_of({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}) is None
    first = cluster_of({"cluster": workers, "task": {"type": "worker", "index": 0}})
    second = cluster_of({"cluster": workers, "task": {"type": "worker", "index": 1}})
    assert first is not None and first.is_chief and first.num_workers == 2
    assert second is not None and not second.is_chief and second.describe() == "worker 1 (b:2)"
    with_chief = cluster_of(
        {"cluster": {"chief": ["c:0"], **workers}, "task": {"type": "worker", "index": 0}}
    )
    assert with_chief is not None and not with_chief.is_chief and with_chief.describe(0) == "chief 0 (c:0)"
    with pytest.raises(ConfigError, match="not one of its training tasks"):
        cluster_of({"cluster": workers, "task": {"type": "worker", "index": 5}})
    with pytest.raises(ConfigError, match="not a valid cluster description"):
        cluster_from_environment({CONFIG_VARIABLE: "{not json"})


def test_distribute_and_tf_config_must_agree() -> None:
    from imgclf_cli.config import resolve_config

    def config(*overrides: str) -> Config:
        return resolve_config(None, list(overrides), {})

    cluster = cluster_of({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})
    check_distribute(config(), cluster)
    check_distribute(config("train.distribute=multi_worker"), cluster)
    check_distribute(config("train.time_budget=5m"), None)
    with pytest.raises(ConfigError, match="needs TF_CONFIG"):
        check_distribute(config("train.distribute=multi_worker"), None)
    with pytest.raises(ConfigError, match="train.distribute is mirrored"):
        check_distribute(config("train.distribute=mirrored"), cluster)
    with pytest.raises(ConfigError, match="time_budget"):
        check_distribute(config("train.time_budget=5m"), cluster)


def test_multi_worker_without_tf_config_fails_before_tensorflow_loads(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", per_class=3)
    done = subprocess.run(
        [sys.executable, "-m", "imgclf_cli", "train", str(data), "--set", "train.distribute=multi_worker"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(IMGCLF_RUNS_DIR=str(tmp_path / "runs")),
    )
    assert done.returncode == 2
    assert "Error: train.distribute=multi_worker needs TF_CONFIG naming at least two workers" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_the_lost_worker_is_named_from_tensorflows_error() -> None:
    from imgclf_cli.multi_worker import lost_task

    cluster = cluster_of(
        {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 0}}
    )
    assert cluster is not None
    # As TensorFlow 2.21 words them (seen with a killed and a frozen worker).
    reset = (
        "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
        "information from remote target /job:worker/replica:0/task:2 while calling RecvBuf"
    )
    unhealthy = (
        "Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped "
        "sending heartbeats):\n/job:worker/replica:0/task:2\nThe tasks have crashed."
    )
    assert lost_task(reset, cluster) == 2
    assert lost_task(unhealthy, cluster) == 2
    assert lost_task("Collective has timed out during execution.", cluster) is None


def test_each_worker_takes_its_slice_of_every_global_batch() -> None:
    import tensorflow as tf

    from imgclf_cli.multi_worker import replica_batches

    batches = tf.data.Dataset.range(24).batch(8).map(lambda x: (x, -x))
    shares = []
    for worker in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2
        )
        shares.append([images.numpy().tolist() for images, _ in replica_batches(batches, 2)(context)])
    # Step by step, the two halves make up the global batch a single process trains on.
    assert [first + second for first, second in zip(*shares, strict=True)] == [
        list(range(start, start + 8)) for start in (0, 8, 16)
    ]


def test_a_checkpoint_due_by_the_clock_is_agreed_at_the_same_step_on_every_worker() -> None:
    from imgclf_cli.checkpointing import CheckpointEvery
    from imgclf_cli.multi_worker import AGREE_EVERY_STEPS, AgreedCheckpointEvery

    asked: list[bool] = []

    def another_worker_is_due(local: bool) -> bool:
        asked.append(local)
        return True

    every = AgreedCheckpointEvery(None, 600.0, agree=another_worker_is_due)
    # Between comparisons no worker saves, whatever its clock says; at one, any worker's clock
    # decides for all (here another worker's: this one's 10 s are not yet 600).
    assert not every.due(AGREE_EVERY_STEPS - 1, 700.0)
    assert every.due(AGREE_EVERY_STEPS, 10.0) and asked == [False]
    counted = AgreedCheckpointEvery(5, None, agree=another_worker_is_due)
    assert counted.due(5, 0.0) and not counted.due(4, 0.0) and asked == [False]
    assert isinstance(every, CheckpointEvery)


def test_an_uneven_batch_is_split_among_the_replicas_and_a_too_small_one_left_out() -> None:
    import tensorflow as tf

    from imgclf_cli.multi_worker import replica_batches

    # 11 images in batches of 5: 5, 5, 1. Two workers of two replicas each (4 replicas).
    batches = tf.data.Dataset.range(11).batch(5).map(lambda x: (x, -x))
    shares = []
    for worker in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=4
        )
        shares.append([images.numpy().tolist() for images, _ in replica_batches(batches, 4)(context)])
    # Worker 0 holds replicas 0 and 1 (consecutive elements), worker 1 replicas 2 and 3.
    assert shares[0] == [[0, 1], [2], [5, 6], [7]]
    assert shares[1] == [[3], [4], [8], [9]]


def test_validation_batches_give_every_replica_an_image() -> None:
    from imgclf_cli.training import validation_batch_size

    for num_val in range(2, 200):
        for replicas in (2, 3, 8):
            size = validation_batch_size(num_val, 32, replicas)
            if num_val < replicas:
                assert size is None
                continue
            assert size is not None and replicas <= size <= 32
            assert num_val % size == 0 or num_val % size >= replicas
    assert validation_batch_size(18, 32, 2) == 18
    assert validation_batch_size(33, 32, 2) == 31


def test_evaluate_predict_and_export_use_the_chiefs_run_as_one_devices(
    three_ways: ThreeWays, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from imgclf_cli.cli.app import app

    runner = CliRunner()
    answers = {}
    for name, run in (("chief", three_ways.chief), ("one-device", three_ways.one_device)):
        copy = tmp_path / name / run.name
        shutil.copytree(run, copy)
        evaluated = runner.invoke(app, ["evaluate", "--run", str(copy), "--json"])
        assert evaluated.exit_code == 0, evaluated.output
        image = store.read_manifest(copy).val[0].path
        predicted = runner.invoke(app, ["predict", image, "--run", str(copy), "--format", "json"])
        assert predicted.exit_code == 0, predicted.output
        exported = runner.invoke(app, ["export", "--run", str(copy), "--tflite", "--json"])
        assert exported.exit_code == 0, exported.output
        assert json.loads(exported.stdout)["verified"] is True
        report = json.loads(evaluated.stdout)
        answers[name] = (report["accuracy"], report["confusion_matrix"], json.loads(predicted.stdout))
    (accuracy, matrix, predictions), (want_accuracy, want_matrix, want_predictions) = answers.values()
    assert (accuracy, matrix) == (want_accuracy, want_matrix)
    assert predictions[0]["label"] == want_predictions[0]["label"]
    assert predictions[0]["confidence"] == pytest.approx(want_predictions[0]["confidence"], abs=1e-4)


@pytest.mark.parametrize(("per_replica", "global_batch"), [(False, 8), (True, 16)])
def test_the_global_batch_is_the_batch_size_unless_per_replica(
    data: Path, tmp_path: Path, per_replica: bool, global_batch: int
) -> None:
    from imgclf_cli.config import resolve_config
    from imgclf_cli.dataset import make_manifest, scan_dataset
    from imgclf_cli.pipeline import DecodeFailures
    from imgclf_cli.training import make_training_data
    from imgclf_cli.training_events import TrainingListener

    overrides = [
        "data.batch_size=8",
        "data.image_size=16",
        f"data.batch_per_replica={str(per_replica).lower()}",
    ]
    config = resolve_config(None, overrides, {})
    manifest = make_manifest(scan_dataset(data), config.data.validation_split, config.seed)
    streams = make_training_data(config, manifest, 2, DecodeFailures(), tmp_path, TrainingListener())
    assert streams.batch_size == global_batch
    assert streams.steps_per_epoch == -(-len(manifest.train) // global_batch)
    images, _ = next(iter(streams.train))
    assert images.shape[0] == global_batch
    # Validation: every image, in batches that leave each of the 2 replicas at least one.
    sizes = [int(images.shape[0]) for images, _ in streams.val]
    assert sum(sizes) == len(manifest.val) and min(sizes) >= 2
