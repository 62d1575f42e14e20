"""The user's own evaluation data: a local JSONL/parquet file or a hub dataset, as lm-eval tasks.

An ``eval_tasks`` entry with ``source: local`` or ``source: hub`` names its rows and how to read
them (``fields``: the row keys holding the prompt and the answer; ``extract``: how the answer is cut
out of the gold field and of the model's reply). Its splits are explicit files / hub splits
(``splits: {val, test, ood}``), or one file / hub split cut by a seeded held-out partition into
``data.val_examples`` validation and ``data.test_examples`` test rows. Rule ``prepare_eval_task``
writes ``results/eval_tasks/<task>/<split>.jsonl`` and the lm-eval task YAMLs beside them
(``lamdagent_<task>_<split>``: generate_until with the chat template, the extraction filter,
exact match), as the embedded tasks have theirs.

Validation never shares a prompt with another split: checked by content hash (of the whitespace-
normalised prompt) when the config is read (local files) and in ``prepare_eval_task`` (hub data),
before any evaluation. ``split_prompts`` yields the prompts of every evaluation split of any
eval task (embedded, local file, hub, lm-eval name), for checks that compare them with others.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Iterator

from lamdagent.data.datasets import DatasetError, _rows_from_file
from lamdagent.data.tasks import TASKS
from lamdagent.errors import ConfigError
from lamdagent.store.fileio import atomic_write_json, atomic_write_text, write_jsonl

FILE_SOURCES = ("local", "hub")
EVAL_SPLITS = ("val", "test", "ood")
EXTRACTS = ("final_number", "after_marker", "choice_letter", "text")
DEFAULT_MARKER = "#### "
DEFAULT_FIELDS = {"prompt": "prompt", "answer": "answer"}
DEFAULT_MAX_GEN_TOKS = 256
TASKS_ROOT = "results/eval_tasks"


class EvalDataError(ValueError):
    """Evaluation data that cannot be used (missing file or field, no answer, overlapping splits)."""


def is_file_task(eval_task: dict) -> bool:
    return eval_task.get("source") in FILE_SOURCES


def task_splits(eval_task: dict) -> tuple[str, ...]:
    """The evaluation splits a file or hub task has: val and test, and ood when it names one."""
    return ("val", "test", "ood") if "ood" in (eval_task.get("splits") or {}) else ("val", "test")


def lm_eval_name(task: str, split: str) -> str:
    return f"lamdagent_{task}_{split}"


# ---- answer extraction: one regex serves the gold field (here) and the reply (lm-eval's filter) ------


def reply_pattern(eval_task: dict) -> tuple[str, int]:
    """(regex, group_select) of lm-eval's ``regex`` filter for ``extract``."""
    extract = eval_task.get("extract", "text")
    if extract == "final_number":
        return r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)", -1
    if extract == "after_marker":
        return re.escape(eval_task.get("marker", DEFAULT_MARKER)) + r"\s*([^\n]*)", -1
    if extract == "choice_letter":
        # The last standalone capital A-H: "[[B]]", "(B)", "The answer is B." (I and later are words).
        return r"\b([A-H])\b", -1
    if extract == "text":
        return r"^\s*([^\n]*)", 0
    raise ValueError(f"unknown extract {extract!r}; expected one of {', '.join(EXTRACTS)}")


def extract_answer(text: str, eval_task: dict) -> str | None:
    """The answer in ``text`` exactly as lm-eval's regex filter cuts it from a reply; None if none."""
    pattern, group = reply_pattern(eval_task)
    found = re.findall(pattern, str(text))
    if not found:
        return None
    answer = found[group].strip()
    return answer or None


def metric_options(eval_task: dict) -> dict:
    """exact_match's normalisation, applied to reply and gold alike."""
    extract = eval_task.get("extract", "text")
    if extract == "final_number":
        return {"regexes_to_ignore": [",", r"\.0+$"]}  # "1,250" and "12.00" count as 1250 and 12
    if extract == "choice_letter":
        return {}
    return {"ignore_case": True, "regexes_to_ignore": [",", r"\$", r"\.$", r"\.0+$"]}


# ---- loading ----------------------------------------------------------------------------------


def normalise_prompt(prompt: str) -> str:
    return " ".join(str(prompt).split())


def prompt_hash(prompt: str) -> str:
    """The content hash splits are compared by: sha256 of the whitespace-normalised prompt."""
    return hashlib.sha256(normalise_prompt(prompt).encode("utf-8")).hexdigest()


def _located_rows(eval_task: dict, where: str, workdir: Path):
    """(location, row) pairs of one file (local) or one split (hub)."""
    if eval_task["source"] == "local":
        try:
            return _rows_from_file(workdir / where)
        except DatasetError as err:
            raise EvalDataError(str(err)) from None
    from datasets import load_dataset

    try:
        hub = load_dataset(eval_task["repo"], eval_task.get("name"), split=where, revision=eval_task.get("revision"))
    except Exception as err:  # noqa: BLE001 - any loading problem is reported with the repo and split
        raise EvalDataError(f"{eval_task['repo']} split {where!r}: cannot be loaded: "
                            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from None
    return [(f"{eval_task['repo']}[{where}] row {i}", dict(row)) for i, row in enumerate(hub)]


def _mapped(located_rows, eval_task: dict) -> list[dict]:
    """Rows ``{prompt, answer}``: the mapped fields, the answer as ``extract`` cuts it from the gold field."""
    fields = {**DEFAULT_FIELDS, **(eval_task.get("fields") or {})}
    judged = eval_task.get("kind") == "judge"
    out = []
    for location, row in located_rows:
        if fields["prompt"] not in row:
            raise EvalDataError(f"{location}: no field {fields['prompt']!r} (mapped to 'prompt'); fields: {sorted(row)}")
        prompt = row[fields["prompt"]]
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalDataError(f"{location}: field {fields['prompt']!r} must be a non-empty string")
        if eval_task.get("instruction"):
            prompt = f"{prompt}\n{eval_task['instruction']}"
        mapped = {"prompt": prompt}
        if judged:  # the judge grades the answer alone; a reference answer is optional
            if row.get(fields["answer"]) not in (None, ""):
                mapped["reference"] = str(row[fields["answer"]])
        else:
            if fields["answer"] not in row:
                raise EvalDataError(f"{location}: no field {fields['answer']!r} (mapped to 'answer'); "
                                    f"fields: {sorted(row)}")
            answer = extract_answer(row[fields["answer"]], eval_task)
            if answer is None:
                raise EvalDataError(f"{location}: extract {eval_task.get('extract', 'text')!r} finds no answer in "
                                    f"field {fields['answer']!r}: {str(row[fields['answer']])[-80:]!r}")
            mapped["answer"] = answer
        out.append(mapped)
    if not out:
        raise EvalDataError("the evaluation data has no rows")
    return out


def _unique(rows: list[dict]) -> list[dict]:
    """The first row of each prompt (by content hash): a repeated prompt must not land in two splits."""
    seen, out = set(), []
    for row in rows:
        digest = prompt_hash(row["prompt"])
        if digest not in seen:
            seen.add(digest)
            out.append(row)
    return out


def load_splits(eval_task: dict, data: dict, seed: int, workdir: str | Path = ".") -> dict[str, list[dict]]:
    """Rows ``{id, prompt, answer}`` of every split of a file or hub task, checked disjoint.

    Explicit ``splits`` give at most ``data.val_examples`` validation and ``data.test_examples`` test
    (and ood) rows each; one file / hub split is shuffled with ``seed`` (its unique prompts) and cut
    into the first ``val_examples`` for validation and the next ``test_examples`` for test.
    """
    workdir = Path(workdir)
    task = eval_task["task"]
    sizes = {"val": data["val_examples"], "test": data["test_examples"], "ood": data["test_examples"]}
    explicit = eval_task.get("splits")
    if explicit:
        splits = {split: _unique(_mapped(_located_rows(eval_task, explicit[split], workdir), eval_task))[: sizes[split]]
                  for split in task_splits(eval_task)}
    else:
        where = eval_task["path"] if eval_task["source"] == "local" else eval_task.get("split", "test")
        rows = _unique(_mapped(_located_rows(eval_task, where, workdir), eval_task))
        if len(rows) <= sizes["val"]:
            raise EvalDataError(f"{where}: {len(rows)} distinct prompts leave none for test after "
                                f"data.val_examples = {sizes['val']} held out for validation")
        order = list(range(len(rows)))
        random.Random(f"{seed}:{task}:holdout").shuffle(order)
        val = order[: sizes["val"]]
        test = order[sizes["val"]: sizes["val"] + sizes["test"]]
        splits = {"val": [rows[i] for i in sorted(val)], "test": [rows[i] for i in sorted(test)]}
    check_disjoint(splits, task)
    return {split: [{"id": f"{task}-{split}-{i:05d}", **row} for i, row in enumerate(rows)]
            for split, rows in splits.items()}


def check_disjoint(splits: dict[str, list], task: str) -> None:
    """Validation shares no prompt (by content hash) with any other split; rows are dicts or prompts."""
    def hashes(rows):
        return {prompt_hash(r["prompt"] if isinstance(r, dict) else r) for r in rows}

    val = hashes(splits.get("val", []))
    for split, rows in splits.items():
        if split == "val":
            continue
        shared = val & hashes(rows)
        if shared:
            raise EvalDataError(f"task {task}: {len(shared)} prompt(s) of the validation split are also in "
                                f"{split}; validation and {split} must be disjoint")


# ---- the lm-eval task YAMLs -----------------------------------------------------------------


def task_yaml(eval_task: dict, split: str, data_file: str) -> dict:
    """An lm-eval task over ``data_file`` (relative to the working directory, as the embedded tasks)."""
    generation = {"until": [], "do_sample": False,
                  "max_gen_toks": int(eval_task.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))}
    if eval_task.get("kind") == "judge":
        # The model's answers only: rule judge grades them (the placeholder metric is replaced there).
        return {"task": lm_eval_name(eval_task["task"], split), "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": data_file}}, "test_split": "test",
                "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "", "num_fewshot": 0,
                "generation_kwargs": generation,
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0, "kind": "judge"}}
    pattern, group = reply_pattern(eval_task)
    return {
        "task": lm_eval_name(eval_task["task"], split),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 0,
        # The tokenizer's end of sequence stops generation (lm-eval adds it to `until`).
        "generation_kwargs": generation,
        "filter_list": [{"name": "extract", "filter": [
            {"function": "regex", "regex_pattern": pattern, "group_select": group},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         **metric_options(eval_task)}],
        "metadata": {"version": 1.0, "extract": eval_task.get("extract", "text")},
    }


def prepare(eval_task: dict, out_dir: str | Path, data: dict, seed: int, workdir: str | Path = ".") -> dict:
    """Write ``<out_dir>/<split>.jsonl`` and ``lamdagent_<task>_<split>.yaml`` per split; return the
    manifest (rows and content hashes per split), also written as ``manifest.json``."""
    import yaml

    out_dir = Path(out_dir)
    splits = load_splits(eval_task, data, seed, workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"task": eval_task["task"], "source": eval_task["source"], "splits": {}}
    for split, rows in splits.items():
        data_file = out_dir / f"{split}.jsonl"
        write_jsonl(data_file, rows)
        text = yaml.safe_dump(task_yaml(eval_task, split, str(data_file)), sort_keys=False)
        atomic_write_text(out_dir / f"{lm_eval_name(eval_task['task'], split)}.yaml", text)
        manifest["splits"][split] = {"rows": len(rows), "file": str(data_file),
                                     "prompt_sha256": sorted(prompt_hash(r["prompt"]) for r in rows)}
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


# ---- every evaluation split's prompts, for checks against other data --------------------------


def split_prompts(eval_task: dict, config: dict, workdir: str | Path = ".") -> Iterator[tuple[str, str]]:
    """``(split, prompt)`` for every prompt of every evaluation split of one ``eval_tasks`` entry:
    embedded (generated), local file or hub (as ``prepare_eval_task`` cuts them), or lm-eval task
    names (the task's evaluation docs through lm-eval, with ``evaluation.include_paths``).
    Prompts are as the model sees them before the chat template."""
    seed, data = config["seed"], config["data"]
    if is_file_task(eval_task):
        for split, rows in load_splits(eval_task, data, seed, workdir).items():
            for row in rows:
                yield split, row["prompt"]
    elif "lm_eval_task" in eval_task:
        from lamdagent.evaluation.evaluate import lm_eval_task_docs

        include = [str(Path(workdir) / p) for p in config.get("evaluation", {}).get("include_paths", [])]
        for split, name in eval_task["lm_eval_task"].items():
            for prompt in lm_eval_task_docs(name, include):
                yield split, prompt
    else:
        from lamdagent.data.tasks import generate

        sizes = {"val": data["val_examples"], "test": data["test_examples"], "ood": data["test_examples"]}
        for split, n in sizes.items():
            for row in generate(eval_task["task"], split, n, seed):
                yield split, row["prompt"]


def fetch_task(task: str, include_paths, out_json) -> dict:
    """Load an lm-eval task's data (into the datasets cache) and record its docs' prompt hashes."""
    import datasets

    from lamdagent.evaluation.evaluate import lm_eval_task_docs

    prompts = list(lm_eval_task_docs(task, include_paths))
    if not prompts:
        raise ValueError(f"lm-eval task {task!r} has no evaluation docs")
    entry = {"task": task, "docs": len(prompts), "hf_datasets_cache": str(datasets.config.HF_DATASETS_CACHE),
             "prompt_sha256": sorted(prompt_hash(p) for p in prompts)}
    atomic_write_json(out_json, entry)
    return entry


def check_file_task(task: dict, key: str, config: dict, workdir: Path) -> None:
    """A task read from a local file or the hub: its keys; for local files, the rows and the
    disjointness of validation and the other splits (hub data is checked by prepare_eval_task)."""
    import re

    if task["task"] in TASKS:
        raise ConfigError(f"{key}.task", f"{task['task']!r} is an embedded task; name your own task otherwise")
    if not re.fullmatch(r"[A-Za-z0-9_]+", task["task"]):
        raise ConfigError(f"{key}.task", "a task with its own data is named by letters, digits and _ only")
    for other in ("lm_eval_task", "allow_same_split"):
        if other in task:
            raise ConfigError(f"{key}.{other}", f"only for lm-eval task names, not with source {task['source']!r}")
    where = "path" if task["source"] == "local" else "split"
    if "splits" in task and where in task:
        raise ConfigError(f"{key}.splits", f"give either `splits` or `{where}`, not both")
    if task["source"] == "local" and "splits" not in task and "path" not in task:
        raise ConfigError(f"{key}.path", "missing (a JSONL or parquet file, or `splits: {val: F1, test: F2}`)")
    if task["source"] == "hub" and "repo" not in task:
        raise ConfigError(f"{key}.repo", "missing (the hub dataset id)")
    kind = task.setdefault("kind", "generate")
    if kind == "generate":
        task.setdefault("extract", "text")
        if task.get("metric", "exact_match") != "exact_match":
            raise ConfigError(f"{key}.metric", "a generated-answer task is scored by exact_match")
    else:
        if task.setdefault("metric", "rating") != "rating":
            raise ConfigError(f"{key}.metric", "a judged task is scored by rating (1-10)")
        judge = config["evaluation"].get("judge")
        if not judge:
            raise ConfigError("evaluation.judge", f"missing: {key} is graded by a judge (model, base_url, api_key_env)")
    if task["source"] == "local":
        from lamdagent.evaluation.eval_data import EvalDataError  # noqa: PLC0415 - reads the files only when needed
        from lamdagent.evaluation.eval_data import load_splits

        try:
            load_splits(task, config["data"], config["seed"], workdir)
        except EvalDataError as err:
            raise ConfigError(f"{key}.{'splits' if 'splits' in task else 'path'}", str(err)) from None


def check_lm_eval_task(task: dict, key: str) -> None:
    names = task["lm_eval_task"]
    if names.get("test") and names["test"] == names["val"] and not task.get("allow_same_split"):
        raise ConfigError(f"{key}.lm_eval_task", f"val and test are the same task and split {names['val']!r}: the "
                                                 "search would select on its test set; hold out a validation "
                                                 "split (or set allow_same_split: true)")


def check_lm_eval_names(config: dict, workdir: Path) -> None:
    """Every lm_eval_task name is one lm-eval knows (ours, evaluation.include_paths, its own)."""
    include = config["evaluation"]["include_paths"]
    for index, path in enumerate(include):
        if not (workdir / path).is_dir():
            raise ConfigError(f"evaluation.include_paths[{index}]", f"{workdir / path} is not a directory")
    named = [(index, split, name) for index, task in enumerate(config["eval_tasks"])
             for split, name in (task.get("lm_eval_task") or {}).items()]
    if not named:
        return
    from lamdagent.evaluation.evaluate import (  # noqa: PLC0415 - lm-eval is imported only for lm-eval task names
        unknown_tasks)

    unknown = set(unknown_tasks([name for _, _, name in named], [workdir / p for p in include],
                                cache_dir=workdir / ".snakemake" / "lamdagent"))
    for index, split, name in named:
        if name in unknown:
            raise ConfigError(f"eval_tasks[{index}].lm_eval_task.{split}",
                              f"unknown lm-eval task {name!r} (not built in, nor under evaluation.include_paths)")
