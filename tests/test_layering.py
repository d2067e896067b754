"""The layers hold: data/ and model/ import neither mlflow nor click, nothing in ecg_mlflow
imports analysis, analysis reads runs through ecg_mlflow.tracking and schema only, and the
served model's shipped modules import nothing outside what is shipped.

Read from the source (every import statement, deferred ones inside functions included), so a
lazy import cannot slip past the way it would past a check of sys.modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from ecg_mlflow.serving.packaging import SERVED_MODULES

PACKAGE = PROJECT_ROOT / "ecg_mlflow"
ANALYSIS = PROJECT_ROOT / "analysis"
ANALYSIS_MAY_IMPORT = ("ecg_mlflow.tracking", "ecg_mlflow.schema", "ecg_mlflow.parsing")


def imported_modules(path: Path, root: Path = PROJECT_ROOT) -> set[str]:
    """Absolute module names of every import in a file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("layer", ["data", "synth", "model"])
def test_data_and_model_import_neither_mlflow_nor_click(layer):
    offending = {
        f"{path.relative_to(PROJECT_ROOT)}: {name}"
        for path in sources(PACKAGE / layer)
        for name in imported_modules(path)
        if under(name, "mlflow") or under(name, "click") or under(name, "ecg_mlflow.tracking")
        or under(name, "ecg_mlflow.commands")
    }
    assert not offending


def test_nothing_in_ecg_mlflow_imports_analysis():
    offending = {f"{p.relative_to(PROJECT_ROOT)}: {n}" for p in sources(PACKAGE)
                 for n in imported_modules(p) if under(n, "analysis")}
    assert not offending


def test_analysis_reads_runs_through_the_tracking_layer_and_schema_only():
    offending = {
        f"{p.relative_to(PROJECT_ROOT)}: {n}"
        for p in sources(ANALYSIS) for n in imported_modules(p)
        if under(n, "ecg_mlflow") and n != "ecg_mlflow" and not any(under(n, a) for a in ANALYSIS_MAY_IMPORT)
    }
    assert not offending


def test_the_served_modules_import_only_each_other():
    shipped = {"ecg_mlflow." + m.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
               for m in SERVED_MODULES} | {"ecg_mlflow"}
    offending = {
        f"{module}: {name}"
        for module in SERVED_MODULES
        for name in imported_modules(PACKAGE / module)
        if under(name, "ecg_mlflow") and name not in shipped
        and name.rpartition(".")[0] not in shipped - {"ecg_mlflow"}  # `from pkg import Name`
    }
    assert not offending


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    """Imports inside functions and relative ones are read too: a breach there would be found."""
    probe = tmp_path / "ecg_mlflow" / "data" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    import mlflow\n    from ..tracking import runs\n    from analysis import gather\n")
    assert {"mlflow", "ecg_mlflow.tracking.runs", "analysis.gather"} <= imported_modules(probe, tmp_path)
