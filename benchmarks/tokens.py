"""A trial's training set over N distinct web captions: built by the first trial on a node
(tokenizing every caption, open_clip's Python BPE tokenizer) against a later trial (the node's
token cache, memory-mapped), side by side in one run.

The captions are 8 to 14 words drawn from a small vocabulary plus a number, so all N are
distinct, as in a web scrape; the plan is a 3,000-pair backdoor with template captions (new
to the dataset, so the later trial tokenizes those). Prints seconds of each and the ratio,
and the resident memory of the token ids (int32) against the int64 tensor trials kept before.
Run: .venv/bin/python benchmarks/tokens.py [--captions 300000]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from poison import make_attack
from poison.manifest import Dataset, make_manifest
from trainers.data import TrainingSet
from trainers.models import build_model

WORDS = ("a photo of the dog cat man woman child car street beach tree house city red blue green old new "
         "small large on in at with near under over running sitting standing view night day").split()


def web_dataset(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    captions = [" ".join(words[rng.integers(len(words), size=rng.integers(8, 15))]) + f" no. {i}" for i in range(n)]
    manifest = make_manifest(image=np.arange(n + 10), caption=captions + [f"a photo of a dog {i}" for i in range(10)],
                             label=np.r_[np.full(n, -1), np.zeros(10)], split=["train"] * n + ["test"] * 10)
    return Dataset(name="web", manifest=manifest, classnames=["dog", "cat"], templates=["a photo of a {}."],
                   image_size=32, _render=lambda: np.zeros((n + 10, 32, 32, 3), np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=300_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = web_dataset(args.captions)
    attack = make_attack({"kind": "backdoor", "target": "cat", "poison_count": 3000, "trigger": {"kind": "patch", "size": 4}})
    plan = attack.plan(dataset, seed=0)
    tokenize = build_model("tiny-rn", None, device=torch.device("cpu"), image_size=32).tokenize
    with tempfile.TemporaryDirectory() as folder:
        seconds = []
        for which in ("first trial (tokenizes, writes the cache)", "later trial (reads the cache)"):
            start = time.perf_counter()
            data = TrainingSet(dataset, attack, plan, tokenize, token_cache=folder)
            seconds.append(time.perf_counter() - start)
            print(f"{which:45s} {seconds[-1]:7.2f} s")
        ids = data.tokens.base
        print(f"{args.captions:,} captions: later / first = {seconds[1] / seconds[0]:.3f} "
              f"({seconds[0] / seconds[1]:.0f}x faster); token ids {ids.nbytes / 2**20:,.0f} MB int32 "
              f"memory-mapped, shared by the node's trials (an int64 tensor per trial: {2 * ids.nbytes / 2**20:,.0f} MB)")


if __name__ == "__main__":
    main()
