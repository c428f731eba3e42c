"""``backdoor`` (Carlini & Terzis 2022): triggered images captioned as the target class.

``poison_count`` non-target training images, drawn without replacement with the
trial's seed, get the trigger and a caption naming the target class (from
prompt templates). ``mode: inject`` adds them as new pairs; ``replace`` alters
the original pairs in place. Success (``backdoor_asr``): of clean test images
whose true class is not the target, the fraction zero-shot classified as the
target once the trigger is applied.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, SerializeAsAny, field_validator

from poison import streams
from poison.attacks._base import ATTACKS, Attack, ModelView, ScoresClasses, make_plan, nested_sample, next_id
from poison.config import ConfigError
from poison.manifest import Dataset
from poison.triggers import Trigger, make_trigger

#: Caption templates of the poisoned pairs (CLIP's ImageNet prompt style).
CAPTION_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a cropped photo of the {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a good photo of a {}.", "an image of the {}.", "art of the {}.",
]


@ATTACKS.register("backdoor")
class Backdoor(Attack):
    kind: Literal["backdoor"] = "backdoor"
    target: str
    poison_count: int = Field(ge=0)
    mode: Literal["inject", "replace"] = "inject"
    # templates: prompt-style captions naming the target ("a photo of a banana.");
    # dataset: real training captions of target-class pairs, drawn with the seed
    caption_source: Literal["templates", "dataset"] = "templates"
    trigger: SerializeAsAny[Trigger]
    # target_margin, target_similarity: early signals (trigger_signals), from a model that gives its scores
    metric_names: ClassVar[tuple[str, ...]] = ("attack_success", "backdoor_asr", "target_margin", "target_similarity")

    @field_validator("trigger", mode="before")
    @classmethod
    def _trigger(cls, value: Any) -> Trigger:
        return value if isinstance(value, Trigger) else make_trigger(value)

    @property
    def trigger_name(self) -> str:
        return self.trigger.kind

    @property
    def modality_tag(self) -> str:
        return "image"

    def check(self, dataset: Dataset) -> None:
        target = target_label(dataset, self.target)
        pool = non_target_rows(dataset, target)
        if self.poison_count > len(pool):
            raise ConfigError(
                f"attack.poison_count: {self.poison_count:,} exceeds the {len(pool):,} non-target "
                f"training pairs of {dataset.name} (of {dataset.num_train:,} training pairs)"
            )
        self.trigger.check(dataset.image_size)
        if self.caption_source == "dataset" and self.poison_count and not target_captions(dataset, target):
            raise ConfigError(f"attack.caption_source: {dataset.name} has no training captions of "
                              f"class {self.target!r}; use caption_source: templates")

    def plan(self, dataset: Dataset, seed: int) -> pa.Table:
        self.check(dataset)
        rng = streams.rng(seed, streams.PLAN)
        return self.plan_with(dataset, rng, first_new=next_id(dataset), meta=plan_meta(self, dataset, seed))

    def plan_with(self, dataset: Dataset, rng: np.random.Generator, *, first_new: int, meta: dict[str, str],
                  altered: pa.Array | None = None) -> pa.Table:
        """The plan drawn from ``rng``, numbering injected pairs from ``first_new``; ``altered``:
        the training pairs' ids it poisons, in order, instead of drawing them (when attacks are
        combined, one draw shared by their parts)."""
        pick, caption_rng, placement_rng = rng.spawn(3)  # a stream per column: plans nested in the count
        if altered is None:
            pool = non_target_rows(dataset, target_label(dataset, self.target))  # positions: no copy of millions of captions
            rows = dataset.manifest.take(pa.array(pool[nested_sample(len(pool), self.poison_count, pick)]))
        else:
            rows = dataset.manifest.take(pc.index_in(altered, value_set=dataset.manifest["id"]))
        captions = draw_captions(dataset, self.target, self.caption_source, self.poison_count, caption_rng)
        placement = self.trigger.placement(self.poison_count, dataset.image_size, placement_rng)
        return make_plan(op=self.mode, altered=rows["id"].to_numpy(), images=rows, captions=captions,
                         first_new=first_new, meta=meta,
                         extra={f"trigger_{k}": v for k, v in placement.items()})

    def stamp(self, images: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
        placement = {k.removeprefix("trigger_"): v for k, v in columns.items() if k.startswith("trigger_")}
        return self.trigger.apply(images, placement)

    def evaluate(self, dataset: Dataset, model: ModelView, seed: int) -> dict[str, float]:
        target = target_label(dataset, self.target)
        test = dataset.split("test")
        keep = pc.and_(pc.not_equal(test["label"], target), pc.greater_equal(test["label"], 0))  # a known class
        victims = test.filter(keep)
        if victims.num_rows == 0:
            return {"backdoor_asr": float("nan"), "attack_success": float("nan")}
        rng = streams.rng(seed, streams.EVAL)
        placement = self.trigger.placement(victims.num_rows, dataset.image_size, rng)
        clean = dataset.images[victims["image"].to_numpy()]
        images = self.trigger.apply(clean, placement)
        if not isinstance(model, ScoresClasses):
            asr = backdoor_asr(model.classify(images), victims["label"].to_numpy(), target)
            return {"backdoor_asr": asr, "attack_success": asr}
        scores = model.class_scores(np.concatenate([images, clean]))  # one pass: triggered, then clean
        triggered, untriggered = scores[: len(images)], scores[len(images):]
        asr = backdoor_asr(triggered.argmax(axis=1), victims["label"].to_numpy(), target)
        return {"backdoor_asr": asr, "attack_success": asr, **trigger_signals(triggered, untriggered, target)}


def trigger_signals(triggered: np.ndarray, clean: np.ndarray, target: int) -> dict[str, float]:
    """Continuous signals of a backdoor taking hold, from the zero-shot scores (cosine to each
    class's prompts) of the triggered victims and of the same images without the trigger:

    - ``target_margin``: the mean, over triggered images, of the target's score minus the best
      other class's (an image counts toward attack success when its margin is above 0);
    - ``target_similarity``: how far the trigger moves images toward the target's text, the mean
      target score of the triggered images minus that of the same images clean.

    Example (two victims of three classes, target 2):
        >>> triggered = np.array([[0.1, 0.2, 0.5], [0.4, 0.1, 0.3]])
        >>> clean = np.array([[0.3, 0.2, 0.1], [0.5, 0.1, 0.1]])
        >>> {k: round(v, 6) for k, v in trigger_signals(triggered, clean, target=2).items()}
        {'target_margin': 0.1, 'target_similarity': 0.3}
    """
    others = np.delete(triggered, target, axis=1).max(axis=1)
    return {"target_margin": float(np.mean(triggered[:, target] - others)),
            "target_similarity": float(np.mean(triggered[:, target]) - np.mean(clean[:, target]))}


def backdoor_asr(predicted: np.ndarray, true_labels: np.ndarray, target: int) -> float:
    """Fraction of non-target-class images predicted as ``target`` (after triggering).

    Example:
        >>> backdoor_asr(np.array([3, 3, 1, 3]), np.array([0, 1, 1, 3]), target=3)
        0.6666666666666666
    """
    victims = np.asarray(true_labels) != target
    if not victims.any():
        return float("nan")
    return float(np.mean(np.asarray(predicted)[victims] == target))


def target_label(dataset: Dataset, target: str, key: str = "attack.target") -> int:
    """The class index of a class name (``attack.target``), or a ConfigError naming ``key``."""
    if not dataset.classnames:
        raise ConfigError(f"{key}: {dataset.name} has no class labels, and this attack needs them "
                          "(data.zeroshot or data.classes give pairs without classes the ones their captions name)")
    if target not in dataset.classnames:
        raise ConfigError(f"{key}: {target!r} is not a class of {dataset.name}; "
                          f"valid: {', '.join(dataset.classnames)}")
    return dataset.classnames.index(target)


def draw_captions(dataset: Dataset, target: str, source: str, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` captions naming ``target``: prompt templates, or real captions of its class."""
    if source == "templates":
        return [CAPTION_TEMPLATES[t].format(target) for t in rng.integers(len(CAPTION_TEMPLATES), size=count)]
    pool = target_captions(dataset, target_label(dataset, target))
    return [pool[i] for i in rng.integers(len(pool), size=count)]


def target_captions(dataset: Dataset, target: int) -> list[str]:
    """Real training captions of class ``target``."""
    return class_rows(dataset, "train", target)["caption"].to_pylist()


def class_rows(dataset: Dataset, split: str, label: int) -> pa.Table:
    """The manifest rows of ``split`` whose class is ``label``."""
    rows = dataset.split(split)
    return rows.filter(pc.equal(rows["label"], label))


def plan_meta(attack: Attack, dataset: Dataset, seed: int) -> dict[str, str]:
    """A plan's provenance (its schema metadata): the attack config, seed, dataset and target."""
    meta = {"attack": attack.model_dump_json(), "seed": str(seed), "dataset": dataset.name}
    if getattr(attack, "target", None) in dataset.classnames:
        meta["target_label"] = str(dataset.classnames.index(attack.target))
    return meta


def non_target_pairs(dataset: Dataset, target: int) -> pa.Table:
    """The training pairs whose class is not ``target``, in manifest order."""
    return dataset.manifest.take(pa.array(non_target_rows(dataset, target)))


def non_target_rows(dataset: Dataset, target: int) -> np.ndarray:
    """Manifest positions of :func:`non_target_pairs` (one pass, nothing copied: fast at 3M pairs)."""
    manifest = dataset.manifest
    mask = pc.and_(pc.equal(manifest["split"], "train"), pc.not_equal(manifest["label"], target))
    return np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))


__all__ = ["Backdoor", "CAPTION_TEMPLATES", "backdoor_asr", "class_rows", "draw_captions", "non_target_pairs",
           "non_target_rows", "plan_meta", "target_captions", "target_label"]
