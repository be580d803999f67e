"""Datasets on object stores: the real CLI against a real S3 endpoint on 127.0.0.1.

The endpoint is moto's S3 server, served in this process on a free port behind a middleware
that records every HTTP request it answers: what imgclf asks of the store is counted, not
guessed. The endpoint reaches imgclf the way a MinIO user's would, through ``AWS_ENDPOINT_URL``.
gs:// and az:// go through the same layer (``imgclf_cli.filesystems``) and are not tested here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imgclf_cli import filesystems
from imgclf_cli.cli.app import app
from imgclf_cli.cli.training_view import TrainingView

from conftest import make_class_folders

pytest.importorskip("s3fs", reason="the s3 extra: pip install -e '.[test]'")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")

BUCKET = "imgclf-test"
DATASET = f"s3://{BUCKET}/dataset"
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3
NUM_IMAGES = 3 * (TRAIN_PER_CLASS + VAL_PER_CLASS)
# fmt: off
TINY_TRAINING = ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--set", "model.width=8"]
# fmt: on
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Hermetic: no profile, config file or instance metadata of the machine running the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}

runner = CliRunner()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str

    @property
    def reads_object(self) -> bool:
        """A GET of one object (a listing is a GET of the bucket with a query)."""
        return self.method == "GET" and self.path.count("/") >= 2


class CountingS3Server:
    """moto's S3 endpoint, served by werkzeug on 127.0.0.1, recording each request it answers."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        backend = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)
        self.requests: list[Request] = []

        def counting(environ: dict[str, Any], start_response: Any) -> Any:
            if not environ["PATH_INFO"].startswith("/moto-api"):
                self.requests.append(
                    Request(environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("QUERY_STRING", ""))
                )
            return backend(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=QuietHandler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CountingS3Server:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def require_credentials(self, required: bool) -> None:
        """moto's switch: check each request's access key against its (empty) IAM users."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if required else b"inf",
            headers={"Content-Type": "text/plain"},  # a form body would be parsed away
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass


def upload(server: CountingS3Server, local: Path, prefix: str) -> None:
    """``local``'s files as ``s3://BUCKET/PREFIX/...`` (the bucket is made when missing)."""
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, **lower_case(CREDENTIALS))
    if BUCKET not in [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(local).as_posix()}"
            client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())


def lower_case(credentials: dict[str, str]) -> dict[str, str]:
    names = {
        "AWS_ACCESS_KEY_ID": "aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
        "AWS_DEFAULT_REGION": "region_name",
    }
    return {names[key]: value for key, value in credentials.items() if key in names}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CountingS3Server]:
    """The endpoint, with ``dataset/{train,val}/<class>/*.png``, a hidden file and a note, and
    ``broken/<class>/``: images and files that are not (see ``broken_folder``)."""
    base = tmp_path_factory.mktemp("remote")
    local = base / "dataset"
    make_class_folders(local / "train", per_class=TRAIN_PER_CLASS, seed=1)
    make_class_folders(local / "val", per_class=VAL_PER_CLASS, seed=2)
    (local / "train" / "red" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (local / "README.txt").write_text("three colours\n")
    with CountingS3Server() as server:
        upload(server, local, "dataset")
        upload(server, broken_folder(base / "broken"), "broken")
        yield server


def broken_folder(root: Path) -> Path:
    """Two classes of two images, and an empty, a truncated and a text file filed as images."""
    make_class_folders(root, per_class=2, classes={"red": (200, 0, 0), "blue": (0, 0, 200)})
    whole = (root / "red" / "red_000.png").read_bytes()
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "red" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "blue" / "notes.jpg").write_text("not a picture\n")
    return root


def point_at(server: CountingS3Server, patch: pytest.MonkeyPatch) -> None:
    """This process's AWS variables pointed at ``server``, and a fresh s3fs that reads them."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        patch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        patch.setenv(name, value)
    patch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    filesystems.forget_filesystems()


@pytest.fixture
def s3_environment(s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingS3Server]:
    point_at(s3, monkeypatch)
    yield s3
    filesystems.forget_filesystems()


@pytest.fixture(scope="module")
def remote_run(s3: CountingS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One tiny run trained on ``s3://BUCKET/dataset``, with the requests made in each phase."""
    runs = tmp_path_factory.mktemp("remote_runs")
    marks: dict[str, int] = {}
    with pytest.MonkeyPatch.context() as patch:
        point_at(s3, patch)
        original_start, original_end = TrainingView.on_epoch_start, TrainingView.on_epoch_end

        def on_epoch_start(view: TrainingView, epoch: int) -> None:
            marks[f"start {epoch}"] = len(s3.requests)
            original_start(view, epoch)

        def on_epoch_end(view: TrainingView, event: Any) -> None:
            marks[f"end {event.epoch}"] = len(s3.requests)
            original_end(view, event)

        patch.setattr(TrainingView, "on_epoch_start", on_epoch_start)
        patch.setattr(TrainingView, "on_epoch_end", on_epoch_end)
        before = len(s3.requests)
        result = runner.invoke(app, ["train", DATASET, "--runs-dir", str(runs), "--json", *TINY_TRAINING])
        filesystems.forget_filesystems()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    yield {
        "summary": summary,
        "run_dir": Path(summary["run_dir"]),
        "scan": s3.requests[before : marks["start 1"]],
        "epoch 1": s3.requests[marks["start 1"] : marks["end 1"]],
        "epoch 2": s3.requests[marks["end 1"] : marks["end 2"]],
    }


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_inspect_dataset_reads_each_object_once(s3_environment: CountingS3Server) -> None:
    before = len(s3_environment.requests)
    result = runner.invoke(app, ["inspect-dataset", DATASET, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["root"] == DATASET
    assert report["num_images"] == NUM_IMAGES
    assert report["splits"]["train"] == {name: TRAIN_PER_CLASS for name in ("blue", "green", "red")}
    assert report["splits"]["val"] == {name: VAL_PER_CLASS for name in ("blue", "green", "red")}
    assert report["hidden_files"] == ["train/red/.DS_Store"]
    assert report["ignored_paths"] == ["README.txt"]
    gets = [request for request in s3_environment.requests[before:] if request.reads_object]
    assert len(gets) == NUM_IMAGES  # the hidden file and the note are listed, never read
    assert len({request.path for request in gets}) == NUM_IMAGES


def test_broken_objects_are_reported_as_local_files_are(
    s3_environment: CountingS3Server, tmp_path: Path
) -> None:
    """The same files, on the store and on disk: the same verdicts, from scan and inspection."""
    from imgclf_cli.dataset import scan_dataset
    from imgclf_cli.inspection import inspect_dataset
    from imgclf_cli.inspection_plots import thumbnail_of, write_report

    local = broken_folder(tmp_path / "broken")
    url = f"s3://{BUCKET}/broken"
    remote_scan, local_scan = scan_dataset(url), scan_dataset(local)

    def skipped(scan: Any) -> list[tuple[str, str]]:
        return [(filesystems.relative_path(entry.path, scan.root), entry.reason) for entry in scan.skipped]

    # The scan reads headers: the truncated file passes it (training's decode drops it later).
    assert skipped(remote_scan) == skipped(local_scan) and len(skipped(local_scan)) == 2
    assert remote_scan.num_images == local_scan.num_images == 5
    remote_report, local_report = inspect_dataset(url), inspect_dataset(local)
    assert remote_report.corrupt == local_report.corrupt and len(local_report.corrupt) == 3
    assert remote_report.duplicates == local_report.duplicates
    assert thumbnail_of(url, "red/red_000.png") is not None  # the report's pictures, read in one GET
    written = write_report(remote_report, tmp_path / "report")
    assert {path.name for path in written} >= {"inspection.json", "samples.png"}


def test_train_uses_every_image_and_epoch_two_makes_no_request(remote_run: dict[str, Any]) -> None:
    summary, run_dir = remote_run["summary"], remote_run["run_dir"]
    assert summary["num_train"] == 3 * TRAIN_PER_CLASS
    assert summary["num_val"] == 3 * VAL_PER_CLASS
    assert summary["skipped_files"] == []
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["dataset"]["root"] == DATASET
    assert meta["dataset"]["num_images"] == NUM_IMAGES
    assert len(meta["dataset"]["fingerprint"]) == 16
    split = json.loads((run_dir / "split.json").read_text())
    assert split["root"] == DATASET and split["train"][0][0].startswith("train/")
    # The scan reads each image's header (one ranged GET each); epoch 1 reads each image once,
    # in tf.data's parallel decode calls; epoch 2 is served from the cache: not one request.
    scan_reads = [request for request in remote_run["scan"] if request.reads_object]
    epoch_one = remote_run["epoch 1"]
    assert len(scan_reads) == NUM_IMAGES
    assert len(epoch_one) == NUM_IMAGES and all(request.reads_object for request in epoch_one)
    assert len({request.path for request in epoch_one}) == NUM_IMAGES
    assert remote_run["epoch 2"] == []


def test_evaluate_a_bucket_and_the_runs_own_split(
    remote_run: dict[str, Any], s3_environment: CountingS3Server
) -> None:
    run = ["--run", str(remote_run["run_dir"]), "--json"]
    result = runner.invoke(app, ["evaluate", DATASET, *run])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_samples"] == 3 * VAL_PER_CLASS
    assert report["data_dir"] == DATASET
    result = runner.invoke(app, ["evaluate", *run])  # the run's val split, listed again on the store
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_samples"] == 3 * VAL_PER_CLASS


def test_predict_an_object_a_prefix_and_a_missing_key(
    remote_run: dict[str, Any], s3_environment: CountingS3Server
) -> None:
    run = ["--run", str(remote_run["run_dir"]), "--format", "json"]
    image = f"{DATASET}/val/red/red_000.png"
    result = runner.invoke(app, ["predict", image, *run])
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.stdout)
    assert answer["path"] == image and answer["label"] in ("red", "green", "blue")
    result = runner.invoke(app, ["predict", f"{DATASET}/val/", f"{DATASET}/val/red/nothing.png", *run])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert len(answers) == 3 * VAL_PER_CLASS + 1
    assert all(answer["path"].startswith(f"{DATASET}/val/") for answer in answers)
    assert answers[-1]["error"] == "file not found"
    result = runner.invoke(app, ["predict", f"{DATASET}/val/green", "--run", str(remote_run["run_dir"])])
    assert result.exit_code == 0, result.output
    assert "Images in s3://imgclf-test/dataset/val/green" in result.stdout
    assert "green_000.png" in result.stdout


def test_a_missing_bucket_is_one_line(s3_environment: CountingS3Server) -> None:
    for command in (["inspect-dataset", "s3://no-such-bucket/dataset"], ["train", "s3://no-such-bucket/x"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, result.output
        assert error_lines(result.output) == [
            f"Error: Bucket not found: s3://no-such-bucket (endpoint {s3_environment.endpoint}), "
            f"reading {command[1]}"
        ]
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["inspect-dataset", f"s3://{BUCKET}/no-such-prefix"])
    assert result.exit_code == 1
    assert error_lines(result.output) == [f"Error: Dataset folder not found: s3://{BUCKET}/no-such-prefix"]


def test_refused_credentials_are_one_line(s3_environment: CountingS3Server) -> None:
    s3_environment.require_credentials(True)
    try:
        result = runner.invoke(app, ["inspect-dataset", DATASET])
    finally:
        s3_environment.require_credentials(False)
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert line.startswith(f"Error: Access to {DATASET} was refused: ")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.output
    assert "Traceback" not in result.output


def test_credentials_refused_during_training_are_one_line(
    s3_environment: CountingS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses once the scan is done: the images are read in tf.data's threads."""
    original = TrainingView.on_training_start

    def on_training_start(view: TrainingView, event: Any) -> None:
        s3_environment.require_credentials(True)
        original(view, event)

    monkeypatch.setattr(TrainingView, "on_training_start", on_training_start)
    try:
        result = runner.invoke(app, ["train", DATASET, "--runs-dir", str(tmp_path), *TINY_TRAINING])
    finally:
        s3_environment.require_credentials(False)
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert line.startswith(f"Error: Access to {DATASET}/") and " was refused: " in line
    assert "imgclf train --resume latest" in result.output
    assert "Traceback" not in result.output


def test_an_unreachable_endpoint_is_one_line_and_quick(
    s3_environment: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    filesystems.forget_filesystems()
    started = time.perf_counter()
    result = runner.invoke(app, ["inspect-dataset", DATASET])
    assert time.perf_counter() - started < 20
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert line.startswith(f"Error: Cannot reach S3 at {closed} to read {DATASET}")
    assert f"AWS_ENDPOINT_URL={closed}" in result.output


FAKE_S3FS = "raise ImportError('No module named s3fs')\n"


def test_a_missing_extra_is_one_line(tmp_path: Path) -> None:
    """Without s3fs, a URL asks for the extra (in a new process, where s3fs cannot be imported)."""
    (tmp_path / "s3fs").mkdir()
    (tmp_path / "s3fs" / "__init__.py").write_text(FAKE_S3FS)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    completed = subprocess.run(
        [sys.executable, "-m", "imgclf_cli", "inspect-dataset", DATASET],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert completed.returncode == 1, completed.stderr
    assert error_lines(completed.stderr) == [
        f"Error: Reading {DATASET} needs the s3fs package, which is not installed"
    ]
    assert 'pip install "imgclf[s3]"' in completed.stderr
    assert "Traceback" not in completed.stderr
