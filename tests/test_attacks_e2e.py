"""An attack's packaged preset, trained for real on the CPU through `poisonsweep train`:
the attack clearly works (far above the same metric on the clean model) and utility holds.

The synthetic presets share one recipe (8,000 pairs, 10 epochs: the clean model alone is
80,000 samples), so only Yang et al.'s attack III runs here; the backdoor, text backdoor,
dual backdoor and targeted attack run end to end on web pairs in tests/test_zeroshot.py,
and every preset's numbers are in the README.
"""
import json
from importlib import resources

import pytest

from sweeps.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("attacks-e2e")


def train_preset(kind: str, store, *overrides: str) -> dict:
    preset = resources.files("sweeps.presets") / f"{kind}.yaml"
    out = store / f"{kind}.json"
    args = ["train", str(preset), "--set", f"storage.path={store}", "--output", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads(out.read_text())


# mm-multi-label: Yang et al.'s retrieval poisoning, two goals at once (attack III: attack II's
# pairs for each goal), hit@10 over both goals' source captions
@pytest.mark.parametrize("kind, floor", [("mm-multi-label", 0.5)])
def test_attack_preset_works_without_costing_utility(kind, floor, store):
    m = train_preset(kind, store)
    assert m["attack_success"] >= floor
    assert m["attack_success"] - m["clean_attack_success"] >= 0.5
    assert m["utility_drop"] <= 0.05 and m["clean_utility"] > 0.9
    assert m["poison_count"] > 0 and 0 < m["poison_rate"] < 0.05
