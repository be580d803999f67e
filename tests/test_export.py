"""imgclf export: every format and quantization mode of the tiny trained run, verified against
the Keras model; the SavedModel's signatures, ONNX with onnxruntime, and prediction from
``.tflite``/``.onnx`` with TensorFlow made unimportable."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgclf_cli import store
from imgclf_cli.cli.app import app
from imgclf_cli.images import load_image

ARTIFACT_KEYS = {
    "format",
    "quantize",
    "quantization",
    "path",
    "size_bytes",
    "agreement",
    "max_abs_diff",
    "accuracy",
    "accuracy_delta",
    "latency_ms",
    "passed",
    "threshold",
}
EVERY_ARTIFACT = {
    ("saved_model", "none"),
    ("onnx", "none"),
    ("tflite", "none"),
    ("tflite", "dynamic"),
    ("tflite", "float16"),
    ("tflite", "int8"),
}

# Inserted at the front of sys.meta_path in a fresh interpreter: importing TensorFlow or Keras
# (directly or through any module) raises ImportError.
BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class BlockTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "keras", "tf_keras", "tensorflow_core"):
                raise ImportError(f"{name} is blocked: this code path must not import TensorFlow")
            return None

    sys.meta_path.insert(0, BlockTensorFlow())
    """
)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["export", *args])


def image_size(run_dir: Path) -> tuple[int, int]:
    height, width = store.read_meta(run_dir)["image_size"]
    return (height, width)


def validation_images(run_dir: Path, limit: int = 8) -> tuple[list[str], np.ndarray]:
    manifest = store.read_manifest(run_dir)
    paths = [sample.path for sample in manifest.val[:limit]]
    return paths, np.stack([load_image(path, image_size(run_dir)) for path in paths])


def keras_probabilities(run_dir: Path, images: np.ndarray) -> np.ndarray:
    from imgclf_cli.inference import load_predictor

    return load_predictor(run=str(run_dir)).predict_batch(images)


@pytest.fixture(scope="module")
def exported(trained_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`imgclf export --all` once for the module; tests read the artifacts, never rewrite them."""
    output = tmp_path_factory.mktemp("export")
    result = invoke("--run", str(trained_run["run_dir"]), "--all", "--output", str(output), "--json")
    assert result.exit_code == 0, result.output
    return {
        "output": output,
        "document": json.loads(result.stdout),
        "stderr": result.stderr,
        "run_dir": trained_run["run_dir"],
    }


def test_export_all_writes_every_format_and_mode_with_verification_numbers(exported: dict[str, Any]) -> None:
    from imgclf_cli.export_verification import SERVING_BYTES_THRESHOLD, THRESHOLDS

    document = exported["document"]
    assert set(document) == {"passed", "verified", "artifacts", "serving_check"}
    assert document["passed"] is True and document["verified"] is True
    assert document["serving_check"]["passed"] is True
    assert document["serving_check"]["threshold"] == asdict(SERVING_BYTES_THRESHOLD)
    artifacts = document["artifacts"]
    assert {(artifact["format"], artifact["quantize"]) for artifact in artifacts} == EVERY_ARTIFACT
    assert len(artifacts) == len(EVERY_ARTIFACT)
    for artifact in artifacts:
        assert set(artifact) == ARTIFACT_KEYS
        assert Path(artifact["path"]).exists()
        assert artifact["size_bytes"] > 1000
        # Fractions, not percents; the tiny model is confident on its solid colours.
        assert 0.995 <= artifact["agreement"] <= 1.0, artifact
        assert 0.0 <= artifact["accuracy"] <= 1.0
        assert abs(artifact["accuracy_delta"]) <= 0.02
        assert 0.0 <= artifact["max_abs_diff"] < 0.1
        assert artifact["latency_ms"] > 0
        assert artifact["passed"] is True
        assert artifact["threshold"] == asdict(THRESHOLDS[artifact["quantize"]])
        if artifact["quantize"] == "none":
            assert artifact["quantization"] == "float32"
            assert artifact["max_abs_diff"] < 1e-3, artifact
        else:
            assert artifact["quantization"] == artifact["quantize"]
    sizes = {
        artifact["quantize"]: artifact["size_bytes"]
        for artifact in artifacts
        if artifact["format"] == "tflite"
    }
    assert (
        sizes["int8"] < sizes["none"]
        and sizes["dynamic"] < sizes["none"]
        and sizes["float16"] < sizes["none"]
    )

    output = exported["output"]
    assert (output / "labels.txt").read_text().split() == ["blue", "green", "red"]
    record = json.loads((output / "export.json").read_text())
    assert record["verified"] is True and record["problems"] == {}
    assert record["serving_check"]["agreement"] >= 0.95


def test_tflite_files_carry_labels_and_input_size(exported: dict[str, Any]) -> None:
    from imgclf_cli.inference import read_tflite_metadata

    for path in sorted(exported["output"].glob("*.tflite")):
        metadata = read_tflite_metadata(path.read_bytes())
        assert metadata["labels"] == ["blue", "green", "red"], path
        assert metadata["image_size"] == list(image_size(exported["run_dir"]))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_saved_model_has_tf_serving_layout_and_both_signatures(exported: dict[str, Any]) -> None:
    import tensorflow as tf

    version_dir = exported["output"] / "saved_model" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "assets" / "labels.txt").read_text().split() == ["blue", "green", "red"]
    loaded = tf.saved_model.load(str(version_dir))
    assert {"serving_default", "serving_images"} <= set(loaded.signatures)

    paths, images = validation_images(exported["run_dir"])
    expected = keras_probabilities(exported["run_dir"], images)

    from_bytes = loaded.signatures["serving_default"](
        image_bytes=tf.constant([png_bytes(image) for image in images])
    )
    probabilities = from_bytes["probabilities"].numpy()
    assert probabilities.shape == (len(images), 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The PNGs hold pixels already at the model size: decoding adds no resampling difference.
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    predicted = [name.decode() for name in from_bytes["predicted_class"].numpy()]
    assert predicted == [["blue", "green", "red"][index] for index in expected.argmax(axis=1)]
    assert [name.decode() for name in from_bytes["classes"].numpy()[0]] == ["blue", "green", "red"]

    # The real files (48x40 PNGs) are decoded and resized inside the graph, as TF Serving gets them.
    from_files = loaded.signatures["serving_default"](
        image_bytes=tf.constant([Path(path).read_bytes() for path in paths])
    )
    assert (from_files["probabilities"].numpy().argmax(axis=1) == expected.argmax(axis=1)).all()

    from_floats = loaded.signatures["serving_images"](images=tf.constant(images.astype("float32")))
    np.testing.assert_allclose(from_floats["probabilities"].numpy(), expected, atol=1e-5)


def test_saved_model_decodes_large_jpegs_like_training(exported: dict[str, Any], tmp_path: Path) -> None:
    """JPEGs several times the model size take Pillow's reduced-scale path in load_image."""
    import tensorflow as tf

    from imgclf_cli.inference import load_predictor

    _, images = validation_images(exported["run_dir"], limit=3)
    height, width = image_size(exported["run_dir"])
    paths = []
    for index, image in enumerate(images):
        path = tmp_path / f"large_{index}.jpg"
        Image.fromarray(image).resize((width * 5, height * 5), Image.Resampling.BICUBIC).save(
            path, quality=92
        )
        paths.append(path)
    decoded = np.stack([load_image(path, (height, width)) for path in paths])
    expected = load_predictor(run=str(exported["run_dir"])).predict_batch(decoded)

    loaded = tf.saved_model.load(str(exported["output"] / "saved_model" / "1"))
    served = loaded.signatures["serving_default"](
        image_bytes=tf.constant([path.read_bytes() for path in paths])
    )
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=0.02)


def test_onnx_model_runs_with_onnxruntime(exported: dict[str, Any]) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(exported["output"] / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["imgclf"])
    assert metadata["labels"] == ["blue", "green", "red"]
    _, images = validation_images(exported["run_dir"])
    (probabilities,) = session.run(
        ["probabilities"], {session.get_inputs()[0].name: images.astype("float32")}
    )
    np.testing.assert_allclose(probabilities, keras_probabilities(exported["run_dir"], images), atol=1e-5)


def test_load_predictor_reads_every_exported_format(exported: dict[str, Any]) -> None:
    from imgclf_cli.inference import SavedModelPredictor, load_predictor

    _, images = validation_images(exported["run_dir"])
    expected = keras_probabilities(exported["run_dir"], images)
    # The SavedModel base folder resolves to its highest version, as TF Serving does.
    predictor = load_predictor(model=exported["output"] / "saved_model")
    assert isinstance(predictor, SavedModelPredictor)
    assert predictor.labels == ["blue", "green", "red"]
    assert predictor.image_size == image_size(exported["run_dir"])
    np.testing.assert_allclose(predictor.predict_batch(images), expected, atol=1e-5)


def run_without_tensorflow(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORFLOW + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_tflite_and_onnx_predict_without_tensorflow(exported: dict[str, Any], tmp_path: Path) -> None:
    output = exported["output"]
    paths, images = validation_images(exported["run_dir"])
    models = [
        output / name for name in ("model.tflite", "model_int8.tflite", "model_float16.tflite", "model.onnx")
    ]
    size = image_size(exported["run_dir"])
    code = f"""
    import json
    import numpy as np
    from imgclf_cli.images import load_image
    from imgclf_cli.inference import load_predictor

    images = np.stack([load_image(path, {size!r}) for path in {[str(path) for path in paths]!r}])
    results = {{}}
    for model in {[str(path) for path in models]!r}:
        predictor = load_predictor(model=model)
        results[model] = {{
            "labels": predictor.labels,
            "image_size": list(predictor.image_size),
            "probabilities": predictor.predict_batch(images).tolist(),
        }}
    assert not any(name.startswith(("tensorflow", "keras")) for name in sys.modules)
    print(json.dumps(results))
    """
    completed = run_without_tensorflow(code, tmp_path)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = keras_probabilities(exported["run_dir"], images)
    for model in models:
        result = results[str(model)]
        assert result["labels"] == ["blue", "green", "red"]
        assert result["image_size"] == list(image_size(exported["run_dir"]))
        probabilities = np.asarray(result["probabilities"])
        assert (probabilities.argmax(axis=1) == expected.argmax(axis=1)).all(), model
        np.testing.assert_allclose(probabilities, expected, atol=0.05)


def test_predict_command_runs_a_tflite_model_without_tensorflow(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    """`imgclf predict --model model.tflite` end to end, in a Python where TensorFlow cannot load."""
    paths, images = validation_images(exported["run_dir"], limit=3)
    model = str(exported["output"] / "model.tflite")
    code = f"""
    from imgclf_cli.cli.app import main

    sys.argv = ["imgclf", "predict", "--model", {model!r}, "--format", "json", *{paths!r}]
    try:
        main()
    finally:
        assert not any(name.startswith(("tensorflow", "keras")) for name in sys.modules)
    """
    completed = run_without_tensorflow(code, tmp_path)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)
    expected = keras_probabilities(exported["run_dir"], images).argmax(axis=1)
    assert [result["label"] for result in results] == [["blue", "green", "red"][index] for index in expected]


def test_int8_io_model_takes_and_returns_uint8(trained_run: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(
        "--run",
        str(trained_run["run_dir"]),
        "--quantize",
        "int8",
        "--int8-io",
        "--output",
        str(tmp_path),
        "--json",
    )
    assert result.exit_code == 0, result.output
    (artifact,) = json.loads(result.stdout)["artifacts"]
    assert (artifact["format"], artifact["quantize"]) == ("tflite", "int8")
    assert Path(artifact["path"]).name == "model_int8_uint8.tflite"
    assert artifact["accuracy_delta"] >= -0.02

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=artifact["path"])
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.uint8


def test_export_tflite_alone_writes_into_the_runs_export_folder(
    trained_run: dict[str, Path], tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    run_copy = runs / trained_run["run_dir"].name
    shutil.copytree(trained_run["run_dir"], run_copy, ignore=shutil.ignore_patterns("export"))
    result = CliRunner().invoke(app, ["export", "--tflite", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    assert (run_copy / "export" / "model.tflite").is_file()
    assert (run_copy / "export" / "labels.txt").is_file()
    assert "model.tflite" in result.stdout and "best.keras (ref)" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith(" model.tflite"))
    assert row.rstrip().endswith(" passed")
    assert "Threshold for float32 (model.tflite): agree ≥ 99.5%, max Δp ≤ 0.01." in result.stderr
    assert "Every artifact passed its check." in result.stderr
    # The legend explains only what the table shows: here no SavedModel, so no (bytes) row.
    assert "(bytes)" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("arguments", "file_name", "quantize"),
    [
        ([], "model.tflite", "none"),
        (["--quantize", "float32"], "model.tflite", "none"),
        (["--quantize", "int8"], "model_int8.tflite", "int8"),
    ],
)
def test_export_tflite_command_writes_and_verifies_the_tflite_model(
    trained_run: dict[str, Path], tmp_path: Path, arguments: list[str], file_name: str, quantize: str
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "export-tflite",
            "--run",
            str(trained_run["run_dir"]),
            *arguments,
            "--output",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    (artifact,) = json.loads(result.stdout)["artifacts"]
    assert (artifact["format"], artifact["quantize"]) == ("tflite", quantize)
    assert Path(artifact["path"]) == tmp_path / file_name and (tmp_path / file_name).is_file()
    assert artifact["agreement"] is not None and artifact["accuracy_delta"] >= -0.02
    assert json.loads((tmp_path / "export.json").read_text())["verified"] is True


def test_export_tflite_is_listed_and_documented() -> None:
    listing = CliRunner().invoke(app, ["--help"])
    assert listing.exit_code == 0
    assert "export-tflite" in listing.stdout
    usage = CliRunner().invoke(app, ["export-tflite", "--help"])
    assert usage.exit_code == 0
    assert "Export a trained run as TFLite" in usage.stdout
    assert "imgclf export-tflite --quantize int8" in usage.stdout
    assert "--quantize" in usage.stdout and "--saved-model" in usage.stdout


@pytest.mark.parametrize(
    ("file_name", "hint"),
    [
        ("best.keras", "its training did not complete an epoch"),
        ("split.json", "pass --no-verify to export without checking"),
    ],
)
def test_a_missing_run_file_is_one_error_naming_it(
    trained_run: dict[str, Path], tmp_path: Path, file_name: str, hint: str
) -> None:
    run_copy = tmp_path / trained_run["run_dir"].name
    shutil.copytree(trained_run["run_dir"], run_copy, ignore=shutil.ignore_patterns("export"))
    (run_copy / file_name).unlink()
    result = invoke("--tflite", "--run", str(run_copy), "--output", str(tmp_path / "export"))
    assert result.exit_code == 1, result.output
    assert f"Error: {run_copy.name} has no {file_name}" in result.stderr
    assert hint in result.stderr
    assert "Traceback" not in result.output


def test_artifact_missing_its_threshold_exits_1_naming_it(
    trained_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgclf_cli import export_verification

    # No float32 artifact can agree on more than 100% of images.
    monkeypatch.setitem(
        export_verification.THRESHOLDS, "none", export_verification.Threshold(min_agreement=1.01)
    )
    result = invoke("--run", str(trained_run["run_dir"]), "--onnx", "--output", str(tmp_path), "--json")
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)  # the report is still printed, on stdout
    (artifact,) = document["artifacts"]
    assert document["passed"] is False and artifact["passed"] is False
    assert artifact["threshold"]["min_agreement"] == 1.01
    assert artifact["agreement"] == 1.0
    assert (
        "Error: 1 exported artifact does not match the trained model: model.onnx (onnx float32)"
        in result.stderr
    )
    assert "needs 101.0%" in result.stderr
    assert (tmp_path / "model.onnx").is_file()
    assert json.loads((tmp_path / "export.json").read_text())["problems"]


def test_failed_row_says_so_with_its_threshold(
    trained_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without colours too: a status word per row, and the threshold each row was held to."""
    from imgclf_cli import export_verification

    monkeypatch.setitem(
        export_verification.THRESHOLDS, "float16", export_verification.Threshold(min_agreement=1.01)
    )
    run = str(trained_run["run_dir"])
    result = invoke("--run", run, "--onnx", "--quantize", "float16", "--output", str(tmp_path))
    assert result.exit_code == 1, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(" model")}
    assert rows["model.onnx"].rstrip().endswith(" passed")
    assert rows["model_float16.tflite"].rstrip().endswith(" FAILED")
    assert max(len(line) for line in result.stdout.splitlines()[2:]) <= 80
    assert "Threshold for float32 (model.onnx): agree ≥ 99.5%, max Δp ≤ 0.01." in result.stderr
    assert "Threshold for float16 (model_float16.tflite): agree ≥ 101.0%." in result.stderr
    assert "Every artifact passed" not in result.stderr
    assert "does not match the trained model: model_float16.tflite (tflite float16)" in result.stderr


def test_no_verify_reports_sizes_only(trained_run: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(
        "--run", str(trained_run["run_dir"]), "--onnx", "--no-verify", "--output", str(tmp_path), "--json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    (artifact,) = document["artifacts"]
    assert artifact["size_bytes"] > 0
    assert artifact["agreement"] is None and artifact["accuracy"] is None and artifact["latency_ms"] is None
    # Nothing was checked: neither passed nor failed.
    assert document["passed"] is None and document["verified"] is False
    assert artifact["passed"] is None and artifact["threshold"] is None

    table = invoke("--run", str(trained_run["run_dir"]), "--onnx", "--no-verify", "--output", str(tmp_path))
    assert table.exit_code == 0, table.output
    header = next(line for line in table.stdout.splitlines() if "artifact" in line)
    assert header.split() == ["artifact", "size"]  # no columns of dashes
    assert "Not verified (--no-verify): sizes only." in table.stderr
    assert "agree =" not in table.stderr and "Threshold" not in table.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "Nothing to export"),
        (["--tflite", "--int8-io"], "--int8-io applies to the int8 TFLite model only"),
        (["--quantize", "int4"], "Invalid value for '--quantize'"),
        # Both spellings of the unquantized mode parse (and then meet the --int8-io check).
        (["--quantize", "float32", "--int8-io"], "--int8-io applies to the int8 TFLite model only"),
        (["--quantize", "none", "--int8-io"], "--int8-io applies to the int8 TFLite model only"),
    ],
)
def test_usage_errors_exit_2(trained_run: dict[str, Path], arguments: list[str], message: str) -> None:
    result = invoke("--run", str(trained_run["run_dir"]), *arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    result = invoke("--tflite", "--runs-dir", str(tmp_path / "empty"))
    assert result.exit_code == 1
    assert "Error: No completed run" in result.stderr
