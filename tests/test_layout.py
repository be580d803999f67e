"""The package's structure rules: a quiet library, and modules that fit in a head."""

from __future__ import annotations

import ast
from pathlib import Path

import imgclf_cli

PACKAGE = Path(imgclf_cli.__file__).parent
# Only the command-line layer draws: it owns the terminal (Rich) and the argument parsing (Typer).
DRAWING_MODULES = ("rich", "typer")
MAX_MODULE_LINES = 600


def library_modules() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "cli" not in path.relative_to(PACKAGE).parts[:-1] and path.name != "console.py"
    ]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_library_never_draws() -> None:
    offenders = {
        path.relative_to(PACKAGE).as_posix(): sorted(
            name for name in imported_modules(path) if name.split(".")[0] in DRAWING_MODULES
        )
        for path in library_modules()
    }
    assert library_modules(), "no library module found"
    assert {module: names for module, names in offenders.items() if names} == {}


def test_no_module_outgrows_easy_reading() -> None:
    sizes = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}
