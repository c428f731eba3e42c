"""The sweep config: its schema (sweep-level sections, the trial's sections with search
dimensions in place of values), validation, overrides, resolving a drawn point into a trial
config, and the search space Optuna draws from."""
from poison.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "_schema": ["REPLICATE", "Constraint", "Dimension", "ResourcesConfig", "StrictLoader", "SweepConfig", "apply_override",
                "flatten", "load_config", "objective_names", "read_yaml", "resolve", "validate_config"],
    "_space": ["define_by_run", "make_sampler"],
})
