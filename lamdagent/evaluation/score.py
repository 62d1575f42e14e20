"""The score the agent is fed back: s_multi = sum_k alpha_k * s_k over the target tasks.

``weight: auto`` sets alpha_k = 1 / (the metric's maximum), normalising metric ranges as the paper
does; a number sets alpha_k directly.
"""

from __future__ import annotations

EMBEDDED_PREFIX = "lamdagent"


def lm_eval_tasks(eval_task: dict, split: str) -> dict[str, str]:
    """{label: lm-eval task name} to evaluate for one target task on ``val`` or ``test``.

    The test split also runs the out-of-distribution variant, labelled ``<task>_ood``.
    """
    from lamdagent.evaluation.eval_data import is_file_task, task_splits

    task = eval_task["task"]
    splits = task_splits(eval_task) if is_file_task(eval_task) else ("val", "test", "ood")
    names = eval_task.get("lm_eval_task") or {s: f"{EMBEDDED_PREFIX}_{task}_{s}" for s in splits}
    if split == "val":
        return {task: names["val"]}
    out = {}
    if names.get("test"):
        out[task] = names["test"]
    if names.get("ood"):
        out[f"{task}_ood"] = names["ood"]
    return out


def split_tasks(eval_tasks: list[dict], split: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for eval_task in eval_tasks:
        out.update(lm_eval_tasks(eval_task, split))
    return out


def alpha(eval_task: dict) -> float:
    if eval_task.get("weight", "auto") != "auto":
        return float(eval_task["weight"])
    maximum = eval_task.get("max") or METRIC_MAX[eval_task.get("metric", "exact_match").split(",")[0]]
    return 1.0 / float(maximum)


def scoring_spec(eval_tasks: list[dict], split: str = "val") -> list[dict]:
    """What turns an evaluation of ``split`` into a score, normalised: per task its lm-eval name, metric
    and weight alpha (``auto`` resolved). The `score` rule's params: a change rescores, and only a
    change of meaning does (``weight: auto`` and ``1.0`` on exact match are the same spec)."""
    splits = ("val",) if split == "val" else ("test", "ood")
    spec = []
    for eval_task in eval_tasks:
        names = eval_task.get("lm_eval_task") or {s: f"{EMBEDDED_PREFIX}_{eval_task['task']}_{s}" for s in splits}
        spec.append({"task": eval_task["task"], "metric": eval_task.get("metric", "exact_match"),
                     "weight": alpha(eval_task), "lm_eval_task": {s: names[s] for s in splits if names.get(s)}})
    return spec


def score(eval_result: dict, eval_tasks: list[dict], split: str = "val") -> dict:
    """Per-task scores and s_multi from one evaluation JSON (see ``lamdagent.evaluation.evaluate``)."""
    from lamdagent.evaluation.evaluate import task_metric

    tasks: dict[str, float] = {}
    weights: dict[str, float] = {}
    for eval_task in eval_tasks:
        for label, lm_task in lm_eval_tasks(eval_task, split).items():
            tasks[label] = float(task_metric(eval_result, lm_task, eval_task.get("metric", "exact_match")))
            weights[label] = alpha(eval_task)
    s_multi = sum(weights[label] * tasks[label] for label in tasks if not label.endswith("_ood"))
    return {"split": split, "tasks": tasks, "weights": weights, "s_multi": s_multi}


def failure_score(config: dict) -> dict:
    """The score a failed action is fed back with: ``failures.score`` as s_multi, no task scores."""
    return {"split": "val", "tasks": {}, "weights": {}, "s_multi": float(config["failures"]["score"]), "failed": True}


# Maxima of the metrics whose range is known, for `weight: auto` (alpha = 1 / max, as in the paper).
METRIC_MAX = {"exact_match": 1.0, "acc": 1.0, "acc_norm": 1.0, "f1": 1.0, "mc1": 1.0, "mc2": 1.0, "bleu": 100.0,
              "rouge1": 1.0, "rougeL": 1.0, "rating": 10.0}
