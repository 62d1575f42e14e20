"""Evaluate one model directory on lm-eval tasks and write one JSON (scores, samples, timing).

Our tasks live in ``lm_eval_tasks/`` and read ``results/data/<task>/<split>.jsonl`` relative to the
working directory. lm-eval's own task index (thousands of YAMLs, most of its start-up time) is only
built when a task outside ours is asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

from lamdagent.store.fileio import atomic_write_json

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"


def own_task_names(extra_include_paths=()) -> set[str]:
    """Names of the tasks defined by the YAMLs in ``TASKS_DIR`` and ``extra_include_paths``
    (read as plain YAML: cheap, and no lm-eval import)."""
    import yaml

    names = set()
    for root in (TASKS_DIR, *map(Path, extra_include_paths)):
        for path in Path(root).glob("**/*.yaml"):
            try:
                cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue  # lm-eval's own loader handles its custom tags; those are not ours
            if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
                names.add(cfg["task"])
    return names


def needs_default_tasks(tasks, extra_include_paths=()) -> bool:
    """Whether lm-eval's built-in task index must be built: only for a task that is not ours."""
    return not set(tasks) <= own_task_names(extra_include_paths)


def _default_task_names(cache_dir) -> set[str]:
    """Names in lm-eval's built-in index (~10 s to build), cached per lm-eval version."""
    import json

    from lm_eval.tasks import TaskManager

    cache = Path(cache_dir) / f"lm_eval_default_tasks-{_pkg_version('lm_eval')}.json"
    if cache.is_file():
        return set(json.loads(cache.read_text(encoding="utf-8")))
    names = set(TaskManager(include_defaults=True).all_tasks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, sorted(names))
    return names


def unknown_tasks(tasks, include_paths=(), cache_dir=".snakemake/lamdagent") -> list[str]:
    """The names among ``tasks`` that neither our tasks, ``include_paths`` (indexed by lm-eval's
    TaskManager, custom YAML tags included) nor lm-eval's built-in tasks define."""
    rest = [t for t in tasks if t not in own_task_names(include_paths)]
    if not rest:
        return []
    from lm_eval.tasks import TaskManager

    ours = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)], include_defaults=False).all_tasks
    rest = [t for t in rest if t not in ours]
    if not rest:
        return []
    builtin = _default_task_names(cache_dir)
    return [t for t in rest if t not in builtin]


def offline_if_fetched(fetched_jsons) -> None:
    """Read the lm-eval tasks' data from the cache rule fetch_lm_eval_task filled, when this machine
    sees that cache (a compute node without network then never tries the hub); else leave it."""
    from lamdagent.store.fileio import read_json

    caches = [read_json(path)["hf_datasets_cache"] for path in fetched_jsons]
    if caches and all(Path(cache).is_dir() for cache in caches):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def lm_eval_task_docs(task: str, include_paths=()):
    """The prompts of an lm-eval task's evaluation docs (its ``doc_to_text``), every subtask of a group."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)],
                          include_defaults=needs_default_tasks([task], include_paths))
    for leaf in manager.load([task])["tasks"].values():  # a group's leaf tasks, flat
        for doc in leaf.eval_docs:
            yield str(leaf.doc_to_text(doc))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    # bf16 matmuls on CPU are slow and change greedy outputs; CPU runs are small anyway.
    return "float32"


# lm-eval's backends the workflow runs. Only hf: vLLM needs a CUDA build of its own, pinned to its own
# torch, which neither the project's environments nor its tests install; a backend accepted without
# an environment that installs it and a test that runs it would be a stub.
BACKENDS = ("hf",)


def model_args(backend: str, model_dir, device: str, dtype: str, batch_size: int | str) -> tuple[str, dict]:
    """The lm-eval model name and its ``model_args`` for ``backend`` (pure: no torch, no I/O)."""
    if backend == "hf":
        return "hf", {"pretrained": str(model_dir), "device": device, "dtype": dtype, "batch_size": batch_size}
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _compact_samples(samples: list[dict]) -> list[dict]:
    out = []
    for s in samples:
        resps = s.get("resps") or [[""]]
        first = resps[0]
        response = first[0] if isinstance(first, (list, tuple)) else first
        filtered = s.get("filtered_resps")
        if isinstance(filtered, (list, tuple)) and filtered:
            filtered = filtered[0]
        row = {
            "doc_id": s.get("doc_id"),
            "prompt": (s.get("doc") or {}).get("prompt"),
            "target": s.get("target"),
            "response": response,
            "filtered": filtered,
            "exact_match": s.get("exact_match"),
        }
        if s.get("filter") not in (None, "extract"):
            row["filter"] = s["filter"]
        out.append(row)
    return out


def _plain(value: Any) -> Any:
    """JSON-friendly metric values (lm-eval reports numpy scalars and "N/A" strings)."""
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    return value


def evaluate(model_dir, tasks: list[str], out_json, *, batch_size: int | str = 16, device: str = "auto",
             dtype: str = "auto", backend: str = "hf", limit: int | None = None, seed: int = 0,
             extra_include_paths=(), usage=None) -> dict:
    """Run lm-eval on ``model_dir`` for exactly ``tasks``; write and return the result dict.

    ``usage``, if given, is called once lm-eval is done; its dict (wall, CPU, measured GPU seconds) is
    stored as ``run``."""
    if not tasks:
        raise ValueError("evaluate() needs at least one task name")
    t0 = time.monotonic()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name, args = model_args(backend, model_dir, device, dtype, batch_size)

    include_defaults = needs_default_tasks(tasks, extra_include_paths)
    task_manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, extra_include_paths)],
                               include_defaults=include_defaults)
    missing = [t for t in tasks if t not in task_manager.all_tasks]
    if missing:
        raise ValueError(f"unknown lm-eval task(s) {missing}")
    startup_s = time.monotonic() - t0

    # lm-eval describes the machine by running `pip list` and other commands in subprocesses (~0.5 s of
    # CPU per evaluation); the evaluation JSON keeps its own record (versions, settings, run) instead.
    with mock.patch("lm_eval.evaluator.add_env_info", lambda storage: None):
        raw = lm_eval.simple_evaluate(
            model=name,
            model_args=args,
            tasks=list(tasks),
            # batch_size and device travel in model_args; lm-eval refuses to get them twice.
            batch_size=None,
            device=None,
            limit=limit,
            apply_chat_template=True,
            task_manager=task_manager,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=1000,
        )
    n_samples = raw.get("n-samples", {})
    scores = {}
    for task in tasks:
        metrics = {k: _plain(v) for k, v in raw["results"][task].items() if k != "alias"}
        metrics["n"] = int(n_samples.get(task, {}).get("effective", len(raw["samples"][task])))
        scores[task] = metrics
    result = {
        "model_dir": str(model_dir),
        "tasks": scores,
        "samples": {task: _compact_samples(raw["samples"][task]) for task in tasks},
        "versions": {"lm_eval": _pkg_version("lm_eval"), "transformers": transformers.__version__},
        "timing": {"startup_s": round(startup_s, 3), "total_s": round(time.monotonic() - t0, 3),
                   "include_defaults": include_defaults},
        "settings": {"batch_size": batch_size, "device": device, "dtype": dtype, "backend": backend,
                     "limit": limit, "seed": seed},
    }
    if usage is not None:
        result["run"] = usage()
    atomic_write_json(out_json, result)
    return result


def _pkg_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist.replace("_", "-"))  # the installed distribution, whatever the module claims


def task_metric(eval_result: dict, task: str, metric: str) -> float:
    """One score of ``task``: ``metric`` is a full ``name,filter`` key, or a bare name when only
    one filter reports it."""
    tasks = eval_result.get("tasks", {})
    if task not in tasks:
        raise ValueError(f"task {task!r} is not in this evaluation; it has {sorted(tasks)}")
    metrics = tasks[task]
    if "," in metric:
        if metric in metrics:
            return float(metrics[metric])
        raise ValueError(f"task {task!r} has no metric {metric!r}; available: {sorted(metrics)}")
    matches = [k for k in metrics if k.startswith(f"{metric},")]
    if len(matches) == 1:
        return float(metrics[matches[0]])
    what = "no" if not matches else "several"
    raise ValueError(f"task {task!r} has {what} keys for metric {metric!r}; give one of {sorted(metrics)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", default="hf", choices=BACKENDS)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--include-path", action="append", default=[])
    a = parser.parse_args(argv)
    batch_size = int(a.batch_size) if a.batch_size.isdigit() else a.batch_size
    result = evaluate(a.model_dir, a.tasks, a.out, batch_size=batch_size, device=a.device, dtype=a.dtype,
                      backend=a.backend, limit=a.limit, seed=a.seed, extra_include_paths=a.include_path)
    summary = {t: {k: v for k, v in m.items() if k.startswith("exact_match") or k == "n"}
               for t, m in result["tasks"].items()}
    print(json.dumps({"tasks": summary, "timing": result["timing"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
