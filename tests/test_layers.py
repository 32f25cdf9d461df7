"""The package layers of docs/architecture.md hold: each package imports only the layers below it (function-level
imports included), and Dagster stays in the orchestration layer."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"store", "sae", "pipeline", "trainer", "world", "eval", "assets", "experiment", "bench"}
ALLOWED = {
    "store": set(),
    "sae": {"store"},
    "pipeline": {"store", "sae"},
    "trainer": {"store"},
    "world": {"store", "sae", "pipeline", "trainer", "eval"},
    "eval": {"store", "trainer", "world"},
    "assets": {"store", "sae", "pipeline", "world"},
    "experiment": {"store", "sae", "pipeline", "trainer", "world", "eval", "assets"},
}
DAGSTER_FREE = ("store", "sae", "pipeline", "trainer", "world", "eval")


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_layers_below(package):
    wrong = {f"{p.relative_to(ROOT)} imports {', '.join(sorted(bad))}"
             for p in sorted((ROOT / package).rglob("*.py"))
             if (bad := (imports_of(p) & PROJECT) - ALLOWED[package] - {package})}
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package]) or 'nothing of ours'}: {sorted(wrong)}"


@pytest.mark.parametrize("package", DAGSTER_FREE)
def test_no_dagster_below_the_orchestration_layer(package):
    users = [str(p.relative_to(ROOT)) for p in sorted((ROOT / package).rglob("*.py"))
             if {"dagster", "dagster_polars"} & imports_of(p)]
    assert not users, f"Dagster is wired only in assets/ (and the experiment); found in {users}"


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from world.base_model import train_base_model\n")
    assert "world" in imports_of(module)
