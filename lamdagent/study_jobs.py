"""The bodies of the scaling and baseline rules (``scripts/<rule>.py`` calls ``study_jobs.<rule>``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .fileio import atomic_write_json, atomic_write_text, atomic_write_yaml, read_json, write_jsonl
from .jobs import job_context

RECIPES = "results/recipes"


def _board(path):
    import pandas as pd

    return pd.read_csv(path, sep="\t")


def _evals(paths) -> dict[tuple[str, str], dict]:
    """{(model, split): evaluation} from ``results/evals/<model>/<split>.json`` paths."""
    return {(Path(p).parent.name, Path(p).stem): read_json(p) for p in paths}


# ---- data -------------------------------------------------------------------------------------


def generate_train(smk):
    from .tasks import generate

    with job_context(smk):
        write_jsonl(smk.output.train, generate(smk.wildcards.task, "train", int(smk.wildcards.examples),
                                               smk.params.seed))


def resize_dataset(smk):
    from .datasets import resize

    with job_context(smk):
        entry = resize(dict(smk.params.spec), int(smk.wildcards.rows), smk.output.dataset,
                       task_train_files=list(smk.input.get("tasks", [])))
        print(f"resized {smk.wildcards.dataset}: {entry}")


# ---- scaling ----------------------------------------------------------------------------------


def replay_data(smk):
    """Replay the top-k at every data size: each dataset swapped for its resized file."""
    from .datasets import dataset_entry
    from .recipe import RecipeStore
    from .scaling import ranked_models, replay, resized_name, resized_rows, sizes, train_rows, tree_datasets

    store = RecipeStore(RECIPES)
    scaling = smk.config["scaling"]
    with job_context(smk):
        board = _board(smk.input.leaderboard)
        resized = {Path(p).relative_to(smk.params.datasets).with_suffix("").as_posix(): dataset_entry(p)
                   for p in smk.input.datasets}
        out = []
        for rank, model in ranked_models(board, scaling["top_k"]):
            pipeline = board["pipeline"].iloc[rank - 1]
            for size in sizes(scaling):
                mapping = {}
                for name, rows in tree_datasets(model, store).items():
                    new_rows = resized_rows(rows, size)
                    if new_rows != rows:
                        new_name = resized_name(name, new_rows)
                        mapping[name] = {"name": new_name, **resized[new_name]}
                new = replay(model, store, datasets=mapping)
                out.append({"rank": rank, "source": model, "pipeline": pipeline, "size": size["label"],
                            "factor": size["factor"], "examples": size["examples"], "model": new,
                            "train_rows": train_rows(new, store)})
                print(f"#{rank} {pipeline} at {size['label']}: {new}")
        atomic_write_json(smk.output.replays, out)


def replay_model(smk):
    """Replay the top-k and the chosen ranks with every base model swapped for another."""
    from .recipe import RecipeStore
    from .scaling import ranked_models, replay, tree_models

    store = RecipeStore(RECIPES)
    settings = smk.config["scaling"]["model"]
    with job_context(smk):
        board = _board(smk.input.leaderboard)
        out = []
        for rank, model in ranked_models(board, smk.config["scaling"]["top_k"], settings["ranks"]):
            leaves = _leaves(model, store, tree_models)
            new = replay(model, store, models={leaf: settings["base"] for leaf in leaves})
            out.append({"rank": rank, "source": model, "pipeline": board["pipeline"].iloc[rank - 1], "model": new,
                        "base": settings["base"]})
            print(f"#{rank} {out[-1]['pipeline']} on {settings['base']}: {new}")
        atomic_write_json(smk.output.replays, out)


def _leaves(model, store, tree_models) -> set[str]:
    """The named (not built) models a recipe tree starts from."""
    from .actions import action_spec
    from .recipe import is_built_id

    if not is_built_id(model):
        return {model}
    leaves = set()
    for node in tree_models(model, store):
        recipe = store.load(node)
        leaves |= {recipe["inputs"][s.name] for s in action_spec(recipe["action"]).slots
                   if s.kind == "model" and not is_built_id(recipe["inputs"][s.name])}
    return leaves


def scaling_data(smk):
    from .scaling import data_table, kendall_table, plot_data_scaling

    with job_context(smk):
        data = data_table(read_json(smk.input.replays), _evals(smk.input.evals), smk.config["eval_tasks"])
        atomic_write_text(smk.output.data, data.to_csv(sep="\t", index=False))
        kendall = kendall_table(data)
        atomic_write_text(smk.output.kendall, kendall.to_csv(sep="\t", index=False))
        plot_data_scaling(data, Path(smk.output.png).with_suffix(""))
        print(data.to_string(index=False))
        print(kendall.to_string(index=False))


def scaling_model(smk):
    from .scaling import model_table

    with job_context(smk):
        table = model_table(read_json(smk.input.replays), _evals(smk.input.evals), smk.config["eval_tasks"])
        atomic_write_text(smk.output.table, table.to_csv(sep="\t", index=False))
        print(table.to_string(index=False))


# ---- baselines --------------------------------------------------------------------------------


def baseline_recipes(smk):
    from .baselines import baseline_recipes as make
    from .datasets import dataset_entry
    from .objects import Pool
    from .recipe import RecipeStore

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
    from .baselines import SHARED_DIRS, random_run_config

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
    from .baselines import table1 as make

    with job_context(smk):
        random_topk = _board(smk.input.random_topk) if smk.input.get("random_topk") else None
        table = make(_board(smk.input.topk), read_json(smk.input.recipes), _evals(smk.input.evals),
                     smk.config["eval_tasks"], random_topk)
        atomic_write_text(smk.output.table, table.to_csv(sep="\t", index=False))
        print(table.to_string(index=False))
