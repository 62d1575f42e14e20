"""The bodies of rules/baselines.smk: the baselines of the paper's Table 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lamdagent.store.fileio import atomic_write_json, atomic_write_text, atomic_write_yaml, read_json
from lamdagent.workflow.common import RECIPES, job_context, read_board, read_evals


def baseline_recipes(smk):
    from lamdagent.agent.objects import Pool
    from lamdagent.data.datasets import dataset_entry
    from lamdagent.store.recipes import RecipeStore
    from lamdagent.studies.baselines import baseline_recipes as make

    with job_context(smk):
        pool = Pool.from_json(read_json(smk.input.pool))
        datasets = {**pool.datasets, **{Path(p).stem: dataset_entry(p) for p in smk.input.datasets}}
        entries = make(smk.config, pool, datasets, RecipeStore(RECIPES))
        atomic_write_json(smk.output.recipes, entries)
        for entry in entries:
            print(f"{entry['role']}: {entry['pipeline']} -> {entry['model']}")


def random_baseline(smk):
    """The same workflow with the random controller, run in its own directory beside the results;
    the content-addressed folders are shared, so models both runs make are built once."""
    from lamdagent.studies.baselines import SHARED_DIRS, random_run_config

    workdir = Path(smk.output.leaderboard).parent.parent  # <workdir>/results/leaderboard.tsv
    results = workdir / "results"
    with job_context(smk):
        results.mkdir(parents=True, exist_ok=True)
        for name in SHARED_DIRS:
            link, target = results / name, Path("results") / name
            target.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(os.path.relpath(target, results))
        config_path = workdir / "config.yaml"
        atomic_write_yaml(config_path, random_run_config(smk.config, os.getcwd()))
        targets = [str(Path(p).relative_to(workdir)) for p in (smk.output.leaderboard, smk.output.topk)]
        command = [sys.executable, "-m", "snakemake", "--snakefile", smk.params.snakefile, "--directory",
                   str(workdir), "--configfile", str(config_path), "--cores", str(smk.threads), *targets]
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def table1(smk):
    from lamdagent.studies.baselines import table1 as make

    with job_context(smk):
        random_topk = read_board(smk.input.random_topk) if smk.input.get("random_topk") else None
        table = make(read_board(smk.input.topk), read_json(smk.input.recipes), read_evals(smk.input.evals),
                     smk.config["eval_tasks"], random_topk)
        atomic_write_text(smk.output.table, table.to_csv(sep="\t", index=False))
        print(table.to_string(index=False))
