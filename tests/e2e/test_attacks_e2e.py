"""Yang et al.'s three retrieval attacks end to end on the CPU through `poisonsweep train`, in
their paper's setting: a trained clean CLIP fine-tuned on poisoned pairs. Each attack clearly
works (far above the same metric on a clean fine-tune of the same start) and utility holds.

The start is the synthetic presets' clean model (8,000 pairs, 10 epochs: zero-shot top-1 about
0.98), trained once here with `attack.kind: none`; each attack then fine-tunes it for 2 epochs
at lr 5e-4 (`model.pretrained` is the clean model's checkpoint). The clean fine-tune is the
same for all three attacks, so it trains once (a cache hit for the second and third).
From scratch, every preset's numbers are in the README; the backdoor, text backdoor, dual
backdoor and targeted attack run end to end on web pairs in tests/e2e/test_zeroshot.py and the
backdoor on Fashion-MNIST in tests/e2e/test_sweep.py.
"""
import json
from importlib import resources

import pytest
import yaml

from sweeps.cli import main

pytestmark = pytest.mark.slow

FINE_TUNE = ("train.epochs=2", "train.lr=5e-4")


def preset(kind: str) -> dict:
    return yaml.safe_load((resources.files("sweeps.presets") / f"{kind}.yaml").read_text())


def train(config: dict, folder, name: str, *overrides: str) -> dict:
    path, out = folder / f"{name}.yaml", folder / f"{name}.json"
    path.write_text(yaml.safe_dump(config))
    args = ["train", str(path), "--output", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The presets' clean model: (its checkpoint, its metrics, the store the attacks share)."""
    folder = tmp_path_factory.mktemp("attacks-e2e")
    config = {**preset("mm-single-label"), "attack": {"kind": "none"},
              "search": {"objectives": {"utility": "max"}}, "storage": {"path": str(folder / "pretraining")}}
    metrics = train(config, folder, "clean")
    (checkpoint,) = (folder / "pretraining").glob("cache/clean/*/model.pt")
    return checkpoint, metrics, folder


# attack I: one target image; II: any image of the target class; III: two goals of attack II at
# once. attack_success is hit@10 over the source class's test captions (over both goals' for III).
@pytest.mark.parametrize("kind, floor", [("mm-single-image", 0.3), ("mm-single-label", 0.5), ("mm-multi-label", 0.5)])
def test_a_retrieval_attack_fine_tuned_in_works_without_costing_utility(kind, floor, start):
    checkpoint, pretrained, folder = start
    assert pretrained["utility"] > 0.9 and pretrained["poison_count"] == 0
    config = {**preset(kind), "storage": {"path": str(folder / "fine-tuning")}}
    m = train(config, folder, kind, f"model.pretrained={checkpoint}", *FINE_TUNE)
    assert m["attack_success"] >= floor and m["clean_attack_success"] <= 0.1
    assert m["utility_drop"] <= 0.05 and m["clean_utility"] > 0.9
    assert m["poison_count"] == preset(kind)["attack"]["poison_count"]["default"]
    assert 0 < m["poison_rate"] < 0.05
    # the clean fine-tune (the baseline) is the same for every attack: one cache entry, whichever ran first
    assert len(list((folder / "fine-tuning").glob("cache/clean/*/model.pt"))) == 1
