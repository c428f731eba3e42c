"""The typed config of one trial: everything that determines its result.

Sweep-only sections (search, resources, tracking, storage) live in
``sweeps.config``; a trial sees only this.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from poison import DATASETS, Attack, DataSpec, Defense, make_attack, make_defense
from poison.config import ConfigError, Section, validate_section


def registered_dataset(value: str) -> str:
    if value not in DATASETS:
        raise ValueError(f"unknown dataset {value!r}; valid: {', '.join(DATASETS.names())}")
    return value


class ZeroshotConfig(Section):
    """``data.zeroshot``: a labelled dataset whose test images and classes measure utility and
    attack success, while the training pairs come from ``data`` (poison.datasets.zeroshot)."""

    dataset: str
    path: str | None = None
    size: int | None = Field(None, ge=1)  # test images (None: the dataset's own test split or default)

    _registered = field_validator("dataset")(classmethod(lambda cls, value: registered_dataset(value)))


class DataConfig(Section):
    dataset: str = "synthetic"
    path: str | None = None
    size: int | None = Field(20000, ge=1)  # None: all the dataset has
    test_size: int | None = Field(None, ge=1)
    image_size: int = Field(32, ge=8)
    # csv only: the header's names of the image-path and caption columns (None: the first
    # of the usual names the file has, poison.datasets.csv_pairs.IMAGE_COLUMNS/CAPTION_COLUMNS)
    image_column: str | None = Field(None, min_length=1)
    caption_column: str | None = Field(None, min_length=1)
    # train on these pairs, evaluate zero-shot on another dataset's test split and classes
    # (e.g. CC3M pairs, ImageNet classes); unlabelled pairs take the class their caption names
    zeroshot: ZeroshotConfig | None = None
    # zero-shot classes for pairs without classes (csv, webdataset, coco-captions): every pair
    # takes the one class its caption names (Yang et al.'s COCO classes)
    classes: list[str] | None = Field(None, min_length=2)

    _registered = field_validator("dataset")(classmethod(lambda cls, value: registered_dataset(value)))

    @model_validator(mode="after")
    def _one_source_of_classes(self) -> DataConfig:
        if self.classes is not None and self.zeroshot is not None:
            raise ConfigError("data.classes: the classes come from data.zeroshot's dataset; give one of the two")
        return self

    @model_validator(mode="after")
    def _columns_only_for_csv(self) -> DataConfig:
        for key in ("image_column", "caption_column"):
            if getattr(self, key) is not None and self.dataset != "csv":
                raise ConfigError(f"data.{key}: only the csv dataset reads named columns, not {self.dataset}")
        return self


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
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1)  # fraction of all steps
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on GPU
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None: torch's default
    # the model's memory layout: channels_last speeds convolutions (on this 2-core CPU a tiny
    # ResNet trains 1.25x faster: benchmarks/throughput.py); auto: channels_last when the image
    # tower has convolutions beyond a patch embedding (ResNets), contiguous for ViTs
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    # background threads preparing the next batches (reading the image cache, stamping triggers,
    # normalising, copying to the device) while the model trains on the current one; 0: none,
    # each batch is prepared in the training thread when it is needed; auto: 1 on a GPU, 0 on
    # the CPU (where a loader thread competes with torch's own threads for the cores: on this
    # 2-core machine one cost about 15% of the throughput, benchmarks/throughput.py)
    loader_threads: Literal["auto"] | int = "auto"

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
    model: ModelConfig = ModelConfig()
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

    def data_spec(self, cache_dir: str | None = None) -> DataSpec:
        d = self.data
        return DataSpec(dataset=d.dataset, path=d.path, size=d.size, test_size=d.test_size,
                        image_size=d.image_size, seed=self.seed, cache_dir=cache_dir,
                        columns=(d.image_column, d.caption_column),
                        classes=None if d.classes is None else tuple(d.classes),
                        zeroshot=None if d.zeroshot is None else DataSpec(
                            dataset=d.zeroshot.dataset, path=d.zeroshot.path, size=1, test_size=d.zeroshot.size,
                            image_size=d.image_size, seed=self.seed, cache_dir=cache_dir))

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
