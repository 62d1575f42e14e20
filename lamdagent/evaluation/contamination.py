"""Contamination guard: no training dataset holds an evaluation prompt, and no validation prompt is a test prompt.

Automatic search optimises whatever it is scored on, so a training set that contains validation or
test examples inflates the very score that selects pipelines. Before any job (Snakefile parse time)
every training dataset (each dataset an action type's slot or a recipe model trains on, and
``baselines.full_sft``) is compared with every evaluation split of every task, and each task's
validation split with its test-side splits (``test``, ``ood``). Prompts are compared by the sha256
of their normalised text (whitespace runs folded to one space, case folded): a row that differs
only in spacing or capitals is the same row. Any overlap is a config error naming the dataset (or
task), the split and the number of shared rows, unless ``contamination.allow`` names that pair.

Where the prompts come from:

- training datasets: embedded ones are generated in-process exactly as ``prepare_dataset`` writes
  them (deterministic from the seed); local files are read with their field mapping; a hub dataset
  is read from its prepared file ``results/datasets/<name>.jsonl`` once ``prepare_dataset`` wrote it
  (the hub itself is not asked at parse time);
- evaluation splits: ``EVAL_SOURCES``, one function per kind of ``eval_tasks`` entry, is the single
  place a source plugs in. Embedded tasks are generated in-process; lm-eval task names are read
  through lm-eval, which may need the network and a full task index, so that check is *deferred*.

A deferred pair (an lm-eval task, or a hub dataset not yet prepared) is checked by the first
evaluation job (``check_deferred``), which records the counts in ``results/contamination/deferred.json``
and stops with the same message; every later parse reads that record, so the error then comes
before any job. The counts of every pair end up in each model's lineage (``dataset_record``).

Over 400 lines, a sixth of them this docstring: one guard, whose sources, counts, cache and
deferred check share one record format.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from lamdagent.errors import ConfigError

# Bump when the normalisation or what is compared changes: cached counts are then recomputed.
GUARD_VERSION = 1
METHOD = "sha256 of the prompt with whitespace runs folded to one space and case folded"
SPLITS = ("val", "test", "ood")
# The test-side splits each task's validation split must not share a prompt with.
HELD_OUT_PAIRS = (("val", "test"), ("val", "ood"))
DEFERRED_RECORD = Path("results") / "contamination" / "deferred.json"
CACHE_FILE = "contamination.json"


class ContaminationError(ConfigError):
    """An overlap not allowed by ``contamination.allow`` (a config error, also raised by the evaluation job)."""


class Deferred:
    """A side that cannot be read before a run: why, and how the evaluation job reads it."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Deferred({self.reason!r})"


# ---- hashing ---------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def prompt_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def row_hashes(rows: Iterable) -> list[tuple[str, ...]]:
    """The hashes of each evaluation row, its prompt first: a row is a prompt, or a tuple of texts any
    of which may match (an lm-eval document: its rendered prompt, then its text fields)."""
    return [tuple(prompt_hash(t) for t in ((row,) if isinstance(row, str) else row)) for row in rows]


def shared_rows(train: set[str], rows: list[tuple[str, ...]]) -> int:
    """How many evaluation rows have a text among the training prompts' hashes."""
    return sum(1 for row in rows if any(h in train for h in row))


# ---- what is compared ------------------------------------------------------------------------


def training_datasets(config: dict) -> list[str]:
    """Every dataset something trains on: the dataset slots' candidates, the recipe models' datasets
    and the fully fine-tuned baseline's."""
    from lamdagent.actions.registry import ACTIONS, DATASET_KINDS, slot_kinds

    kinds = slot_kinds(config)
    names = {v for t, values in config["objects"].items() if kinds.get(t) in DATASET_KINDS for v in values}
    for spec in config["models"].values():
        if "recipe" in spec:
            slots = ACTIONS[spec["recipe"]["action"]].slots
            names.update(v for s, v in zip(slots, spec["recipe"]["objects"]) if s.is_dataset)
    full = (config.get("baselines") or {}).get("full_sft")
    if full:
        names.add(full["dataset"])
    return sorted(names)


def prepared_path(name: str, workdir: Path) -> Path:
    return workdir / "results" / "datasets" / f"{name}.jsonl"


def _embedded_train_prompts(spec: dict, config: dict) -> list[str]:
    from lamdagent.data.tasks import generate

    # As datasets.prepare writes them: task by task interleaved, then max_examples (preference rows
    # keep the prompts of the generated rows).
    per_task = [[r["prompt"] for r in generate(task, "train", config["data"]["train_examples"], config["seed"])]
                for task in spec["tasks"]]
    return [p for group in itertools.zip_longest(*per_task) for p in group if p is not None]


def training_prompts(name: str, config: dict, workdir: Path, *, in_job: bool = False) -> list[str] | Deferred:
    """The prompts a dataset trains on, or ``Deferred`` for a hub dataset not prepared yet (``in_job``:
    an evaluation job, which may read the hub)."""
    from lamdagent.data.datasets import _map_rows, _rows_from_file, default_fields
    from lamdagent.store.fileio import read_jsonl

    spec = config["datasets"][name]
    source = spec["source"]
    if source == "embedded":
        prompts = _embedded_train_prompts(spec, config)
    elif source == "local":
        rows = _map_rows(_rows_from_file(workdir / spec["path"]), spec.get("fields") or default_fields(spec))
        prompts = [row["prompt"] for row in rows]
    elif prepared_path(name, workdir).is_file():
        return [row["prompt"] for row in read_jsonl(prepared_path(name, workdir))]
    elif in_job:
        from datasets import load_dataset

        hub = load_dataset(spec["repo"], spec.get("name"), split=spec.get("split", "train"),
                           revision=spec.get("revision"))
        rows = _map_rows(((f"{spec['repo']} row {i}", dict(row)) for i, row in enumerate(hub)), spec["fields"])
        prompts = [row["prompt"] for row in rows]
    else:
        return Deferred(f"hub dataset {spec['repo']} is read once prepare_dataset has written it")
    return prompts[: spec["max_examples"]] if spec.get("max_examples") else prompts


def _embedded_eval_prompts(entry: dict, split: str, config: dict, workdir: Path, in_job: bool):
    from lamdagent.data.tasks import generate

    size = config["data"]["val_examples" if split == "val" else "test_examples"]
    return [r["prompt"] for r in generate(entry["task"], split, size, config["seed"])]


def _lm_eval_split(entry: dict, split: str, config: dict, workdir: Path, in_job: bool):
    name = entry["lm_eval_task"].get(split)
    if name is None:
        return None
    if not in_job:
        return Deferred(f"lm-eval task {name} is read by the first evaluation job")
    return lm_eval_rows(name, include_paths=(config.get("evaluation") or {}).get("include_paths") or ())


def _file_eval_split(entry: dict, split: str, config: dict, workdir: Path, in_job: bool):
    """A task with its own data (local file or hub), cut as prepare_eval_task cuts it (lamdagent.evaluation.eval_data)."""
    from lamdagent.evaluation.eval_data import TASKS_ROOT, load_splits, task_splits
    from lamdagent.store.fileio import read_jsonl

    if split not in task_splits(entry):
        return None
    if entry["source"] == "hub":
        prepared = workdir / TASKS_ROOT / entry["task"] / f"{split}.jsonl"
        if prepared.is_file():
            return [r["prompt"] for r in read_jsonl(prepared)]
        if not in_job:
            return Deferred(f"hub data of task {entry['task']} is read once prepare_eval_task has written it")
    return [r["prompt"] for r in load_splits(entry, config["data"], config["seed"], workdir)[split]]


def eval_source(entry: dict) -> str:
    """The kind of an ``eval_tasks`` entry, the key of ``EVAL_SOURCES``."""
    return "lm_eval" if "lm_eval_task" in entry else entry.get("source", "embedded")


# The one place an evaluation source plugs in: kind -> fn(entry, split, config, workdir, in_job) giving
# that split's rows (prompts, or tuples of texts any of which may match), None where the task has no
# such split, or Deferred where they cannot be read before a run.
EVAL_SOURCES: dict[str, Callable[..., Any]] = {
    "embedded": _embedded_eval_prompts,
    "lm_eval": _lm_eval_split,
    "local": _file_eval_split,
    "hub": _file_eval_split,
}


def eval_splits(config: dict, workdir: Path, *, in_job: bool = False) -> dict[tuple[str, str], Any]:
    """(task, split) -> rows, or Deferred, for every evaluation split of every task."""
    out = {}
    for index, entry in enumerate(config["eval_tasks"]):
        kind = eval_source(entry)
        if kind not in EVAL_SOURCES:
            # A guard that skips a source silently guards nothing: a new source must say how it is read.
            raise ConfigError(f"eval_tasks[{index}]", f"the contamination guard cannot read eval source {kind!r}")
        for split in SPLITS:
            rows = EVAL_SOURCES[kind](entry, split, config, workdir, in_job)
            if rows is not None:
                out[(entry["task"], split)] = rows if isinstance(rows, Deferred) else list(rows)
    return out


def lm_eval_rows(task_name: str, include_paths=()) -> list[tuple[str, ...]]:
    """The documents of an lm-eval task (every subtask of a group): its rendered prompt first, then
    each of its text fields (a training prompt often is the raw question the template wraps)."""
    from lm_eval.tasks import TaskManager

    from lamdagent.evaluation.evaluate import TASKS_DIR, needs_default_tasks

    manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)],
                          include_defaults=needs_default_tasks([task_name], include_paths))
    rows = []
    for task in manager.load([task_name])["tasks"].values():  # every leaf task of a group
        for doc in task.eval_docs:
            rendered = task.doc_to_text(doc)
            fields = [v for v in doc.values() if isinstance(v, str)] if isinstance(doc, dict) else []
            rows.append(tuple(t for t in [rendered, *fields] if isinstance(t, str) and t.strip()))
    return rows


# ---- counting --------------------------------------------------------------------------------


def _fingerprint(config: dict, workdir: Path) -> str:
    """What the counts depend on: the guard, the seed and sizes, the tasks, the training datasets'
    specs and the size and mtime of every file they name. Hub datasets by their spec alone, so the key
    is the same before and after prepare_dataset (the deferred record is found again)."""
    names = training_datasets(config)
    files = {}
    for value in _strings([config["datasets"][n] for n in names] + list(config["eval_tasks"])):
        path = workdir / value
        if path.is_file():
            stat = path.stat()
            files[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns]
    blob = json.dumps({"version": GUARD_VERSION, "seed": config["seed"], "data": config["data"],
                       "eval_tasks": config["eval_tasks"], "datasets": {n: config["datasets"][n] for n in names},
                       "files": files, "include_paths": (config.get("evaluation") or {}).get("include_paths")},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _strings(node) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def count(config: dict, workdir: Path, *, in_job: bool = False) -> dict:
    """Shared rows of every (training dataset, task, split) and (task, val, test-side split) pair;
    ``None`` where a side is deferred, with the reason in ``deferred``."""
    splits = eval_splits(config, workdir, in_job=in_job)
    eval_rows = {key: row_hashes(rows) for key, rows in splits.items() if not isinstance(rows, Deferred)}
    deferred = {f"{task}/{split}": rows.reason for (task, split), rows in splits.items() if isinstance(rows, Deferred)}
    training: dict[str, dict[str, dict[str, int | None]]] = {}
    for name in training_datasets(config):
        prompts = training_prompts(name, config, workdir, in_job=in_job)
        if isinstance(prompts, Deferred):
            deferred[name] = prompts.reason
        hashes = None if isinstance(prompts, Deferred) else {prompt_hash(p) for p in prompts}
        per_task = training.setdefault(name, {})
        for (task, split) in splits:
            rows = eval_rows.get((task, split))
            per_task.setdefault(task, {})[split] = None if hashes is None or rows is None else shared_rows(hashes, rows)
    held_out: dict[str, dict[str, int | None]] = {}
    for entry in config["eval_tasks"]:
        task = entry["task"]
        for first, second in HELD_OUT_PAIRS:
            if (task, first) in splits and (task, second) in splits:
                a, b = eval_rows.get((task, first)), eval_rows.get((task, second))
                # Between evaluation splits only the prompts themselves count (a shared answer field is no leak).
                held_out.setdefault(task, {})[f"{first}/{second}"] = (
                    None if a is None or b is None else shared_rows({row[0] for row in a if row},
                                                                     [row[:1] for row in b]))
    rows = {f"{task}/{split}": len(r) for (task, split), r in eval_rows.items()}
    return {"method": METHOD, "training": training, "held_out": held_out, "eval_rows": rows, "deferred": deferred}


def counts(config: dict, workdir: str | Path = ".", cache_dir: str | Path | None = None) -> dict:
    """``count`` at parse time, cached in ``cache_dir`` by the fingerprint (Snakemake parses the
    workflow again for every cluster job), with the deferred pairs filled from the evaluation job's record."""
    workdir = Path(workdir)
    key = _fingerprint(config, workdir)
    cache = Path(cache_dir) / CACHE_FILE if cache_dir else None
    result = None
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text(encoding="utf-8"))
            result = cached["counts"] if cached.get("key") == key else None
        except (ValueError, KeyError):
            result = None
    if result is None:
        started = time.perf_counter()
        result = count(config, workdir)
        result["seconds"] = round(time.perf_counter() - started, 4)
        if cache is not None:
            from lamdagent.store.fileio import atomic_write_json

            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache, {"key": key, "counts": result})
    if result["deferred"]:
        record = _read_deferred(workdir, key)
        if record is not None:
            result = {**record, "deferred": {}, "checked_by": "evaluation job"}
    return result


def _read_deferred(workdir: Path, key: str) -> dict | None:
    path = workdir / DEFERRED_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return record["counts"] if record.get("key") == key else None


# ---- deciding --------------------------------------------------------------------------------


def _allowed(config: dict) -> tuple[set, set]:
    """(dataset, task, split) and (task, first, second) pairs that ``contamination.allow`` lets overlap."""
    datasets, held_out = set(), set()
    for entry in (config.get("contamination") or {}).get("allow") or []:
        splits = [entry["split"]] if "split" in entry else list(SPLITS)
        if "dataset" in entry:
            datasets.update((entry["dataset"], entry["task"], s) for s in splits)
        else:
            held_out.add((entry["task"], *sorted(entry["splits"], key=SPLITS.index)))
    # allow_same_split already accepted that validation is the test set: its rows may match too.
    held_out.update((task["task"], "val", "test") for task in config.get("eval_tasks") or []
                    if task.get("allow_same_split"))
    return datasets, held_out


def check_allow(config: dict) -> None:
    """An allow entry names a training dataset or two splits, and only what exists (a typo allows nothing)."""
    names = set(training_datasets(config))
    tasks = {entry["task"] for entry in config["eval_tasks"]}
    for index, entry in enumerate((config.get("contamination") or {}).get("allow") or []):
        key = f"contamination.allow[{index}]"
        if ("dataset" in entry) == ("splits" in entry):
            raise ConfigError(key, "give `dataset` (a training dataset, optionally with `split`) or `splits: [val, test]`")
        if "dataset" in entry and entry["dataset"] not in names:
            raise ConfigError(f"{key}.dataset", f"{entry['dataset']!r} is not a dataset anything trains on; "
                                                f"those are {', '.join(sorted(names))}")
        if entry["task"] not in tasks:
            raise ConfigError(f"{key}.task", f"{entry['task']!r} is not under `eval_tasks`")
        if "splits" in entry and "val" not in entry["splits"]:
            raise ConfigError(f"{key}.splits", "the held-out check is between `val` and a test-side split")


def violations(result: dict, config: dict) -> list[ContaminationError]:
    allowed_data, allowed_held_out = _allowed(config)
    index = {entry["task"]: i for i, entry in enumerate(config["eval_tasks"])}
    errors = []
    for name, per_task in result["training"].items():
        for task, per_split in per_task.items():
            for split, shared in per_split.items():
                if shared and (name, task, split) not in allowed_data:
                    total = result["eval_rows"].get(f"{task}/{split}", "?")
                    errors.append(ContaminationError(
                        f"datasets.{name}",
                        f"{shared} of {total} rows of eval task {task!r}, split {split!r} are in this training dataset "
                        f"(prompts compared with whitespace and case folded); remove them, or allow the pair with "
                        f"contamination: {{allow: [{{dataset: {name}, task: {task}, split: {split}}}]}}"))
    for task, pairs in result["held_out"].items():
        for pair, shared in pairs.items():
            first, second = pair.split("/")
            if shared and (task, first, second) not in allowed_held_out:
                total = result["eval_rows"].get(f"{task}/{second}", "?")
                errors.append(ContaminationError(
                    f"eval_tasks[{index[task]}]",
                    f"{shared} of {total} rows of task {task!r}, split {second!r} are in its split {first!r} "
                    f"(prompts compared with whitespace and case folded): the search would select on test data; "
                    f"hold them out, or allow it with contamination: {{allow: [{{task: {task}, splits: [{first}, {second}]}}]}}"))
    return errors


def guard(config: dict, workdir: str | Path = ".", cache_dir: str | Path | None = None) -> dict:
    """The parse-time check: raises the first unallowed overlap as a ``ContaminationError``; returns the counts."""
    check_allow(config)
    result = counts(config, workdir, cache_dir)
    errors = violations(result, config)
    if errors:
        raise errors[0]
    return result


def deferrable(config: dict) -> bool:
    """Whether parse time may have left a pair to the evaluation job: an lm-eval task, or a hub
    dataset (unprepared at the first parse; prepared by the time the evaluation job runs)."""
    return (any(eval_source(entry) in ("lm_eval", "hub") for entry in config["eval_tasks"])
            or any(config["datasets"][n]["source"] == "hub" for n in training_datasets(config)))


def check_deferred(config: dict, workdir: str | Path = ".") -> dict | None:
    """In an evaluation job: count what parse time could not read (lm-eval documents, hub datasets not
    prepared yet), record it for every later parse, and stop on an unallowed overlap. The first
    evaluation job does the work; the others find the record (an atomic write, so two at once agree)."""
    from lamdagent.store.fileio import atomic_write_json

    workdir = Path(workdir)
    if not deferrable(config):
        return None
    key = _fingerprint(config, workdir)
    record = _read_deferred(workdir, key)
    if record is None:
        record = count(config, workdir, in_job=True)
        atomic_write_json(workdir / DEFERRED_RECORD, {"key": key, "counts": record})
    errors = violations(record, config)
    if errors:
        raise errors[0]
    return record


# ---- lineage ---------------------------------------------------------------------------------


def dataset_record(name: str, path: str | os.PathLike, config: dict) -> dict | None:
    """What the lineage says of a training file: its shared rows with every evaluation split (0 when
    clean; None where the evaluation job had not read that split when the model was built) and the
    overlaps ``contamination.allow`` let through. None without ``eval_tasks`` (a record rebuilt from lineage)."""
    from lamdagent.store.fileio import read_jsonl

    if not config.get("eval_tasks") or "seed" not in config or "data" not in config:
        return None
    workdir = Path(".")
    hashes = {prompt_hash(row["prompt"]) for row in read_jsonl(path)}
    splits = eval_splits(config, workdir)
    record = _read_deferred(workdir, _fingerprint(config, workdir)) if any(
        isinstance(rows, Deferred) for rows in splits.values()) else None
    overlaps: dict[str, dict[str, int | None]] = {}
    for (task, split), rows in splits.items():
        if isinstance(rows, Deferred):
            shared = ((record or {}).get("training", {}).get(name, {}).get(task, {}).get(split))
        else:
            shared = shared_rows(hashes, row_hashes(rows))
        overlaps.setdefault(task, {})[split] = shared
    allowed_data, _ = _allowed(config)
    allowed = [f"{task}/{split}" for task, per in overlaps.items() for split, n in per.items()
               if n and (name, task, split) in allowed_data]
    return {"method": METHOD, "overlaps": overlaps, "allowed": allowed}
