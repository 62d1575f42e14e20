"""Custom actions (config's ``custom_actions``) and the built-ins on the same registry.

The unit tests check the config errors, the ids (the built-ins' pinned, a custom action's following
its code) and run a custom action's job (its real child process) on the tiny model; the slow test
runs an exploration in which the agent chooses a user's KTO script and a script that fails.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml
from e2e import REPO, run_snakemake, tiny_config

from lamdagent.actions import custom, failures
from lamdagent.actions.recipe import make_recipe
from lamdagent.actions.registry import ACTIONS, BUILTIN_ACTIONS
from lamdagent.agent import prompts
from lamdagent.config import DEFAULTS, load
from lamdagent.errors import ConfigError
from lamdagent.store.fileio import atomic_write_json, read_json, sha256_file
from lamdagent.store.recipes import model_id
from lamdagent.workflow import models as model_jobs

DATASETS = {"arith": {"sha256": "a" * 64, "rows": 96}, "pairs": {"sha256": "b" * 64, "rows": 32}}
# config.DEFAULTS' training and merging sections as they were when these ids were pinned.
TRAINING = {"epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "max_length": 512, "precision": "auto",
            "lr_scheduler_type": "linear", "warmup_ratio": 0.0}
MERGING = {"dtype": "float32", "normalize": True}

# A copy of the input model, saved as a new one: the smallest action that makes a loadable model.
COPY_SCRIPT = """\
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True)
print("copied", sys.argv[1], "with lr", sys.argv[3])
"""


@pytest.fixture(autouse=True)
def builtins_only():
    """Each test registers its own config's custom actions; none leaks into the next."""
    yield
    for name in [name for name in ACTIONS if name not in BUILTIN_ACTIONS]:
        del ACTIONS[name]


@pytest.mark.parametrize("action, values, expected", [
    ("sft", ("tiny", "arith", 1e-3), "sft-32f69a9bacf53c7e"),
    ("sft", ("tiny", "arith", 1e-3, 2), "sft-39dea5cf876cf503"),
    ("sft_lora", ("tiny", "arith", 1e-4, 8, 16), "sft_lora-029b4fa2e0b22056"),
    ("dpo", ("tiny", "pairs", 1e-5, 0.1), "dpo-3256f5cd5e66b622"),
    ("ties_merging", ("tiny", "a", "b", [0.5, 0.5], 0.5), "ties_merging-a68d1cf66a434e2d"),
    ("linear", ("a", "b", [0.3, 0.7]), "linear-bc6a149d733a02e2"),
    ("slerp", ("a", "b", 0.5), "slerp-720c9633a668da2f"),
    ("task_arithmetic", ("tiny", "a", "b", [1, 1]), "task_arithmetic-533968e4053c1a18"),
    ("dare_ties", ("tiny", "a", "b", [0.5, 0.5], 0.3), "dare_ties-b2a0cc623f9f8cb6"),
])
def test_builtin_model_ids_are_unchanged(action, values, expected):
    """Ids computed before the built-ins moved onto the registry's one rule per action: models built
    then are still found (the same results/models/<id>/)."""
    recipe = make_recipe(action, values, datasets=DATASETS, training=TRAINING, merging=MERGING, seed=0)
    assert model_id(recipe) == expected


def copy_action(script: Path, **extra) -> dict:
    return {"description": "copy a model (a stand-in for the user's trainer)",
            "slots": [{"name": "model", "kind": "model", "description": "the model to copy"},
                      {"name": "learning_rate", "kind": "number", "description": "a learning rate it ignores"}],
            "command": f"python {script} {{model}} {{output}} {{learning_rate}}",
            "resources": {"gpu": 0, "runtime": 5}, **extra}


def with_action(base: dict, name: str, entry: dict, object_types=("models", "sft_lr")) -> dict:
    config = copy.deepcopy(base)
    config["custom_actions"] = {name: entry}
    config["action_types"][name] = list(object_types)
    return config


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "copy_model.py"
    path.write_text(COPY_SCRIPT)
    return path


def test_a_custom_action_is_an_action_with_its_resources_and_its_code_in_the_recipe(default_config, script, tmp_path):
    config = load(with_action(default_config, "copy_model", copy_action(script)), tmp_path)
    spec = ACTIONS["copy_model"]
    assert spec.family == "custom" and [s.name for s in spec.slots] == ["model", "learning_rate"]
    assert config["resources"]["copy_model"] == {**DEFAULTS["resources"]["sft"], "gpu": 0, "runtime": 5}
    assert config["custom_actions"]["copy_model"]["code"] == {
        "command": copy_action(script)["command"], "script": str(script), "sha256": sha256_file(script)}
    recipe = make_recipe("copy_model", ("smollm2", 1e-4), datasets={}, training=config["training"],
                         merging=config["merging"], seed=0)
    assert recipe["code"]["sha256"] == sha256_file(script) and recipe["params"] == {"learning_rate": 1e-4}
    # The agent's prompts describe it and each of its slots as config does.
    text = prompts.type_selection(eval_tasks=config["eval_tasks"], memory="", history=[], action_types=["copy_model"],
                                  counts={"copy_model": 4})
    assert "copy_model: copy a model (a stand-in for the user's trainer)" in text


def test_changing_the_script_changes_the_ids_and_nothing_else_does(default_config, script, tmp_path):
    def kto_id() -> str:
        config = load(with_action(default_config, "copy_model", copy_action(script)), tmp_path)
        return model_id(make_recipe("copy_model", ("smollm2", 1e-4), datasets={}, training=config["training"],
                                    merging=config["merging"], seed=0))

    before = kto_id()
    assert kto_id() == before and before.startswith("copy_model-")
    script.write_text(COPY_SCRIPT + "# tuned\n")
    assert kto_id() != before


@pytest.mark.parametrize("change, key, words", [
    (lambda e: e.update(command="python missing.py {model} {output}"), "custom_actions.act.command", "missing.py not found"),
    (lambda e: e.update(script="nowhere.py"), "custom_actions.act.script", "nowhere.py not found"),
    (lambda e: e.update(command="my-tool {model} {output}"), "custom_actions.act.script", "missing"),
    (lambda e: e["slots"][1].update(kind="float"), "custom_actions.act.slots[1].kind", "unknown slot kind 'float'"),
    (lambda e: e.update(command=e["command"] + " --beta {beta}"), "custom_actions.act.command",
     "{beta} is not a slot of act"),
    (lambda e: e.update(command=e["command"].replace("{output}", "out")), "custom_actions.act.command",
     "never names {output}"),
    (lambda e: e.update(entry_point="my_pkg.train:run"), "custom_actions.act", "exactly one of"),
    (lambda e: (e.pop("command"), e.update(entry_point="no_such_pkg.train:run")), "custom_actions.act.entry_point",
     "'no_such_pkg.train' not found"),
    (lambda e: e.update(conda="envs/none.yaml"), "custom_actions.act.conda", "not a file"),
    (lambda e: e["slots"].append({"name": "model", "kind": "number", "description": "x"}),
     "custom_actions.act.slots[2].name", "duplicate slot"),
])
def test_config_errors_are_one_line_naming_the_key(default_config, script, tmp_path, change, key, words):
    entry = copy_action(script)
    change(entry)
    with pytest.raises(ConfigError) as err:
        load(with_action(default_config, "act", entry), tmp_path)
    message = str(err.value)
    assert message.startswith(f"config: {key}: ") and words in message and "\n" not in message, message


@pytest.mark.parametrize("name", ["sft", "ties_merging", "evaluate", "propose"])
def test_a_name_of_a_builtin_or_a_workflow_rule_is_refused(default_config, script, tmp_path, name):
    config = with_action(default_config, name, copy_action(script))
    config["action_types"].pop(name, None)
    with pytest.raises(ConfigError, match=rf"^config: custom_actions\.{name}: '{name}' is (a built-in action|the name "
                                          "of a workflow rule)"):
        load(config, tmp_path)


def test_the_reserved_rule_names_are_the_workflows_rules():
    rules = set()
    for path in (REPO / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^(?:rule|checkpoint) (\w+):", path.read_text(), flags=re.MULTILINE))
    rules |= set(re.findall(r"^rule (\w+):", (REPO / "Snakefile").read_text(), flags=re.MULTILINE))
    assert rules == custom.WORKFLOW_RULES


# ---- the job --------------------------------------------------------------------------------------


def custom_smk(tmp_path: Path, config: dict, action: str, parent: Path, learning_rate: float = 1e-4) -> SimpleNamespace:
    recipe = make_recipe(action, ("tiny", learning_rate), datasets={}, training=config["training"],
                         merging=config["merging"], seed=0)
    mid = model_id(recipe)
    atomic_write_json(tmp_path / "recipes" / f"{mid}.json", recipe)
    return SimpleNamespace(
        rule=action, threads=1, config=config, resources=SimpleNamespace(runtime=5, gpu=0),
        input=SimpleNamespace(recipe=str(tmp_path / "recipes" / f"{mid}.json"), model=str(parent)),
        output=SimpleNamespace(model=str(tmp_path / "models" / mid)),
        log=[str(tmp_path / "logs" / action / f"{mid}.log")], wildcards=SimpleNamespace(hash=mid[-16:]))


def run_job(tmp_path, default_config, entry, tiny_model_dir, name="copy_model") -> Path:
    config = load(with_action(default_config, name, entry), tmp_path)
    smk = custom_smk(tmp_path, config, name, tiny_model_dir)
    shutil.rmtree(tmp_path / "models", ignore_errors=True)
    model_jobs.build_model(smk)
    return Path(smk.output.model)


def test_a_custom_command_makes_a_model_with_its_lineage(tmp_path, default_config, script, tiny_model_dir):
    out = run_job(tmp_path, default_config, copy_action(script), tiny_model_dir)
    assert failures.read_failure(out) is None and (out / "model.safetensors").is_file()
    lineage = read_json(out / "lineage.json")
    assert lineage["details"]["code"] == {"command": copy_action(script)["command"], "script": str(script),
                                          "sha256": sha256_file(script)}
    assert lineage["recipe"]["code"]["sha256"] == sha256_file(script) and lineage["model"] == out.name
    assert lineage["run"]["metrics"]["precision"] == "fp32"
    assert lineage["determinism"]["bit_reproducible"] is False  # the user's code decides, not known here
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]  # renamed into place
    assert "copied" in Path(tmp_path / "logs" / "copy_model" / f"{out.name}.log").read_text()
    # Read without the config (`lamdagent lineage`), the record declares its action itself.
    from lamdagent.lineage.cards import render_tree
    from lamdagent.lineage.records import load_lineage

    del ACTIONS["copy_model"]
    assert "copy_model(tiny)" in render_tree(load_lineage(out))
    assert ACTIONS["copy_model"].code == lineage["recipe"]["code"]


@pytest.mark.parametrize("body, reason", [
    ("import sys\nprint('no GPU here', file=sys.stderr)\nsys.exit(3)\n", "exited with code 3"),
    ("import sys\n", "wrote no model"),
    ("import sys, pathlib\npathlib.Path(sys.argv[2], 'config.json').write_text('{}')\n", "does not load with from_pretrained"),
])
def test_a_failing_custom_command_is_a_failed_step(tmp_path, default_config, tiny_model_dir, body, reason):
    bad = tmp_path / "bad.py"
    bad.write_text(body)
    out = run_job(tmp_path, default_config, copy_action(bad), tiny_model_dir)
    assert sorted(p.name for p in out.iterdir()) == [failures.FAILURE_FILE]
    record = failures.read_failure(out)
    assert record["kind"] == "error" and record["action"] == "copy_model" and reason in record["reason"], record
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_a_script_changed_after_the_recipe_was_made_is_refused(tmp_path, default_config, script, tiny_model_dir):
    config = load(with_action(default_config, "copy_model", copy_action(script)), tmp_path)
    smk = custom_smk(tmp_path, config, "copy_model", tiny_model_dir)
    script.write_text(COPY_SCRIPT + "# edited mid-run\n")
    with pytest.raises(RuntimeError, match="changed since this recipe was made"):
        model_jobs.build_model(smk)


def test_an_entry_point_is_called_with_its_slots_and_output(tmp_path, default_config, tiny_model_dir, monkeypatch):
    package = tmp_path / "my_actions"
    package.mkdir()
    (package / "copying.py").write_text(
        "import shutil\n\ndef run(model, learning_rate, output):\n"
        "    shutil.copytree(model, output, dirs_exist_ok=True)\n    return {'lr_seen': learning_rate}\n")
    entry = {k: v for k, v in copy_action(tmp_path / "unused.py").items() if k != "command"}
    entry["entry_point"] = "my_actions.copying:run"
    monkeypatch.chdir(tmp_path)  # the workflow's directory: where the entry point's package is found
    out = run_job(tmp_path, default_config, entry, tiny_model_dir)
    lineage = read_json(out / "lineage.json")
    assert lineage["run"]["metrics"]["lr_seen"] == 1e-4
    assert lineage["details"]["code"] == {"entry_point": "my_actions.copying:run",
                                          "module_file": "my_actions/copying.py",
                                          "sha256": sha256_file(package / "copying.py")}


# ---- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow(seconds=55)
def test_the_agent_runs_a_users_kto_script_and_records_a_failing_one(tmp_path, tiny_model_dir):
    """Iteration 1 is forced to the example KTO action (examples/actions/kto.py), iteration 2 to a
    script that exits non-zero; a named model made by KTO is built before the agent starts, and the
    SLURM profile's dry run lists its job under the action's own rule name."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    broken = workdir / "broken.py"
    broken.write_text("import sys\nprint('CUDA error: no kernel image', file=sys.stderr)\nsys.exit(2)\n")
    config = tiny_config(tiny_model_dir, iterations=2)
    config["models"]["pref-arith"] = {"recipe": {"action": "kto", "objects": ["tiny", "arith-pref", 1.0e-4, 0.1]}}
    config["datasets"]["arith-pref"] = {"source": "embedded", "kind": "preference", "tasks": ["arith"]}
    config["objects"].update(models=["tiny", "specialist-arith", "specialist-choice", "pref-arith"],
                             pref_dataset=["arith-pref"], kto_beta=[0.1])
    config["custom_actions"] = {
        "kto": {"description": "KTO preference optimisation (the user's own trl script)",
                "slots": [{"name": "model", "kind": "model", "description": "the model to train"},
                          {"name": "dataset", "kind": "preference_dataset", "description": "the preference pairs"},
                          {"name": "learning_rate", "kind": "number", "description": "the learning rate"},
                          {"name": "beta", "kind": "number", "description": "the KTO beta"}],
                "command": f"python {REPO}/examples/actions/kto.py --model {{model}} --data {{dataset}} "
                           "--lr {learning_rate} --beta {beta} --max-length 64 --batch-size 4 --seed {seed} --out {output}",
                "resources": {"gpu": 0, "cpus_per_gpu": 1, "threads": 1, "mem_mb": 2000, "runtime": 10, "retries": 0}},
        "broken": {"description": "a trainer that crashes", "command": "python broken.py {model} {output}",
                   "slots": [{"name": "model", "kind": "model", "description": "the model"}],
                   "resources": {"gpu": 0, "threads": 1, "runtime": 10, "retries": 0}},
    }
    config["action_types"].update(kto=["models", "pref_dataset", "sft_lr", "kto_beta"], broken=["models"])
    config["forced_actions"] = ["kto", "broken"]
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    run_snakemake(workdir, path, "results/agent/pool.json", timeout=600)
    dry = run_snakemake(workdir, path, "--profile", str(REPO / "profiles" / "slurm"), "-n", timeout=300).stdout
    assert re.search(r"^kto\s+1$", dry, flags=re.MULTILINE), dry[-3000:]
    assert re.search(r"rule kto:\n(?:    .*\n)*?    resources: .*runtime=10", dry), dry[-3000:]

    run_snakemake(workdir, path, timeout=1800)
    step1 = read_json(workdir / "results" / "agent" / "iter_1" / "step.json")
    step2 = read_json(workdir / "results" / "agent" / "iter_2" / "step.json")
    assert step1["action"] == "kto" and step1["status"] == "done" and step1["model"].startswith("kto-")
    lineage = read_json(workdir / "results" / "models" / step1["model"] / "lineage.json")
    assert lineage["details"]["code"]["sha256"] == sha256_file(REPO / "examples" / "actions" / "kto.py")
    assert step2["action"] == "broken" and step2["status"] == "failed"
    assert "exited with code 2" in step2["reason"] and "CUDA error" in step2["failure"]["log_tail"]
    # The failed step is fed back to the agent (its memory is updated after it) and the run completes.
    assert (workdir / "results" / "leaderboard.tsv").is_file()
    initial = read_json(workdir / "results" / "agent" / "iter_0" / "step.json")["initial"]
    assert {e["name"]: e["status"] for e in initial}["pref-arith"] == "done"


def test_restore_rebuilds_a_custom_model_from_its_recipe(tmp_path, default_config, script, tiny_model_dir):
    """keep_top_k's restore_model (lineage.build_step) runs a custom action in-process, as its job does."""
    from lamdagent.lineage.rebuild import build_step

    config = load(with_action(default_config, "copy_model", copy_action(script)), tmp_path)
    recipe = make_recipe("copy_model", ("tiny", 1e-4), datasets={}, training=config["training"],
                         merging=config["merging"], seed=0)
    out = tmp_path / "models" / model_id(recipe)
    lineage = build_step(recipe, {"model": str(tiny_model_dir)}, {}, out, config)
    assert lineage["model"] == out.name and (out / "model.safetensors").is_file()
    assert sha256_file(out / "model.safetensors") == sha256_file(tiny_model_dir / "model.safetensors")


def test_the_example_config_declares_kto_and_a_three_model_merge(tmp_path, tiny_model_dir):
    """config/examples/custom-action.yaml: KTO from a script, a mergekit merge of three models from an
    entry point (run here on three copies of the tiny model)."""
    from lamdagent.actions.registry import count_actions

    config = load(yaml.safe_load((REPO / "config" / "examples" / "custom-action.yaml").read_text()), REPO)
    assert config["custom_actions"]["kto"]["code"]["sha256"] == sha256_file(REPO / "examples" / "actions" / "kto.py")
    assert config["custom_actions"]["merge3"]["code"]["module_file"] == "examples/actions/merge3.py"
    assert ACTIONS["merge3"].slots[3].describe == "the weights of the three models"
    # 4 candidate models, three distinct ones in order, two weight lists.
    assert count_actions(config["action_types"], config["objects"])["merge3"] == 4 * 3 * 2 * 2
    # Its `weights` slot is not the TIES baseline's (two weights), whatever the order of action_types.
    assert config["baselines"]["ties"]["weights"] == [[0.5, 0.5]]
    jsonschema.validate(config, yaml.safe_load((REPO / "lamdagent" / "schemas" / "config.schema.yaml").read_text()))
    models = []
    for name in "abc":
        models.append(tmp_path / name)
        shutil.copytree(tiny_model_dir, models[-1])
    metrics = custom.run(config["custom_actions"]["merge3"]["code"],
                         {"model_a": str(models[0]), "model_b": str(models[1]), "model_c": str(models[2]),
                          "weights": [2.0, 1.0, 1.0]}, str(tmp_path / "merged"), seed=0, workdir=str(REPO))
    assert metrics["n_models"] == 3 and metrics["precision"] == "fp32"
