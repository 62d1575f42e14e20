"""The paper's baselines (Table 1): the specialists, a fully fine-tuned model, a TIES grid search over
the specialists' merge weights, and an exploration with the random controller on the same budget.

Their recipes are content-addressed like the agent's, so a baseline the exploration already built
(the specialists, a merge the agent happened to pick) is reused, not retrained.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pandas as pd

from lamdagent.actions.recipe import pipeline_text
from lamdagent.agent.objects import Pool, recipe_for
from lamdagent.store.recipes import RecipeStore
from lamdagent.studies.scaling import test_columns

# The random-controller exploration runs in its own directory and shares these content-addressed
# folders with the main run (models, recipes, evaluations keyed by model id; data made from config).
SHARED_DIRS = ("models", "recipes", "evals", "scores", "datasets", "data")


def baseline_recipes(config: dict, pool: Pool, datasets: dict[str, dict], store: RecipeStore) -> list[dict]:
    """{role, model, pipeline} of every baseline model; saves the new recipes to ``store``."""
    settings = config["baselines"]
    ids = {label: model for model, label in pool.labels.items()}
    base = ids.get(settings["base"], settings["base"])
    out = [{"role": "base", "model": base}]
    specialists = [ids[name] for name in settings["specialists"]]
    out += [{"role": "specialist", "model": model} for model in specialists]
    full = settings.get("full_sft")
    if full:
        recipe = recipe_for(config, datasets, "sft", [base, full["dataset"], full["learning_rate"]])
        out.append({"role": "fully fine-tuned", "model": store.save(recipe)})
    ties = settings["ties"]
    for model_a, model_b in itertools.combinations(specialists, 2):
        for weights, density in itertools.product(ties.get("weights", []), ties.get("density", [])):
            recipe = recipe_for(config, datasets, "ties_merging", [base, model_a, model_b, weights, density])
            model = store.save(recipe)
            out.append({"role": "ties grid", "model": model,
                        "pipeline": f"{pipeline_text(model, store, pool.labels)} weights={weights}, density={density}"})
    for entry in out:
        entry.setdefault("pipeline", pipeline_text(entry["model"], store, pool.labels))
    return out


def random_run_config(config: dict, workdir: str | Path) -> dict:
    """The exploration's config with the random controller on the same budget, for another directory:
    relative local paths made absolute, the studies left out."""
    workdir = Path(workdir).resolve()
    out = copy.deepcopy(config)
    out["controller"] = {"type": "random"}
    out["iterations"] = config["baselines"]["random"]["iterations"]
    for section in ("scaling", "baselines"):
        out.pop(section, None)
    for spec in list(out["models"].values()) + list(out["datasets"].values()):
        if spec.get("source") == "local":
            spec["path"] = str((workdir / spec["path"]).resolve())
    return out


def table1(topk: pd.DataFrame, baselines: list[dict], evals: dict[tuple[str, str], dict], eval_tasks: list[dict],
           random_topk: pd.DataFrame | None = None) -> pd.DataFrame:
    """The exploration's top-k beside the baselines on the test and OOD tasks (the paper's Table 1).

    The TIES grid is reported by its best point on validation, as a grid search would choose it.
    """
    from lamdagent.evaluation.score import score

    def row(role: str, pipeline: str, model: str) -> dict:
        val = score(evals[(model, "val")], eval_tasks, "val")["s_multi"] if (model, "val") in evals else math.nan
        out = {"role": role, "pipeline": pipeline, "model": model, "val_s_multi": val}
        out.update(test_columns(score(evals[(model, "test")], eval_tasks, "test")["tasks"]))
        return out

    rows = []
    for entry in baselines:
        if entry["role"] != "ties grid":
            rows.append(row(entry["role"], entry["pipeline"], entry["model"]))
    grid = [e for e in baselines if e["role"] == "ties grid"]
    if grid:
        best = max(grid, key=lambda e: score(evals[(e["model"], "val")], eval_tasks, "val")["s_multi"])
        rows.append(row(f"TIES grid best of {len(grid)}", best["pipeline"], best["model"]))
    if random_topk is not None:
        top = random_topk[random_topk["role"] == "top-1"]
        if len(top):
            rows.append(row("random controller top-1", top["pipeline"].iloc[0], top["model"].iloc[0]))
    for _, entry in topk[topk["role"].str.startswith("top-")].iterrows():
        rows.append(row(f"LaMDAgent {entry['role']}", entry["pipeline"], entry["model"]))
    table = pd.DataFrame(rows)
    scored = [c for c in table.columns if c.startswith("test_") and c != "test_avg"]
    table["avg"] = table[scored].mean(axis=1)
    return table.round(6)

