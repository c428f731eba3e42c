"""The sweep config: one YAML file, validated into typed objects before anything starts.

Any field of the trial part (``name``, ``seed``, ``data``, ``model``, ``train``,
``attack``, ``defense``) is either a fixed value or a search dimension: a
mapping with ``low``/``high`` (optionally ``log``, ``step``) or ``choices``, and
an optional ``default`` used when a single trial is run. The sweep part
(``search``, ``resources``, ``tracking``, ``storage``) configures the driver.

Validation resolves the config with every dimension at its default and again
with each dimension at each of its extremes (``low``, ``high``, every choice),
and checks each against the data, so ``attack.poison_count: {high: 10**9}``
fails here, naming the key, not hours into a sweep.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from poison import DataError, load_dataset
from poison.config import ConfigError, Section, validate_section
from trainers.config import TrialConfig, parse_trial_config

TRIAL_KEYS = tuple(TrialConfig.model_fields)
DIMENSION_KEYS = {"low", "high", "log", "step", "choices", "default"}
OBJECTIVES = ("attack_success", "utility", "poison_count", "poison_rate", "utility_drop",
              "backdoor_asr", "targeted_success", "zeroshot_top1", "zeroshot_top5", "train_seconds")


class Dimension(Section):
    """One search dimension: an int/float range (``log`` scale allowed) or categorical choices."""

    low: int | float | None = None  # written as integers: an int range
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None
    default: Any = None

    @model_validator(mode="after")
    def _check(self) -> "Dimension":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices: empty list")
            if self.default is not None and self.default not in self.choices:
                raise ValueError(f"default {self.default!r} is not one of the choices {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if not isinstance(self.low, (int, float)) or not isinstance(self.high, (int, float)):
            raise ValueError("low and high must be numbers")
        if self.default is not None and (isinstance(self.default, bool)
                                         or not isinstance(self.default, (int, float))):
            raise ValueError(f"default {self.default!r} is not a number")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be positive, but got step={self.step}")
        if self.log and self.step not in (None, 1):
            raise ValueError(f"a log range takes no step (got step={self.step})")
        if not self.low < self.high:
            raise ValueError(f"low < high must hold, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, but got low={self.low}")
        if self.default is not None and not self.low <= self.default <= self.high:
            raise ValueError(f"default {self.default} is outside [{self.low}, {self.high}]")
        return self

    @property
    def kind(self) -> Literal["int", "float", "categorical"]:
        if self.choices is not None:
            return "categorical"
        values = [self.low, self.high] + ([self.step] if self.step is not None else [])
        return "int" if all(isinstance(v, int) for v in values) else "float"

    def value_default(self) -> Any:
        if self.default is not None:
            return self.default
        if self.kind == "categorical":
            return self.choices[0]
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return round(mid) if self.kind == "int" else mid

    def extremes(self) -> list[tuple[str, Any]]:
        if self.kind == "categorical":
            return [(f"choice {c!r}", c) for c in self.choices]
        cast = int if self.kind == "int" else float
        return [(f"low ({cast(self.low)})", cast(self.low)), (f"high ({cast(self.high)})", cast(self.high))]


class SearchConfig(Section):
    objectives: dict[str, Literal["max", "min"]] = Field(
        default_factory=lambda: {"attack_success": "max", "utility": "max", "poison_count": "min"})
    sampler: Literal["tpe", "nsga2", "random", "gp"] = "tpe"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    seed: int | None = None  # the sampler's seed; default: the config's seed
    # Configurations to evaluate first (Optuna's enqueue_trial), each a mapping of
    # dimension key paths to values; the all-defaults point is always first.
    points: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _objectives(self) -> "SearchConfig":
        if not self.objectives:
            raise ValueError("objectives: give at least one metric with max or min")
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ValueError(f"objectives: unknown metric {name!r}; valid: {', '.join(OBJECTIVES)}")
        return self


class ResourcesConfig(Section):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)  # fractions share a GPU between trials

    @model_validator(mode="after")
    def _gpu(self) -> "ResourcesConfig":
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ValueError(f"gpu: a fraction must be below 1, or a whole number of GPUs, got {self.gpu}")
        return self


class TrackingConfig(Section):
    uri: str | None = None         # default: $MLFLOW_TRACKING_URI, else SQLite in storage.path
    experiment: str | None = None  # default: the config's name


class StorageConfig(Section):
    path: str = "poisonsweep_results"  # Ray Tune results, the cache, the default SQLite store
    cache: str | None = None           # default: <path>/cache (shared by every trial on a node)

    def cache_dir(self) -> str:
        return str(Path(self.cache or Path(self.path) / "cache").resolve())


@dataclass
class SweepConfig:
    """A validated sweep: the raw trial part with its dimensions, and the driver sections."""

    raw: dict[str, Any]
    dimensions: dict[str, Dimension]
    search: SearchConfig
    resources: ResourcesConfig
    tracking: TrackingConfig
    storage: StorageConfig
    default_trial: TrialConfig = field(repr=False)

    @property
    def name(self) -> str:
        return self.default_trial.name

    def resolve(self, values: dict[str, Any] | None = None) -> TrialConfig:
        """The trial config with ``values`` (key path → value) for the dimensions, defaults elsewhere."""
        return resolve(self.raw, self.dimensions, values or {})

    def defaults(self) -> dict[str, Any]:
        return {path: dim.value_default() for path, dim in self.dimensions.items()}

    def initial_points(self) -> list[dict[str, Any]]:
        """The all-defaults point, then ``search.points`` (each completed with defaults)."""
        if not self.dimensions:
            return []
        return [self.defaults()] + [{**self.defaults(), **p} for p in self.search.points]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw_full, sort_keys=False)

    raw_full: dict[str, Any] = field(default_factory=dict, repr=False)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Reads, overrides (``key.path=value``) and validates a sweep config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Sets ``key.path=value`` in place; the value is parsed as YAML (``--set a.b=[1, 2]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from None
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            if part in node and node[part] is not None and not _is_dimension(node[part]):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any], *, check_data: bool = True) -> SweepConfig:
    """Validates a raw mapping; raises ConfigError naming the key path."""
    sweep_keys = {"search": SearchConfig, "resources": ResourcesConfig,
                  "tracking": TrackingConfig, "storage": StorageConfig}
    unknown = set(raw) - set(TRIAL_KEYS) - set(sweep_keys)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key; valid: "
                          f"{', '.join(TRIAL_KEYS + tuple(sweep_keys))}")
    sections = {k: validate_section(cls, raw.get(k), k) for k, cls in sweep_keys.items()}
    trial_raw = {k: copy.deepcopy(v) for k, v in raw.items() if k in TRIAL_KEYS}
    dims = find_dimensions(trial_raw)
    default = resolve(trial_raw, dims, {})
    _check_objectives(sections["search"], default)
    points = sections["search"].points
    _check_extremes(trial_raw, dims, default, check_data=check_data, points=points)
    return SweepConfig(raw=trial_raw, dimensions=dims, default_trial=default, raw_full=copy.deepcopy(raw),
                       **sections)


def find_dimensions(raw: dict[str, Any], prefix: str = "") -> dict[str, Dimension]:
    """Every search dimension in ``raw``, by dotted key path."""
    found: dict[str, Dimension] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if _is_dimension(value):
            found[path] = validate_section(Dimension, value, path)
        elif isinstance(value, dict):
            found.update(find_dimensions(value, f"{path}."))
    return found


def _is_dimension(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value) and set(value) <= DIMENSION_KEYS
            and ("choices" in value or "low" in value or "high" in value))


def resolve(raw: dict[str, Any], dims: dict[str, Dimension], values: dict[str, Any]) -> TrialConfig:
    unknown = set(values) - set(dims)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: not a search dimension of this config")
    resolved = copy.deepcopy(raw)
    for path, dim in dims.items():
        _set(resolved, path, values.get(path, dim.value_default()))
    return parse_trial_config(resolved)


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


def _check_objectives(search: SearchConfig, trial: TrialConfig) -> None:
    """Every objective must be a metric this sweep's trials report."""
    produced = {"utility", "zeroshot_top1", "zeroshot_top5", "poison_count", "poison_rate", "train_seconds"}
    produced |= set(trial.attack.metric_names)
    if trial.attack.kind != "none":
        produced.add("utility_drop")
    for name in search.objectives:
        if name not in produced:
            raise ConfigError(f"search.objectives.{name}: attack.kind {trial.attack.kind!r} does not report "
                              f"{name}; objectives it can use: {', '.join(sorted(produced))}")


def _check_extremes(raw: dict[str, Any], dims: dict[str, Dimension], default: TrialConfig, *,
                    check_data: bool, points: list[dict[str, Any]]) -> None:
    cases = [("", None, {})] + [(path, label, {path: value})
                                for path, dim in dims.items() for label, value in dim.extremes()]
    cases += [(f"search.points[{i}]", None, point) for i, point in enumerate(points)]
    datasets: dict[str, Any] = {}
    for path, label, values in cases:
        try:
            trial = resolve(raw, dims, values) if values else default
            if check_data:
                spec = trial.data_spec()
                key = repr(spec)
                if key not in datasets:
                    datasets[key] = load_dataset(spec)
                trial.attack.check(datasets[key])
        except DataError as err:
            raise ConfigError(_prefix(str(err), path, label, dims)) from None
        except ConfigError as err:
            raise ConfigError(_prefix(str(err), path, label, dims)) from None


def _prefix(message: str, path: str, label: str | None, dims: dict[str, Dimension]) -> str:
    if path.startswith("search.points"):
        return f"{path}: {message}"
    if not path:  # the all-defaults case: name the dimension whose default failed
        path = next((p for p in dims if message.startswith(f"{p}: ")), "")
        if not path:
            return message
        label = f"default ({dims[path].value_default()})"
    if message.startswith(f"{path}: "):
        return f"{path}: {label}: {message[len(path) + 2:]}"
    return f"{path}: {label}: {message}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping → {"a.b.c": value}, the MLflow params of a trial."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
