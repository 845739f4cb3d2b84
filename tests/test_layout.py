"""The package's layout is its layering: each folder imports only what its ``__init__`` allows.

Read from the source (every ``import`` and ``from ... import``, function-level and relative ones
included), so a lazy import inside a function cannot slip past the rule.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "airflow_provider_cxpg"
LEAVES = frozenset(
    {
        "exceptions",
        "conninfo",
        "libpq_defaults",
        "control",
        "querylog",
        "bounded",
        "durations",
        "get_provider_info",
        "version_compat",
    }
)

#: Parts with an allow-list: the only first-party modules they may import (a part: every module
#: under it; ``worker.protocol``: that module only). Their ``__init__`` docstrings say the same.
ALLOWED: dict[str, frozenset[str]] = {
    "worker": frozenset({"worker", "exceptions", "conninfo", "bounded"}),
    "planning": frozenset({"planning", *LEAVES} - {"get_provider_info"}),
    "output": frozenset({"output", "worker.protocol", *LEAVES} - {"get_provider_info"}),
    "supervisor": frozenset({"supervisor", "worker.protocol", "worker.reaper", *LEAVES} - {"get_provider_info"}),
    **{leaf: LEAVES | {"__version__"} for leaf in LEAVES},
}
#: Parts with a deny-list: what they must never import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "run": frozenset({"hooks", "operators", "demo", "embedded_postgres"}),
    "hooks": frozenset({"operators", "demo", "embedded_postgres"}),
    "operators": frozenset({"demo", "embedded_postgres"}),
}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _first_party_imports(path: Path, source: str | None = None) -> set[str]:
    """Every first-party module ``path`` imports, as a dotted name below the package."""
    package = [PACKAGE.name, *path.relative_to(PACKAGE).parent.parts]
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # ``from airflow_provider_cxpg import run`` imports a module too
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            pieces = name.split(".")
            if pieces[0] == PACKAGE.name and len(pieces) > 1:
                found.add(".".join(pieces[1:]))
    return found


def _violations(path: Path, source: str | None = None) -> list[str]:
    """The imports of ``path`` (or of ``source`` as if it were that file) its part may not make."""
    part = _part(path)
    imported = {m for m in _first_party_imports(path, source) if m.split(".")[0] != part}
    if part in ALLOWED:
        allowed = ALLOWED[part]
        return sorted(m for m in imported if not any(m == e or m.startswith(e + ".") for e in allowed))
    forbidden = FORBIDDEN.get(part, frozenset())
    return sorted(m for m in imported if m.split(".")[0] in forbidden)


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "example_dags" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_what_its_part_may_not(path: Path) -> None:
    assert not _violations(path), f"{path.relative_to(PACKAGE)} imports {_violations(path)}"


def test_every_folder_says_what_lives_there_and_what_it_may_import() -> None:
    for folder in ("planning", "run", "supervisor", "worker", "output", "demo"):
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())) or ""
        assert len(doc) > 80, f"{folder}/__init__.py needs a docstring"
        if folder != "demo":
            assert "import" in doc, f"{folder}/__init__.py should say what it may import"


@pytest.mark.parametrize(
    ("where", "source", "caught"),
    [
        (
            "worker/chunk.py",
            "def f():\n    from airflow_provider_cxpg.run.extraction import Extraction\n",
            "run.extraction",
        ),
        ("worker/chunk.py", "from ..output import manifest\n", "output.manifest"),
        ("worker/chunk.py", "from airflow_provider_cxpg import supervisor\n", "supervisor"),
        ("output/manifest.py", "from airflow_provider_cxpg.worker.sinks import STORAGE\n", "worker.sinks"),
        ("planning/plan.py", "import airflow_provider_cxpg.embedded_postgres\n", "embedded_postgres"),
        ("conninfo.py", "from airflow_provider_cxpg.planning.sql import literal\n", "planning.sql"),
        ("run/extraction.py", "from airflow_provider_cxpg.operators import extract\n", "operators"),
    ],
)
def test_a_damaged_module_is_caught(where: str, source: str, caught: str) -> None:
    """The rules can fail: each form of a forbidden import is reported (judged as that file)."""
    assert caught in _violations(PACKAGE / where, source)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("airflow_provider_cxpg.hooks.connectorx", "ConnectorXPostgresHook"),
        ("airflow_provider_cxpg.operators.extract", "PostgresExtractOperator"),
        ("airflow_provider_cxpg.operators.partition", "PostgresPartitionPlanOperator"),
        ("airflow_provider_cxpg.operators.partition", "PostgresPartitionValidateOperator"),
        ("airflow_provider_cxpg.exceptions", "CxpgError"),
        ("airflow_provider_cxpg.supervisor", "WorkerSettings"),
        ("airflow_provider_cxpg.supervisor.settings", "WorkerSettings"),
        ("airflow_provider_cxpg.embedded_postgres", "EmbeddedPostgres"),
        ("airflow_provider_cxpg.embedded_postgres", "interrupt_on_termination"),
        ("airflow_provider_cxpg.demo", "main"),
        ("airflow_provider_cxpg.worker.server", "main"),
    ],
)
def test_public_import_paths_keep_working(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)
