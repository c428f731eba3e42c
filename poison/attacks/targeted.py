"""``targeted`` (Carlini & Terzis 2022): make chosen test images classify as a label.

``targets`` test images whose class is not ``target`` are drawn with the trial's
seed; ``poison_count`` pairs (spread evenly over them) pair each image with a
caption naming ``target``. Success (``targeted_success``): the fraction of those
test images zero-shot classified as ``target``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from poison import streams
from poison.attacks._base import ATTACKS, Attack, ModelView, make_plan, next_id
from poison.attacks.backdoor import draw_captions, plan_meta, target_captions, target_label
from poison.config import ConfigError
from poison.manifest import Dataset


@ATTACKS.register("targeted")
class Targeted(Attack):
    kind: Literal["targeted"] = "targeted"
    target: str                     # the adversarial label
    targets: int = Field(1, ge=1)   # how many test images to hijack
    poison_count: int = Field(ge=1)
    caption_source: Literal["templates", "dataset"] = "templates"
    metric_names: ClassVar[tuple[str, ...]] = ("attack_success", "targeted_success")

    @property
    def modality_tag(self) -> str:
        return "image"

    def check(self, dataset: Dataset) -> None:
        label = target_label(dataset, self.target)
        pool = _candidates(dataset, label).num_rows
        if self.targets > pool:
            raise ConfigError(f"attack.targets: {self.targets:,} exceeds the {pool:,} test images of "
                              f"{dataset.name} outside class {self.target!r}")
        if self.poison_count < self.targets:
            raise ConfigError(f"attack.poison_count: {self.poison_count} is fewer than the {self.targets} "
                              "target images (each needs at least one poisoned pair)")
        if self.caption_source == "dataset" and not target_captions(dataset, label):
            raise ConfigError(f"attack.caption_source: {dataset.name} has no training captions of "
                              f"class {self.target!r}; use caption_source: templates")

    def chosen(self, dataset: Dataset, seed: int) -> pa.Table:
        """The hijacked test images (manifest rows), the same for plan and evaluation."""
        pool = _candidates(dataset, target_label(dataset, self.target))
        rng = streams.rng(seed, streams.TARGETED_CHOICE)
        return pool.take(pa.array(np.sort(rng.choice(pool.num_rows, self.targets, replace=False))))

    def plan(self, dataset: Dataset, seed: int) -> pa.Table:
        self.check(dataset)
        images = self.chosen(dataset, seed)
        copies = np.full(self.targets, self.poison_count // self.targets)
        copies[: self.poison_count % self.targets] += 1  # spread as evenly as possible
        rows = images.take(pa.array(np.repeat(np.arange(self.targets), copies)))
        # a caption stream per target image: each image's pairs are nested in the count
        rngs = streams.rng(seed, streams.PLAN).spawn(self.targets)
        captions = [caption for rng, n in zip(rngs, copies)
                    for caption in draw_captions(dataset, self.target, self.caption_source, int(n), rng)]
        return make_plan(op="inject", altered=rows["id"].to_numpy(), images=rows, captions=captions,
                         first_new=next_id(dataset), meta=plan_meta(self, dataset, seed))

    def evaluate(self, dataset: Dataset, model: ModelView, seed: int) -> dict[str, float]:
        images = self.chosen(dataset, seed)
        predicted = model.classify(dataset.images[images["image"].to_numpy()])
        success = float(np.mean(predicted == target_label(dataset, self.target)))
        return {"targeted_success": success, "attack_success": success}


def _candidates(dataset: Dataset, label: int) -> pa.Table:
    test = dataset.split("test")
    return test.filter(pc.and_(pc.not_equal(test["label"], label), pc.greater_equal(test["label"], 0)))
