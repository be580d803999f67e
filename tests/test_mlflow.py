"""MLflow tracking (``imgclf[mlflow]``): a real local tracking store (SQLite in a temporary
folder), read back with MLflow's own client; the missing extra; a tracking server that fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf_cli import mlflow_tracking
from imgclf_cli.cli.app import app
from imgclf_cli.mlflow_tracking import MlflowTracking, absolute_tracking_uri, metric_name, param_text
from imgclf_cli.training_events import TrainingListener

from conftest import make_class_folders

runner = CliRunner()
# fmt: off
TINY = [
    "--image-size", "32",
    "--batch-size", "8",
    "--set", "model.width=8",
    "--set", "train.learning_rate=0.01",
    "--set", "train.warmup_epochs=0",
]
# fmt: on
INSTALL = 'pip install "imgclf[mlflow]"'
# Runs the CLI with mlflow (and TensorFlow, to prove the error comes before it) not importable.
WITHOUT_MLFLOW = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("mlflow", "tensorflow"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocked())
from imgclf_cli.cli.app import main
sys.argv = ["imgclf", *sys.argv[1:]]
main()
"""


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite tracking store in the test's folder, named by ``MLFLOW_TRACKING_URI``; the
    working folder moves there too (MLflow keeps a local store's artifacts in ./mlruns)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return uri


def train(data_dir: Path, runs_dir: Path, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["train", str(data_dir), "--runs-dir", str(runs_dir), "--json", *TINY, *args])


def read_meta(runs_dir: Path, run_id: str) -> dict:
    return json.loads((runs_dir / run_id / "meta.json").read_text())


def artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:  # type: ignore[no-untyped-def]
    paths: set[str] = set()
    for entry in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return paths


def test_run_tracked_evaluated_and_resumed_in_one_mlflow_run(tracking_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    data_dir = make_class_folders(tmp_path / "data", per_class=8)
    runs_dir = tmp_path / "runs"
    result = train(data_dir, runs_dir, "--epochs", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing of MLflow's on stdout: one JSON document
    assert "mlflow" not in result.stderr.lower()  # nor its log lines on stderr
    run_id = summary["run_id"]
    record = read_meta(runs_dir, run_id)["mlflow"]
    assert record["tracking_uri"] == tracking_uri
    client = MlflowClient(tracking_uri)
    run = client.get_run(record["run_id"])
    assert run.info.run_name == run_id
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "imgclf"
    assert run.data.tags["imgclf.run_id"] == run_id
    assert run.data.tags["imgclf.model"] == "imgclf-cnn"
    assert run.data.tags["imgclf.dataset"] == str(data_dir)
    params = run.data.params
    assert (params["train.epochs"], params["model.width"], params["data.image_size"]) == ("2", "8", "32")
    assert params["train.mlflow"] == "false"  # on through MLFLOW_TRACKING_URI alone
    rows = (runs_dir / run_id / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    history = [dict(zip(header, map(float, row.split(",")), strict=True)) for row in rows[1:]]
    logged = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(entry.step, entry.value) for entry in logged] == [
        (1, pytest.approx(history[0]["val_accuracy"], abs=1e-5)),  # history.csv: 6 digits
        (2, pytest.approx(history[1]["val_accuracy"], abs=1e-5)),
    ]
    assert [entry.step for entry in client.get_metric_history(run.info.run_id, "learning_rate")] == [1, 2]

    result = runner.invoke(app, ["evaluate", "--run", run_id, "--runs-dir", str(runs_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    metrics = client.get_run(record["run_id"]).data.metrics
    assert metrics["eval_val_accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["eval_val_f1_macro"] == pytest.approx(report["f1_macro"])
    assert metrics["best_val_accuracy"] == pytest.approx(summary["val_accuracy"])
    artifacts = artifact_paths(client, record["run_id"])
    assert {
        "best.keras",
        "labels.json",
        "config.yaml",
        "meta.json",
        "plots/training_curves.png",
        "eval/val/confusion_matrix.png",
        "eval/val/reliability.png",
        "eval/val/metrics.json",
    } <= artifacts

    # --resume continues the same MLflow run; the changed epoch count is a tag (params are fixed).
    result = runner.invoke(
        app, ["train", "--resume", run_id, "--runs-dir", str(runs_dir), "--epochs", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert read_meta(runs_dir, run_id)["mlflow"] == record
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["imgclf.resumed.train.epochs"] == "3"
    assert [entry.step for entry in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_tracking_failure_mid_run_is_one_warning(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "failing-server")
    log_batch = MlflowClient.log_batch
    calls = []

    def fail_on_metrics(self, run_id, metrics=(), *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(metrics))
        if metrics:  # the params went through; the first epoch's metrics do not
            raise MlflowException("tracking server went away")
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", fail_on_metrics)
    data_dir = make_class_folders(tmp_path / "data", per_class=8)
    result = train(data_dir, tmp_path / "runs", "--epochs", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs_run"] == 2
    warning = " ".join(result.stderr.split())
    assert warning.count("Warning:") == 1
    assert "MLflow tracking stopped: MlflowException: tracking server went away" in warning
    meta = read_meta(tmp_path / "runs", summary["run_id"])
    assert meta["status"] == "completed"
    assert calls == [0, 5]  # tracking stopped at the first failure: epoch 2 was not sent
    run = MlflowClient(tracking_uri).get_run(meta["mlflow"]["run_id"])
    assert MlflowClient(tracking_uri).get_experiment(run.info.experiment_id).name == "failing-server"
    assert run.data.metrics == {}


def test_tracking_uri_without_mlflow_installed_warns_and_trains(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlflow_tracking, "mlflow_installed", lambda: False)
    data_dir = make_class_folders(tmp_path / "data", per_class=8)
    result = train(data_dir, tmp_path / "runs", "--epochs", "1")
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stderr.split())  # as one line, however the console wrapped it
    assert warning.count("Warning:") == 1
    assert "MLFLOW_TRACKING_URI is set but MLflow is not installed: this run is not tracked" in warning
    assert INSTALL in warning
    assert "mlflow" not in read_meta(tmp_path / "runs", json.loads(result.stdout)["run_id"])
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("way", ["--set", "--config"])
def test_train_mlflow_without_the_extra_fails_before_tensorflow(way: str, tmp_path: Path) -> None:
    data_dir = make_class_folders(tmp_path / "data", per_class=2)
    if way == "--set":
        asked = ["--set", "train.mlflow=true"]
    else:
        (tmp_path / "config.yaml").write_text("train:\n  mlflow: true\n")
        asked = ["--config", str(tmp_path / "config.yaml")]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_MLFLOW, "train", str(data_dir), "--runs-dir", str(tmp_path / "runs")]
        + asked,
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert completed.returncode == 1, completed.stderr
    assert "Error: train.mlflow is on but MLflow is not installed" in completed.stderr
    assert INSTALL in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "runs").exists()


def test_every_training_event_is_passed_on() -> None:
    events = {name for name in vars(TrainingListener) if name.startswith("on_")}
    assert events <= set(vars(MlflowTracking))

    class Recorder(TrainingListener):
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def on_info(self, message: str) -> None:
            self.calls.append(("info", message))

        def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
            self.calls.append(("batch", step, loss, accuracy))

        def on_finish(self) -> None:
            self.calls.append(("finish",))

    recorder = Recorder()
    tracking = MlflowTracking(recorder)
    tracking.on_info("a note")
    tracking.on_batch_end(3, 0.5, 0.75)
    tracking.on_finish()
    assert recorder.calls == [("info", "a note"), ("batch", 3, 0.5, 0.75), ("finish",)]


def test_params_and_names_within_mlflow_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert param_text(False) == "false"
    assert param_text([32, 32]) == "[32, 32]"
    assert param_text({"cat": 1.5}) == '{"cat": 1.5}'
    long_weights = {f"class_{index}": 1.0 for index in range(200)}
    clipped = mlflow_tracking.clipped(param_text(long_weights), mlflow_tracking.MAX_PARAM_LENGTH)
    assert len(clipped) == mlflow_tracking.MAX_PARAM_LENGTH and clipped.endswith("...")
    assert metric_name("holiday photos (2024)") == "holiday photos _2024_"
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
