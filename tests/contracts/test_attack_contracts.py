"""Every attack (``poison.ATTACKS``), every variant of its choices, on the built-in synthetic set.

A plan poisons exactly ``poison_count`` pairs, each a distinct row that exists (an altered
training pair or a new id after the manifest's), pointing at a real image of the manifest;
one seed gives one plan and another seed another; and budgets are nested, as
``poison.attacks._base.nested_sample`` promises for every plan: under one seed each pair of a
smaller budget's plan is in a larger budget's. The attack that plants nothing (the base
``Attack.plan``) plans no rows whatever its count."""
from collections import Counter

import pyarrow.compute as pc
import pytest

from poison import ATTACKS, plan_hash
from poison.attacks import PLAN_SCHEMA, Attack, next_id

from .conftest import build, seeded_twice, variants

CASES = variants(ATTACKS)


def attack_of(name, overrides, dataset, count=12):
    return build(ATTACKS, name, overrides, dataset, poison_count=count)


def plants(attack) -> bool:
    return type(attack).plan is not Attack.plan


@pytest.mark.parametrize("name, overrides", CASES)
def test_plans_exactly_its_count_of_distinct_existing_rows(name, overrides, small_synthetic):
    ds = small_synthetic
    attack = attack_of(name, overrides, ds)
    plan = attack.plan(ds, seed=1)
    assert plan.schema.names[: len(PLAN_SCHEMA)] == PLAN_SCHEMA.names
    assert all(plan.schema.field(f.name).type == f.type for f in PLAN_SCHEMA)
    if not plants(attack):
        assert plan.num_rows == 0
        return
    assert plan.num_rows == attack.poison_count
    assert len(set(plan["poison_id"].to_pylist())) == plan.num_rows
    manifest = {r["id"]: r for r in ds.manifest.select(["id", "image", "label", "split"]).to_pylist()}
    train_ids = {i for i, r in manifest.items() if r["split"] == "train"}
    for row in plan.select(["poison_id", "op", "source_id", "image", "source_label", "caption"]).to_pylist():
        if row["op"] == "replace":
            assert row["poison_id"] in train_ids, row  # alters a training pair that exists
        else:
            assert row["op"] == "inject" and row["poison_id"] >= next_id(ds), row  # a new id, after the manifest's
        source = manifest[row["source_id"]]
        assert row["image"] == source["image"] and row["source_label"] == source["label"], row
        assert 0 <= row["image"] < len(ds.images) and row["caption"], row
    if "mode" in type(attack).model_fields:  # inject adds pairs, replace alters them: all of one kind
        assert set(plan["op"].to_pylist()) == {attack.mode}


@pytest.mark.parametrize("name, overrides", CASES)
def test_one_seed_gives_one_plan_and_another_seed_another(name, overrides, small_synthetic):
    attack = attack_of(name, overrides, small_synthetic)
    a, b = seeded_twice(lambda: attack.plan(small_synthetic, seed=4))
    assert a.equals(b) and a.schema.metadata == b.schema.metadata and plan_hash(a) == plan_hash(b)
    if plants(attack):
        other = attack.plan(small_synthetic, seed=5)
        assert not other.replace_schema_metadata(None).equals(a.replace_schema_metadata(None))


@pytest.mark.parametrize("name, overrides", CASES)
def test_a_smaller_budget_is_part_of_a_larger_one(name, overrides, small_synthetic):
    """Each pair (image, caption, trigger placement, ...) planned at 5 is planned at 12 too;
    injected pairs are numbered in plan order, so their ids are left out of the comparison."""
    def pairs(count):
        plan = attack_of(name, overrides, small_synthetic, count).plan(small_synthetic, seed=7)
        if plan.num_rows and pc.all(pc.equal(plan["op"], "inject")).as_py():
            plan = plan.drop_columns(["poison_id"])
        return [tuple(sorted(row.items())) for row in plan.to_pylist()]

    small, large = Counter(pairs(5)), Counter(pairs(12))  # an injected pair may be planned twice
    missing = small - large
    assert not missing, f"{missing.total()} of the {small.total()} pairs planned at 5 are not planned at 12"

