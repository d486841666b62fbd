"""The framing core is sans-IO: ``udskit.proto`` and every udskit module it imports (however
indirectly) import no I/O module. Checked statically, from the source, so that an import
hidden in a function body counts too.

Only explicit imports are followed: importing ``udskit.proto`` at run time also runs
``udskit/__init__.py`` (Python always initialises parent packages), which is the public
facade and is I/O by design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit

FORBIDDEN = frozenset({"socket", "asyncio", "selectors", "select"})

SRC = Path(udskit.__file__).parent


def module_file(root: Path, name: str) -> Path | None:
    """The source file of ``name`` (a dotted module under ``root``'s package), if any."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(root: Path, name: str, path: Path) -> Iterator[str]:
    """Absolute names of every module ``path`` imports (``from x import y`` yields x, and x.y
    where that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            yield base
            for alias in node.names:
                if module_file(root, f"{base}.{alias.name}") is not None:
                    yield f"{base}.{alias.name}"


def io_imports(root: Path, top: str) -> dict[str, set[str]]:
    """For every module reachable from package ``top`` (within the root package): the
    forbidden modules it imports."""
    root_name = root.name
    start = module_file(root, top)
    assert start is not None, top
    todo = [(top, start)] + [
        (f"{top}.{p.stem}", p) for p in sorted(start.parent.glob("*.py")) if p != start
    ]
    seen: dict[str, set[str]] = {}
    while todo:
        name, path = todo.pop()
        if name in seen:
            continue
        seen[name] = set()
        for imported in imports_of(root, name, path):
            if imported.split(".")[0] in FORBIDDEN:
                seen[name].add(imported)
            elif imported.split(".")[0] == root_name and imported != root_name:
                found = module_file(root, imported)
                if found is not None:
                    todo.append((imported, found))
    return seen


def test_proto_and_what_it_imports_do_no_io() -> None:
    found = io_imports(SRC, "udskit.proto")
    assert "udskit.proto.framing" in found
    assert "udskit.errors" in found  # the walk does follow imports out of proto/
    offenders = {name: sorted(mods) for name, mods in found.items() if mods}
    assert not offenders, f"sans-IO modules import I/O modules: {offenders}"


# -- the checker itself finds what it must --------------------------------------------------
@pytest.mark.parametrize(
    "line",
    [
        "import socket",
        "import select as _select",
        "from asyncio import get_event_loop",
        "import selectors",
        "def later():\n    import asyncio.streams",
    ],
)
def test_checker_finds_an_io_import_two_modules_away(tmp_path: Path, line: str) -> None:
    root = tmp_path / "pkg"
    (root / "proto").mkdir(parents=True)
    (root / "__init__.py").write_text("import socket\n")  # the facade is not followed
    (root / "proto" / "__init__.py").write_text("from .framing import X\n")
    (root / "proto" / "framing.py").write_text("from ..helpers import util\nX = 1\n")
    (root / "helpers").mkdir()
    (root / "helpers" / "__init__.py").write_text("")
    (root / "helpers" / "util.py").write_text(f"import os\n{line}\n")
    found = io_imports(root, "pkg.proto")
    assert found["pkg.helpers.util"]
    assert not found["pkg.proto.framing"]
    assert "pkg" not in found


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "proto").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "proto" / "__init__.py").write_text("import struct\nfrom . import framing\n")
    (root / "proto" / "framing.py").write_text("from collections import deque\n")
    assert not any(io_imports(root, "pkg.proto").values())
