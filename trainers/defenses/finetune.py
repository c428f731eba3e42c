"""``clean-finetune`` (Yang et al. 2023): fine-tune the poisoned model on clean pairs.

After the trial's training, the model trains ``epochs`` more epochs at ``lr`` on
``clean_pairs`` trusted pairs (disjoint from the training pairs; see ``DataSpec.trusted``),
with the trial's recipe otherwise (batch size, warm-up and cosine, weight decay, frozen
tower). The defaults are CleanCLIP's fine-tuning recipe (nishadsinghi/CleanCLIP, its README's
fine-tuning command and ``src/parser.py``): 10 epochs at 1/50 of the learning rate the model was
trained at (their 1e-5 after 5e-4), so ``lr`` defaults to ``train.lr / 50``; their 100,000 clean
pairs are a scale, here ``clean_pairs`` (default 2,000). The metrics before it are kept as
``predefense_*``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from poison.defenses import DEFENSES, Defense, Stage, check_trusted
from poison.manifest import Dataset

if TYPE_CHECKING:
    from trainers.hooks import PostTraining
    from trainers.objectives import Objective

AUTHORS_LR_RATIO = 1 / 50  # CleanCLIP fine-tunes at 1e-5 a model pretrained at 5e-4
#: Reported by every post-training defense (the trainer adds all ``predefense_*``).
POST_TRAINING_METRICS = ("predefense_attack_success", "predefense_utility", "defense_seconds")


@DEFENSES.register("clean-finetune")
class CleanFinetune(Defense):
    kind: Literal["clean-finetune"] = "clean-finetune"
    clean_pairs: int = Field(2000, ge=2)  # trusted pairs to fine-tune on
    epochs: int = Field(10, ge=1)
    lr: float | None = Field(None, gt=0)  # None: the trial's train.lr / 50 (CleanCLIP's 1e-5 after 5e-4)

    metric_names: ClassVar[tuple[str, ...]] = POST_TRAINING_METRICS
    stage: ClassVar[Stage] = "post"

    @property
    def extra_epochs(self) -> int:
        return self.epochs

    def check(self, dataset: Dataset, *, pretrained: bool) -> None:
        check_trusted(dataset, self.clean_pairs, "defense.clean_pairs")

    def after_training(self, session: PostTraining) -> dict[str, float]:
        clean = session.trusted(self.clean_pairs, "defense.clean_pairs")
        session.fit(clean, epochs=self.epochs, lr=self.lr or session.config.train.lr * AUTHORS_LR_RATIO,
                    objective=self.finetune_objective(session.config.seed))
        return {}

    def finetune_objective(self, seed: int) -> Objective | None:
        """The loss fine-tuning minimises (None: CLIP's); CleanCLIP adds in-modal terms."""
        return None
