"""The data-side and in-training defenses where their papers put them: a clean pretrained CLIP
fine-tuned on a poisoned scrape (Yang et al. 2023's threat model), swept on the CPU through
Ray Tune + Optuna + MLflow with ``defense.kind`` drawn and each defense's own fields: the filters,
SafeCLIP and RoCLIP.

The pretrained model: tiny-rn trained 6 epochs on 4,000 trusted Fashion-MNIST pairs (disjoint from
the sweep's 2,000 training pairs; zero-shot top-1 0.830). The sweep fine-tunes it 2 epochs at lr 1e-3
on the 2,000 pairs plus the backdoor of ``tests/e2e/test_defenses_e2e.py`` (150 injected pairs, 6 px
checkerboard, target ``bag``). With ``model.pretrained`` set the filters' reference model is the
pretrained one, and SafeCLIP splits from the first epoch (``inmodal_epochs: 0, clip_epochs: 0``:
the pretrained towers are already aligned). A fine-tuning from a converged model varies far less
from draw to draw than the from-scratch recipe (about ±0.07 of top-1), so the filters' utility
bound here is 0.03 (RoCLIP's pool: 0.04).

Measured by ``benchmarks/pretrained_defenses.py`` (``trainers.run_trial``, one torch thread,
seeds 0-2; this sweep's trials are seed 0 with their own thread count, so their numbers differ a
little), attack success / utility:

| defense | seed 0 | seed 1 | seed 2 |
| --- | --- | --- | --- |
| undefended (150 pairs, 2 epochs) | 0.855 / 0.826 | 0.898 / 0.810 | 0.870 / 0.820 |
| similarity-filter (fraction 0.1) | 0.009 / 0.838, AUROC 0.997 | 0.002 / 0.814, AUROC 0.998 | 0.002 / 0.832, AUROC 0.997 |
| outlier-filter (k-distance, 0.1) | 0.013 / 0.804, AUROC 0.996 | 0.004 / 0.826, AUROC 0.997 | 0.002 / 0.818, AUROC 0.997 |
| safeclip (the authors' views; splits from epoch 1) | 0.004 / 0.586, AUROC 0.860 | 0.000 / 0.416, AUROC 0.747 | 0.013 / 0.596, AUROC 0.748 |
| undefended (60 pairs, 4 epochs) | 0.749 / 0.818 | 0.715 / 0.822 | 0.907 / 0.864 |
| roclip (pool 512, period 2, the authors' views) | 0.004 / 0.602 | 0.002 / 0.634 | 0.000 / 0.686 |
| roclip (pool 512, period 2, no views) | 0.190 / 0.796 | 0.241 / 0.822 | 0.128 / 0.828 |

The filters remove the backdoor at no utility cost. SafeCLIP and RoCLIP with the authors' augmented
views remove it too, but at a cost of 0.13 to 0.39 of top-1: their SimCLR-style views (resized crops
down to 8% of the image, blur) of 28 px clothing images are far from the test images, and two or
four fine-tuning epochs on them pull the towers away from the pretrained alignment. RoCLIP's caption
pool alone (``augment: false``) halves the 60-pair attack at a cost of at most 0.04; this sweep runs
that. AUROC: the split's or filter's scores of the poisoned pairs against the plan.
"""
from pathlib import Path

import pytest
import yaml

from poison.datasets import fashion_mnist
from sweeps.cli import main
from tests.support import launch_runs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(fashion_mnist.DEFAULT_PATH).is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")]

DATA = {"dataset": "fashion-mnist", "size": 2000, "test_size": 500}
PRETRAINING = {"seed": 0, "data": DATA, "attack": {"kind": "none"},
               "train": {"epochs": 6, "batch_size": 64, "lr": 2.0e-3, "warmup": 0.05}}
SWEEP = {
    "name": "defenses-pretrained",
    "seed": 0,
    "data": DATA,
    "train": {"epochs": {"choices": [2, 4]}, "batch_size": 64, "lr": 1.0e-3, "warmup": 0.05},
    "attack": {"kind": "backdoor", "target": "bag", "poison_count": {"choices": [150, 60]},
               "caption_source": "dataset", "trigger": {"kind": "patch", "size": 6, "location": "bottom-right"}},
    "defense": {"kind": {"choices": ["none", "similarity-filter", "outlier-filter", "safeclip", "roclip"]},
                "fraction": 0.1,                           # both filters
                "inmodal_epochs": 0, "clip_epochs": 0,     # safeclip: split from the first epoch
                "pool_size": 512, "augment": False},       # roclip: the pool alone (its views: the table)
    # the default point (150 pairs, 2 epochs, undefended), the filters and SafeCLIP against it; RoCLIP
    # against the weaker attack it can hold (60 pairs, 2.9%) and that attack undefended, 4 epochs
    "search": {"objectives": {"attack_success": "min", "utility": "max"}, "num_samples": 6, "max_concurrent": 2,
               "points": [*({"defense.kind": k} for k in ("similarity-filter", "outlier-filter", "safeclip")),
                          *({"defense.kind": k, "attack.poison_count": 60, "train.epochs": 4} for k in ("none", "roclip"))]},
    "resources": {"cpu": 1},
}


@pytest.fixture(scope="module")
def trials(tmp_path_factory, ray_local):
    """The finished sweep: its tracking URI and its trial metrics by (defense, poison_count)."""
    from trainers import parse_trial_config
    from trainers.trial import reference_model

    folder = tmp_path_factory.mktemp("defense-pretrained")
    pretraining = parse_trial_config(PRETRAINING)
    model = reference_model(pretraining, 4000, cache_dir=str(folder / "pretraining"))
    assert model.metrics["utility"] > 0.75  # chance is 0.1
    (checkpoint,) = (folder / "pretraining" / "reference").glob("*/model.pt")  # the one cache entry
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "model": {"arch": "tiny-rn", "pretrained": str(checkpoint)},
                                    "storage": {"path": str(folder / "results")}}))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri]) == 0
    _, _, runs = launch_runs(uri, "defenses-pretrained", "sweep")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    by_point = {(r.data.tags["defense"], int(r.data.metrics["poison_count"])): r.data.metrics for r in runs}
    assert sorted(by_point) == [("none", 60), ("none", 150), ("outlier-filter", 150), ("roclip", 60),
                                ("safeclip", 150), ("similarity-filter", 150)]
    for r in runs:  # each point as asked: its recipe, and the scalar defense fields only for their kinds
        p = r.data.params
        assert p["train.epochs"] == ("4" if p["attack.poison_count"] == "60" else "2")
        assert ("defense.clip_epochs" in p) == (p["defense.kind"] == "safeclip")
        assert ("defense.pool_size" in p) == (p["defense.kind"] == "roclip")
        assert p["model.pretrained"] == str(checkpoint)
    return {"uri": uri, **by_point}


def test_the_fine_tuning_plants_the_backdoor_at_a_small_utility_cost(trials):
    """Against the pretrained model fine-tuned on the clean pairs alone (the same optimizer steps)."""
    m = trials["none", 150]
    assert m["attack_success"] >= 0.7 and m["clean_attack_success"] <= 0.1
    assert m["utility_drop"] <= 0.06  # against the same pretrained model fine-tuned on the clean pairs


@pytest.mark.parametrize("kind", ["similarity-filter", "outlier-filter"])
def test_a_filter_removes_the_backdoor_within_003_of_utility(trials, kind):
    undefended, m = trials["none", 150], trials[kind, 150]
    assert m["filter_removed"] == 215  # round(0.1 × 2,150)
    # random removal gives recall 0.1; of the 215 removed at most 150 are poison
    assert m["filter_poison_recall"] >= 0.95
    # the scores behind the cut (measured AUROC 0.996-0.998, FPR at 95% recall 0.006-0.017)
    assert m["filter_auroc"] >= 0.98 and m["filter_fpr_at_95"] <= 0.05
    assert m["attack_success"] <= 0.05
    assert m["utility"] >= undefended["utility"] - 0.03


def test_safeclip_keeps_the_poison_out_of_the_clip_loss(trials):
    """SafeCLIP's last split (the metrics score it, not the first): risky pairs trained in-modal only.
    Its posteriors, of augmented views, rank the poison above most clean pairs (AUROC 0.75-0.86
    measured; 0.5 is chance). Its utility, 0.42-0.60 against the undefended 0.81-0.83 (table above), is
    the cost of the authors' views here; the bound asks that the model still classify (chance: 0.1)."""
    m = trials["safeclip", 150]
    assert m["filter_poison_recall"] >= 0.95  # the poisoned pairs fell among the risky ones
    assert m["filter_auroc"] >= 0.7
    assert m["attack_success"] <= 0.05
    assert m["utility"] >= 0.35


def test_roclip_halves_a_weaker_backdoor_at_a_small_utility_cost(trials):
    """RoCLIP's caption pool alone (the authors' schedule, pool 512, period 2: epochs 2 and 4
    matched; ``augment: false``) against 60 poisoned pairs over 4 epochs: 0.749 → 0.190, 0.715 →
    0.241 and 0.907 → 0.128 at seeds 0-2, at utility costs of 0.022, 0.000 and 0.036 (table above)."""
    undefended, m = trials["none", 60], trials["roclip", 60]
    assert undefended["attack_success"] >= 0.6
    assert m["attack_success"] <= undefended["attack_success"] / 2
    assert m["utility"] >= undefended["utility"] - 0.04


def test_the_defenses_table_says_so_in_mlflow(trials, capsys):
    """``poisonsweep defenses`` on the sweep: each defense against the undefended trial of its own
    attack configuration (150 pairs over 2 epochs, or 60 over 4), logged on the parent run."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    uri = trials["uri"]
    assert main(["defenses", "--experiment", "defenses-pretrained", "--tracking-uri", uri]) == 0
    assert "roclip" in capsys.readouterr().out
    client, parent, _ = launch_runs(uri, "defenses-pretrained", "sweep")
    table = pd.read_csv(MlflowClient(uri).download_artifacts(parent.info.run_id, "analysis/defenses.csv"))
    defended = table[table["defense"] != "none"]
    assert sorted(defended["defense"]) == ["outlier-filter", "roclip", "safeclip", "similarity-filter"]
    for _, row in defended.iterrows():
        assert ("poison_count=60" in row["attack_params"]) != ("poison_count=150" in row["attack_params"])
        count = 60 if "poison_count=60" in row["attack_params"] else 150
        assert (row["defense"] == "roclip") == (count == 60)
        assert row["baseline"] == "none"
        assert row["attack_success_without"] == pytest.approx(trials["none", count]["attack_success"])
        assert row["utility_without"] == pytest.approx(trials["none", count]["utility"])
        assert row["attack_success"] == pytest.approx(trials[row["defense"], count]["attack_success"])
        assert row["utility"] == pytest.approx(trials[row["defense"], count]["utility"])
