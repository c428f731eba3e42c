"""Public names of a package, imported when first used (PEP 562): ``trainers`` and sweeps'
packages use it (here, in the package every other imports).

Each package's ``__init__`` lists what it makes public and where each name lives; a name's
module is imported on first use. So importing one part does not import the others' libraries:
reading a trial config does not import torch, a Ray worker unpickling the trainable does not
import Optuna or MLflow, and the analysis verbs (``pareto``, ``defenses``) do not import torch.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, where: dict[str, list[str]]) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose public names are
    ``where``'s: the private module (``"_schema"``) each name is defined in."""
    home = {name: f"{package}.{module}" for module, names in where.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name]), name)

    def __dir__() -> list[str]:
        return sorted(home)

    return sorted(home), __getattr__, __dir__
