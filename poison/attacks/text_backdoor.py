"""Backdoors through the captions: ``text-backdoor``, and ``dual-backdoor`` (both modalities).

``text-backdoor``: ``poison_count`` captions of non-target training pairs get the
text trigger and are paired with images of the target class (``target_image:
class``, a random target-class training image per pair) or with one target image
(``single``: a test image of the target class drawn with the trial's seed).
``inject`` adds them as new pairs; ``replace`` alters the caption's own pair.
Success: the trigger is put into every non-target test caption, and each such
query ranks the whole test gallery; ``min_rank`` is the 1-based rank of its best
target image (any target-class test image, or the single target) and
``attack_success`` is ``hit_at_1`` (the target retrieved first). ``hit_at_5/10``
and ``min_rank_mean/median`` are reported too (definitions in ``retrieval.py``).

``dual-backdoor``: an image backdoor (``backdoor``: triggered non-target images
captioned as the target) and a text backdoor toward the same target in one
training set. ``modality`` picks which are planted: ``image``, ``text`` or
``both`` (the budget split as evenly as possible, the image part taking the odd
pair; in ``replace`` mode the two parts alter different pairs). Both backdoors are
measured whatever the modality (so a sweep compares like with like):
``attack_success`` is ``backdoor_asr`` for ``image``, ``hit_at_1`` for ``text``, and
their mean for ``both``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, SerializeAsAny, field_validator

from poison import streams
from poison.attacks import retrieval
from poison.attacks._base import ATTACKS, Attack, ModelView, make_plan, nested_sample, next_id
from poison.attacks.backdoor import Backdoor, class_rows, non_target_pairs, plan_meta, target_label
from poison.config import ConfigError
from poison.manifest import Dataset
from poison.text_triggers import PhraseTrigger, TextTrigger, make_text_trigger
from poison.triggers import Trigger, make_trigger


class TextTriggered(Attack):
    """Fields and validation shared by the attacks that carry a text trigger."""

    text_trigger: SerializeAsAny[TextTrigger] = Field(default_factory=PhraseTrigger)

    @field_validator("text_trigger", mode="before")
    @classmethod
    def _text_trigger(cls, value: Any) -> TextTrigger:
        return value if isinstance(value, TextTrigger) else make_text_trigger(value)


@ATTACKS.register("text-backdoor")
class TextBackdoor(TextTriggered):
    kind: Literal["text-backdoor"] = "text-backdoor"
    target: str
    poison_count: int = Field(ge=0)
    mode: Literal["inject", "replace"] = "inject"
    target_image: Literal["class", "single"] = "class"
    metric_names: ClassVar[tuple[str, ...]] = ("attack_success", *retrieval.metric_names())

    @property
    def trigger_name(self) -> str:
        return self.text_trigger.kind

    @property
    def modality_tag(self) -> str:
        return "text"

    def check(self, dataset: Dataset) -> None:
        target = target_label(dataset, self.target)
        pool = non_target_pairs(dataset, target)
        if self.poison_count > pool.num_rows:
            raise ConfigError(f"attack.poison_count: {self.poison_count:,} exceeds the {pool.num_rows:,} "
                              f"non-target training captions of {dataset.name}")
        if self.target_image == "class" and not class_rows(dataset, "train", target).num_rows:
            raise ConfigError(f"attack.target: {dataset.name} has no training images of class {self.target!r}")
        if not class_rows(dataset, "test", target).num_rows:
            raise ConfigError(f"attack.target: {dataset.name} has no test images of class {self.target!r} "
                              "to measure retrieval against")

    def chosen(self, dataset: Dataset, seed: int) -> pa.Table:
        """The single target image (a test image of the target class), one row."""
        candidates = class_rows(dataset, "test", target_label(dataset, self.target))
        rng = streams.rng(seed, streams.TEXT_BACKDOOR_CHOICE)
        return candidates.slice(int(rng.integers(candidates.num_rows)), 1)

    def plan(self, dataset: Dataset, seed: int) -> pa.Table:
        self.check(dataset)
        rng = streams.rng(seed, streams.PLAN)
        return self.plan_with(dataset, seed, rng, first_new=next_id(dataset), meta=plan_meta(self, dataset, seed))

    def plan_with(self, dataset: Dataset, seed: int, rng: np.random.Generator, *, first_new: int,
                  meta: dict[str, str], altered: pa.Array | None = None) -> pa.Table:
        """The plan drawn from ``rng``; ``altered``: the training pairs' ids it poisons, in order,
        instead of drawing them (when attacks are combined, one draw shared by their parts)."""
        target = target_label(dataset, self.target)
        pool = non_target_pairs(dataset, target)
        pick, position_rng, image_rng = rng.spawn(3)  # a stream per column: plans nested in the count
        if altered is None:
            rows = pool.take(pa.array(nested_sample(pool.num_rows, self.poison_count, pick)))
        else:
            rows = pool.take(pc.index_in(altered, value_set=pool["id"]))
        clean = rows["caption"].to_pylist()
        positions = self.text_trigger.placement(clean, position_rng)
        if self.target_image == "single":
            images = self.chosen(dataset, seed).take(pa.array(np.zeros(self.poison_count, np.int64)))
        else:
            own = class_rows(dataset, "train", target)
            images = own.take(pa.array(image_rng.integers(own.num_rows, size=self.poison_count)))
        return make_plan(op=self.mode, altered=rows["id"].to_numpy(), images=images,
                         captions=self.text_trigger.apply(clean, positions), first_new=first_new, meta=meta,
                         extra={"caption_source_id": rows["id"],
                                "text_trigger_position": pa.array(positions, pa.int32())})

    def evaluate(self, dataset: Dataset, model: ModelView, seed: int) -> dict[str, float]:
        target = target_label(dataset, self.target)
        test = dataset.split("test")
        queries = test.filter(pc.and_(pc.not_equal(test["label"], target), pc.greater_equal(test["label"], 0)))
        queries = queries["caption"].to_pylist()
        rng = streams.rng(seed, streams.EVAL)
        triggered = self.text_trigger.apply(queries, self.text_trigger.placement(queries, rng))
        if self.target_image == "single":
            mask = test["id"].to_numpy() == self.chosen(dataset, seed)["id"][0].as_py()
        else:
            mask = test["label"].to_numpy() == target
        if not triggered or not mask.any():
            out = retrieval.hit_metrics(np.zeros(0))
        else:
            gallery = model.embed_images(dataset.images[test["image"].to_numpy()])
            out = retrieval.hit_metrics(retrieval.ranks_by_embedding(model.embed_texts(triggered), gallery, mask))
        return {**out, "attack_success": out["hit_at_1"]}


@ATTACKS.register("dual-backdoor")
class DualBackdoor(TextTriggered):
    kind: Literal["dual-backdoor"] = "dual-backdoor"
    target: str
    poison_count: int = Field(ge=0)
    modality: Literal["image", "text", "both"] = "both"
    mode: Literal["inject", "replace"] = "inject"
    caption_source: Literal["templates", "dataset"] = "templates"  # of the image part
    target_image: Literal["class", "single"] = "class"             # of the text part
    trigger: SerializeAsAny[Trigger]
    metric_names: ClassVar[tuple[str, ...]] = ("attack_success", "backdoor_asr", *retrieval.metric_names())

    @field_validator("trigger", mode="before")
    @classmethod
    def _trigger(cls, value: Any) -> Trigger:
        return value if isinstance(value, Trigger) else make_trigger(value)

    @property
    def modality_tag(self) -> str:
        return self.modality

    @property
    def trigger_name(self) -> str:
        return {"image": self.trigger.kind, "text": self.text_trigger.kind,
                "both": f"{self.trigger.kind}+{self.text_trigger.kind}"}[self.modality]

    def counts(self) -> tuple[int, int]:
        """Pairs of the image part and of the text part."""
        if self.modality == "image":
            return self.poison_count, 0
        if self.modality == "text":
            return 0, self.poison_count
        return self.poison_count - self.poison_count // 2, self.poison_count // 2

    def parts(self) -> tuple[Backdoor, TextBackdoor]:
        n_image, n_text = self.counts()
        image = Backdoor(target=self.target, poison_count=n_image, mode=self.mode,
                         caption_source=self.caption_source, trigger=self.trigger)
        text = TextBackdoor(target=self.target, poison_count=n_text, mode=self.mode,
                            target_image=self.target_image, text_trigger=self.text_trigger)
        return image, text

    def check(self, dataset: Dataset) -> None:
        image, text = self.parts()
        image.check(dataset)
        text.check(dataset)
        pool = non_target_pairs(dataset, target_label(dataset, self.target)).num_rows
        if self.mode == "replace" and self.poison_count > pool:
            raise ConfigError(f"attack.poison_count: {self.poison_count:,} exceeds the {pool:,} non-target "
                              f"training pairs of {dataset.name} that replace mode can alter")

    def plan(self, dataset: Dataset, seed: int) -> pa.Table:
        self.check(dataset)
        image, text = self.parts()
        meta = plan_meta(self, dataset, seed)
        first = next_id(dataset)
        shared = {"image": None, "text": None}
        if self.mode == "replace":  # one draw of the pairs to alter, dealt out: budgets stay nested
            shared = self.dealt(dataset, seed)
        a = image.plan_with(dataset, streams.rng(seed, streams.PLAN), first_new=first, meta=meta,
                            altered=shared["image"])
        b = text.plan_with(dataset, seed, streams.rng(seed, streams.DUAL_TEXT_PART),
                           first_new=first + a.num_rows, meta=meta, altered=shared["text"])
        a = a.append_column("part", pa.array(["image"] * a.num_rows, pa.string()))
        b = b.append_column("part", pa.array(["text"] * b.num_rows, pa.string()))
        # the image rows carry trigger placement, the text rows text-trigger positions: nulls elsewhere
        return pa.concat_tables([a, b], promote_options="default").replace_schema_metadata(meta)

    def dealt(self, dataset: Dataset, seed: int) -> dict[str, pa.Array]:
        """Replace mode: the ids of the pairs each half alters, the first ``poison_count`` of one
        order of the non-target pairs (stream ``DUAL_REPLACED``), the image half taking the even
        places and the text half the odd ones while both have pairs left: the pairs of a smaller
        budget are those of a larger one, each in the same half."""
        n_image, n_text = self.counts()
        ids = non_target_pairs(dataset, target_label(dataset, self.target))["id"]
        order = nested_sample(len(ids), self.poison_count, streams.rng(seed, streams.DUAL_REPLACED))
        both = 2 * min(n_image, n_text)
        image = np.concatenate([order[:both:2], order[both:]]) if n_image > n_text else order[:both:2]
        text = np.concatenate([order[1:both:2], order[both:]]) if n_text > n_image else order[1:both:2]
        return {"image": ids.take(pa.array(image, pa.int64())), "text": ids.take(pa.array(text, pa.int64()))}

    def stamp(self, images: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
        hit = np.asarray(columns["part"]) == "image"
        if not hit.any():
            return images
        placement = {k.removeprefix("trigger_"): np.asarray(v)[hit].astype(np.int64)
                     for k, v in columns.items() if k.startswith("trigger_")}
        out = np.array(images, copy=True)
        out[hit] = self.trigger.apply(images[hit], placement)
        return out

    def evaluate(self, dataset: Dataset, model: ModelView, seed: int) -> dict[str, float]:
        image, text = self.parts()
        asr = image.evaluate(dataset, model, seed)["backdoor_asr"]
        out = text.evaluate(dataset, model, seed)
        success = {"image": asr, "text": out["hit_at_1"], "both": (asr + out["hit_at_1"]) / 2}[self.modality]
        return {**out, "backdoor_asr": asr, "attack_success": success}



__all__ = ["DualBackdoor", "TextBackdoor"]
