"""The public surface of ``udskit``: a snapshot of ``__all__``, and ``__init__`` only
re-exports (after trio's ``_tests/test_exports.py``).

Changing the public API is a decision: update the snapshot in the same commit, on purpose.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import udskit

PUBLIC_API = [
    "Address",
    "AddressError",
    "AddressInUse",
    "Channel",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "Datagram",
    "DatagramListener",
    "FrameTooLarge",
    "HandoverError",
    "Listener",
    "MessageServer",
    "PeerCred",
    "PeerRejected",
    "Policy",
    "ProtocolError",
    "Server",
    "SocketFileError",
    "Timeout",
    "UdsError",
    "Upgrader",
    "__version__",
    "connect",
    "listen",
    "pair",
    "serve",
    "serve_messages",
]


def test_public_api_snapshot() -> None:
    assert sorted(udskit.__all__) == PUBLIC_API
    assert len(set(udskit.__all__)) == len(udskit.__all__), "duplicates in __all__"


def test_every_public_name_resolves() -> None:
    for name in udskit.__all__:
        assert getattr(udskit, name, None) is not None, name


def test_star_import_gives_exactly_the_public_api() -> None:
    namespace: dict[str, object] = {}
    exec("from udskit import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC_API


def test_public_objects_come_from_udskit_modules() -> None:
    for name in udskit.__all__:
        value = getattr(udskit, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("udskit."), (name, value.__module__)
            # and are reachable where they are defined (no stale re-export)
            home = importlib.import_module(value.__module__)
            assert getattr(home, name) is value


def test_version_is_a_release_string() -> None:
    parts = udskit.__version__.split(".")
    assert len(parts) == 3
    assert all(part.isdigit() for part in parts)


def test_init_only_reexports() -> None:
    source = Path(udskit.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported: set[str] = set()
    for index, node in enumerate(tree.body):
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            assert isinstance(node.value.value, str)  # the module docstring
            continue
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1 or node.module == "__future__", ast.unparse(node)
            if node.module != "__future__":
                imported.update(alias.asname or alias.name for alias in node.names)
            continue
        if isinstance(node, ast.Import):
            continue
        assert isinstance(node, ast.Assign), (
            f"__init__.py does more than re-export: {ast.unparse(node)}"
        )
        targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        assert targets in (["__all__"], ["__version__"]), ast.unparse(node)
        assert isinstance(node.value, (ast.List, ast.Constant)), ast.unparse(node)
    # Everything imported is exported, and everything exported is imported (or __version__).
    assert imported == set(udskit.__all__) - {"__version__"}
