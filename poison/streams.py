"""Every random stream drawn from a seed, in one table.

A trial's randomness comes from its ``seed`` through numpy's ``SeedSequence``: each use draws
from ``default_rng([seed, *key])`` (``[seed, *key, index]`` for a stream with an index, such as
an epoch), so each use has a stream of its own and changing one use (more pairs, another
attack) never shifts another's draws. Two uses that shared a key would draw the same numbers:
the trusted split of a real dataset would be the batch order's twin. ``SeedSequence`` also pads
its entropy with zeros, so ``[seed, 22]`` and ``[seed, 22, 0]`` are one stream: an indexed
stream's key must not be another's, nor a prefix of another's. ``tests/poison/test_streams.py``
checks the table for both and draws from every stream to show that no two agree, and that no
code outside this module builds a generator from a seed.

Key 0 is the seed itself (``[seed, 0]`` pads to ``[seed]``); only the synthetic set's
attributes use it. The triggers' fixed patterns draw from their own ``pattern_seed``, not the
trial's seed, and are in the table so their keys stay distinct from the seed's streams.

Torch's generator is not in the table: a trial seeds it with the seed itself before building
its model (initialisation, dropout), and a post-training defense reseeds it from
``DEFENSE_TORCH`` per epoch.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Stream(NamedTuple):
    key: tuple[int, ...]  # what follows the seed in the SeedSequence's entropy
    use: str
    index: str | None = None  # what the one index after the key counts, for an indexed stream


# datasets
SYNTHETIC_ATTRIBUTES = Stream((0,), "synthetic set: every pair's colour, shape, size and position")
SYNTHETIC_RENDER = Stream((1,), "synthetic set: the pixels' noise when images are drawn")
SYNTHETIC_TRUSTED_ATTRIBUTES = Stream((0, 1), "synthetic set: the trusted split's attributes")
SYNTHETIC_TRUSTED_RENDER = Stream((1, 1), "synthetic set: the trusted split's pixel noise")
FASHION_SUBSET = Stream((2,), "fashion-mnist: which training and test images are used")
FASHION_CAPTIONS = Stream((3,), "fashion-mnist: each image's caption")
FASHION_TRUSTED = Stream((4,), "fashion-mnist: the trusted split, from the images left over")
FILES_SELECT = Stream((20,), "file datasets (csv, coco, shards, image folders): which pairs are used")
FILES_TRUSTED = Stream((24,), "file datasets: the trusted split, from the pairs left over")
IMAGEFOLDER_CAPTIONS = Stream((25,), "image folders: each image's caption template")

# triggers: streams of the trigger's own pattern_seed
PATCH_NOISE = Stream((7,), "patch trigger: the noise pattern (of pattern_seed)")
BLENDED_NOISE = Stream((8,), "blended trigger: the noise pattern (of pattern_seed)")
WARP_FIELD = Stream((9,), "warp trigger: the coarse displacement field (of pattern_seed)")

# attacks
PLAN = Stream((11,), "attacks: which pairs are poisoned, with which captions and placements")
EVAL = Stream((12,), "attacks: the test images a success rate is measured on, and their placements")
TARGETED_CHOICE = Stream((13,), "targeted attack: the target images (shared by plan and evaluation)")
TEXT_BACKDOOR_CHOICE = Stream((14,), "text backdoor: the single target image")
DUAL_TEXT_PART = Stream((11, 15), "dual backdoor: its text half's plan, a branch of PLAN")
DUAL_REPLACED = Stream((11, 17), "dual backdoor, replace mode: one order of the pairs it alters, dealt to its halves")
MULTIMODAL_CHOICE = Stream((16,), "Yang et al. attacks: a goal's single target image", index="goal")

# training
BATCHES = Stream((21,), "training loop: every epoch's batch order")
DEFENSE_BATCHES = Stream((22,), "post-training defenses: the fine-tuning batch order", index="epoch")
DEFENSE_TORCH = Stream((23,), "post-training defenses: torch's seed before an epoch", index="epoch")

# defenses
OUTLIER_FILTER = Stream((31,), "outlier filter: the isolation forest's random state")
SAFECLIP_BANK = Stream((34,), "SafeCLIP: the memory banks' random first rows", index="modality")
ROCLIP_POOL = Stream((33,), "RoCLIP: the caption pool's random first rows")
SAFECLIP_EPOCH = Stream((32,), "SafeCLIP: the mixture fit of an epoch's safe/risky split", index="epoch")
CAPTION_VIEWS = Stream((35,), "EDA caption views: each training row's fixed variant (trainers.augment)",
                       index="view")

TABLE: dict[str, Stream] = {name: value for name, value in globals().items() if isinstance(value, Stream)}


def rng(seed: int, stream: Stream, index: int | None = None) -> np.random.Generator:
    """The generator of ``stream`` for ``seed`` (and ``index``, for an indexed stream).

    >>> a, b = rng(7, BATCHES), rng(7, BATCHES)
    >>> int(a.integers(1000)) == int(b.integers(1000))
    True
    """
    if (index is None) != (stream.index is None):
        raise TypeError(f"the {stream.use!r} stream takes {'an index' if stream.index else 'no index'}")
    return np.random.default_rng([seed, *stream.key, *(() if index is None else (index,))])
