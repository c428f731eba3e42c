"""Analysis of a sweep's trials, read from MLflow: Pareto fronts (over replicates too) and the
attack × defense table. Imports neither torch nor Ray."""
from sweeps._lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "_pareto": ["format_front", "latest_sweep_run", "load_trials", "pareto_front", "parse_objectives", "record",
                "replicate_stats", "sweep_constraints"],
    "_defenses": ["defense_table", "defenses_report"],
})
