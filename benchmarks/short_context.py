"""Training steps of a CLIP whose text tower sees token batches cut to their longest caption
(``ShortContextCLIP``, what every trial does), against the same steps on the full context,
side by side in one run.

open_clip pads every caption to the model's context (77 tokens for its architectures), and its
text tower computes over all of it. Under the causal text mask the padding after a batch's
longest caption changes nothing that the end token's features depend on, so a poisonsweep
trial cuts it (``Built.text_input``); the features agree to float rounding (printed here too).

Model: ``--arch`` (default ViT-B-32 at 224 px, random init) with fused AdamW; batch ``--batch``
of the built-in synthetic set's captions (their token widths are printed); each round times
``--steps`` training steps (forward, CLIP loss, backward, optimizer step) per variant, the
variants alternating, after one untimed step each. Prints the median step times and their ratio.

Run: .venv/bin/python benchmarks/short_context.py [--arch ViT-B-32] [--image-size 224] [--batch 32]
     [--steps 2] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch

from poison import DataSpec, load_dataset
from trainers.models import ShortContextCLIP, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    built = build_model(args.arch, None, device=torch.device("cpu"), image_size=args.image_size)
    model = built.model
    assert isinstance(model, ShortContextCLIP), f"{args.arch} keeps its full context"
    data = load_dataset(DataSpec(dataset="synthetic", size=args.batch * 4, test_size=16, image_size=32, seed=0))
    captions = data.split("train")["caption"].to_pylist()[: args.batch]
    full = built.tokenize(captions)
    short = built.text_input(full)
    lengths = (full != 0).sum(1).float()
    print(f"{args.arch} at {args.image_size} px, batch {args.batch}, {args.threads} threads: captions of "
          f"{lengths.min():.0f}-{lengths.max():.0f} tokens (mean {lengths.mean():.1f}); context "
          f"{full.shape[1]}, cut to {short.shape[1]}")
    with torch.no_grad():
        diff = (model.encode_text(full, normalize=True) - model.encode_text(short, normalize=True)).abs().max()
    print(f"largest difference of the normalised text features, full against cut: {diff:.1e}")
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    loss_fn = open_clip.ClipLoss()

    def step(tokens: torch.Tensor) -> None:
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {"full context": [], "cut to the longest caption": []}
    for tokens in (full, short):
        step(tokens)  # untimed: allocator and kernels warm
    for r in range(args.rounds):
        for name, tokens in zip(times, (full, short)):
            start = time.perf_counter()
            for _ in range(args.steps):
                step(tokens)
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s/step" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["full context"] / med["cut to the longest caption"]
    print(f"median step: full context {med['full context']:.2f} s, cut {med['cut to the longest caption']:.2f} s: "
          f"{ratio:.2f}x faster cut")


if __name__ == "__main__":
    main()
