"""Yang et al. (ICML 2023) poisoning of text→image retrieval: attacks I, II and III.

Every poisoned pair joins a caption of a source class A with an image of a
target class B, so that A's captions come to retrieve B's images:

- ``mm-single-image`` (attack I): all pairs use one target image, a test image
  of B drawn with the trial's seed (so it is in the retrieval gallery);
- ``mm-single-label`` (attack II): the pairs cycle through B's training images in a seeded
  random order, so each is used ⌊n/m⌋ or ⌈n/m⌉ times, as mm_poison's
  ``poisoning/dirty_label_poison.py:generate_one_label`` spreads them (``target_images: cycle``,
  the default; ``independent``, ours, draws each pair's image uniformly with replacement);
- ``mm-multi-label`` (attack III): several ``goals`` (A→B) at once, the budget
  split as evenly as possible over them (earlier goals take the odd pairs).

Captions are real training captions of A (``caption_source: dataset``, the
paper's setting) or prompt templates naming A. ``replace`` swaps the image of existing A pairs,
drawn without replacement: the authors' code (``generate_one_label`` samples a ``poisoned_ratio``
of the source class's rows and overwrites their image), and the mode of the ``mm-*`` presets;
``inject`` (ours) adds the pairs, their captions drawn with replacement. Every trial logs
``source_poison_rate``, the poisoned pairs over the source class's training pairs (mm_poison's
``poisoned_ratio``, per goal averaged over the goals), beside ``poison_rate`` (over all training
pairs).

Success (``retrieval.py`` pins the ranks): every test caption of A queries the
whole test gallery; ``min_rank`` is the 1-based rank of its best target image
(the single image, or any test image of B); ``attack_success`` is ``hit_at_10``.
The image→text direction is reported as ``i2t_*``: each target image queries
all test captions, ranked for its best caption of A. Yang et al. rank a gallery
of their own choosing (mm_poison's ``image_feature_base``); ours is always the
test split, so numbers compare across attacks and trials.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from poison import streams
from poison.attacks import retrieval
from poison.attacks._base import ATTACKS, Attack, ModelView, make_plan, nested_sample, next_id
from poison.attacks.backdoor import CAPTION_TEMPLATES, class_rows, plan_meta, target_label
from poison.config import ConfigError, Section
from poison.manifest import Dataset


class Goal(Section):
    source: str  # class A: its captions are the queries
    target: str  # class B: its images should come back


class RetrievalPoisoning(Attack):
    """Base of the three attacks: subclasses say which goals and which target images."""

    poison_count: int = Field(ge=0)
    mode: Literal["inject", "replace"] = "inject"
    caption_source: Literal["dataset", "templates"] = "dataset"
    target_images: Literal["cycle", "independent"] = "cycle"  # attacks II and III (module docstring)
    metric_names: ClassVar[tuple[str, ...]] = ("attack_success", *retrieval.metric_names(),
                                               *retrieval.metric_names("i2t_"), "source_poison_rate")
    single_image: ClassVar[bool] = False

    @property
    def modality_tag(self) -> str:
        return "both"  # a genuine caption meets a foreign image

    def goal_list(self) -> list[tuple[str, Goal]]:
        """(key path, goal) pairs; the key path names the fields in errors."""
        raise NotImplementedError

    def counts(self) -> list[int]:
        n = len(self.goal_list())
        counts = [self.poison_count // n] * n
        for i in range(self.poison_count % n):
            counts[i] += 1
        return counts

    def check(self, dataset: Dataset) -> None:
        for (key, goal), count in zip(self.goal_list(), self.counts()):
            source = target_label(dataset, goal.source, f"{key}source")
            target = target_label(dataset, goal.target, f"{key}target")
            if source == target:
                raise ConfigError(f"{key}target: {goal.target!r} is also the source class")
            if not class_rows(dataset, "test", source).num_rows:
                raise ConfigError(f"{key}source: {dataset.name} has no test captions of class "
                                  f"{goal.source!r} to query with")
            if not class_rows(dataset, "test", target).num_rows:
                raise ConfigError(f"{key}target: {dataset.name} has no test images of class {goal.target!r}")
            if not self.single_image and not class_rows(dataset, "train", target).num_rows:
                raise ConfigError(f"{key}target: {dataset.name} has no training images of class {goal.target!r}")
            pool = class_rows(dataset, "train", source).num_rows
            if count and (pool == 0 and self.caption_source == "dataset" or self.mode == "replace" and count > pool):
                raise ConfigError(f"attack.poison_count: {count:,} poisoned pairs of {goal.source!r} need "
                                  f"{'as many' if self.mode == 'replace' else 'some'} training pairs of that "
                                  f"class to {'alter' if self.mode == 'replace' else 'caption from'}; "
                                  f"{dataset.name} has {pool:,}")

    def chosen(self, dataset: Dataset, seed: int, goal: Goal, index: int = 0) -> pa.Table:
        """The single target image of a goal (a test image of its target class), one row."""
        candidates = class_rows(dataset, "test", target_label(dataset, goal.target))
        rng = streams.rng(seed, streams.MULTIMODAL_CHOICE, index)
        return candidates.slice(int(rng.integers(candidates.num_rows)), 1)

    def plan(self, dataset: Dataset, seed: int) -> pa.Table:
        self.check(dataset)
        meta = plan_meta(self, dataset, seed)
        goal_rngs = streams.rng(seed, streams.PLAN).spawn(len(self.goal_list()))
        first, tables = next_id(dataset), []
        for index, ((_, goal), count) in enumerate(zip(self.goal_list(), self.counts())):
            # a stream per goal and per column: each goal's pairs are nested in its count
            pick_rng, caption_rng, image_rng = goal_rngs[index].spawn(3)
            own = class_rows(dataset, "train", target_label(dataset, goal.source))
            pick = np.zeros(0, np.int64)
            if own.num_rows:  # replace alters distinct pairs; inject may reuse a caption
                pick = (nested_sample(own.num_rows, count, pick_rng) if self.mode == "replace"
                        else pick_rng.integers(own.num_rows, size=count))
            rows = own.take(pa.array(pick, pa.int64()))
            if self.caption_source == "dataset":
                captions, caption_ids = rows["caption"].to_pylist(), rows["id"]
            else:
                captions = [CAPTION_TEMPLATES[t].format(goal.source)
                            for t in caption_rng.integers(len(CAPTION_TEMPLATES), size=count)]
                caption_ids = pa.nulls(count, pa.int64())
            if self.single_image:
                images = self.chosen(dataset, seed, goal, index).take(pa.array(np.zeros(count, np.int64)))
            else:
                pool = class_rows(dataset, "train", target_label(dataset, goal.target))
                images = pool.take(pa.array(target_images(pool.num_rows, count, image_rng, self.target_images),
                                            pa.int64()))
            tables.append(make_plan(
                op=self.mode, altered=rows["id"].to_numpy(), images=images, captions=captions, first_new=first,
                meta=meta, extra={"caption_source_id": caption_ids, "goal": pa.array(np.full(count, index), pa.int32())}))
            first += count
        return pa.concat_tables(tables).replace_schema_metadata(meta)

    def evaluate(self, dataset: Dataset, model: ModelView, seed: int) -> dict[str, float]:
        test = dataset.split("test")
        labels, ids = test["label"].to_numpy(), test["id"].to_numpy()
        images = model.embed_images(dataset.images[test["image"].to_numpy()])
        texts = model.embed_texts(test["caption"].to_pylist())
        t2i, i2t = [], []
        for index, (_, goal) in enumerate(self.goal_list()):
            source, target = target_label(dataset, goal.source), target_label(dataset, goal.target)
            if self.single_image:
                is_target = ids == self.chosen(dataset, seed, goal, index)["id"][0].as_py()
            else:
                is_target = labels == target
            queries = labels == source
            t2i.append(retrieval.ranks_by_embedding(texts[queries], images, is_target))
            i2t.append(retrieval.ranks_by_embedding(images[is_target], texts, queries))
        out = {**retrieval.hit_metrics(np.concatenate(t2i)), **retrieval.hit_metrics(np.concatenate(i2t), "i2t_")}
        return {**out, "attack_success": out["hit_at_10"], "source_poison_rate": self.source_poison_rate(dataset)}

    def source_poison_rate(self, dataset: Dataset) -> float:
        """Poisoned pairs over the source class's training pairs, averaged over the goals."""
        rates = [count / max(1, class_rows(dataset, "train", target_label(dataset, goal.source)).num_rows)
                 for (_, goal), count in zip(self.goal_list(), self.counts())]
        return float(np.mean(rates))


def target_images(pool: int, count: int, rng: np.random.Generator, how: str) -> np.ndarray:
    """Which of ``pool`` target-class images each of ``count`` poisoned pairs gets: ``cycle`` runs
    through one seeded permutation of them again and again (each used ⌊count/pool⌋ or
    ⌈count/pool⌉ times, the extra ones a random subset, as mm_poison's ``generate_one_label``;
    nested: a smaller count's images are a prefix), ``independent`` draws each uniformly.

    Example:
        >>> rows = target_images(3, 7, np.random.default_rng(0), "cycle")
        >>> sorted(np.bincount(rows, minlength=3).tolist()), rows[:3].tolist() == rows[3:6].tolist()
        ([2, 2, 3], True)
    """
    if how == "independent":
        return rng.integers(pool, size=count)
    return np.resize(rng.permutation(pool), count)


@ATTACKS.register("mm-single-image")
class SingleImage(RetrievalPoisoning):
    """Attack I: captions of ``source`` paired with one target image of class ``target``."""

    kind: Literal["mm-single-image"] = "mm-single-image"
    source: str
    target: str
    single_image: ClassVar[bool] = True

    def goal_list(self) -> list[tuple[str, Goal]]:
        return [("attack.", Goal(source=self.source, target=self.target))]


@ATTACKS.register("mm-single-label")
class SingleLabel(RetrievalPoisoning):
    """Attack II: captions of ``source`` paired with images of class ``target``."""

    kind: Literal["mm-single-label"] = "mm-single-label"
    source: str
    target: str

    def goal_list(self) -> list[tuple[str, Goal]]:
        return [("attack.", Goal(source=self.source, target=self.target))]


@ATTACKS.register("mm-multi-label")
class MultiLabel(RetrievalPoisoning):
    """Attack III: several source→target goals at once."""

    kind: Literal["mm-multi-label"] = "mm-multi-label"
    goals: list[Goal] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_sources(self) -> MultiLabel:
        sources = [g.source for g in self.goals]
        for i, name in enumerate(sources):
            if name in sources[:i]:
                raise ConfigError(f"attack.goals[{i}].source: {name!r} is already the source of an earlier goal")
        return self

    def goal_list(self) -> list[tuple[str, Goal]]:
        return [(f"attack.goals[{i}].", g) for i, g in enumerate(self.goals)]



__all__ = ["Goal", "MultiLabel", "SingleImage", "SingleLabel", "target_images"]
