"""Evaluation throughput: the project's evaluation (``lamdagent.evaluation.evaluate`` through lm-eval, one fresh
process per model and split as the ``evaluate`` rule runs it) against batched ``model.generate``.

Both sides get the same model, the same validation rows of the embedded tasks, the chat template,
greedy decoding with each task's ``max_gen_toks`` and stop strings (read from the project's lm-eval
task YAMLs), the same batch size and thread count, and run as a fresh Python process. The baseline's
replies are scored with lm-eval's own regex filter and exact-match function, with the YAMLs' options,
and the script reports how many replies are identical to lm-eval's. Repeats interleave (the order
alternates); figures are medians. Target: project examples/s / baseline examples/s >= 0.8. Usage::

    .venv/bin/python benchmarks/eval_throughput.py                    # random Llama, 3 tasks x 20 rows
    .venv/bin/python benchmarks/eval_throughput.py --model smollm2    # the embedded model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, median, model_for_benchmark  # noqa: E402

TASKS = ("arith", "choice", "context")


def task_settings(task: str) -> dict:
    """Generation and scoring settings of ``lamdagent_<task>_val`` from the project's YAMLs."""
    import yaml

    base = yaml.safe_load((REPO / "lamdagent" / "lm_eval_tasks" / f"_{task}_base.yaml").read_text())
    regex = base["filter_list"][0]["filter"][0]
    metric = {k: v for k, v in base["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    return {"until": base["generation_kwargs"]["until"], "max_gen_toks": base["generation_kwargs"]["max_gen_toks"],
            "regex": regex["regex_pattern"], "group_select": regex.get("group_select", 0), "metric": metric}


def worker(args) -> int:
    """The baseline, in its own process: imports, load, batched generate per task; replies to JSON."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

    class StopWhenEveryRowHas(StoppingCriteria):
        """Stop once every row's reply holds a stop string (transformers' ``stop_strings`` matches a
        string's prefix at the end of the text, and stops "\n\n" replies after one "\n")."""

        def __init__(self, tokenizer, stops, prompt_len):
            self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:])
            done = all(any(s in t for s in self.stops) for t in texts)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    torch.set_num_threads(args.threads)
    t_import = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.worker_model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.worker_model, dtype=torch.float32).eval()
    t_load = time.perf_counter()
    jobs = json.loads(Path(args.worker_in).read_text())
    replies = {}
    for task, job in jobs.items():
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in job["prompts"]]
        # Longest first, as lm-eval orders them: rows of one batch pad to similar lengths.
        order = sorted(range(len(texts)), key=lambda i: -len(tokenizer(texts[i], add_special_tokens=False).input_ids))
        out = [""] * len(texts)
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            stop = StopWhenEveryRowHas(tokenizer, job["until"], batch.input_ids.shape[1])
            with torch.inference_mode():
                generated = model.generate(**batch, max_new_tokens=job["max_gen_toks"], do_sample=False, top_p=None,
                                           top_k=None, stopping_criteria=StoppingCriteriaList([stop]),
                                           pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(idx, generated[:, batch.input_ids.shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                for stop in job["until"]:
                    text = text.split(stop)[0]
                out[i] = text
        replies[task] = out
    t_done = time.perf_counter()
    Path(args.worker_out).write_text(json.dumps({"replies": replies, "import_s": t_import - t0,
                                                 "load_s": t_load - t_import, "generate_s": t_done - t_load}))
    return 0


def score_replies(task: str, replies: list[str], targets: list[str]) -> list[float]:
    """lm-eval's own regex filter (take the first) and exact match, with the task's options."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    settings = task_settings(task)
    extract = RegexFilter(regex_pattern=settings["regex"], group_select=settings["group_select"])
    filtered = [f[0] for f in extract.apply([[r] for r in replies], [{}] * len(replies))]
    return [float(exact_match_hf_evaluate([p], [t], **settings["metric"])["exact_match"])
            for p, t in zip(filtered, targets)]


def run_timed(command: list[str], cwd: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                       os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="'smollm2' or an HF model directory (default: a random Llama, see --hidden)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=20, help="validation rows per task")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-in", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_model:
        return worker(args)

    from lamdagent.data.tasks import write_splits
    from lamdagent.store.fileio import read_jsonl

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="lamdagent-eval-bench-"))
    print(f"machine: {machine()}; torch threads {args.threads}")
    try:
        model_dir = model_for_benchmark(args.model, scratch, args.hidden, args.layers).resolve()
        rows = {}
        for task in TASKS:  # where the project's task YAMLs read them (relative to the working directory)
            write_splits(task, scratch / "results" / "data" / task, {"val": args.examples}, seed=0)
            rows[task] = read_jsonl(scratch / "results" / "data" / task / "val.jsonl")
        jobs = {t: {"prompts": [r["prompt"] for r in rows[t]], **{k: task_settings(t)[k] for k in ("until", "max_gen_toks")}}
                for t in TASKS}
        (scratch / "jobs.json").write_text(json.dumps(jobs))
        lm_tasks = [f"lamdagent_{t}_val" for t in TASKS]
        project_cmd = [sys.executable, "-m", "lamdagent.evaluation.evaluate", str(model_dir), *lm_tasks, "--out",
                       str(scratch / "project.json"), "--batch-size", str(args.batch_size), "--device", "cpu",
                       "--dtype", "float32"]
        baseline_cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-model", str(model_dir), "--worker-in",
                        str(scratch / "jobs.json"), "--worker-out", str(scratch / "baseline.json"),
                        "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        n = sum(len(rows[t]) for t in TASKS)
        runs = {"project": [], "baseline": []}
        for repeat in range(args.repeats):
            order = ("project", "baseline") if repeat % 2 == 0 else ("baseline", "project")
            for name in order:
                wall = run_timed(project_cmd if name == "project" else baseline_cmd, scratch, args.threads)
                detail = json.loads((scratch / f"{name}.json").read_text())
                runs[name].append({"wall_s": wall, "detail": detail})
                print(f"repeat {repeat} {name}: {wall:.1f} s", flush=True)

        project = runs["project"][-1]["detail"]
        baseline = runs["baseline"][-1]["detail"]
        print(f"\n{n} examples ({args.examples} per task), batch {args.batch_size}, model {model_dir.name}")
        print("| task | project exact match | baseline exact match | identical replies |")
        print("|---|---|---|---|")
        for task, lm_task in zip(TASKS, lm_tasks):
            samples = sorted(project["samples"][lm_task], key=lambda s: s["doc_id"])
            replies = baseline["replies"][task]
            base_scores = score_replies(task, replies, [r["answer"] for r in rows[task]])
            same = sum(s["response"] == r for s, r in zip(samples, replies))
            print(f"| {task} | {project['tasks'][lm_task]['exact_match,extract']:.2f} | "
                  f"{sum(base_scores) / len(base_scores):.2f} | {same}/{len(replies)} |")

        p_wall = [r["wall_s"] for r in runs["project"]]
        b_wall = [r["wall_s"] for r in runs["baseline"]]
        ratio = median([b / p for p, b in zip(p_wall, b_wall)])  # examples/s ratio = inverse wall ratio
        # Project start-up: process start and imports before evaluate() runs, plus lm-eval's import and task
        # index (timing.startup_s); the rest of timing.total_s is model load, datasets and generation.
        p_startup = [r["wall_s"] - r["detail"]["timing"]["total_s"] + r["detail"]["timing"]["startup_s"]
                     for r in runs["project"]]
        b_startup = [r["wall_s"] - r["detail"]["load_s"] - r["detail"]["generate_s"] for r in runs["baseline"]]
        print("\n| side | median wall s | examples/s | start-up s (share) | model load + generate s |")
        print("|---|---|---|---|---|")
        print(f"| project (lm-eval) | {median(p_wall):.1f} | {n / median(p_wall):.2f} | {median(p_startup):.1f} "
              f"({median(s / w for s, w in zip(p_startup, p_wall)):.0%}) | "
              f"{median(r['detail']['timing']['total_s'] - r['detail']['timing']['startup_s'] for r in runs['project']):.1f} |")
        print(f"| baseline (generate) | {median(b_wall):.1f} | {n / median(b_wall):.2f} | {median(b_startup):.1f} "
              f"({median(s / w for s, w in zip(b_startup, b_wall)):.0%}) | "
              f"{median(r['detail']['load_s'] + r['detail']['generate_s'] for r in runs['baseline']):.1f} |")
        print(f"\nratio project/baseline examples/s (median of per-repeat ratios): {ratio:.2f} "
              f"({'target >= 0.8 met' if ratio >= 0.8 else 'target >= 0.8 MISSED'})")
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
