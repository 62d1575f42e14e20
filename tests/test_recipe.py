import pytest

from lamdagent.actions.recipe import make_recipe, pipeline_text
from lamdagent.actions.registry import count_actions, enumerate_actions
from lamdagent.store.recipes import RecipeStore, model_id

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
    assert "ties(smollm2, specialist-arith=sft(smollm2, arith, learning_rate=1e-05, epochs=1)" in full
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


def test_an_epochs_object_overrides_the_training_default_and_keeps_ids_stable():
    default = sft("smollm2")
    assert default["params"]["epochs"] == 1
    # The same value as an object is the same recipe: configs without an epochs slot keep their ids.
    same = make_recipe("sft", ("smollm2", "arith", 1e-5, 1), datasets=DATASETS, training=TRAINING, merging=MERGING,
                       seed=42)
    assert model_id(same) == model_id(default)
    two = make_recipe("sft", ("smollm2", "arith", 1e-5, 2), datasets=DATASETS, training=TRAINING, merging=MERGING,
                      seed=42)
    assert two["params"]["epochs"] == 2.0 and model_id(two) != model_id(default)
    with pytest.raises(ValueError, match="3 to 4 objects"):
        make_recipe("sft", ("smollm2", "arith"), datasets=DATASETS, training=TRAINING, merging=MERGING, seed=42)


def test_new_actions_record_their_own_parameters(tmp_path):
    store = RecipeStore(tmp_path)
    lora = make_recipe("sft_lora", ("smollm2", "arith", 1e-4, 8, 16), datasets=DATASETS, training=TRAINING,
                       merging=MERGING, seed=42)
    assert lora["params"]["lora_rank"] == 8 and isinstance(lora["params"]["lora_rank"], int)
    assert lora["params"]["lora_alpha"] == 16.0 and lora["params"]["lora_target_modules"] == "all-linear"
    dpo = make_recipe("dpo", ("smollm2", "arith", 1e-6, 0.1), datasets=DATASETS, training=TRAINING,
                      merging=MERGING, seed=42)
    assert dpo["params"]["beta"] == 0.1 and dpo["inputs"]["dataset"]["sha256"] == "a" * 64
    a, b = store.save(lora), store.save(dpo)
    labels = {"smollm2": "smollm2", a: "lora-arith", b: "dpo-arith"}
    task = make_recipe("task_arithmetic", ("smollm2", a, b, [1.0, 0.5]), datasets=DATASETS, training=TRAINING,
                       merging=MERGING, seed=42)
    # Task arithmetic has no `normalize`; linear and the TIES family take it from config.
    assert task["params"] == {"dtype": "float32", "weights": [1.0, 0.5]}
    slerp = make_recipe("slerp", (a, b, 0.3), datasets=DATASETS, training=TRAINING, merging=MERGING, seed=42)
    assert slerp["params"] == {"dtype": "float32", "t": 0.3}
    assert pipeline_text(store.save(task), store, labels) == "task_arith(lora-arith, dpo-arith)"
    assert pipeline_text(store.save(slerp), store, labels) == "slerp(lora-arith, dpo-arith)"


def test_merges_without_a_base_enumerate_distinct_pairs():
    action_types = {"linear": ["models", "models", "w"], "slerp": ["models", "models", "t"],
                    "dare_ties": ["base", "models", "models", "w", "d"]}
    candidates = {"models": ["m0", "m1", "m2"], "base": ["m0"], "w": [[0.5, 0.5]], "d": [0.5], "t": [0.3, 0.7]}
    counts = count_actions(action_types, candidates)
    assert counts == {"linear": 6, "slerp": 12, "dare_ties": 2}


def test_every_action_is_described_to_the_agent():
    from lamdagent.actions.registry import ACTIONS
    from lamdagent.agent import prompts

    prompt = prompts.type_selection(eval_tasks=[{"task": "arith"}], memory="m", history=[],
                                    action_types=list(ACTIONS), counts={a: 2 for a in ACTIONS})
    for number, (name, spec) in enumerate(ACTIONS.items(), start=1):
        assert f"{number}. {name}: {spec.describe} (2 possible choices)" in prompt
    objects = prompts.object_selection(action="dpo", slots=[(ACTIONS["dpo"].slots[1].describe, ["arith-pref"])],
                                       memory="m")
    assert "preference optimisation (DPO)" in objects and "prompt, chosen, rejected" in objects


def test_lineage_details_name_the_library_the_adapter_and_the_seeded_randomness():
    from lamdagent.lineage.records import action_details, determinism

    lora = make_recipe("sft_lora", ("m", "arith", 1e-4, 8, 16), datasets=DATASETS, training=TRAINING,
                       merging=MERGING, seed=5)
    details = action_details(lora, {"adapter/adapter_config.json": {}, "model.safetensors": {}})
    assert details["adapter"]["files"] == ["adapter/adapter_config.json"] and details["adapter"]["rank"] == 8
    assert "peft" in details["library"] and "seeded with 5" in details["random"]
    dare = make_recipe("dare_ties", ("b", "m1", "m2", [0.5, 0.5], 0.3), datasets=DATASETS, training=TRAINING,
                       merging=MERGING, seed=5)
    details = action_details(dare, {})
    assert details["mergekit_method"] == "dare_ties" and "probability 0.3" in details["random"]
    record = determinism("cpu", "fp32", 1, random=details["random"])
    assert record["bit_reproducible"] and "seeded with 5" in record["reason"]
    assert not determinism("cuda", "fp32", 1, random=details["random"])["bit_reproducible"]


def test_the_default_save_dtype_keeps_existing_ids_and_another_one_changes_them():
    from lamdagent.config import DEFAULTS

    before = {key: value for key, value in DEFAULTS["training"].items() if key != "save_dtype"}  # recipes made before it
    assert DEFAULTS["training"]["save_dtype"] == "auto"
    for action, values in (("sft", ("smollm2", "arith", 1e-5)), ("sft_lora", ("smollm2", "arith", 1e-5, 4, 8))):
        def recipe(training):
            return make_recipe(action, values, datasets=DATASETS, training=training, merging=MERGING, seed=42)

        assert recipe(DEFAULTS["training"]) == recipe(before)
        as_bf16 = recipe({**DEFAULTS["training"], "save_dtype": "bfloat16"})
        assert as_bf16["params"]["save_dtype"] == "bfloat16" and model_id(as_bf16) != model_id(recipe(before))


def test_the_default_configs_ids_are_unchanged(tmp_path):
    """The whole path from config/config.yaml to an id, pinned: config defaults, the embedded tasks'
    data and its hash, the pool's named recipe models, a merge and an SFT the agent may choose.
    Computed before the package moved into subpackages (the layout issue): built models stay found.
    test_custom_actions pins each built-in's recipe hashing on fixed settings."""
    from pathlib import Path

    import yaml

    from lamdagent.agent.objects import Pool
    from lamdagent.config import load
    from lamdagent.data.datasets import prepare
    from lamdagent.data.tasks import write_splits

    repo = Path(__file__).resolve().parent.parent
    config = load(yaml.safe_load((repo / "config" / "config.yaml").read_text()), repo)
    for task in ("arith", "choice", "context"):
        write_splits(task, tmp_path / task, {"train": config["data"]["train_examples"]}, config["seed"])
    datasets = {name: prepare(spec, tmp_path / f"{name}.jsonl",
                              task_train_files=[tmp_path / task / "train.jsonl" for task in spec["tasks"]])
                for name, spec in config["datasets"].items()}
    pool = Pool.initial(config, datasets, RecipeStore(tmp_path / "recipes"))
    assert pool.labels == {"smollm2": "smollm2", "sft-923fa027cc8df640": "specialist-arith",
                           "sft-8b2ad60f9c1aef9a": "specialist-choice", "sft-5bf5dd162f6bce77": "specialist-context"}
    arith, choice = pool.candidates["models"][1:3]
    settings = dict(datasets=datasets, training=config["training"], merging=config["merging"], seed=config["seed"])
    ties = make_recipe("ties_merging", ("smollm2", arith, choice, [0.5, 0.5], 0.5), **settings)
    assert model_id(ties) == "ties_merging-4c9a6ed0b63087e3"
    assert model_id(make_recipe("sft", (arith, "all", 1e-4), **settings)) == "sft-d78ba72f938a9b1c"
