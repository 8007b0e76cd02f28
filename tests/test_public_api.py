"""The public API: exports, typing marker and the direction of imports."""

from __future__ import annotations

import ast
from pathlib import Path

import replistate

PACKAGE = Path(replistate.__file__).parent


def test_all_is_sorted_and_importable() -> None:
    assert replistate.__all__ == sorted(replistate.__all__)
    for name in replistate.__all__:
        assert getattr(replistate, name) is not None


def test_py_typed_is_shipped() -> None:
    assert (PACKAGE / "py.typed").is_file()


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pure_modules_import_no_io() -> None:
    """models, codec and subjects stay free of asyncio, nats and psycopg."""
    for module in ("models.py", "codec.py", "subjects.py"):
        roots = {name.split(".")[0] for name in imported_modules(PACKAGE / module)}
        assert roots.isdisjoint({"asyncio", "nats", "psycopg", "psycopg_pool"}), module


def test_core_does_not_import_integrations() -> None:
    """Imports point one way: the core never imports an integration or the CLI."""
    core = ["models.py", "codec.py", "subjects.py", "errors.py", "opcache.py"]
    core += ["service.py", "replica.py", "bus/base.py", "bus/memory.py"]
    core += ["invalidation.py", "runner.py", "resync.py", "housekeeping.py"]
    core += ["bus/nats.py", "store/base.py", "store/memory.py", "store/postgres.py"]
    for module in core:
        imported = imported_modules(PACKAGE / module)
        assert not any(
            name.startswith(("replistate.integrations", "replistate.cli"))
            for name in imported
        ), module
