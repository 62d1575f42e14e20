"""The bodies of rules/scaling.smk: the resized datasets, the replays of the top-k and the scaling tables."""

from __future__ import annotations

from pathlib import Path

from lamdagent.store.fileio import atomic_write_json, atomic_write_text, read_json, write_jsonl
from lamdagent.workflow.common import RECIPES, job_context, read_board, read_evals

# ---- resized datasets ----------------------------------------------------------------------------


def generate_train(smk):
    from lamdagent.data.tasks import generate

    with job_context(smk):
        write_jsonl(smk.output.train, generate(smk.wildcards.task, "train", int(smk.wildcards.examples),
                                               smk.params.seed))


def resize_dataset(smk):
    from lamdagent.data.datasets import resize

    with job_context(smk):
        entry = resize(dict(smk.params.spec), int(smk.wildcards.rows), smk.output.dataset,
                       task_train_files=list(smk.input.get("tasks", [])))
        print(f"resized {smk.wildcards.dataset}: {entry}")


# ---- scaling ----------------------------------------------------------------------------------


def replay_data(smk):
    """Replay the top-k at every data size: each dataset swapped for its resized file."""
    from lamdagent.data.datasets import dataset_entry
    from lamdagent.store.recipes import RecipeStore
    from lamdagent.studies.scaling import (ranked_models, replay, resized_name, resized_rows, sizes, train_rows,
                                           tree_datasets)

    store = RecipeStore(RECIPES)
    scaling = smk.config["scaling"]
    with job_context(smk):
        board = read_board(smk.input.leaderboard)
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
    from lamdagent.store.recipes import RecipeStore
    from lamdagent.studies.scaling import ranked_models, replay, tree_models

    store = RecipeStore(RECIPES)
    settings = smk.config["scaling"]["model"]
    with job_context(smk):
        board = read_board(smk.input.leaderboard)
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
    from lamdagent.actions.registry import action_spec, is_built_id

    if not is_built_id(model):
        return {model}
    leaves = set()
    for node in tree_models(model, store):
        recipe = store.load(node)
        leaves |= {recipe["inputs"][s.name] for s in action_spec(recipe["action"]).slots
                   if s.kind == "model" and not is_built_id(recipe["inputs"][s.name])}
    return leaves


def scaling_data(smk):
    from lamdagent.studies.scaling import data_table, kendall_table, plot_data_scaling

    with job_context(smk):
        data = data_table(read_json(smk.input.replays), read_evals(smk.input.evals), smk.config["eval_tasks"])
        atomic_write_text(smk.output.data, data.to_csv(sep="\t", index=False))
        kendall = kendall_table(data)
        atomic_write_text(smk.output.kendall, kendall.to_csv(sep="\t", index=False))
        plot_data_scaling(data, Path(smk.output.png).with_suffix(""))
        print(data.to_string(index=False))
        print(kendall.to_string(index=False))


def scaling_model(smk):
    from lamdagent.studies.scaling import model_table

    with job_context(smk):
        table = model_table(read_json(smk.input.replays), read_evals(smk.input.evals), smk.config["eval_tasks"])
        atomic_write_text(smk.output.table, table.to_csv(sep="\t", index=False))
        print(table.to_string(index=False))
