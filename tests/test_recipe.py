import pytest

from lamdagent.actions import count_actions, enumerate_actions
from lamdagent.recipe import RecipeStore, make_recipe, model_id, pipeline_text

DATASETS = {"arith": {"sha256": "a" * 64, "rows": 96}, "all": {"sha256": "b" * 64, "rows": 288}}
TRAINING = {"epochs": 1, "batch_size": 8}
MERGING = {"dtype": "float32", "normalize": True}


def sft(model, dataset="arith", lr=1e-5, seed=42, datasets=DATASETS, training=TRAINING):
    return make_recipe("sft", (model, dataset, lr), datasets=datasets, training=training, merging=MERGING, seed=seed)


def test_identical_recipes_share_an_id():
    assert model_id(sft("smollm2")) == model_id(sft("smollm2"))
    assert model_id(sft("smollm2")).startswith("sft-")


@pytest.mark.parametrize("change", [
    dict(model="other"), dict(dataset="all"), dict(lr=2e-5), dict(seed=1),
    dict(training={"epochs": 2, "batch_size": 8}),
    dict(datasets={**DATASETS, "arith": {"sha256": "c" * 64, "rows": 96}}),
    dict(datasets={**DATASETS, "arith": {"sha256": "a" * 64, "rows": 192}}),
])
def test_every_ingredient_changes_the_id(change):
    assert model_id(sft(**{"model": "smollm2", **change})) != model_id(sft("smollm2"))


def test_parent_id_is_recursive(tmp_path):
    store = RecipeStore(tmp_path)
    parent_a = store.save(sft("smollm2", lr=1e-5))
    parent_b = store.save(sft("smollm2", lr=2e-5))
    assert model_id(sft(parent_a)) != model_id(sft(parent_b))


def test_store_refuses_an_edited_recipe(tmp_path):
    store = RecipeStore(tmp_path)
    mid = store.save(sft("smollm2"))
    store.path(mid).write_text(store.path(mid).read_text().replace("arith", "all"))
    with pytest.raises(ValueError, match="does not hash"):
        store.load(mid)
    with pytest.raises(FileNotFoundError, match="no recipe"):
        store.load("sft-0000000000000000")


def test_pipeline_text(tmp_path):
    store = RecipeStore(tmp_path)
    spec_a = store.save(sft("smollm2", "arith"))
    spec_b = store.save(sft("smollm2", "all"))
    labels = {"smollm2": "smollm2", spec_a: "specialist-arith", spec_b: "specialist-all"}
    merged = store.save(make_recipe("ties_merging", ("smollm2", spec_a, spec_b, [0.5, 0.5], 0.5), datasets=DATASETS,
                                    training=TRAINING, merging=MERGING, seed=42))
    top = store.save(sft(merged, "all"))
    assert pipeline_text(top, store, labels) == "sft(ties(specialist-arith, specialist-all), all)"
    full = pipeline_text(top, store, labels, full=True)
    assert "ties(smollm2, specialist-arith=sft(smollm2, arith, learning_rate=1e-05)" in full
    assert "density=0.5" in full


def test_enumeration_is_the_product_minus_invalid_merges():
    action_types = {"sft": ["models", "data", "lr"], "ties_merging": ["base", "models", "models", "w", "d"]}
    candidates = {"models": ["m0", "m1", "m2"], "data": ["a", "b"], "lr": [1e-5, 2e-5], "base": ["m0"],
                  "w": [[0.5, 0.5]], "d": [0.5, 0.7]}
    counts = count_actions(action_types, candidates)
    assert counts["sft"] == 3 * 2 * 2
    # (m1, m2) and (m2, m1) over base m0; pairs with the base itself or twice the same model are left out.
    assert counts["ties_merging"] == 2 * 2
    space = enumerate_actions(action_types, candidates)
    assert all(combo[1] != combo[2] and combo[0] not in combo[1:3] for combo in space["ties_merging"])
