"""Lineage of an SFT-of-a-merge chain of the tiny model: the record, --verify, and a bit-identical rebuild.

The chain is built with the library calls the jobs make (lineage.build_step: train.sft /
merge.ties_merge with the recipe's arguments, then lineage.record_model as jobs._store_recipe does),
without Snakemake, to stay fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lamdagent.actions.recipe import make_recipe
from lamdagent.cli import main
from lamdagent.data.datasets import dataset_entry, prepare
from lamdagent.data.tasks import write_splits
from lamdagent.lineage.clock import GpuMeter, busy_seconds, measure
from lamdagent.lineage.rebuild import build_step, rebuild, recorded_save_dtype
from lamdagent.lineage.records import load_lineage, parent_node, record_base, refresh_card
from lamdagent.lineage.tree import rebuild_plan
from lamdagent.lineage.verify import verify
from lamdagent.store.fileio import sha256_file
from lamdagent.store.recipes import RecipeStore

LAMDAGENT = str(Path(sys.executable).with_name("lamdagent"))
TRAINING = {"epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 256, "precision": "fp32",
            "lr_scheduler_type": "linear", "warmup_ratio": 0.0}
MERGING = {"dtype": "float32", "normalize": True}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir):
    """sft(ties(tiny, sft(tiny, arith), sft(tiny, choice)), all) under <tmp>/results."""
    results = tmp_path_factory.mktemp("lineage") / "results"
    config = {
        "seed": 3,
        "data": {"train_examples": 4},  # 4 rows per task: arith and choice 4 rows, all 8
        "models": {"tiny": {"source": "local", "path": str(tiny_model_dir)}},
        "datasets": {"arith": {"source": "embedded", "tasks": ["arith"]},
                     "choice": {"source": "embedded", "tasks": ["choice"]},
                     "all": {"source": "embedded", "tasks": ["arith", "choice"]}},
    }
    task_files = {task: write_splits(task, results / "data" / task, {"train": 4}, config["seed"])["train"]
                  for task in ("arith", "choice")}
    paths, entries = {}, {}
    for name, spec in config["datasets"].items():
        paths[name] = results / "datasets" / f"{name}.jsonl"
        prepare(spec, paths[name], task_train_files=[task_files[t] for t in spec["tasks"]])
        entries[name] = dataset_entry(paths[name])
    store = RecipeStore(results / "recipes")
    dirs = {"tiny": tiny_model_dir}

    def build(action, values):
        recipe = make_recipe(action, values, datasets=entries, training=TRAINING, merging=MERGING, seed=0)
        model = store.save(recipe)
        slots = {"sft": (("model",), ("dataset",)), "ties_merging": (("base_model", "model_a", "model_b"), ())}
        model_slots, data_slots = slots[action]
        parents = {slot: dirs[recipe["inputs"][slot]] for slot in model_slots}
        datasets = {slot: paths[recipe["inputs"][slot]["name"]] for slot in data_slots}
        dirs[model] = results / "models" / model
        build_step(recipe, parents, datasets, dirs[model], config)
        return model

    spec_a = build("sft", ["tiny", "arith", 1e-3])
    spec_b = build("sft", ["tiny", "choice", 1e-3])
    merged = build("ties_merging", ["tiny", spec_a, spec_b, [0.5, 0.5], 0.5])
    final = build("sft", [merged, "all", 1e-3])
    return {"results": results, "final": dirs[final], "merged": dirs[merged], "ids": [spec_a, spec_b, merged, final],
            "tiny": tiny_model_dir}


def test_record_holds_the_whole_tree(chain):
    record = load_lineage(chain["final"])
    spec_a, spec_b, merged, final = chain["ids"]
    assert record["model"] == final and record["kind"] == "built"
    assert record["files"]["model.safetensors"]["sha256"] == sha256_file(chain["final"] / "model.safetensors")
    merge = record["parents"]["model"]
    assert merge["model"] == merged and merge["recipe"]["action"] == "ties_merging"
    assert [merge["parents"][s]["model"] for s in ("base_model", "model_a", "model_b")] == ["tiny", spec_a, spec_b]
    base = merge["parents"]["base_model"]
    assert base["kind"] == "base" and base["source"] == {"source": "local", "path": str(chain["tiny"])}
    assert base["files"]["model.safetensors"]["sha256"] == sha256_file(chain["tiny"] / "model.safetensors")
    data = record["datasets"]["dataset"]
    assert data["rows"] == 8 and data["generator"]["tasks"] == ["arith", "choice"] and data["generator"]["seed"] == 3
    assert data["sha256"] == record["recipe"]["inputs"]["dataset"]["sha256"]
    assert record["determinism"]["bit_reproducible"] is True
    assert record["run"]["cpu_s"] > 0 and record["run"]["ended"] >= record["run"]["started"]
    assert record["code"]["git_commit"] and record["packages"]["torch"] and record["hardware"]["torch_device"] == "cpu"
    assert [n["model"] for n in rebuild_plan(record)] == [spec_a, spec_b, merged, final]

    card = (chain["final"] / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "base_model: tiny" in front
    assert "sft(ties(sft(tiny, arith), sft(tiny, choice)), all)" in card
    assert record["files"]["model.safetensors"]["sha256"] in card


def test_lineage_command_prints_tree_and_json(chain, capsys):
    assert main(["lineage", str(chain["final"])]) == 0
    tree = capsys.readouterr().out
    assert tree.startswith(f"{chain['ids'][3]} = sft(ties(sft(tiny, arith), sft(tiny, choice)), all)")
    for model in chain["ids"]:
        assert model in tree
    assert "[base: local " in tree and "generated arith+choice seed=3" in tree

    assert main(["lineage", str(chain["final"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == chain["ids"][3]


def test_verify_catches_a_corrupted_weight_file(chain, tmp_path):
    ok = subprocess.run([LAMDAGENT, "lineage", str(chain["final"]), "--verify"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verify: 0 mismatch(es)" in ok.stdout

    copy = tmp_path / "models"
    shutil.copytree(chain["results"] / "models", copy)
    final, merged = copy / chain["final"].name, copy / chain["merged"].name
    for weights in (final / "model.safetensors", merged / "model.safetensors"):
        with open(weights, "r+b") as handle:  # flip one byte in the middle of the tensor data
            handle.seek(weights.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, 1)
            handle.write(bytes([byte[0] ^ 0x01]))

    bad = subprocess.run([LAMDAGENT, "lineage", str(final), "--verify"], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    mismatches = [line for line in bad.stdout.splitlines() if line.startswith("MISMATCH")]
    # The model's own file, and the parent's copy found beside it: the check recurses into the tree.
    assert len(mismatches) == 2, bad.stdout
    assert str(final / "model.safetensors") in mismatches[0]
    assert str(merged / "model.safetensors") in mismatches[1]


def test_rebuild_in_a_fresh_results_dir_is_bit_identical(chain, tmp_path, capsys):
    fresh = tmp_path / "fresh-results"
    assert main(["rebuild", str(chain["final"]), "--results", str(fresh)]) == 0
    out = capsys.readouterr().out
    assert "bit-identical" in out
    for model in chain["ids"]:
        original = chain["results"] / "models" / model / "model.safetensors"
        assert sha256_file(fresh / "models" / model / "model.safetensors") == sha256_file(original), model
        assert (fresh / "recipes" / f"{model}.json").is_file()
    # The datasets were generated again from the recorded task names, seed and sizes, not copied.
    assert sha256_file(fresh / "datasets" / "all.jsonl") == sha256_file(chain["results"] / "datasets" / "all.jsonl")
    assert (fresh / "data" / "arith" / "train.jsonl").is_file()
    assert verify(fresh / "models" / chain["ids"][3]) == []


def test_card_gains_scores_without_touching_hashes_or_snakemake_dates(chain, tmp_path):
    model = tmp_path / "copy"
    shutil.copytree(chain["final"], model)
    (model / ".snakemake_timestamp").touch()  # what Snakemake dates a directory output by
    stamp = (model / ".snakemake_timestamp").stat().st_mtime_ns
    assert "Not evaluated" in (model / "README.md").read_text()
    val = {"split": "val", "tasks": {"arith": 0.25, "choice": 0.5}, "weights": {"arith": 1, "choice": 1},
           "s_multi": 0.75}
    test = {"split": "test", "tasks": {"arith": 0.2, "choice": 0.4, "arith_ood": 0.1}, "s_multi": 0.6}
    assert refresh_card(model, {"validation": val, "test": test})
    card = (model / "README.md").read_text()
    assert "| task | validation | test |" in card
    assert "| arith | 0.25 | 0.2 |" in card and "| arith_ood |  | 0.1 |" in card and "| **s_multi** | 0.75 | 0.6 |" in card
    assert verify(model) == []
    assert (model / ".snakemake_timestamp").stat().st_mtime_ns == stamp
    # A directory without a lineage record (a user's local model) is never written to.
    assert not refresh_card(chain["tiny"], {"validation": val})


def test_a_base_model_directory_carries_its_own_record(chain, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(chain["tiny"], base)
    spec = {"source": "hub", "repo": "org/tiny", "revision": "abc123"}
    with measure() as usage:
        pass
    record = record_base(base, "tiny-base", spec, usage)
    assert record["kind"] == "base" and record["source"] == spec and record["run"]["wall_s"] >= 0
    assert record["files"]["model.safetensors"]["sha256"] == sha256_file(base / "model.safetensors")
    card = (base / "README.md").read_text()
    assert "hub org/tiny@abc123" in card and "base_model:" not in card.split("---")[1]
    assert main(["lineage", str(base), "--verify"]) == 0
    assert "[base: hub org/tiny@abc123]" in capsys.readouterr().out
    (base / "model.safetensors").write_bytes(b"corrupt")
    assert main(["lineage", str(base), "--verify"]) != 0
    # A model built on it embeds the base's own record as its parent.
    assert parent_node("tiny-base", base, None)["source"] == spec


def test_busy_gpu_seconds_integrate_utilisation_over_time():
    samples = [(0.0, [100.0, 50.0]), (2.0, [0.0, 100.0]), (3.0, [0.0, 0.0])]
    assert busy_seconds(samples) == pytest.approx(2 * 1.5 + 1 * 1.0)
    assert busy_seconds(samples[:1]) == 0.0


def test_gpu_meter_samples_until_stopped_and_says_why_when_it_cannot():
    import time

    meter = GpuMeter(sample=lambda: [100.0], interval_s=0.01).start()
    time.sleep(0.1)
    usage = meter.stop()
    assert len(meter.samples) >= 3 and usage["gpu_util_mean"] == [100.0]
    assert usage["gpu_busy_s"] == pytest.approx(meter.samples[-1][0] - meter.samples[0][0], abs=1e-3)

    def no_nvml():
        raise ModuleNotFoundError("No module named 'pynvml'")

    usage = GpuMeter(sample=no_nvml, interval_s=0.01).start().stop()
    assert usage["gpu_busy_s"] is None and "pynvml" in usage["gpu_busy_s_is"]


def test_a_bf16_base_trains_into_bf16_weights_recorded_and_rebuilt_bit_identically(chain, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(chain["tiny"], dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(chain["tiny"]).save_pretrained(base)
    results = chain["results"]
    config = {"seed": 3, "data": {"train_examples": 4}, "models": {"tiny-bf16": {"source": "local", "path": str(base)}},
              "datasets": {"arith": {"source": "embedded", "tasks": ["arith"]}}}
    dataset = results / "datasets" / "arith.jsonl"
    recipe = make_recipe("sft", ["tiny-bf16", "arith", 1e-3], datasets={"arith": dataset_entry(dataset)},
                         training={**TRAINING, "save_dtype": "auto"}, merging=MERGING, seed=0)
    assert "save_dtype" not in recipe["params"]  # the default stays out of the recipe and the id
    model = RecipeStore(results / "recipes").save(recipe)
    out = tmp_path / "models" / model
    record = build_step(recipe, {"model": base}, {"dataset": dataset}, out, config)
    assert record["run"]["metrics"]["save_dtype"] == "bfloat16" and recorded_save_dtype(record) == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert record["determinism"]["bit_reproducible"]  # CPU fp32 training; rounding to bf16 is deterministic

    fresh = tmp_path / "fresh"
    report = rebuild(record, fresh, say=lambda *_: None)
    assert [step["identical"] for step in report] == [True]
    assert sha256_file(fresh / "models" / model / "model.safetensors") == sha256_file(out / "model.safetensors")

    # A model trained before save_dtype existed was written in float32 whatever its base: its
    # rebuild writes float32 again, so its recorded hashes still hold.
    old = json.loads(json.dumps(record))
    del old["run"]["metrics"]["save_dtype"]
    assert recorded_save_dtype(old) == "float32"
