"""Security: checkpoints and caches load without unpickling code, YAML loads safely, and the servers
poisonsweep starts listen on loopback unless told otherwise."""
from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import pytest
import yaml

from sweeps.cli import main

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("poison", "trainers", "sweeps")
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
# ours: sweeps.config.StrictLoader, a SafeLoader that refuses duplicate keys and alias bombs (checked below)
YAML_SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "StrictLoader", "sweeps.config.StrictLoader"}
# names that build arbitrary Python objects from YAML (FullLoader too: it ran code before PyYAML 5.4)
YAML_UNSAFE = {f"yaml.{name}" for name in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
                                           "Loader", "CLoader", "FullLoader", "CFullLoader", "UnsafeLoader",
                                           "CUnsafeLoader")}
PICKLE_LOADS = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                "pandas.read_pickle"}


class _Scan(ast.NodeVisitor):
    """Finds unsafe deserialisation in one module, names resolved through its imports
    (``import torch as th``, ``from yaml import FullLoader``)."""

    def __init__(self, where: str) -> None:
        self.where, self.aliases = where, {}
        self.problems: list[str] = []
        self.torch_loads = 0

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:  # import torch.serialization as ts
                self.aliases[alias.asname] = alias.name
            else:  # import torch.serialization binds torch
                root = alias.name.split(".")[0]
                self.aliases[root] = root

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if node.module and node.level == 0:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._flag_unsafe(node)
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self._flag_unsafe(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self._name(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in TORCH_LOADS:
            self.torch_loads += 1
            if not _is_true(keywords.get("weights_only")):
                self._problem(node, f"{name}(...) without weights_only=True")
        elif name in YAML_LOADS:
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if self._name(loader) not in YAML_SAFE_LOADERS:
                self._problem(node, f"{name}(...) without Loader=yaml.SafeLoader (use yaml.safe_load)")
        elif name in PICKLE_LOADS:
            self._problem(node, f"{name}(...) unpickles: code can run from the file")
        elif name in {"numpy.load"} and _is_true(keywords.get("allow_pickle")):
            self._problem(node, "numpy.load(..., allow_pickle=True)")
        self.generic_visit(node)

    def _flag_unsafe(self, node: ast.expr) -> None:
        name = self._name(node)
        if name in YAML_UNSAFE:
            self._problem(node, f"{name}: unsafe YAML loading")

    def _name(self, node: ast.expr | None) -> str | None:
        """``th.serialization.load`` -> ``torch.serialization.load`` (None for anything but dotted names)."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._name(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def _problem(self, node: ast.AST, text: str) -> None:
        self.problems.append(f"{self.where}:{node.lineno}: {text}")


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _scan(source: str, where: str = "<test>") -> _Scan:
    scan = _Scan(where)
    scan.visit(ast.parse(source))
    return scan


def _package_files() -> list[Path]:
    files = sorted(f for package in PACKAGES for f in (ROOT / package).rglob("*.py"))
    assert len(files) > 10, files  # the scan looks where the code is
    return files


def test_checkpoints_load_weights_only_and_yaml_loads_safely():
    from sweeps.config._schema import StrictLoader

    # the one loader of ours the scan accepts is a SafeLoader, and the only class of that name
    assert issubclass(StrictLoader, yaml.SafeLoader) and StrictLoader.yaml_constructors is yaml.SafeLoader.yaml_constructors
    assert sum(f.read_text().count("class StrictLoader") for f in _package_files()) == 1
    scans = [_scan(f.read_text(), str(f.relative_to(ROOT))) for f in _package_files()]
    problems = [p for scan in scans for p in scan.problems]
    assert not problems, "\n".join(problems)
    assert sum(scan.torch_loads for scan in scans) >= 1  # the model cache's load was seen, and passed


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(path)",
    "import torch\ntorch.load(path, weights_only=False)",
    "import torch\ntorch.load(path, **options)",
    "import torch as th\nth.load(path, map_location='cpu')",
    "from torch import load\nload(path)",
    "import torch\ntorch.serialization.load(path)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
    "import yaml\nyaml.load(text, yaml.Loader)",
    "import yaml\nyaml.load_all(text, Loader=yaml.UnsafeLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "from yaml import FullLoader\nloader = FullLoader",
    "from yaml import unsafe_load as ul\nul(text)",
    "import pickle\npickle.loads(blob)",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
])
def test_the_scan_finds_unsafe_loading(source):
    assert _scan(source).problems, source


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "import torch as th\nth.load(path, weights_only=True)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.safe_load_all(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.load(text, yaml.CSafeLoader)",
    "import yaml\nyaml.safe_dump(data)",
    "import numpy as np\nnp.load(path)",
    "json.load(f)",
])
def test_the_scan_passes_safe_loading(source):
    assert _scan(source).problems == [], source


def _ui_argv(monkeypatch, tmp_path, *options: str) -> tuple[list[str], dict]:
    """The command and environment ``poisonsweep ui`` would start mlflow with."""
    started = []
    monkeypatch.setattr("sweeps.cli.subprocess.call", lambda cmd, env: started.append((cmd, env)) or 0)
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *options]) == 0
    assert len(started) == 1
    return started[0]


def _option(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, cmd
    return cmd[cmd.index(name) + 1]


def test_poisonsweep_ui_binds_to_loopback_unless_told_otherwise(monkeypatch, tmp_path):
    cmd, env = _ui_argv(monkeypatch, tmp_path)
    assert Path(cmd[0]).name == "mlflow" and cmd[1] == "ui"
    assert _option(cmd, "--host") == "127.0.0.1"
    assert _option(cmd, "--backend-store-uri") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd, _ = _ui_argv(monkeypatch, tmp_path, "--host", "0.0.0.0", "--port", "8123")  # told otherwise
    assert (_option(cmd, "--host"), _option(cmd, "--port")) == ("0.0.0.0", "8123")


def test_no_code_binds_every_interface():
    """No code of ours names the any-address (Ray's servers: the next test)."""
    found = [f"{f.relative_to(ROOT)}:{node.lineno}" for f in _package_files()
             for node in ast.walk(ast.parse(f.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() == "0.0.0.0"]
    assert not found, found


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only_with_a_private_token(terminal_sweep):
    """A real ``poisonsweep run`` (the ``terminal_sweep`` fixture: two trials from a fresh home):
    every socket that it and the processes it starts (Ray's GCS, raylet, agents and workers, the
    trials) listen on, sampled until it ends, is on loopback; Ray runs with token authentication and
    its token file is the owner's alone. (Before: GCS, raylets and workers on ``::``, the agents on
    the host's address.)"""
    run, home = terminal_sweep
    seen, modes, out = run.listening, run.gcs_auth_modes, run.out
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), seen
    outside = sorted(s for s in seen if not _loopback(s[1]))
    assert not outside, outside
    token = home / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert modes == {"token"}, modes  # the GCS requires the token
    assert "Token authentication is enabled" not in out  # Ray's warning for those who did not choose it
