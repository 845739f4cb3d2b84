"""The package's layout is its layering: each folder imports only what its ``__init__`` allows.

Read from the source (every ``import`` and ``from ... import``, function-level ones included), so a
lazy import inside a function cannot slip past the rule.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "airflow_provider_cxpg"
LEAVES = {"exceptions", "conninfo", "querylog", "bounded", "durations", "get_provider_info", "embedded_postgres"}

#: For each part of the package, the parts it must never import.
FORBIDDEN = {
    "worker": {"planning", "run", "supervisor", "output", "hooks", "operators", "demo", "querylog", "durations"},
    "planning": {"run", "supervisor", "output", "hooks", "operators", "demo"},
    "output": {"planning", "run", "supervisor", "hooks", "operators", "demo"},
    "supervisor": {"planning", "run", "output", "hooks", "operators", "demo"},
    "run": {"hooks", "operators", "demo"},
    "hooks": {"operators", "demo"},
    "operators": {"demo"},
}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "airflow_provider_cxpg" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "example_dags" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_what_its_part_forbids(path: Path) -> None:
    part = _part(path)
    imported = _imported_parts(path) - {part}
    if part in LEAVES and part != "embedded_postgres":
        assert imported <= LEAVES, f"{path.name} is a shared leaf but imports {sorted(imported - LEAVES)}"
    bad = imported & FORBIDDEN.get(part, set())
    assert not bad, f"{path.relative_to(PACKAGE)} ({part}/) imports {sorted(bad)}"


def test_every_folder_says_what_lives_there() -> None:
    for folder in ("planning", "run", "supervisor", "worker", "output", "demo"):
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"{folder}/__init__.py needs a docstring"


def test_a_damaged_worker_module_would_be_caught(tmp_path: Path) -> None:
    """The rule itself can fail: a worker module importing a parent module is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from airflow_provider_cxpg.run.extraction import Extraction\n")
    assert _imported_parts(bad) & FORBIDDEN["worker"] == {"run"}


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("airflow_provider_cxpg.hooks.connectorx", "ConnectorXPostgresHook"),
        ("airflow_provider_cxpg.operators.extract", "PostgresExtractOperator"),
        ("airflow_provider_cxpg.operators.partition", "PostgresPartitionPlanOperator"),
        ("airflow_provider_cxpg.operators.partition", "PostgresPartitionValidateOperator"),
        ("airflow_provider_cxpg.exceptions", "CxpgError"),
        ("airflow_provider_cxpg.embedded_postgres", "EmbeddedPostgres"),
        ("airflow_provider_cxpg.demo", "main"),
        ("airflow_provider_cxpg.worker.server", "main"),
    ],
)
def test_public_import_paths_keep_working(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)
