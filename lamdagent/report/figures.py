"""The report's pictures (PNG and SVG): score over iterations, the top-k pipelines, per-task scores.

Drawn from the step records (``results/agent/iter_*/step.json``), the leaderboard, the top-k table
and the recipe store, with matplotlib's Agg backend (no display on a cluster's login node).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lamdagent.actions.registry import action_spec, is_built_id  # noqa: E402
from lamdagent.agent.plan import step_entries  # noqa: E402
from lamdagent.store.recipes import RecipeStore  # noqa: E402

# No timestamps or random ids in the SVGs: the same results give the same files.
plt.rcParams["svg.hashsalt"] = "lamdagent"


def save(fig, stem: str | Path) -> list[Path]:
    """``<stem>.png`` and ``<stem>.svg``, written to temporary names and renamed (a kill leaves neither half-done)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, metadata in ((".png", {"Software": None}), (".svg", {"Date": None, "Creator": None})):
        path = stem.with_suffix(suffix)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format=suffix[1:], dpi=120, bbox_inches="tight", metadata=metadata)
        tmp.replace(path)
        written.append(path)
    plt.close(fig)
    return written


# ---- score over iterations (the paper's Figure 5) ---------------------------------------------


def step_points(step_records: list[dict]) -> pd.DataFrame:
    """One row per scored agent step: iteration, model, s_multi (a repeated recipe counts again;
    with k proposals per iteration, k points per iteration)."""
    rows = [{"iteration": e["iteration"], "model": e["model"], "s_multi": e["score"]["s_multi"]}
            for r in step_records if "initial" not in r
            for e in step_entries(r) if e.get("status") == "done" and e.get("score")]
    return pd.DataFrame(rows, columns=["iteration", "model", "s_multi"])


def binned_scores(points: pd.DataFrame, every_k: int) -> pd.DataFrame:
    """Mean, max and std of s_multi per bin of ``every_k`` iterations (1..k, k+1..2k, ...)."""
    if points.empty:
        return pd.DataFrame(columns=["bin_start", "bin_end", "mean", "max", "std", "n"])
    bins = (points["iteration"] - 1) // every_k
    grouped = points.groupby(bins)["s_multi"]
    table = pd.DataFrame({"mean": grouped.mean(), "max": grouped.max(), "std": grouped.std(ddof=0),
                          "n": grouped.size()})
    table.insert(0, "bin_end", (table.index + 1) * every_k)
    table.insert(0, "bin_start", table.index * every_k + 1)
    return table.reset_index(drop=True)


def plot_score_over_iterations(step_records: list[dict], every_k: int, stem: str | Path) -> list[Path]:
    points = step_points(step_records)
    bins = binned_scores(points, every_k)
    fig, ax = plt.subplots(figsize=(7, 4))
    initial = [e["score"]["s_multi"] for r in step_records if "initial" in r for e in r["initial"]
               if e.get("score") and e.get("status") != "failed"]
    if initial:
        ax.axhline(max(initial), color="grey", linestyle="--", linewidth=1, label="best initial model")
    ax.scatter(points["iteration"], points["s_multi"], s=14, color="tab:blue", alpha=0.6, label="model (one step)")
    if not bins.empty:
        centre = (bins["bin_start"] + bins["bin_end"]) / 2
        ax.plot(centre, bins["mean"], marker="o", color="tab:orange", label=f"mean per {every_k} iterations")
        ax.fill_between(centre, bins["mean"] - bins["std"], bins["mean"] + bins["std"], color="tab:orange",
                        alpha=0.2, label="± std")
        ax.plot(centre, bins["max"], marker="^", color="tab:green", label=f"max per {every_k} iterations")
    else:
        ax.text(0.5, 0.5, "no scored agent step yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation s_multi")
    ax.set_title("Score over iterations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save(fig, stem)


# ---- the top-k pipelines as graphs (the paper's Figures 3 and 6) -------------------------------


def _number(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_number(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def pipeline_tree(model: str, store: RecipeStore, labels: dict[str, str], scores: dict[str, float]) -> dict:
    """One node per action: its type, datasets and hyper-parameters, and the score of the model it made.

    Named models (the base, the specialists) are leaves, as in the pipeline text. A TIES merge's base
    model (TIES, DARE-TIES, task arithmetic) is a line of its box, not a branch: the task vectors of the two merged models are what differ.
    """
    score = scores.get(model)
    if model in labels or not is_built_id(model):
        return {"title": labels.get(model, model), "lines": [], "score": score, "children": []}
    recipe = store.load(model)
    spec = action_spec(recipe["action"])
    lines, children = [], []
    for slot in spec.slots:
        if slot.kind == "model":
            parent = recipe["inputs"][slot.name]
            if slot.implied:
                lines.append(f"base: {labels.get(parent, parent)}")
            else:
                children.append(pipeline_tree(parent, store, labels, scores))
        elif slot.is_dataset:
            lines.append(f"data: {recipe['inputs'][slot.name]['name']}")
        elif slot.name in recipe["params"]:
            lines.append(f"{slot.name}: {_number(recipe['params'][slot.name])}")
    return {"title": spec.short.upper(), "lines": lines, "score": score, "children": children}


def _layout(node: dict, depth: int, next_leaf: list[int], placed: list[tuple[dict, int, float]]) -> float:
    """Leaves on consecutive rows, a parent midway between its inputs; returns the node's row."""
    if node["children"]:
        rows = [_layout(child, depth + 1, next_leaf, placed) for child in node["children"]]
        row = sum(rows) / len(rows)
    else:
        row = float(next_leaf[0])
        next_leaf[0] += 1
    placed.append((node, depth, row))
    return row


def _box_text(node: dict) -> str:
    score = "score: n/a" if node["score"] is None else f"score: {node['score']:.3f}"
    return "\n".join([node["title"], *node["lines"], score])


def plot_topk_pipelines(board: pd.DataFrame, store: RecipeStore, labels: dict[str, str], top_k: int,
                        stem: str | Path) -> list[Path]:
    """One panel per top-k model: its recipe tree, inputs on the left, the final model on the right."""
    scores = dict(zip(board["model"], board["s_multi"])) if not board.empty else {}
    chosen = list(board.head(top_k).itertuples()) if not board.empty else []
    layouts = []
    for entry in chosen:
        placed: list[tuple[dict, int, float]] = []
        leaves = [0]
        _layout(pipeline_tree(entry.model, store, labels, scores), 0, leaves, placed)
        layouts.append((entry, placed, leaves[0], max(d for _, d, _ in placed)))
    if not layouts:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no scored model yet", ha="center", va="center")
        return save(fig, stem)
    max_depth = max(depth for *_, depth in layouts)
    heights = [max(1.6, 1.3 * leaves) for _, _, leaves, _ in layouts]
    fig, axes = plt.subplots(len(layouts), 1, figsize=(2.6 * (max_depth + 1) + 1, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (entry, placed, leaves, depth) in zip(axes[:, 0], layouts):
        ax.axis("off")
        ax.set_xlim(-0.6, max_depth + 0.6)
        ax.set_ylim(leaves - 0.4, -0.6)
        ax.set_title(f"top-{entry.rank}: {entry.pipeline}  (validation s_multi {entry.s_multi:.3f})", fontsize=9,
                     loc="left")
        artists = {}
        for node, node_depth, row in placed:
            x = max_depth - node_depth  # the final model at the right, its inputs to the left
            leaf = not node["children"]
            artists[id(node)] = ax.text(
                x, row, _box_text(node), ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.4", "facecolor": "#eef3fb" if leaf else "#fdf1dc",
                      "edgecolor": "#4a6fa5" if leaf else "#c98a1b"})
        for node, _, _ in placed:
            for child in node["children"]:
                ax.annotate("", xy=(0, 0.5), xycoords=artists[id(node)], xytext=(1, 0.5),
                            textcoords=artists[id(child)], arrowprops={"arrowstyle": "->", "color": "#555555"})
    return save(fig, stem)


# ---- per-task scores of the top-k against the base and the specialists ------------------------


def comparison_models(board: pd.DataFrame, initial_record: dict, top_k: int) -> list[tuple[str, str]]:
    """(model, label): the top-k, then the initial models (base models and specialists) not among them."""
    names = {e["model"]: e.get("name") or e["pipeline"] for e in initial_record.get("initial", [])}
    chosen = []
    for entry in board.head(top_k).itertuples():
        chosen.append((entry.model, f"top-{entry.rank}: {_shorten(entry.pipeline)}"))
    seen = {m for m, _ in chosen}
    for model, name in names.items():
        if model not in seen:
            kind = "specialist" if is_built_id(model) else "base"
            chosen.append((model, f"{kind}: {name}"))
    return chosen


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _bars(ax, table: pd.DataFrame, models: list[tuple[str, str]], prefix: str, title: str) -> None:
    tasks = [c[len(prefix):] for c in table.columns if c.startswith(prefix) and not c.endswith("_avg")]
    rows = [(label, table[table["model"] == model].iloc[0]) for model, label in models if model in set(table["model"])]
    if not tasks or not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: no scores", transform=ax.transAxes, ha="center", va="center")
        return
    # Scores start at 0; exact-match-like metrics keep the full [0, 1] scale so panels compare by eye.
    highest = max(float(row[f"{prefix}{task}"]) for _, row in rows for task in tasks)
    ax.set_ylim(0, 1.0 if highest <= 1.0 else highest * 1.1)
    width = 0.8 / len(rows)
    # A model keeps its colour across panels, though the test panel shows fewer models.
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, (_, label) in enumerate(models)}
    for i, (label, row) in enumerate(rows):
        values = [float(row[f"{prefix}{task}"]) for task in tasks]
        ax.bar([t + (i - (len(rows) - 1) / 2) * width for t in range(len(tasks))], values, width, label=label,
               color=colours[label])
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def plot_task_scores(board: pd.DataFrame, topk: pd.DataFrame, initial_record: dict, top_k: int,
                     stem: str | Path) -> list[Path]:
    """Validation scores of the top-k, base and specialists; test and OOD scores where they were evaluated.

    The test split is evaluated for the top-k and the base models only (the `topk` rule), so the
    specialists appear in the validation panel.
    """
    models = comparison_models(board, initial_record, top_k) if not board.empty else []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    _bars(axes[0], board, models, "val_", "validation")
    _bars(axes[1], topk, models, "test_", "test and out-of-distribution")
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.05 * math.ceil(len(names) / 3)))
    fig.suptitle("Per-task scores: the top-k against the base and the specialists")
    return save(fig, stem)


def write_figures(step_records: list[dict], board: pd.DataFrame, topk: pd.DataFrame, store: RecipeStore,
                  labels: dict[str, str], *, top_k: int, every_k: int, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    initial = next((r for r in step_records if "initial" in r), {"initial": []})
    return [
        *plot_score_over_iterations(step_records, every_k, out_dir / "score_over_iterations"),
        *plot_topk_pipelines(board, store, labels, top_k, out_dir / "pipelines"),
        *plot_task_scores(board, topk, initial, top_k, out_dir / "task_scores"),
    ]
