"""Analysis of a sweep's trials, read from MLflow: Pareto fronts (over replicates too), the
attack × defense table and the HTML report of a launch. Imports neither torch nor Ray."""
from poison.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "_pareto": ["Front", "format_front", "latest_sweep_run", "load_trials", "pareto_front", "parse_objectives", "record",
                "replicate_stats", "sweep_constraints"],
    "_defenses": ["defense_table", "defenses_report", "describe_defenses", "load_defenses"],
    "_report": ["write_report"],
})
