"""Scaling studies: replay the exploration's best pipelines with more data or another base model.

A replay keeps the recipe tree (actions, hyper-parameters, seed) and swaps only the leaves: every
training dataset for a resized one (data-size scaling, the paper's Figure 7), or every base model
for another (model-size transfer, Table 3). Replayed recipes are content-addressed like any other,
so a subtree none of whose leaves changed keeps its id and its model is reused, not retrained.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd

from lamdagent.actions.registry import action_spec, is_built_id
from lamdagent.store.recipes import RecipeStore

# Resized datasets live beside the prepared ones; the recipe names them by this relative path.
RESIZED_DIR = "resized"


def sizes(scaling: dict) -> list[dict]:
    """The data sizes of a study, the exploration's own first: ``{label, factor, examples}``."""
    out = [{"label": "x1", "factor": 1.0, "examples": None}]
    if scaling.get("examples"):
        out += [{"label": f"n{n}", "factor": None, "examples": int(n)} for n in scaling["examples"]]
    else:
        out += [{"label": f"x{f:g}", "factor": float(f), "examples": None}
                for f in scaling["factors"] if float(f) != 1.0]
    return out


def resized_rows(rows: int, size: dict) -> int:
    return size["examples"] if size["examples"] is not None else max(1, round(rows * size["factor"]))


def resized_name(name: str, rows: int) -> str:
    return f"{RESIZED_DIR}/{name}.n{rows}"


def tree_models(model: str, store: RecipeStore) -> list[str]:
    """The built models of a recipe tree, parents first, each once."""
    if not is_built_id(model):
        return []
    recipe = store.load(model)
    out: list[str] = []
    for slot in action_spec(recipe["action"]).slots:
        if slot.kind == "model":
            out += [m for m in tree_models(recipe["inputs"][slot.name], store) if m not in out]
    return out + [model]


def tree_datasets(model: str, store: RecipeStore) -> dict[str, int]:
    """{dataset name: rows} of every dataset a recipe tree trains on."""
    out: dict[str, int] = {}
    for node in tree_models(model, store):
        recipe = store.load(node)
        for slot in action_spec(recipe["action"]).slots:
            if slot.kind == "dataset":
                out[recipe["inputs"][slot.name]["name"]] = recipe["inputs"][slot.name]["rows"]
    return out


def train_rows(model: str, store: RecipeStore) -> int:
    """Examples trained on along the whole pipeline (each SFT step's dataset, counted per step)."""
    total = 0
    for node in tree_models(model, store):
        recipe = store.load(node)
        total += sum(recipe["inputs"][s.name]["rows"] for s in action_spec(recipe["action"]).slots if s.kind == "dataset")
    return total


def replay(model: str, store: RecipeStore, *, datasets: dict[str, dict] | None = None,
           models: dict[str, str] | None = None) -> str:
    """The id of ``model``'s recipe tree with dataset entries (by name) and leaf models replaced.

    ``datasets``: {old name: {name, sha256, rows}}; ``models``: {old leaf model: new leaf model}.
    Recipes are saved to ``store``; an unchanged subtree gives back its own id.
    """
    datasets, models = datasets or {}, models or {}
    if not is_built_id(model):
        return models.get(model, model)
    recipe = store.load(model)
    new = copy.deepcopy(recipe)
    for slot in action_spec(recipe["action"]).slots:
        if slot.kind == "model":
            new["inputs"][slot.name] = replay(recipe["inputs"][slot.name], store, datasets=datasets, models=models)
        elif slot.kind == "dataset" and recipe["inputs"][slot.name]["name"] in datasets:
            entry = datasets[recipe["inputs"][slot.name]["name"]]
            new["inputs"][slot.name] = {"name": entry["name"], "sha256": entry["sha256"], "rows": entry["rows"]}
    return model if new == recipe else store.save(new)


def ranked_models(board: pd.DataFrame, top_k: int, ranks: list[int] = ()) -> list[tuple[int, str]]:
    """(rank, model) of the top-k and of the chosen ranks; ranks past the leaderboard are skipped."""
    wanted = sorted(set(range(1, top_k + 1)) | set(ranks))
    return [(r, board["model"].iloc[r - 1]) for r in wanted if r <= len(board)]


# ---- tables -----------------------------------------------------------------------------------


def test_columns(tasks: dict[str, float], prefix: str = "") -> dict:
    """test_<task>..., test_avg, test_<task>_ood..., ood_avg (the paper's Table 1 columns)."""
    test = {task: value for task, value in tasks.items() if not task.endswith("_ood")}
    ood = {task: value for task, value in tasks.items() if task.endswith("_ood")}
    row = {f"{prefix}test_{task}": value for task, value in test.items()}
    row[f"{prefix}test_avg"] = sum(test.values()) / len(test) if test else math.nan
    row.update({f"{prefix}test_{task}": value for task, value in ood.items()})
    row[f"{prefix}ood_avg"] = sum(ood.values()) / len(ood) if ood else math.nan
    return row


def _scores(model: str, evals: dict[str, dict], eval_tasks: list[dict], prefix: str = "") -> dict:
    """val per-task scores and s_multi, test/OOD per task and their averages, for one model."""
    from lamdagent.evaluation.score import score

    val = score(evals[(model, "val")], eval_tasks, "val")
    row = {f"{prefix}val_{task}": value for task, value in val["tasks"].items()}
    row[f"{prefix}val_s_multi"] = val["s_multi"]
    row.update(test_columns(score(evals[(model, "test")], eval_tasks, "test")["tasks"], prefix))
    return row


def data_table(replays: list[dict], evals: dict[tuple[str, str], dict], eval_tasks: list[dict]) -> pd.DataFrame:
    """One row per (pipeline, size): ``replays`` entries are {rank, source, pipeline, size, factor,
    examples, model, train_rows}; ``evals`` maps (model, split) to its evaluation."""
    rows = []
    for entry in replays:
        row = {key: entry[key] for key in ("rank", "pipeline", "size", "factor", "examples", "train_rows", "model",
                                           "source")}
        row.update(_scores(entry["model"], evals, eval_tasks))
        rows.append(row)
    return pd.DataFrame(rows).round(6)


def kendall_table(data: pd.DataFrame) -> pd.DataFrame:
    """Kendall's tau between the exploration-size ranking of the pipelines and each other size's."""
    from scipy.stats import kendalltau

    base = data[data["size"] == "x1"].set_index("source")
    rows = []
    for size in [s for s in data["size"].unique() if s != "x1"]:
        other = data[data["size"] == size].set_index("source")
        common = [s for s in base.index if s in other.index]
        row = {"size": size, "pipelines": len(common)}
        for column in ("val_s_multi", "test_avg"):
            if len(common) >= 2:
                tau, p = kendalltau(base.loc[common, column], other.loc[common, column])
            else:
                tau, p = math.nan, math.nan
            short = column.split("_")[0]
            row[f"tau_{short}"], row[f"p_{short}"] = tau, p
        rows.append(row)
    return pd.DataFrame(rows, columns=["size", "pipelines", "tau_val", "p_val", "tau_test", "p_test"]).round(6)


def model_table(replays: list[dict], evals: dict[tuple[str, str], dict], eval_tasks: list[dict]) -> pd.DataFrame:
    """Source and replayed model side by side: ``replays`` entries are {rank, source, pipeline, model, base}."""
    rows = []
    for entry in replays:
        row = {"rank": entry["rank"], "pipeline": entry["pipeline"], "source": entry["source"],
               "model": entry["model"], "base": entry["base"]}
        source = _scores(entry["source"], evals, eval_tasks, "source_")
        target = _scores(entry["model"], evals, eval_tasks, "target_")
        for key in ("val_s_multi", "test_avg", "ood_avg"):
            row[f"source_{key}"], row[f"target_{key}"] = source[f"source_{key}"], target[f"target_{key}"]
        row.update({k: v for k, v in {**source, **target}.items() if k not in row})
        rows.append(row)
    return pd.DataFrame(rows).round(6)


def plot_data_scaling(data: pd.DataFrame, stem: str | Path) -> list[Path]:
    """Score against training examples, one line per pipeline (the paper's Figure 7)."""
    from lamdagent.report.figures import plt, save

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (rank, pipeline), group in data.groupby(["rank", "pipeline"], sort=True):
        group = group.sort_values("train_rows")
        label = f"#{rank} {pipeline if len(pipeline) <= 48 else pipeline[:45] + '...'}"
        for ax, column in zip(axes, ("val_s_multi", "test_avg")):
            ax.plot(group["train_rows"], group[column], marker="o", label=label)
    rows = sorted(data["train_rows"].unique())
    for ax, title in zip(axes, ("validation s_multi", "test average")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(rows, [str(r) for r in rows])
        ax.minorticks_off()
        ax.set_xlabel("training examples along the pipeline")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_title("score against data size")
    axes[1].legend(fontsize=7, loc="best")
    return save(fig, stem)
