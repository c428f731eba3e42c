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

Kind-switched sections: a mapping at key ``K`` whose ``kind`` is a categorical
dimension (``attack.kind: {choices: [backdoor, targeted]}``) may hold the keys of
every choice; the registry named like ``K``'s last component
(``Registry.find("attack")``, ``Registry.find("trigger")`` for ``attack.trigger``)
gives each choice's class, and a trial drops the keys its drawn kind's class does
not accept but another choice's does (so ``trigger`` disappears for ``targeted``,
and with it every dimension under it). A key no choice accepts is still an error.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from poison import ATTACKS, DEFENSES, DataError, load_dataset
from poison.config import ConfigError, Section, validate_section
from poison.registry import Registry
from trainers.config import TrialConfig, parse_trial_config

TRIAL_KEYS = tuple(TrialConfig.model_fields)
DIMENSION_KEYS = {"low", "high", "log", "step", "choices", "default"}
#: Metrics every trial reports, whatever its attack (the attack adds its ``metric_names``).
TRIAL_METRICS = ("utility", "zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10",
                 "t2i_r1", "t2i_r5", "t2i_r10", "poison_count", "poison_rate", "train_seconds")
#: Reported by every trial with an attack (against the sweep's clean model).
ATTACK_TRIAL_METRICS = ("utility_drop",)


def objective_names() -> tuple[str, ...]:
    """The metrics a sweep may optimise: every trial's, plus each registered attack's and defense's."""
    names = dict.fromkeys(("attack_success", *TRIAL_METRICS, *ATTACK_TRIAL_METRICS))
    for registry in (ATTACKS, DEFENSES):
        for kind in registry.names():
            names.update(dict.fromkeys(_metric_names(registry.get(kind))))
    return tuple(names)


def __getattr__(name: str) -> Any:  # OBJECTIVES: computed, so attacks registered later count
    if name == "OBJECTIVES":
        return objective_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _metric_names(attack_cls: Any) -> tuple[str, ...]:
    names = getattr(attack_cls, "metric_names", ())
    return tuple(names) if isinstance(names, (tuple, list, set, frozenset)) else ()


class Dimension(Section):
    """One search dimension: an int/float range (``log`` scale allowed) or categorical choices."""

    low: int | float | None = None  # written as integers: an int range
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None
    default: Any = None

    @model_validator(mode="after")
    def _check(self) -> Dimension:
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
    # auto: TPE for the first 250 trials, then NSGA-II (TPE's cost per trial grows with the study)
    sampler: Literal["auto", "tpe", "nsga2", "random", "gp"] = "auto"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    seed: int | None = None  # the sampler's seed; default: the config's seed
    # seeds per configuration: each configuration Optuna draws runs as this many trials, with
    # seeds seed, seed+1, ...; Optuna is told the mean of each objective over them
    replicates: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0)      # retries of a failed trial (from its last checkpoint)
    checkpoint_every: int = Field(1, ge=0)  # epochs between a trial's checkpoints (0: none)
    # Configurations to evaluate first (Optuna's enqueue_trial), each a mapping of
    # dimension key paths to values; the all-defaults point is always first.
    points: list[dict[str, Any]] = Field(default_factory=list)
    # Early stopping: moasha stops a trial at a rung of epochs (grace_period, grace_period *
    # reduction_factor, ... below train.epochs) unless it is among the best 1/reduction_factor
    # of the trials that reached that rung (non-dominated sorting over the objectives)
    scheduler: Literal["none", "moasha"] = "none"
    grace_period: int = Field(1, ge=1)        # the first rung's epoch
    reduction_factor: float = Field(3, gt=1)  # a rung keeps 1 in reduction_factor of its trials
    # Limits on metrics, "METRIC <= BOUND" or "METRIC >= BOUND" (e.g. "utility_drop <= 0.02"):
    # Optuna's sampler learns them, promotion puts infeasible trials last, pareto's front is
    # of the feasible trials first
    constraints: list[str] = Field(default_factory=list)
    # At a rung, an objective ranked by another metric of the same epoch, in the objective's
    # direction (attack_success: target_similarity, the trigger's pull toward the target's text,
    # which ranks a backdoor's final success epochs before the success itself: docs/search.md)
    rung_metrics: dict[str, str] = Field(default_factory=dict)
    # Start no trial once the sweep's trials have trained this many epochs in all (the running
    # ones finish; num_samples stays the cap): a sweep's compute budget. 0: no budget
    epoch_budget: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _objectives(self) -> SearchConfig:
        if not self.objectives:
            raise ValueError("objectives: give at least one metric with max or min")
        valid = objective_names()
        for name in self.objectives:
            if name not in valid:
                raise ValueError(f"objectives: unknown metric {name!r}; valid: {', '.join(valid)}")
        return self

    @field_validator("rung_metrics")
    @classmethod
    def _rung_metrics(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        objectives, valid = info.data.get("objectives") or {}, objective_names()
        for name, proxy in value.items():
            if name not in objectives:
                raise ValueError(f"{name!r} is not one of the objectives ({', '.join(objectives)})")
            if proxy not in valid:
                raise ValueError(f"{name}: unknown metric {proxy!r}; valid: {', '.join(valid)}")
        return value

    @property
    def parsed_constraints(self) -> list[Constraint]:
        return [Constraint.parse(text, f"search.constraints[{i}]") for i, text in enumerate(self.constraints)]


_CONSTRAINT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*(\S+)\s*")


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound``; its value, as Optuna takes constraints, is
    ``metric - bound`` (or ``bound - metric``): at most 0 when the trial satisfies it."""

    metric: str
    op: Literal["<=", ">="]
    bound: float

    @classmethod
    def parse(cls, text: Any, key: str) -> Constraint:
        found = _CONSTRAINT.fullmatch(text) if isinstance(text, str) else None
        if found is None:
            raise ConfigError(f"{key}: {text!r} is not 'METRIC <= BOUND' or 'METRIC >= BOUND'")
        metric, op, bound = found.groups()
        valid = objective_names()
        if metric not in valid:
            raise ConfigError(f"{key}: unknown metric {metric!r}; valid: {', '.join(valid)}")
        try:
            value = float(bound)
        except ValueError:
            raise ConfigError(f"{key}: bound {bound!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: bound {bound!r} is not a finite number")
        return cls(metric, op, value)  # type: ignore[arg-type]

    def value(self, metric: float) -> float:
        return metric - self.bound if self.op == "<=" else self.bound - metric

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


class ResourcesConfig(Section):
    """A trial's resources: ``cpu`` and ``gpu`` for each of its ``workers`` (data-parallel
    processes; more than one trains through Ray Train, each on its slice of every batch)."""

    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)  # fractions share a GPU between trials
    workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _gpu(self) -> ResourcesConfig:
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ValueError(f"gpu: a fraction must be below 1, or a whole number of GPUs, got {self.gpu}")
        if self.workers > 1 and self.gpu and not float(self.gpu).is_integer():
            # NCCL cannot put two ranks of one process group on the same GPU
            raise ValueError(f"gpu: the {self.workers} workers of a trial need whole GPUs each, got {self.gpu}")
        return self

    def fits(self, nodes: list[dict[str, float]]) -> bool:
        """Whether ``nodes`` (Ray's resources of each node) can hold one trial: its one process,
        or all its workers, spread over the nodes (Ray Train's PACK placement)."""
        want = {k: v for k, v in (("CPU", self.cpu), ("GPU", self.gpu)) if v}
        if self.workers == 1:
            return any(all(node.get(k, 0) >= v for k, v in want.items()) for node in nodes)
        return sum(min(int(node.get(k, 0) // v) for k, v in want.items()) for node in nodes) >= self.workers


class TrackingConfig(Section):
    uri: str | None = None         # default: $MLFLOW_TRACKING_URI, else SQLite in storage.path
    experiment: str | None = None  # default: the config's name

    @model_validator(mode="after")
    def _no_credentials(self) -> TrackingConfig:
        # the config is logged (config.yaml on the parent run) and kept beside Tune's results
        if self.uri and urlsplit(self.uri).password is not None:
            raise ValueError("uri: holds a password; a config is logged as an artifact, so give "
                             "credentials as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")
        return self


class StorageConfig(Section):
    path: str = "poisonsweep_results"  # Ray Tune results, the cache, the default SQLite store
    cache: str | None = None           # default: <path>/cache (shared by every trial on a node)

    @model_validator(mode="after")
    def _local(self) -> StorageConfig:
        for key in ("path", "cache"):
            value = getattr(self, key)
            if value and "://" in value:
                # Tune could write there, but the Optuna study, the resume bookkeeping and the
                # image/model cache are read as local files: refuse rather than make a folder "s3:"
                raise ValueError(f"{key}: {value!r} is a URI; give a local or shared-filesystem path "
                                 f"(an NFS/EFS/Lustre mount on every node); object-store storage is not supported yet")
            if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
                raise ValueError(f"{key}: {value!r} is a file; give a folder (made if missing)")
        return self

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
    _resolved: dict[str, TrialConfig] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.default_trial.name

    def resolve(self, values: dict[str, Any] | None = None) -> TrialConfig:
        """The trial config with ``values`` (key path → value) for the dimensions, defaults elsewhere;
        resolved once per point (the sections are frozen), however often the driver asks."""
        key = json.dumps(values or {}, sort_keys=True, default=str)
        if key not in self._resolved:
            self._resolved[key] = resolve(self.raw, self.dimensions, values or {})
        return self._resolved[key]

    def defaults(self) -> dict[str, Any]:
        return {path: dim.value_default() for path, dim in self.dimensions.items()}

    def active(self, values: dict[str, Any] | None = None) -> list[str]:
        """The dimensions a trial with ``values`` (defaults elsewhere) uses: those not
        under a key that its drawn kinds drop."""
        return active_dimensions(self.dimensions, values or {})

    def initial_points(self) -> list[dict[str, Any]]:
        """The all-defaults point, then ``search.points`` (each completed with defaults)."""
        if not self.dimensions:
            return []
        return [self.defaults()] + [{**self.defaults(), **p} for p in self.search.points]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw_full, sort_keys=False)

    raw_full: dict[str, Any] = field(default_factory=dict, repr=False)


#: The most nodes a config may hold once its aliases are expanded (a packaged preset: about 100).
MAX_YAML_NODES = 100_000


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML's own rule, which
    PyYAML does not enforce: a second ``train:`` would silently replace the first) and a document
    whose aliases expand to more than :data:`MAX_YAML_NODES` nodes (a "billion laughs" bomb), before
    anything is built from it. Anchors and aliases otherwise work as usual."""

    def construct_document(self, node: yaml.Node) -> Any:
        count = _expanded_size(node, {}, set())
        if count > MAX_YAML_NODES:
            raise ConfigError(f"{count:.3g} nodes once its aliases are expanded, more than {MAX_YAML_NODES:,} "
                              f"(an alias bomb?)")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"line {line}: key {str(key)[:80]!r} given twice in one mapping "
                                  f"(first on line {seen[key]})")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in ``node`` with every alias expanded (an alias is the node it names, shared)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ConfigError("a recursive alias (an anchor used inside itself)")
    open_.add(id(node))
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, sizes, open_) for v in node.value)
    else:
        size = 1
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


def read_yaml(text: str, source: str) -> Any:
    """``text`` parsed by :class:`StrictLoader`; errors name ``source`` in one line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())[:300]}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Reads, overrides (``key.path=value``) and validates a sweep config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    raw = read_yaml(text, str(path))
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
    _check_workers(sections["resources"].workers, default, dims)
    _check_objectives(sections["search"], default, dims)
    _check_scheduler(sections["search"], default, dims)
    sections["search"].parsed_constraints  # noqa: B018  (raises naming search.constraints[i])
    points = sections["search"].points
    # with the sweep's image cache: files a real-data loader decodes now are not decoded again by the trials
    _check_extremes(trial_raw, dims, default, check_data=check_data, points=points,
                    cache_dir=sections["storage"].cache_dir())
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


#: The key of a trial's replicate number among its drawn values (Ray Tune's Repeater sets it).
REPLICATE = "__trial_index__"


def resolve(raw: dict[str, Any], dims: dict[str, Dimension], values: dict[str, Any]) -> TrialConfig:
    """The trial config: ``values`` for the dimensions (defaults elsewhere), then in each
    kind-switched section the keys its drawn kind does not take are dropped; values of
    dimensions under a dropped key are ignored."""
    values = dict(values)
    replicate = int(values.pop(REPLICATE, 0))
    unknown = set(values) - set(dims)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: not a search dimension of this config")
    resolved = copy.deepcopy(raw)
    for path, dim in dims.items():
        _set(resolved, path, values.get(path, dim.value_default()))
    if replicate:  # the configuration's replicate number r runs with seed + r
        resolved["seed"] = int(resolved.get("seed", 0)) + replicate
    for section, switch in kind_switches(dims).items():  # outer sections first
        node = _get(resolved, section)
        if isinstance(node, dict):  # else dropped with its parent
            for key in [k for k in node if switch.drops(node.get("kind"), k)]:
                del node[key]
    return parse_trial_config(resolved)


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


def _get(raw: dict[str, Any], path: str) -> Any:
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class KindSwitch:
    """A section whose ``kind`` is a categorical dimension, with the keys each choice's
    registered class accepts (``None``: a choice its registry does not know, or whose
    object is no config class; it drops nothing, and parsing reports the bad kind)."""

    section: str
    choices: tuple[str, ...]
    fields: tuple[frozenset[str] | None, ...]

    @property
    def dimension(self) -> str:
        return f"{self.section}.kind"

    def accepts(self, kind: Any, key: str) -> bool:
        if kind not in self.choices:
            return True
        fields = self.fields[self.choices.index(kind)]
        return fields is None or key in fields

    def drops(self, kind: Any, key: str) -> bool:
        """Whether a trial of ``kind`` drops ``key``: some other choice takes it, ``kind`` not."""
        return (key != "kind" and not self.accepts(kind, key)
                and any(key in f for f in self.fields if f is not None))

    def first_accepting(self, key: str) -> str | None:
        return next((c for c, f in zip(self.choices, self.fields) if f is not None and key in f), None)


def kind_switches(dims: dict[str, Dimension]) -> dict[str, KindSwitch]:
    """The kind-switched sections of a config, by path, outer sections first.

    A mapping at ``K`` is switched when ``K.kind`` is a categorical dimension of
    strings and a registry of kind ``K``'s last component exists.
    """
    found: dict[str, KindSwitch] = {}
    for path, dim in dims.items():
        section, _, last = path.rpartition(".")
        if last != "kind" or not section or dim.kind != "categorical":
            continue
        registry = Registry.find(section.rpartition(".")[2])
        if registry is None or not all(isinstance(c, str) for c in dim.choices):
            continue
        fields = []
        for choice in dim.choices:
            obj = registry.get(choice) if choice in registry else None
            model_fields = getattr(obj, "model_fields", None)
            fields.append(frozenset(model_fields) if isinstance(model_fields, dict) else None)
        found[section] = KindSwitch(section, tuple(dim.choices), tuple(fields))
    return dict(sorted(found.items(), key=lambda item: item[0].count(".")))


def dropped_by(path: str, values: dict[str, Any], dims: dict[str, Dimension],
                switches: dict[str, KindSwitch]) -> str | None:
    """The kind dimension that drops ``path`` (under its value in ``values``, else its
    default), or None when ``path`` is active."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        switch = switches.get(".".join(parts[:i]))
        if switch is not None:
            kind = values.get(switch.dimension, dims[switch.dimension].value_default())
            if switch.drops(kind, parts[i]):
                return switch.dimension
    return None


def search_order(dims: dict[str, Dimension]) -> list[str]:
    """Kind dimensions of switched sections first (outer before inner), then the rest."""
    kinds = [s.dimension for s in kind_switches(dims).values()]
    return kinds + [p for p in dims if p not in kinds]


def active_dimensions(dims: dict[str, Dimension], values: dict[str, Any]) -> list[str]:
    """The dimensions a trial with ``values`` (defaults elsewhere) uses, in search order."""
    switches = kind_switches(dims)
    return [p for p in search_order(dims) if dropped_by(p, values, dims, switches) is None]


def _context(path: str, dims: dict[str, Dimension], switches: dict[str, KindSwitch]) -> dict[str, Any]:
    """Values of the kind dimensions that make ``path`` active: each enclosing switched
    section whose default kind drops the next key is set to the first choice taking it."""
    values: dict[str, Any] = {}
    parts = path.split(".")
    for i in range(1, len(parts)):
        switch = switches.get(".".join(parts[:i]))
        if switch is None:
            continue
        kind = values.get(switch.dimension, dims[switch.dimension].value_default())
        if switch.drops(kind, parts[i]):
            values[switch.dimension] = switch.first_accepting(parts[i])
    return values


def _check_objectives(search: SearchConfig, trial: TrialConfig, dims: dict[str, Dimension]) -> None:
    """Every objective must be a metric this sweep's trials report: with ``attack.kind`` or
    ``defense.kind`` a dimension, every combination of choices must report it (a trial
    reports its attack's metrics and its defense's)."""
    attacks = {k: set(TRIAL_METRICS) | set(n) | (set(ATTACK_TRIAL_METRICS) if k != "none" else set())
               for k, n in _kind_metrics("attack", ATTACKS, trial.attack, dims).items()}
    defenses = {k: set(n) for k, n in _kind_metrics("defense", DEFENSES, trial.defense, dims).items()}
    what = {s: f"{s}.kind choice" if s + ".kind" in dims and dims[s + ".kind"].kind == "categorical"
            else f"{s}.kind" for s in ("attack", "defense")}
    for name in search.objectives:
        attack = next((k for k, produced in attacks.items() if name not in produced), None)
        defense = next((k for k, produced in defenses.items() if name not in produced), None)
        if attack is None or defense is None:
            continue  # every attack reports it, or every defense does
        a_defense_metric = any(name in _metric_names(DEFENSES.get(k)) for k in DEFENSES.names())
        blamed = ("defense", defense) if a_defense_metric else ("attack", attack)
        produced = sorted(attacks[attack] | defenses[defense])
        raise ConfigError(f"search.objectives.{name}: {what[blamed[0]]} {blamed[1]!r} does not report "
                          f"{name}; objectives it can use: {', '.join(produced)}")


def _check_scheduler(search: SearchConfig, trial: TrialConfig, dims: dict[str, Dimension]) -> None:
    """moasha's rungs are epochs below ``train.epochs``: a fixed number of them, more than
    ``grace_period``."""
    if search.scheduler == "none":
        if search.rung_metrics:
            raise ConfigError("search.rung_metrics: only search.scheduler: moasha ranks trials at rungs; "
                              "set it, or leave rung_metrics out")
        return
    if "train.epochs" in dims:
        raise ConfigError("search.scheduler: moasha needs a fixed train.epochs (its rungs are epochs "
                          "below it), not a search dimension")
    if search.grace_period >= trial.train.epochs:
        raise ConfigError(f"search.grace_period: {search.grace_period} leaves no rung below train.epochs "
                          f"({trial.train.epochs}); give fewer epochs than train.epochs")


def _kind_metrics(section: str, registry: Registry, default: Any, dims: dict[str, Dimension]
                  ) -> dict[str, tuple[str, ...]]:
    """The metric names of each kind a trial's ``section`` may take (unknown kinds are left to
    the check of their choice)."""
    dim = dims.get(f"{section}.kind")
    kinds = list(dim.choices) if dim is not None and dim.kind == "categorical" else [default.kind]
    return {k: default.metric_names if k == default.kind else _metric_names(registry.get(k))
            for k in kinds if k == default.kind or k in registry}


def _check_workers(workers: int, default: TrialConfig, dims: dict[str, Dimension]) -> None:
    """Each of a trial's ``workers`` trains on an equal slice of every batch: every batch size a
    trial may draw must divide evenly."""
    if workers == 1:
        return
    dim = dims.get("train.batch_size")
    if dim is None:
        sizes = [default.train.batch_size]
    elif dim.kind == "categorical":
        sizes = list(dim.choices)
    elif dim.kind == "int" and not dim.log and dim.step is not None:
        sizes = [dim.low, dim.step]  # low, low + step, ...: all multiples when these are
    else:
        raise ConfigError(f"train.batch_size: with resources.workers {workers}, a range needs an int step "
                          f"(low and step multiples of {workers}), so that every drawn batch splits evenly")
    bad = next((s for s in sizes if not isinstance(s, int) or s % workers), None)
    if bad is not None:
        what = "batch size" if dim is None or dim.kind == "categorical" else "range's low/step"
        raise ConfigError(f"train.batch_size: {what} {bad} does not split evenly over resources.workers "
                          f"{workers}; give a multiple of {workers}")


def _check_extremes(raw: dict[str, Any], dims: dict[str, Dimension], default: TrialConfig, *,
                    check_data: bool, points: list[dict[str, Any]], cache_dir: str | None = None) -> None:
    """Resolves and checks the all-defaults trial, each extreme of each dimension, and each
    point. A dimension only some kinds use is checked with its sections' kinds set to
    the first choices that use it (named in the message)."""
    switches = kind_switches(dims)
    cases: list[tuple[str, str | None, dict[str, Any]]] = [("", None, {})]
    for path, dim in dims.items():
        context = _context(path, dims, switches)
        under = "".join(f" with {k} {v!r}" for k, v in context.items())
        cases += [(path, label + under, {**context, path: value}) for label, value in dim.extremes()]
    cases += [(f"search.points[{i}]", None, point) for i, point in enumerate(points)]
    datasets: dict[str, Any] = {}
    for path, label, values in cases:
        try:
            trial = resolve(raw, dims, values) if values else default
            if check_data:
                spec = trial.data_spec(cache_dir)
                key = repr(spec)
                if key not in datasets:
                    datasets[key] = load_dataset(spec)
                trial.attack.check(datasets[key])
                trial.defense.check(datasets[key], pretrained=trial.model.pretrained is not None)
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
    elif not message.startswith(f"{path}: ") and label and path.endswith(".kind"):
        # a choice of a kind failed on another dimension's default (e.g. a sig trigger's
        # frequency): name that dimension, and the choice as its context
        other = next((p for p in dims if message.startswith(f"{p}: ") and not p.endswith(".kind")), "")
        if other:
            default = dims[other].value_default()
            return f"{other}: default ({default}) with {path} {label.removeprefix('choice ')}: " \
                   f"{message[len(other) + 2:]}"
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
