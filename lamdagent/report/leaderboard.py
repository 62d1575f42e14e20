"""What a user reads: the leaderboard (validation) and the top-k on test and OOD tasks (Table 1)."""

from __future__ import annotations

import pandas as pd

from lamdagent.agent.plan import step_entries
from lamdagent.evaluation.score import score


def leaderboard_table(step_records: list[dict]) -> pd.DataFrame:
    """One row per distinct model, best validation s_multi first.

    ``step_records``: iteration 0's record (the initial models) then each iteration's record (one
    step, or k steps proposed together).
    """
    rows, seen = [], set()
    for record in step_records:
        for entry in step_entries(record):
            if entry.get("status") != "done" or entry["model"] in seen or not entry.get("score"):
                continue
            seen.add(entry["model"])
            row = {"model": entry["model"], "iteration": record["iteration"], "pipeline": entry["pipeline"],
                   "name": entry.get("name")}  # the short name the agent knows the model by
            row.update({f"val_{task}": value for task, value in entry["score"]["tasks"].items()})
            row["s_multi"] = entry["score"]["s_multi"]
            row["pipeline_full"] = entry.get("pipeline_full", entry["pipeline"])
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(["s_multi", "iteration"], ascending=[False, True], kind="stable")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.round(6)


def topk_table(board: pd.DataFrame, evaluations: dict[str, dict], eval_tasks: list[dict], top_k: int) -> pd.DataFrame:
    """The top-k by validation plus the reference models, scored on the test and OOD tasks."""
    chosen = list(board["model"].head(top_k))
    references = [m for m in evaluations if m not in chosen]
    rows = []
    for model in chosen + references:
        result = score(evaluations[model], eval_tasks, "test")
        entry = board[board["model"] == model]
        row = {
            "model": model,
            "role": f"top-{chosen.index(model) + 1}" if model in chosen else "reference",
            "pipeline": entry["pipeline"].iloc[0] if len(entry) else model,
            "val_s_multi": float(entry["s_multi"].iloc[0]) if len(entry) else float("nan"),
        }
        test = {task: value for task, value in result["tasks"].items() if not task.endswith("_ood")}
        ood = {task: value for task, value in result["tasks"].items() if task.endswith("_ood")}
        row.update({f"test_{task}": value for task, value in test.items()})
        row["test_avg"] = sum(test.values()) / len(test) if test else float("nan")
        row.update({f"test_{task}": value for task, value in ood.items()})
        row["ood_avg"] = sum(ood.values()) / len(ood) if ood else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).round(6)
