"""End to end: a 3-iteration exploration of the tiny model that uses every new action
(sft_lora, dpo, linear, task_arithmetic, dare_ties, slerp) and records each one's lineage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e import NEW_ACTIONS, WIDE_FORCED, run_snakemake, wide_config

from lamdagent.store.fileio import read_json

LAMDAGENT = str(Path(sys.executable).with_name("lamdagent"))


@pytest.mark.slow
def test_every_new_action_runs_in_a_three_iteration_exploration(tmp_path, tiny_model_dir):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(wide_config(tiny_model_dir), sort_keys=False))
    run_snakemake(workdir, config, timeout=900)

    plan = yaml.safe_load((workdir / "results" / "plan.yaml").read_text())
    assert [step["action"] for step in plan["steps"]] == WIDE_FORCED
    assert all(step["status"] == "done" for step in plan["steps"])
    models = workdir / "results" / "models"
    built = {action: sorted(models.glob(f"{action}-*")) for action in NEW_ACTIONS}
    assert all(built.values()), {a: len(d) for a, d in built.items()}

    for action, dirs in built.items():
        model_dir = dirs[0]
        lineage = read_json(model_dir / "lineage.json")
        assert lineage["recipe"]["action"] == action and lineage["details"]["library"]
        shown = subprocess.run([LAMDAGENT, "lineage", str(model_dir)], capture_output=True, text=True, check=True)
        assert "library:" in shown.stdout, shown.stdout
        verified = subprocess.run([LAMDAGENT, "lineage", str(model_dir), "--verify"], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert (workdir / "results" / "logs" / action / f"{model_dir.name.split('-', 1)[1]}.log").is_file()
        assert (workdir / "results" / "benchmarks" / action / f"{model_dir.name.split('-', 1)[1]}.tsv").is_file()

    lora = built["sft_lora"][0]
    assert read_json(lora / "adapter" / "adapter_config.json")["r"] == 4
    assert "adapter" in read_json(lora / "lineage.json")["details"]
    dpo = read_json(built["dpo"][0] / "lineage.json")
    assert dpo["details"]["beta"] == 0.1 and dpo["datasets"]["dataset"]["generator"]["pairs"]
    dare = read_json(built["dare_ties"][0] / "lineage.json")
    assert "seeded with 0" in dare["determinism"]["reason"] and dare["determinism"]["bit_reproducible"]
    slerp = yaml.safe_load((built["slerp"][0] / "mergekit_config.yml").read_text())
    assert slerp["merge_method"] == "slerp" and slerp["parameters"]["t"] == 0.5
