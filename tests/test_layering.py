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


def test_a_trial_worker_imports_torch_only_when_it_trains():
    """A Ray worker unpickling the trainable imports ``sweeps.launch._trainable``: neither Optuna
    nor MLflow (the driver's), nor torch and open_clip until a trial trains (a trial of fixed work,
    like the chaos test's, never does)."""
    import subprocess
    import sys

    heavy = ("optuna", "mlflow", "torch", "open_clip")
    out = subprocess.run([sys.executable, "-c", "import sys, sweeps.launch._trainable; "
                          f"print(sorted(m for m in {heavy!r} if m in sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
