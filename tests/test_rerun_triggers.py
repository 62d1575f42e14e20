"""What reruns when the evaluation changes: the `evaluate` and `score` rules carry what determines
their result in `params` (Snakemake's params rerun trigger). One real evaluation of the tiny base
model, then dry runs (and one real rescoring) with edited configs."""

from __future__ import annotations

import re

import pytest
import yaml
from e2e import run_snakemake, tiny_config

from lamdagent.store.fileio import read_json

pytestmark = pytest.mark.slow

TARGET = "results/scores/tiny.json"


def planned_jobs(output: str) -> dict[str, int]:
    """{rule: count} from a dry run's "Job stats" table (empty when there is nothing to do)."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match or match[1] == "total":
            break
        jobs[match[1]] = int(match[2])
    return jobs


def write(workdir, config) -> object:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dry_run(workdir, config) -> dict[str, int]:
    return planned_jobs(run_snakemake(workdir, write(workdir, config), "-n", TARGET, "--workflow-profile", "none").stdout)


def test_a_changed_evaluation_reevaluates_and_a_changed_weight_only_rescores(tmp_path, tiny_model_dir):
    config = tiny_config(tiny_model_dir)
    run_snakemake(tmp_path, write(tmp_path, config), TARGET, "--workflow-profile", "none", timeout=600)
    evaluation = tmp_path / "results/evals/tiny/val.json"
    evaluated_at = evaluation.stat().st_mtime_ns
    assert read_json(tmp_path / TARGET)["weights"] == {"arith": 1.0, "choice": 1.0}

    # Unchanged config, or a change of how the evaluation runs (batch size): nothing to do.
    assert dry_run(tmp_path, config) == {}
    assert dry_run(tmp_path, {**config, "evaluation": {"batch_size": 2}}) == {}
    # The same weight written another way (auto is 1 / the maximum, 1 for exact match): the same score.
    same = {**config, "eval_tasks": [{**config["eval_tasks"][0], "weight": 1.0}, config["eval_tasks"][1]]}
    assert dry_run(tmp_path, same) == {}

    # A changed task list re-evaluates (and rescores).
    assert dry_run(tmp_path, {**config, "eval_tasks": config["eval_tasks"][:1]}) == {"evaluate": 1, "score": 1}
    # So does a changed evaluation setting that changes the result.
    assert dry_run(tmp_path, {**config, "evaluation": {"batch_size": 8, "limit": 2}}) == {"evaluate": 1, "score": 1}

    # A changed weight rescores from the evaluation already there.
    weighted = {**config, "eval_tasks": [{**config["eval_tasks"][0], "weight": 2.0}, config["eval_tasks"][1]]}
    assert dry_run(tmp_path, weighted) == {"score": 1}
    run_snakemake(tmp_path, write(tmp_path, weighted), TARGET, "--workflow-profile", "none", timeout=300)
    score = read_json(tmp_path / TARGET)
    assert score["weights"] == {"arith": 2.0, "choice": 1.0}
    assert score["s_multi"] == pytest.approx(2.0 * score["tasks"]["arith"] + score["tasks"]["choice"])
    assert evaluation.stat().st_mtime_ns == evaluated_at
    assert dry_run(tmp_path, weighted) == {}
