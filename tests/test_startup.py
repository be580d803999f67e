"""Start-up: ``--help`` imports nothing heavy, shows no ``<bool>``; mistakes are reported before
TensorFlow loads; TensorFlow and LiteRT stay quiet.

The CLI runs in new processes here, through ``main()`` as the ``imgclf`` script does, because
what a process imports and what native code writes to its stderr cannot be seen in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf_cli import quiet_logs
from imgclf_cli.cli.app import app

from conftest import make_class_folders

HEAVY_MODULES = (
    "numpy",
    "PIL",
    "tensorflow",
    "keras",
    "sklearn",
    "matplotlib",
    "ai_edge_litert",
    "onnxruntime",
    # Typer validates option values with pydantic (70 ms or more to import); --help needs none.
    "pydantic",
)
# Runs `imgclf ARGS...` through main() and prints, last, the heavy top-level modules it loaded.
RUN_IMGCLF = """
import sys
from imgclf_cli.cli.app import main
sys.argv = ["imgclf", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
print("heavy modules:", ",".join(heavy) or "none")
sys.exit(code)
""".replace("HEAVY", repr(HEAVY_MODULES))
# What TensorFlow and LiteRT print on stderr and imgclf must hold back: absl's log line
# format ("E0000 00:00:1795872463.778807 8108 cuda_platform.cc:52] ...") and the notices.
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.-]+:\d+\]", re.MULTILINE)
NOTICES = (
    "absl::InitializeLog",
    "oneDNN custom operations",
    "cuda drivers",
    "cuInit",
    "XNNPACK delegate",
    "This TensorFlow binary is optimized",
)

runner = CliRunner()


def child_environment(**changes: str) -> dict[str, str]:
    """This process's environment without the variables imgclf must set itself (conftest sets
    TF_CPP_MIN_LOG_LEVEL for the in-process tests), plus ``changes``."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("TF_CPP_MIN_LOG_LEVEL", quiet_logs.DEBUG_VARIABLE)
    }
    return {**environment, **changes}


def run_imgclf(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN_IMGCLF, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_environment(**environment),
    )


def assert_quiet(stderr: str) -> None:
    assert not ABSL_LINE.search(stderr), stderr
    assert not [notice for notice in NOTICES if notice in stderr], stderr


@pytest.mark.parametrize(
    "command", [None, *(info.name for info in app.registered_commands)], ids=lambda name: name or "imgclf"
)
def test_help_imports_no_heavy_module(command: str | None) -> None:
    args = [command, "--help"] if command else ["--help"]
    completed = run_imgclf(*args)
    assert completed.returncode == 0, completed.stderr
    assert "Usage:" in completed.stdout
    assert completed.stdout.splitlines()[-1] == "heavy modules: none"


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"]])
def test_flags_show_no_type_in_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout
    assert re.search(r"--help +Show this message and exit\.", result.stdout)
    if args == ["--help"]:
        assert re.search(r"--version +Show the version and exit\.", result.stdout)


def test_help_flag_is_eager_and_usage_errors_exit_2() -> None:
    """Our --help replaces Typer's: it still wins over missing arguments and bad values."""
    assert runner.invoke(app, ["predict", "--top-k", "0", "--help"]).exit_code == 0
    assert runner.invoke(app, ["predict"]).exit_code == 2
    assert runner.invoke(app, ["--version"]).stdout.startswith("imgclf ")


def write_to_stderr_in_filter(lines: list[str]) -> None:
    with quiet_logs.native_stderr_filtered():
        os.write(2, "".join(lines).encode())


def test_native_stderr_filter_drops_notices_only(capfd: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv(quiet_logs.DEBUG_VARIABLE, raising=False)
    notice = "I0000 00:00:1795872460.287814    8108 port.cc:153] oneDNN custom operations are on. ...\n"
    xnnpack = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
    real = "E0000 00:00:1795872463.778807    8108 op_kernel.cc:1] Something real went wrong\n"
    write_to_stderr_in_filter([notice, real, xnnpack, "plain text\n"])
    assert capfd.readouterr().err == real + "plain text\n"

    monkeypatch.setenv(quiet_logs.DEBUG_VARIABLE, "1")
    write_to_stderr_in_filter([notice, xnnpack])
    assert capfd.readouterr().err == notice + xnnpack


def test_install_sets_defaults_unless_user_or_debug() -> None:
    script = (
        "import os, sys\n"
        "from imgclf_cli import quiet_logs\n"
        "quiet_logs.install()\n"
        "hooked = any(type(entry).__name__ == '_FilteredTensorFlowImport' for entry in sys.meta_path)\n"
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), hooked)\n"
    )

    def run(**environment: str) -> str:
        completed = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=child_environment(**environment),
        )
        assert completed.returncode == 0, completed.stderr
        return completed.stdout.strip()

    assert run() == "2 True"
    assert run(TF_CPP_MIN_LOG_LEVEL="0") == "0 True"
    assert run(IMGCLF_DEBUG="1") == "None False"


# Every command's usual mistakes: (arguments, exit code, text of the one Error: line). Places
# in braces are filled in by ``mistake_places``.
MISTAKES = {
    "train-yaml-typo": (["train", "{data}", "--config", "{bad_yaml}"], 2, "Invalid YAML"),
    "train-yaml-key-typo": (["train", "{data}", "--config", "{typo_yaml}"], 2, "Did you mean train.epochs?"),
    "train-set-not-int": (["train", "{data}", "--set", "train.epochs=abc"], 2, "expects int"),
    "train-unknown-model": (["train", "{data}", "--model", "resnet5"], 2, "Unknown model 'resnet5'"),
    "train-bad-time": (["train", "{data}", "--time", "soon"], 2, "train.time_budget"),
    "train-missing-data-dir": (["train", "{missing}"], 1, "Dataset folder not found"),
    "train-no-class-folders": (["train", "{flat}"], 1, "No class folders"),
    "train-one-class": (["train", "{single}"], 1, "Only one class"),
    "evaluate-missing-data-dir": (["evaluate", "{missing}", "--run", "{run}"], 2, "does not exist"),
    "evaluate-no-class-folders": (["evaluate", "{flat}", "--run", "{run}"], 1, "No class folders"),
    "evaluate-unknown-run": (["evaluate", "--run", "no-such-run"], 1, "Run not found: 'no-such-run'"),
    "evaluate-no-completed-run": (["evaluate", "--runs-dir", "{missing}"], 1, "No completed run"),
    "predict-missing-path": (["predict", "{missing}", "--run", "{run}"], 1, "No image files found"),
    "predict-missing-model": (["predict", "{image}", "--model", "{missing}"], 2, "does not exist"),
    "predict-unsupported-model": (["predict", "{image}", "--model", "{notes}"], 1, "Unsupported model file"),
    "predict-unknown-run": (["predict", "{image}", "--run", "no-such-run"], 1, "Run not found"),
    "export-no-completed-run": (["export", "--tflite", "--runs-dir", "{missing}"], 1, "No completed run"),
    "export-bad-quantize": (["export", "--quantize", "int4"], 2, "'int4' is not one of"),
    "export-nothing-chosen": (["export", "--run", "{run}"], 2, "Nothing to export"),
    "export-int8-io-alone": (["export", "--tflite", "--int8-io"], 2, "--int8-io applies to the int8"),
    "export-tflite-no-completed-run": (["export-tflite", "--runs-dir", "{missing}"], 1, "No completed run"),
    "inspect-dataset-missing": (["inspect-dataset", "{missing}"], 1, "Dataset folder not found"),
    "inspect-dataset-no-class-folders": (["inspect-dataset", "{flat}"], 1, "No class folders"),
}
TENSORFLOW_IMPORTED = "tensorflow imported"
FAKE_TENSORFLOW = f"""
import sys
print({TENSORFLOW_IMPORTED!r}, file=sys.stderr)
raise ImportError({TENSORFLOW_IMPORTED!r})
"""


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment changes that make ``import tensorflow`` (or keras) fail loudly in a child."""
    fakes = tmp_path_factory.mktemp("no_tensorflow")
    for name in ("tensorflow", "keras"):
        (fakes / name).mkdir()
        (fakes / name / "__init__.py").write_text(FAKE_TENSORFLOW)
    path = [str(fakes), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


@pytest.fixture(scope="module")
def mistake_places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A dataset, folders that are not datasets, bad config files and a store with one run
    (whose best.keras is empty: no mistake below reaches loading it)."""
    base = tmp_path_factory.mktemp("mistakes")
    data = make_class_folders(base / "data", per_class=2)
    single = make_class_folders(base / "single", per_class=2, classes={"cats": (1, 2, 3)})
    flat = base / "flat"
    flat.mkdir()
    image = next(data.glob("red/*.png"))
    (flat / image.name).write_bytes(image.read_bytes())
    (base / "bad.yaml").write_text("train: [oops\n")
    (base / "typo.yaml").write_text("train:\n  epoch: 3\n")
    (base / "notes.txt").write_text("not a model\n")
    run = base / "runs" / "20240101-000000-imgclf-cnn"
    run.mkdir(parents=True)
    (run / "meta.json").write_text(json.dumps({"status": "completed"}))
    (run / "labels.json").write_text(json.dumps(["blue", "green", "red"]))
    (run / "best.keras").write_bytes(b"")
    places = {
        "data": data, "single": single, "flat": flat, "missing": base / "missing",
        "bad_yaml": base / "bad.yaml", "typo_yaml": base / "typo.yaml", "notes": base / "notes.txt",
        "image": image, "run": run, "runs": run.parent,
    }  # fmt: skip
    return {name: str(path) for name, path in places.items()}


@pytest.mark.parametrize(("args", "code", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_mistakes_are_reported_before_tensorflow_loads(
    args: list[str],
    code: int,
    message: str,
    without_tensorflow: dict[str, str],
    mistake_places: dict[str, str],
) -> None:
    """TensorFlow takes seconds to import: a mistake must not wait for it (nor need it)."""
    filled = [arg.format(**mistake_places) for arg in args]
    completed = run_imgclf(*filled, IMGCLF_RUNS_DIR=mistake_places["runs"], **without_tensorflow)
    assert TENSORFLOW_IMPORTED not in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr
    assert completed.returncode == code, completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], completed.stderr


def test_the_fake_tensorflow_fails_loudly(without_tensorflow: dict[str, str]) -> None:
    """The check above means something: with the fakes first on the path, importing fails."""
    completed = subprocess.run(
        [sys.executable, "-c", "import tensorflow"],
        capture_output=True,
        text=True,
        env=child_environment(**without_tensorflow),
    )
    assert completed.returncode == 1 and TENSORFLOW_IMPORTED in completed.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny CPU training and a .tflite export, each in a new process, with their stderr."""
    base = tmp_path_factory.mktemp("startup")
    data_dir = make_class_folders(base / "data", per_class=8)
    runs = str(base / "runs")
    training = run_imgclf(
        "train", str(data_dir), "--epochs", "1", "--image-size", "32", "--batch-size", "8",
        "--set", "model.width=8", "--runs-dir", runs, "--json",
    )  # fmt: skip
    assert training.returncode == 0, training.stderr
    run_dir = json.loads(training.stdout.rsplit("heavy modules:", 1)[0])["run_dir"]
    export = run_imgclf("export", "--tflite", "--run", run_dir, "--runs-dir", runs)
    assert export.returncode == 0, export.stderr
    (tflite,) = Path(run_dir).glob("export/*.tflite")
    return {
        "training": training,
        "export": export,
        "tflite": tflite,
        "image": next(data_dir.glob("red/*.png")),
    }


def test_training_and_export_stderr_hold_no_tensorflow_notices(trained: dict[str, object]) -> None:
    training = trained["training"]
    assert isinstance(training, subprocess.CompletedProcess)
    assert "1/1" in training.stderr  # the CLI's own epoch lines still come through
    assert_quiet(training.stderr)
    export = trained["export"]
    assert isinstance(export, subprocess.CompletedProcess)
    assert_quiet(export.stderr)


def test_tflite_prediction_is_quiet_and_imports_no_tensorflow(trained: dict[str, object]) -> None:
    completed = run_imgclf(
        "predict", str(trained["image"]), "--model", str(trained["tflite"]), "--format", "json"
    )
    assert completed.returncode == 0, completed.stderr
    assert_quiet(completed.stderr)
    assert "Predicted 1 of 1 images" in completed.stderr
    document, heavy = completed.stdout.rsplit("heavy modules:", 1)
    assert json.loads(document)[0]["label"] in ("blue", "green", "red")
    assert not {"tensorflow", "keras"} & set(heavy.strip().split(",")), heavy


def test_debug_variable_lets_everything_through(trained: dict[str, object]) -> None:
    completed = run_imgclf(
        "predict", str(trained["image"]), "--model", str(trained["tflite"]), IMGCLF_DEBUG="1"
    )
    assert completed.returncode == 0, completed.stderr
    assert "XNNPACK delegate" in completed.stderr
