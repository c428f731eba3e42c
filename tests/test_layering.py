"""DESIGN.md's import direction: poison ← trainers ← sweeps; only sweeps knows ray/optuna/mlflow."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "poison": {"trainers", "sweeps", "ray", "optuna", "mlflow", "torch", "open_clip"},
    "trainers": {"sweeps", "ray", "optuna", "mlflow"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {f"{f.relative_to(ROOT)} imports {m}" for f in files for m in imported_roots(f) & FORBIDDEN[package]}
    assert not bad, sorted(bad)
