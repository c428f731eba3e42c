"""Each attack's packaged preset, trained for real on the CPU through `poisonsweep train`:
the attack clearly works (far above the same metric on the clean model) and utility holds.

All presets share one recipe (data, model, train), so the clean model trains once and
every test reuses it from the shared cache.
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


# Two presets keep the suite inside its time budget (~90 s each on 2 cores): dual-backdoor
# exercises both the image backdoor and the text trigger, mm-multi-label Yang et al.'s
# retrieval poisoning (attacks II/III). The others are measured in the README.
@pytest.mark.parametrize("kind, floor", [
    ("dual-backdoor", 0.9),     # mean of the image backdoor's ASR and the text backdoor's hit@1
    ("mm-multi-label", 0.5),    # hit@10 over both goals' source captions
])
def test_attack_preset_works_without_costing_utility(kind, floor, store):
    m = train_preset(kind, store)
    assert m["attack_success"] >= floor
    assert m["attack_success"] - m["clean_attack_success"] >= 0.5
    assert m["utility_drop"] <= 0.05 and m["clean_utility"] > 0.9
    assert m["poison_count"] > 0 and 0 < m["poison_rate"] < 0.05
    if kind == "dual-backdoor":  # both halves work, not just their mean
        assert m["backdoor_asr"] >= 0.9 and m["hit_at_1"] >= 0.9
