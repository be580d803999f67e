"""``imgclf export`` and ``imgclf export-tflite``: parse options, call
``imgclf_cli.exporting.export_run``, render the report."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape

from imgclf_cli.cli.options import JsonOption, RunOption, RunsDirOption, flag
from imgclf_cli.console import err, format_cell, make_table, out, print_json, status_callback, warn
from imgclf_cli.errors import ExportVerificationError

if TYPE_CHECKING:
    from imgclf_cli.export_verification import ArtifactReport, Threshold
    from imgclf_cli.exporting import ExportReport


class Quantize(str, Enum):
    float32 = "float32"
    none = "none"  # the first spelling of float32, still accepted
    dynamic = "dynamic"
    float16 = "float16"
    int8 = "int8"


# The options of both commands, defined once.
QuantizeOption = Annotated[
    list[Quantize] | None,
    typer.Option(
        "--quantize",
        "-q",
        help="TFLite quantization, repeatable, implies --tflite: float32 (the default: not quantized; "
        "also spelled none), dynamic (int8 weights), float16 (float16 weights) or int8 (integer model "
        "calibrated on training images).",
        show_default=False,
        case_sensitive=False,
        metavar="MODE",
    ),
]
SavedModelOption = Annotated[
    bool, flag("--saved-model", help="Export a SavedModel for TF Serving (saved_model/1/).")
]
OnnxOption = Annotated[bool, flag("--onnx", help="Export an ONNX model (needs: pip install 'imgclf[onnx]').")]
AllFormatsOption = Annotated[
    bool, flag("--all", help="SavedModel, ONNX and TFLite in all four quantization modes.")
]
OutputOption = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Folder for the artifacts. Default: RUN/export/.",
        file_okay=False,
        metavar="DIR",
        show_default=False,
    ),
]
VerifyOption = Annotated[
    bool,
    flag("--verify/--no-verify", help="Compare every artifact with the Keras model on validation images."),
]
VerifyImagesOption = Annotated[
    int,
    typer.Option(
        "--verify-images", help="At most this many validation images for verification.", min=1, metavar="N"
    ),
]
CalibrationImagesOption = Annotated[
    int,
    typer.Option(
        "--calibration-images", help="Training images used to calibrate --quantize int8.", min=1, metavar="N"
    ),
]
Int8IoOption = Annotated[
    bool, flag("--int8-io", help="With --quantize int8: uint8 input and output instead of float32.")
]


def export_command(
    run: RunOption = "latest",
    tflite: Annotated[bool, flag("--tflite", help="Export a TFLite (LiteRT) model.")] = False,
    quantize: QuantizeOption = None,
    saved_model: SavedModelOption = False,
    onnx: OnnxOption = False,
    all_formats: AllFormatsOption = False,
    output: OutputOption = None,
    verify: VerifyOption = True,
    verify_images: VerifyImagesOption = 200,
    calibration_images: CalibrationImagesOption = 200,
    int8_io: Int8IoOption = False,
    runs_dir: RunsDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export a trained run as TFLite, SavedModel (TF Serving) and ONNX, and verify each artifact.

    Artifacts carry the model's preprocessing and labels; they are written
    to RUN/export/ unless --output. Each is compared with the Keras model
    on validation images (top-1 agreement, probability difference, accuracy,
    size, latency); the exit code is 1 when one misses its threshold.

    Example:

    \b
        imgclf export --tflite --quantize int8 --saved-model
    """
    from imgclf_cli.exporting import export_run

    formats = [
        name
        for name, chosen in (
            ("tflite", tflite),
            ("saved_model", saved_model),
            ("onnx", onnx),
            ("all", all_formats),
        )
        if chosen
    ]
    failure: ExportVerificationError | None = None
    with status_callback("Exporting", quiet=json_output) as on_progress:
        try:
            report = export_run(
                run,
                formats=formats,
                quantize=[mode.value for mode in quantize or []],
                output_dir=output,
                verify=verify,
                max_verify_images=verify_images,
                calibration_images=calibration_images,
                int8_io=int8_io,
                runs_dir=runs_dir,
                on_progress=on_progress,
                on_warning=lambda text: warn(escape(text)),
            )
        except ExportVerificationError as error:
            # The artifacts were written: show their numbers, then fail with the error's message.
            failure = error
            report = error.report  # type: ignore[assignment]
    render(report, json_output)
    if failure is not None:
        raise failure


def export_tflite_command(
    run: RunOption = "latest",
    quantize: QuantizeOption = None,
    saved_model: SavedModelOption = False,
    onnx: OnnxOption = False,
    all_formats: AllFormatsOption = False,
    output: OutputOption = None,
    verify: VerifyOption = True,
    verify_images: VerifyImagesOption = 200,
    calibration_images: CalibrationImagesOption = 200,
    int8_io: Int8IoOption = False,
    runs_dir: RunsDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export a trained run as TFLite (LiteRT) and verify it; the same as imgclf export --tflite.

    Writes model.tflite (float32), or one file per --quantize mode, with the
    labels and input size inside, and labels.txt, to RUN/export/ unless
    --output. Every option of imgclf export applies: --saved-model, --onnx or
    --all add those formats. Each artifact is compared with the Keras model on
    validation images; the exit code is 1 when one misses its threshold.

    Example:

    \b
        imgclf export-tflite --quantize int8
    """
    export_command(
        run=run,
        tflite=True,
        quantize=quantize,
        saved_model=saved_model,
        onnx=onnx,
        all_formats=all_formats,
        output=output,
        verify=verify,
        verify_images=verify_images,
        calibration_images=calibration_images,
        int8_io=int8_io,
        runs_dir=runs_dir,
        json_output=json_output,
    )


def render(report: ExportReport, json_output: bool) -> None:
    for message in report.warnings:
        warn(message)
    if json_output:
        print_json(report.to_dict())
        return
    out.print(report_table(report))
    for line in legend(report):
        err.print(line, highlight=False, markup=False)


VERIFICATION_COLUMNS = ["agree", "max Δp", "accuracy", "Δ acc", "ms/img"]


def report_table(report: ExportReport) -> Any:
    """One row per artifact with its status (passed, FAILED) and, when verified, its numbers;
    a failed row is also red. The thresholds are in the legend."""
    output = Path(report.output_dir)
    verified = report.verified
    columns = ["artifact", "size", *(VERIFICATION_COLUMNS + ["status"] if verified else [])]
    table = make_table(
        columns,
        [],
        title=f"Run {report.run_id} exported to {output}",
        numeric=["size", *VERIFICATION_COLUMNS],
    )
    # Borderless columns, one space of padding: the table fits an 80-column terminal.
    table.box = box.SIMPLE_HEAD
    table.pad_edge = False
    table.padding = (0, 1, 0, 0)
    if report.reference is not None:
        reference = report.reference
        cells = [
            f"{Path(reference.path).name} (ref)",
            human_size(reference.size_bytes),
            "-",
            "-",
            percent(reference.accuracy),
            "-",
            milliseconds(reference.latency_ms),
            "-",
        ]
        table.add_row(*cells, style="dim")
    for artifact in report.checks:
        cells = [artifact_label(artifact, output), human_size(artifact.size_bytes)]
        if verified:
            cells += [*verification_cells(artifact), status_cell(artifact)]
        table.add_row(*(format_cell(cell) for cell in cells), style=None if artifact.passed else "bold red")
    return table


def status_cell(artifact: ArtifactReport) -> str:
    """A word, so that the status survives a terminal without colours."""
    return "[green]passed[/green]" if artifact.passed else "FAILED"


def legend(report: ExportReport) -> list[str]:
    """What the rows and columns shown mean, and the threshold each row was held to."""
    if not report.verified:
        return ["Not verified (--no-verify): sizes only."]
    output = Path(report.output_dir)
    rows = "; (bytes) = serving_default on the encoded image files" if report.serving_check else ""
    lines = [
        f"Verified on {report.num_verify_images} validation image(s) against the Keras model (ref): "
        "agree = same top-1 class; max Δp = largest difference of a class probability; "
        f"Δ acc = accuracy change in points; ms/img = one image per call{rows}."
    ]
    held_to: dict[str, list[ArtifactReport]] = {}
    for artifact in report.checks:
        held_to.setdefault(threshold_kind(artifact), []).append(artifact)
    for kind, artifacts in held_to.items():
        threshold = artifacts[0].threshold
        names = ", ".join(artifact_label(artifact, output) for artifact in artifacts)
        lines.append(f"Threshold for {kind} ({names}): {describe_threshold(threshold)}.")
    if not report.failures:  # otherwise the error that follows says what failed, and why
        lines.append("Every artifact passed its check.")
    return lines


def threshold_kind(artifact: ArtifactReport) -> str:
    return "image bytes" if artifact.note else artifact.quantization


def describe_threshold(threshold: Threshold | None) -> str:
    """The limits in the table's own column names: ``agree ≥ 99.5%, max Δp ≤ 0.01``."""
    if threshold is None:
        return "not checked"
    limits = []
    if threshold.min_agreement is not None:
        limits.append(f"agree ≥ {threshold.min_agreement:.1%}")
    if threshold.max_abs_diff is not None:
        limits.append(f"max Δp ≤ {threshold.max_abs_diff:g}")
    if threshold.max_accuracy_drop is not None:
        limits.append(f"Δ acc ≥ {-threshold.max_accuracy_drop * 100:.1f}")
    return ", ".join(limits) or "no limit"


def artifact_label(artifact: ArtifactReport, output: Path) -> str:
    """The file name, relative to the export folder; the SavedModel bytes check is marked."""
    path = Path(artifact.path)
    name = path.relative_to(output).as_posix() if path.is_relative_to(output) else str(path)
    return f"{name} (bytes)" if artifact.note else name


def verification_cells(artifact: ArtifactReport) -> list[Any]:
    return [
        percent(artifact.agreement),
        None if artifact.max_abs_diff is None else f"{artifact.max_abs_diff:.4f}",
        percent(artifact.accuracy),
        None if artifact.accuracy_delta is None else f"{artifact.accuracy_delta * 100:+.1f}",
        milliseconds(artifact.latency_ms),
    ]


def percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


def milliseconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def human_size(size: int) -> str:
    if size < 1024 * 1024:
        return f"{size / 1024:.1f}K"
    return f"{size / 1024 / 1024:.1f}M"
