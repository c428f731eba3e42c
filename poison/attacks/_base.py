"""The base of ``poison.attacks``: what every plug-in imports (the package's ``__init__`` imports the plug-ins, which register themselves)."""
from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poison.config import Section, make_registered
from poison.manifest import Dataset
from poison.registry import Registry

ATTACKS: Registry = Registry("attack")


class ModelView(Protocol):
    """What an attack may ask of a trained model (trainers.evaluate.Evaluator implements it)."""

    def classify(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) images → zero-shot class indices (N,)."""

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) images → L2-normalised embeddings (N, D)."""

    def embed_texts(self, captions: list[str]) -> np.ndarray:
        """captions → L2-normalised embeddings (N, D)."""


@runtime_checkable
class ScoresClasses(Protocol):
    """A :class:`ModelView` that also gives each image's zero-shot scores, from which an attack
    reads continuous signals beside its success rate (``classify`` is their argmax)."""

    def class_scores(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) images → (N, classes) cosine similarities of each image's embedding to
        each class's prompt embedding; ``classify(images)`` is the first argmax of each row."""


def nested_sample(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct positions of ``range(size)``: the first ``count`` of one permutation
    drawn from ``rng``, so for one seed a smaller count's sample is a prefix of a larger one's.

    Plans use it (and a stream of their own for each other random column) so that budgets are
    nested: for one seed the plan of ``poison_count`` n holds the first n pairs of the plan of
    any larger count, and a dose-response curve compares the same poison plus more, not a new
    draw at every count (the draws' own luck would otherwise move attack success from one count
    to the next more than replicate seeds average out).

    Example:
        >>> small = nested_sample(10, 3, np.random.default_rng(0))
        >>> large = nested_sample(10, 7, np.random.default_rng(0))
        >>> bool((large[:3] == small).all()), len(set(large.tolist()))
        (True, 7)
    """
    if not 0 <= count <= size:
        raise ValueError(f"cannot draw {count} distinct positions of {size}")
    return rng.permutation(size)[:count]


class Attack(Section):
    """Base of attacks: a frozen config; the base itself is the clean (no-poison) case.

    Lifecycle, in a trial's order:

    1. ``check(dataset)``: before any training, rejects what cannot run on this dataset
       (a budget larger than the data, a target class it lacks), naming the key;
    2. ``plan(dataset, seed)``: the poison plan, a table of the training rows it adds or
       alters (deterministic in ``seed``: one stream of ``poison.streams``);
    3. ``stamp(images, columns)``: as batches load, the plan's image changes on its rows
       (captions come from the plan itself);
    4. ``evaluate(dataset, model, seed)``: after training, ``metric_names`` measured on the
       test split through a :class:`ModelView`, headed by ``attack_success``.
    """

    kind: str
    poison_count: int = 0

    #: The metrics ``evaluate`` returns (its headline is ``attack_success``).
    metric_names: ClassVar[tuple[str, ...]] = ()

    @property
    def trigger_name(self) -> str:
        return "none"

    @property
    def modality_tag(self) -> str:
        return "none"

    def check(self, dataset: Dataset) -> None:
        """Raises ConfigError (naming the key) when the attack cannot run on ``dataset``."""

    def plan(self, dataset: Dataset, seed: int) -> pa.Table:
        return empty_plan()

    def stamp(self, images: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Applies the plan's image changes to the batch ``images`` of poisoned rows."""
        return images

    def evaluate(self, dataset: Dataset, model: ModelView, seed: int) -> dict[str, float]:
        return {}


@ATTACKS.register("none")
class NoAttack(Attack):
    """No poisoning: the clean model."""

    kind: str = "none"


PLAN_SCHEMA = pa.schema(
    [
        ("poison_id", pa.int64()),   # row id in the poisoned training set (replace: the altered pair)
        ("op", pa.string()),         # "inject" (added pair) or "replace" (altered pair)
        ("source_id", pa.int64()),   # manifest id of the pair whose image is used
        ("image", pa.int64()),       # index into the dataset's image array
        ("source_label", pa.int32()),
        ("caption", pa.string()),
    ]
)


def empty_plan() -> pa.Table:
    return PLAN_SCHEMA.empty_table()


def next_id(dataset: Dataset) -> int:
    """The first row id free for injected pairs (after every manifest id)."""
    return int(pc.max(dataset.manifest["id"]).as_py() or 0) + 1


def make_plan(*, op: str, altered: np.ndarray, images: pa.Table, captions: list[str], first_new: int,
              extra: dict[str, object] | None = None, meta: dict[str, str]) -> pa.Table:
    """A plan table: PLAN_SCHEMA's columns first, then ``extra`` (trigger placement, provenance).

    ``images`` are the manifest rows whose images the poisoned pairs use; ``altered``
    the ids of the pairs that ``replace`` alters (ignored for ``inject``, which numbers
    new pairs from ``first_new``).
    """
    n = len(captions)
    columns = {
        "poison_id": pa.array(first_new + np.arange(n) if op == "inject" else np.asarray(altered), pa.int64()),
        "op": pa.array([op] * n, pa.string()),
        "source_id": images["id"],
        "image": images["image"],
        "source_label": images["label"],
        "caption": pa.array(captions, pa.string()),
        **{k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v) for k, v in (extra or {}).items()},
    }
    table = pa.table(columns)
    schema = pa.schema([*PLAN_SCHEMA, *(f for f in table.schema if f.name not in PLAN_SCHEMA.names)])
    return table.cast(schema).replace_schema_metadata(meta)


def plan_hash(plan: pa.Table) -> str:
    """Content hash of a plan (rows and provenance), used as a cache key."""
    digest = hashlib.sha256()
    for col in plan.column_names:
        digest.update(col.encode())
        digest.update(json.dumps(plan[col].to_pylist(), default=str).encode())
    digest.update(json.dumps({k.decode(): v.decode() for k, v in (plan.schema.metadata or {}).items()},
                             sort_keys=True).encode())
    return digest.hexdigest()[:16]


def make_attack(data: object, path: str = "attack") -> Attack:
    """Validates an attack mapping into its registered class (absent: no attack)."""
    return make_registered(ATTACKS, data, path, default="none")


__all__ = ["Attack", "ATTACKS", "empty_plan", "make_attack", "make_plan", "ModelView", "nested_sample", "ScoresClasses", "next_id", "plan_hash", "PLAN_SCHEMA"]
