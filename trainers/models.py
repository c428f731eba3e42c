"""Model creation: any open_clip architecture, plus tiny bundled ones.

The bundled architectures live as JSON files in ``trainers/model_configs`` and
are added to open_clip's own model-config registry, so ``model.arch: tiny-rn``
works exactly like ``model.arch: ViT-B-32``. Adding one is adding a file.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import text_global_pool

from poison.config import ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


def bundled_archs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def check_arch(arch: str) -> None:
    """Raises ConfigError for an architecture open_clip does not know."""
    if arch not in open_clip.list_models():
        hint = ", ".join(bundled_archs()) + ", or any of open_clip.list_models()"
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; valid: {hint}")


def architecture_fingerprint(arch: str) -> dict[str, Any]:
    """What defines ``arch`` (its open_clip config and the open_clip version), for cache keys."""
    return {"config": open_clip.get_model_config(arch), "open_clip": open_clip.__version__}


def check_image_size(arch: str, image_size: int) -> None:
    """The vision tower must accept ``image_size`` (open_clip ResNets downsample by 32)."""
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    patch = vision.get("patch_size")
    step = 32 if patch is None and isinstance(vision.get("layers"), (list, tuple)) else patch
    if step and (image_size < step or image_size % step):
        raise ConfigError(f"data.image_size: {arch} needs a multiple of {step} pixels, got {image_size}")


def check_pretrained(arch: str, pretrained: str | None) -> None:
    """A local checkpoint path must exist; a tag must be one open_clip has for ``arch``."""
    if pretrained is None:
        return
    looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path:
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained: checkpoint file {pretrained} not found")
        return
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        valid = ", ".join(tags) if tags else "none (give a local checkpoint path)"
        raise ConfigError(f"model.pretrained: {arch} has no pretrained tag {pretrained!r}; valid: {valid}")


class ShortContextCLIP(open_clip.model.CLIP):
    """open_clip's CLIP whose text tower also takes token rows cut short of its context length:
    the same computation over the first ``n`` positions (their positional embeddings, the
    causal mask's top-left n x n). With a causal mask a position sees only itself and those
    before it, so the features pooled at a caption's end token are the same (up to float
    rounding) whether the padding after the batch's longest caption is there or not; cutting it
    saves the text tower's work on it (``Built.text_input``). A model of this class is created as
    an open_clip ``CLIP`` and re-classed by :func:`build_model`; its parameters and state dict
    are unchanged."""

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        n = text.shape[1]
        if n == self.positional_embedding.shape[0]:
            return super().encode_text(text, normalize=normalize)
        # open_clip's CLIP.encode_text (3.x), over the first n positions
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:n].to(cast_dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:n, :n]))
        x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    @staticmethod
    def takes(model: torch.nn.Module) -> bool:
        """Whether ``model`` computes the same with its padding cut: an open_clip CLIP (not a
        subclass: CoCa, custom text towers) with a causal text mask and pooling at the end
        token (or the first): pooling the last position would change."""
        return (type(model) is open_clip.model.CLIP and getattr(model, "attn_mask", None) is not None
                and model.text_pool_type in ("argmax", "eos", "first"))


@dataclass
class Built:
    """A model ready to train: the module, its tokenizer and input normalisation."""

    model: torch.nn.Module
    tokenize: Callable[[list[str]], torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor
    image_size: int

    def text_input(self, tokens: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        """Token ids (on the CPU) as the text tower takes them, on the model's device: for a
        :class:`ShortContextCLIP`, without the columns that are padding (id 0) in every row.
        Captions are mostly far shorter than the context (77 tokens for open_clip's models),
        and a ViT-B-32 trained about 1.3x faster on batches cut to their longest caption
        (benchmarks/short_context.py)."""
        if isinstance(self.model, ShortContextCLIP) and tokens.shape[1] and len(tokens):
            used = torch.nonzero(tokens.ne(0).any(0))
            tokens = tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]
        return tokens.to(self.mean.device, non_blocking=non_blocking)


def build_model(arch: str, pretrained: str | None, *, device: torch.device, image_size: int) -> Built:
    """Creates ``arch`` (random init, an open_clip tag, or a local checkpoint path)."""
    check_arch(arch)
    kwargs: dict[str, Any] = {"force_image_size": image_size} if image_size else {}
    model = open_clip.create_model(arch, pretrained=pretrained, device=device, output_dict=True, **kwargs)
    if ShortContextCLIP.takes(model):
        model.__class__ = ShortContextCLIP
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
    return Built(model=model, tokenize=open_clip.get_tokenizer(arch), mean=mean, std=std,
                 image_size=image_size)


def clip_loss() -> torch.nn.Module:
    """open_clip's own symmetric InfoNCE loss."""
    return open_clip.ClipLoss()
