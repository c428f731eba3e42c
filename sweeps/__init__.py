"""sweeps: the sweep system around one trial — the only package of poisonsweep that imports
ray, optuna and mlflow.

- ``sweeps.config``: the sweep config's schema, validation and search space;
- ``sweeps.launch``: running a sweep (the Ray Tune driver, the trainable in Ray's workers);
- ``sweeps.tracking``: MLflow (the client, the mirror of Tune's storage, the trial logger);
- ``sweeps.analysis``: Pareto fronts and the attack × defense table, read from MLflow;
- ``sweeps.budget``: the minimal poison budget's sequential search;
- ``sweeps.api``: the Python API (``run``, ``minimal_budget``, ``trials``, ``pareto``, ``defenses``),
  also importable from here: ``import sweeps; sweeps.run("sweep.yaml")``;
- ``sweeps.cli``: the ``poisonsweep`` command, every verb, a layer over ``sweeps.api``.

Each package's ``__init__`` lists its public names; its modules (``_name.py``) are private.
"""
from poison.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "api": ["ConfigError", "SweepResult", "defenses", "load", "minimal_budget", "pareto", "run", "trials"],
})
