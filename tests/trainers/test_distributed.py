"""Data-parallel training in the loop (trainers.distributed), without Ray: two processes in a gloo
group train on the same global batches as one process, and end with the same model."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from poison import DataSpec, load_dataset, make_attack, streams
from poison.attacks import empty_plan
from tests.support import free_port
from trainers import parse_trial_config
from trainers.data import TrainingSet
from trainers.distributed import Ranks
from trainers.loop import fit
from trainers.models import build_model
from trainers.resume import FolderCheckpointer

# tiny-vit: no BatchNorm, so two ranks compute what one process does (up to summation order);
# 160 training pairs in batches of 32: 5 steps an epoch
CONFIG = {"model": {"arch": "tiny-vit"}, "data": {"size": 176, "test_size": 16},
          "train": {"epochs": 2, "batch_size": 32, "threads": 1, "device": "cpu", "lr": 2e-3}}


def train(folder: str | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The loop on CONFIG's data from the seeded initial model; in a process group, data-parallel."""
    torch.set_num_threads(1)
    config = parse_trial_config(CONFIG)
    dataset = load_dataset(DataSpec(dataset="synthetic", size=176, test_size=16, seed=5))
    torch.manual_seed(config.seed)
    built = build_model("tiny-vit", None, device=torch.device("cpu"), image_size=32)
    data = TrainingSet(dataset, make_attack(None), empty_plan(), built.tokenize)
    ranks = Ranks.current()
    evaluate = lambda: {"rank": float(ranks.rank), "scale": float(built.model.logit_scale.item())}  # noqa: E731
    reports = []
    fitted = fit(built, data, config, evaluate=evaluate, rng=streams.rng(config.seed, streams.BATCHES),
                 on_epoch=reports.append, checkpointer=FolderCheckpointer(folder, every=1) if folder else None)
    assert fitted.samples == 2 * 160 and fitted.history == reports
    return built.model.state_dict(), reports


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state, reports = train(os.path.join(folder, f"checkpoint{rank}"))
        torch.save(state, os.path.join(folder, f"state{rank}.pt"))
        with open(os.path.join(folder, f"reports{rank}.json"), "w") as fh:
            json.dump(reports, fh)
    finally:
        dist.destroy_process_group()



@pytest.mark.slow
def test_two_gloo_ranks_train_the_model_one_process_trains(tmp_path):
    ranks = mp.start_processes(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn",
                               join=False)
    alone, alone_reports = train()  # while the two ranks start (importing torch takes them seconds)
    while not ranks.join():
        pass

    states = [torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in range(2)]
    reports = [json.loads((tmp_path / f"reports{r}.json").read_text()) for r in range(2)]
    # rank 0 evaluated and every rank reported its evaluation, with the global batch's loss
    # (and its own training time)
    timing = ("epoch_seconds", "epoch_data_seconds")
    untimed = [[{k: v for k, v in r.items() if k not in timing} for r in rank] for rank in reports]
    assert untimed[0] == untimed[1] and [r["rank"] for r in reports[0]] == [0.0, 0.0]
    assert all(r["epoch_seconds"] > r["epoch_data_seconds"] >= 0 for rank in reports for r in rank)
    for two, one in zip(reports[0], alone_reports):
        assert two["epoch"] == one["epoch"] and two["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert two["scale"] == pytest.approx(one["scale"], rel=1e-5)
    # DDP kept the ranks' weights equal, and they are the single process's up to float rounding
    for name, value in alone.items():
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], value, rtol=1e-3, atol=2e-4, msg=name)  # seen: 6e-5
    # only rank 0 saved the loop's state
    assert (tmp_path / "checkpoint0" / "train_state.json").is_file()
    assert not (tmp_path / "checkpoint1").exists() or not any((tmp_path / "checkpoint1").iterdir())


def test_one_process_is_one_rank_and_leaves_the_batch_whole():
    ranks = Ranks.current()
    assert not ranks.parallel and ranks.lead and ranks.local(7) == slice(None)
    out = {"image_features": torch.ones(2, 3)}
    assert ranks.gather(out) is out and ranks.from_lead(lambda: 5) == 5
    model = torch.nn.Linear(2, 2)
    assert ranks.wrap(model, torch.device("cpu")) is model


def test_a_global_batch_splits_into_contiguous_equal_slices():
    assert [Ranks(r, 4).local(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert Ranks(1, 2).usable(33) == 32
    with pytest.raises(ValueError, match="does not split evenly over 2 ranks"):
        Ranks(0, 2).local(33)


# --- a data-parallel trial in a sweep: Ray Train inside the Tune trial ---

def sweep_config(tmp_path, **resources) -> dict:
    return {"name": "dp", "seed": 0, "data": {"size": 512, "test_size": 64},
            "model": {"arch": "tiny-vit"},
            "train": {"epochs": 2, "batch_size": 64},
            "attack": {"kind": "backdoor", "target": "blue circle", "trigger": {"kind": "patch", "size": 4},
                       "poison_count": {"low": 10, "high": 40, "default": 20}},
            "search": {"num_samples": 1, "max_concurrent": 1},
            "resources": {"cpu": 1, **resources}, "storage": {"path": str(tmp_path / "results")}}


def test_workers_must_split_every_batch_size_evenly(tmp_path):
    from poison import ConfigError
    from sweeps.config._schema import validate_config

    raw = sweep_config(tmp_path, workers=3)
    with pytest.raises(ConfigError, match="train.batch_size: batch size 64 does not split evenly over resources.workers 3"):
        validate_config(raw, check_data=False)
    raw["train"]["batch_size"] = {"choices": [48, 96, 100]}
    with pytest.raises(ConfigError, match="batch size 100 does not split evenly"):
        validate_config(raw, check_data=False)
    raw["train"]["batch_size"] = {"low": 48, "high": 96}
    with pytest.raises(ConfigError, match="a range needs an int step"):
        validate_config(raw, check_data=False)
    raw["train"]["batch_size"] = {"low": 48, "high": 96, "step": 24}
    assert validate_config(raw, check_data=False).resources.workers == 3
    with pytest.raises(ConfigError, match="resources.gpu: the 2 workers of a trial need whole GPUs"):
        validate_config(sweep_config(tmp_path, workers=2, gpu=0.5), check_data=False)
    with pytest.raises(ConfigError, match="resources.workers"):
        validate_config(sweep_config(tmp_path, workers=0), check_data=False)


def test_a_trials_workers_may_spread_over_nodes_but_must_all_fit():
    from sweeps.config._schema import ResourcesConfig

    nodes = [{"CPU": 2.0}, {"CPU": 3.0, "GPU": 1.0}]
    assert ResourcesConfig(cpu=1, workers=5).fits(nodes) and not ResourcesConfig(cpu=1, workers=6).fits(nodes)
    assert ResourcesConfig(cpu=2, workers=2).fits(nodes) and not ResourcesConfig(cpu=2, workers=3).fits(nodes)
    assert ResourcesConfig(cpu=1, gpu=1, workers=1).fits(nodes)
    assert not ResourcesConfig(cpu=1, gpu=1, workers=2).fits(nodes)
    assert not ResourcesConfig(cpu=3, gpu=0).fits([{"CPU": 2.0}, {"CPU": 2.0}])  # one process: one node


@pytest.mark.slow
def test_a_two_worker_trial_runs_on_two_gloo_ranks_and_lands_in_mlflow(tmp_path, ray_local):
    import yaml

    from sweeps.cli import main
    from tests.support import launch_runs

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path, workers=2)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri]) == 0

    client, parent, children = launch_runs(uri, "dp", "sweep")
    assert parent.info.status == "FINISHED" and len(children) == 1
    child = children[0]
    m = child.data.metrics
    assert child.info.status == "FINISHED", child.data.tags.get("error")
    assert m["train_workers"] == 2 and m["poison_count"] == 20  # rank 0's report, of two ranks
    for name in ("attack_success", "utility", "clean_utility", "utility_drop", "samples_per_second"):
        assert name in m, name
    # each epoch reported once, by rank 0, with its checkpoint (Tune kept the last one)
    assert [h.step for h in client.get_metric_history(child.info.run_id, "utility")] == [1, 2]
    assert [h.value for h in client.get_metric_history(child.info.run_id, "train_workers")][-1] == 2
    assert list((tmp_path / "results").glob("dp-*/*/checkpoint_*"))
