"""The code's layout keeps the promises of docs/architecture.md that
import-linter does not check: every package says what it owns, and no module
reaches into another package's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import whisperd

PACKAGE_ROOT = Path(whisperd.__file__).parent
PACKAGES = sorted(p.parent for p in PACKAGE_ROOT.glob("*/__init__.py"))


def _package_of(module: str) -> str:
    """The subpackage `module` belongs to ("" for a top-level module)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE_ROOT / parts[1]).is_dir()):
        return parts[1]
    return ""


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_package_says_what_it_owns_and_may_import(package: Path) -> None:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc, f"{package.name}/__init__.py has no docstring"
    assert "import" in doc, f"{package.name}/__init__.py does not say what it may import"


def test_the_packages_are_the_rooms_of_the_map() -> None:
    names = {p.name for p in PACKAGES}
    assert names == {
        "cli", "daemon", "devices", "engines", "files", "hooks", "intake", "media",
        "metrics", "models", "store", "watch", "workers",
    }  # fmt: skip
    documented = (PACKAGE_ROOT.parent / "docs" / "architecture.md").read_text()
    assert [n for n in sorted(names) if f"`{n}/`" not in documented] == []


def test_no_module_imports_a_private_name_of_another_package() -> None:
    found = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        own = _package_of(_module_name(path))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("whisperd")):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and _package_of(node.module) != own:
                found.append(f"{_module_name(path)}: from {node.module} import {', '.join(private)}")
    assert found == []
