"""`imgclf runs show RUN --html FILE`: one self-contained page with every section, parsed back."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from imgclf_cli import store
from imgclf_cli.cli.app import app
from imgclf_cli.run_report import SECTIONS, write_html_report


class Page(HTMLParser):
    """The parts of a report the tests check: elements by id, images, links, text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.stack: list[str] = []
        self.rows_under: dict[str, int] = {}
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if "id" in found:
            self.ids.append(found["id"])
        if tag == "img":
            self.images.append(found)
        for name in ("src", "href"):
            if name in found and tag != "img":
                self.links.append(found[name])
        if tag in ("div", "section"):
            self.stack.append(found.get("class") or found.get("id") or "")
        if tag == "tr":
            for owner in self.stack:
                self.rows_under[owner] = self.rows_under.get(owner, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("div", "section") and self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def png_of(image: dict[str, str]) -> Image.Image:
    source = image["src"]
    assert source.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))


@pytest.fixture(scope="module")
def full_run(trained_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's run, evaluated and exported."""
    run_dir = tmp_path_factory.mktemp("report") / "runs" / trained_run["run_dir"].name
    shutil.copytree(trained_run["run_dir"], run_dir)
    runner = CliRunner()
    assert runner.invoke(app, ["evaluate", "--run", str(run_dir)]).exit_code == 0
    exported = runner.invoke(app, ["export", "--run", str(run_dir), "--tflite"])
    assert exported.exit_code == 0, exported.output
    return run_dir


def test_the_report_of_an_evaluated_exported_run_has_every_section(full_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "reports" / "report.html"
    result = CliRunner().invoke(app, ["runs", "show", str(full_run), "--html", str(output)])
    assert result.exit_code == 0, result.output
    text = output.read_text(encoding="utf-8")
    page = Page(text)
    assert [section for section in SECTIONS if section not in page.ids] == []
    assert "evaluation-val" in page.ids
    labels = store.read_labels(full_run)
    # The per-class table: a header row and one row per class.
    assert page.rows_under["per-class"] == 1 + len(labels)
    words = " ".join(page.text)
    for label in labels:
        assert label in words
    # Config differences: keys the run changed (TINY_TRAINING), with their defaults.
    assert "model.width" in words and "train.learning_rate" in words
    # Training curves, confusion matrix, misclassified gallery, reliability: real PNGs inside.
    alts = {image["alt"]: image for image in page.images}
    for alt in (
        "training curves",
        "Confusion matrix, val",
        "Misclassified images, val",
        "Reliability diagram, val",
    ):
        assert png_of(alts[alt]).format == "PNG", alt
    # The export verification table: one row per artifact, its file, what it was held to, its verdict.
    assert page.rows_under["exports"] == 1 + 1
    assert "model.tflite" in words and "≥ 99.5% agreement" in words and "passed" in words
    # Nothing is fetched from anywhere: no link or source outside the page, no CSS url().
    assert all(not image["src"].startswith(("http", "//")) for image in page.images)
    assert all(not link.startswith(("http", "//")) for link in page.links)
    assert "url(" not in text and "<script" not in text.lower()


def test_a_run_without_outputs_says_what_is_missing_and_escapes_its_text(
    trained_run: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "runs" / trained_run["run_dir"].name
    shutil.copytree(
        trained_run["run_dir"], run_dir, ignore=shutil.ignore_patterns(store.EVAL_DIR, store.EXPORT_DIR)
    )
    hostile = "images/<script>alert(1)</script>.png"
    store.update_meta(run_dir, skipped_files=[{"path": hostile, "reason": "cannot identify <b>image</b>"}])
    hostile_class = "<script>alert('class')</script>"
    rename_first_class(run_dir, hostile_class)
    output = tmp_path / "report.html"
    write_html_report(run_dir, output)
    text = output.read_text(encoding="utf-8")
    page = Page(text)
    assert [section for section in SECTIONS if section not in page.ids] == []
    words = " ".join(page.text)
    assert "No evaluation yet" in words and f"imgclf evaluate --run {run_dir.name}" in words
    assert "No export yet" in words
    assert "<script>" not in text and hostile in words  # shown as text, never as markup
    assert "cannot identify <b>image</b>" in words
    assert hostile_class in words  # the class, in the per-class split table
    assert page.rows_under["dataset"] >= 1 + len(store.read_labels(run_dir))


def rename_first_class(run_dir: Path, name: str) -> None:
    """Give the run's first class ``name`` wherever the run records it."""
    labels = store.read_labels(run_dir)
    store.write_labels(run_dir, [name, *labels[1:]])
    split = json.loads((run_dir / store.SPLIT_FILE).read_text(encoding="utf-8"))
    split["classes"] = [name, *split["classes"][1:]]
    store.atomic_write_json(run_dir / store.SPLIT_FILE, split)
    for metrics_file in (run_dir / store.EVAL_DIR).glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        metrics["per_class"] = {
            name if label == labels[0] else label: scores for label, scores in metrics["per_class"].items()
        }
        store.atomic_write_json(metrics_file, metrics)


def test_a_class_name_with_markup_is_text_in_every_table(full_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / full_run.name
    shutil.copytree(full_run, run_dir)
    hostile_class = '<script>alert("x")</script><img src="https://example.com/x.png">'
    rename_first_class(run_dir, hostile_class)
    output = tmp_path / "report.html"
    write_html_report(run_dir, output)
    text = output.read_text(encoding="utf-8")
    page = Page(text)
    assert "<script" not in text.lower()
    assert all(image["src"].startswith("data:image/png;base64,") for image in page.images)
    # Shown once in the split table and once in the evaluation's per-class table.
    assert sum(piece.count(hostile_class) for piece in page.text) == 2
    assert page.rows_under["per-class"] == 1 + len(store.read_labels(run_dir))


def test_a_folder_as_output_is_one_clear_error(trained_run: dict[str, Path], tmp_path: Path) -> None:
    from imgclf_cli.errors import ImgclfError

    result = CliRunner().invoke(app, ["runs", "show", str(trained_run["run_dir"]), "--html", str(tmp_path)])
    assert result.exit_code == 2  # a usage error, caught by the option itself
    assert "is a directory" in result.output and "Traceback" not in result.output
    with pytest.raises(ImgclfError, match="is a folder"):
        write_html_report(trained_run["run_dir"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_path_through_a_file_is_one_clear_error(trained_run: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    output = tmp_path / "notes.txt" / "reports" / "report.html"
    result = CliRunner().invoke(app, ["runs", "show", str(trained_run["run_dir"]), "--html", str(output)])
    assert result.exit_code == 1
    assert "notes.txt is a file, not a folder" in result.output and "Hint:" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
