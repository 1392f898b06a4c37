"""docs/architecture.md's module table matches the code: every module of lbq has its row, and
no module imports from a row below its own (lazy imports inside functions included). The
README's Architecture section links that page."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lbq"


def table_rows() -> list[list[str]]:
    """The backticked paths of each row of docs/architecture.md's module table, top to bottom."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `lbq/"):
            first_cell = line.split("|")[1]
            rows.append(re.findall(r"`(lbq/[^`]*)`", first_cell))
    return rows


def row_of(path: str, rows: list[list[str]]) -> int | None:
    """The row holding ``path`` (a file, or a file under a listed folder); a package's
    ``__init__.py`` takes the first row that lists something inside the package."""
    for index, entries in enumerate(rows):
        for entry in entries:
            if path == entry or (entry.endswith("/") and path.startswith(entry)):
                return index
    if path.endswith("/__init__.py"):
        folder = path[: -len("__init__.py")]
        inside = [i for i, entries in enumerate(rows) for e in entries if e.startswith(folder)]
        return min(inside) if inside else None
    return None


def module_file(dotted: str) -> str | None:
    """``lbq.x.y`` as a path relative to the repository, or None outside lbq."""
    parts = dotted.split(".")
    if parts[0] != "lbq":
        return None
    base = REPO.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(REPO).as_posix()
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(REPO).as_posix()
    return None


def imported_files(tree: ast.AST) -> set[str]:
    """The lbq files a module imports, anywhere in it."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from lbq import data`` names a submodule; ``from lbq.x import f`` a name in x.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if module_file(n) else node.module for n in names]
        found.update(f for f in map(module_file, names) if f and f != "lbq/__init__.py")
    return found


def test_every_module_has_a_row_and_imports_only_from_rows_above_it():
    rows = table_rows()
    assert len(rows) > 10
    missing, backwards = [], []
    for file in sorted(PACKAGE.rglob("*.py")):
        path = file.relative_to(REPO).as_posix()
        if path == "lbq/__init__.py":
            continue
        own = row_of(path, rows)
        if own is None:
            missing.append(path)
            continue
        for target in imported_files(ast.parse(file.read_text())):
            target_row = row_of(target, rows)
            if target_row is None or target_row > own:
                backwards.append(f"{path} imports {target}")
    assert not missing, f"modules without a row in docs/architecture.md's table: {missing}"
    assert not backwards, f"imports from a row below (or from no row): {backwards}"


def test_readme_architecture_section_links_the_module_table():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/architecture.md)" in section
