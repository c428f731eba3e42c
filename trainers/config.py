"""The typed config of one trial: everything that determines its result.

The ``data`` section's schema is poison's (``poison.datasets.DataConfig``), which the loaders' spec extends.

Sweep-only sections (search, resources, tracking, storage) live in
``sweeps.config``; a trial sees only this.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from poison import Attack, Defense, make_attack, make_defense
from poison.config import SPEED_ONLY, ConfigError, Section, validate_section
from poison.datasets import DataConfig, DataSpec


class ModelConfig(Section):
    arch: str = "tiny-rn"
    pretrained: str | None = None  # an open_clip tag, or a local checkpoint path

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        from trainers.models import check_arch, check_pretrained

        check_arch(self.arch)
        check_pretrained(self.arch, self.pretrained)
        return self


class TrainConfig(Section):
    """``train:``, the recipe. Fields marked ``SPEED_ONLY`` change where and how fast a model
    trains, never what it learns: cache keys leave them out (``poison.config.key_values``)."""

    epochs: int = Field(6, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1)  # fraction of all steps
    device: Annotated[Literal["auto", "cpu", "cuda"], SPEED_ONLY] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on GPU
    threads: Annotated[int | None, SPEED_ONLY] = Field(None, ge=1)  # torch CPU threads; None: torch's default
    # the model's memory layout: channels_last speeds convolutions (on this 2-core CPU a tiny
    # ResNet trains 1.25x faster: benchmarks/throughput.py); auto: channels_last when the image
    # tower has convolutions beyond a patch embedding (ResNets), contiguous for ViTs
    memory_format: Annotated[Literal["auto", "channels_last", "contiguous"], SPEED_ONLY] = "auto"
    # background threads preparing the next batches (reading the image cache, stamping triggers,
    # normalising, copying to the device) while the model trains on the current one; 0: none,
    # each batch is prepared in the training thread when it is needed; auto: 1 on a GPU, 0 on
    # the CPU (where a loader thread competes with torch's own threads for the cores: on this
    # 2-core machine one cost about 15% of the throughput, benchmarks/throughput.py)
    loader_threads: Annotated[Literal["auto"] | int, SPEED_ONLY] = "auto"

    @field_validator("loader_threads", mode="before")
    @classmethod
    def _loader_threads(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 32:
            raise ValueError("'auto' or a number of threads from 0 to 32")
        return value

    # which CLIP towers train; the other stays at its initial (or pretrained) weights:
    # Yang et al.'s frozen-encoder ablation (image / text encoder poisoned alone)
    trainable: Literal["both", "image", "text"] = "both"
    # what "frozen" covers: ``encoder`` as Yang et al.'s code (mm_poison retrieval_by_CLIP.py:main,
    # --freeze_encoder): the image encoder (visual) alone, its BatchNorm statistics still updating,
    # or the text transformer alone (token and positional embeddings, ln_final and text_projection
    # train); ``tower``, ours: every parameter of the tower, BatchNorm statistics frozen too
    freeze: Literal["encoder", "tower"] = "encoder"


class TrialConfig(Section):
    """A fully resolved trial: no search dimensions left."""

    name: str = "poisonsweep"
    seed: int = Field(0, ge=0, lt=2**32)
    data: DataConfig = DataConfig()
    model: ModelConfig = Field(default_factory=ModelConfig)  # built when needed: its check imports open_clip
    train: TrainConfig = TrainConfig()
    attack: SerializeAsAny[Attack] = Field(default_factory=lambda: make_attack(None))
    defense: SerializeAsAny[Defense] = Field(default_factory=lambda: make_defense(None))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        """The name is a folder under ``storage.path`` (and an MLflow experiment): never a path."""
        if not value.strip() or value in (".", "..") or any(c in value for c in "/\\") or not value.isprintable():
            raise ValueError("a sweep's name is its folder under storage.path: no path separators or "
                             "control characters, not '.' or '..'")
        return value

    @field_validator("attack", mode="before")
    @classmethod
    def _attack(cls, value: Any) -> Attack:
        return value if isinstance(value, Attack) else make_attack(value)

    @field_validator("defense", mode="before")
    @classmethod
    def _defense(cls, value: Any) -> Defense:
        return value if isinstance(value, Defense) else make_defense(value)

    @model_validator(mode="after")
    def _fits(self) -> TrialConfig:
        from trainers.models import check_image_size

        check_image_size(self.model.arch, self.data.image_size)
        if self.train.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("train.device: cuda was asked for, but torch sees no CUDA device")
        return self

    def data_spec(self, cache_dir: str | None = None, trusted: int | None = None) -> DataSpec:
        """The loaders' spec of the ``data`` section, seeded by the trial (``DataConfig.spec``)."""
        return self.data.spec(self.seed, cache_dir, trusted)

    def clean(self) -> TrialConfig:
        """The same data, model and recipe without poison or defense."""
        return self.model_copy(update={"attack": make_attack(None), "defense": make_defense(None)})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_trial_config(raw: dict[str, Any]) -> TrialConfig:
    """Validates a plain mapping; ConfigError names the key path.

    Sections are validated one at a time so each error carries its full path.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {raw!r}")
    unknown = set(raw) - set(TrialConfig.model_fields)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key; valid: {', '.join(TrialConfig.model_fields)}")
    sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
    parsed: dict[str, Any] = {k: v for k, v in raw.items() if k in ("name", "seed")}
    for key, cls in sections.items():
        if key in raw:
            parsed[key] = validate_section(cls, raw[key], key)
    if "attack" in raw:
        parsed["attack"] = make_attack(raw["attack"])
    if "defense" in raw:
        parsed["defense"] = make_defense(raw["defense"])
    return validate_section(TrialConfig, parsed, "")
