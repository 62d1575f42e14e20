"""Rebuilding a tree from its lineage record, with the library calls the workflow makes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lamdagent.lineage.cards import short_sha
from lamdagent.lineage.clock import measure
from lamdagent.lineage.records import record_model
from lamdagent.lineage.tree import base_nodes, pipeline, rebuild_plan, walk, weight_files
from lamdagent.lineage.verify import _check_files
from lamdagent.store.fileio import atomic_directory, sha256_file


def recorded_save_dtype(lineage: dict) -> str:
    """The dtype a trained model's weights were written in, as its lineage records it. Models trained
    before ``training.save_dtype`` existed were always written in float32, whatever their base."""
    return lineage.get("run", {}).get("metrics", {}).get("save_dtype", "float32")


def sft_kwargs(recipe: dict, model_dir, dataset_path, out_dir, save_dtype: str | None = None) -> dict:
    """The keyword arguments of ``lamdagent.actions.train.sft`` (or ``dpo``) for an sft, sft_lora or dpo recipe
    (the job and rebuild share them). ``save_dtype``: the recipe's (``auto`` when it names none) unless
    given; a rebuild gives the recorded one, so that it writes the same bytes."""
    params = recipe["params"]
    extra: dict[str, Any] = {}
    if recipe["action"] == "sft_lora":
        extra = dict(lora_rank=params["lora_rank"], lora_alpha=params["lora_alpha"],
                     lora_dropout=params["lora_dropout"], lora_target_modules=params["lora_target_modules"])
    elif recipe["action"] == "dpo":
        extra = dict(beta=params["beta"])
    return dict(
        **extra,
        model_dir=str(model_dir),
        dataset_path=str(dataset_path),
        out_dir=str(out_dir),
        learning_rate=params["learning_rate"],
        epochs=params["epochs"],
        batch_size=params["batch_size"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
        max_length=params["max_length"],
        seed=recipe["seed"],
        precision=params["precision"],
        lr_scheduler_type=params["lr_scheduler_type"],
        warmup_ratio=params["warmup_ratio"],
        save_dtype=save_dtype or params.get("save_dtype", "auto"),
    )


def merge_kwargs(recipe: dict, parents: dict, out_dir) -> dict:
    """The keyword arguments of ``lamdagent.actions.merge.merge`` for any merge recipe (``parents``: slot -> dir)."""
    from lamdagent.actions.registry import action_spec

    spec = action_spec(recipe["action"])
    params = recipe["params"]
    kwargs = dict(method=spec.merge_method, base_dir=str(parents["base_model"]) if "base_model" in parents else None,
                  model_dirs=[str(parents["model_a"]), str(parents["model_b"])], out_dir=str(out_dir),
                  dtype=params["dtype"], seed=recipe["seed"])
    kwargs.update({key: params[key] for key in ("weights", "density", "t", "normalize") if key in params})
    return kwargs


TRAIN_METHOD = {"sft": "sft", "sft_lora": "sft", "dpo": "dpo"}


def merge_precision(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def build_step(recipe: dict, parents: dict, datasets: dict, out_dir, config: dict, save_dtype: str | None = None) -> dict:
    """Run one recipe in this process (train.sft or merge.ties_merge, as the single-process jobs do)
    and record it; returns the new lineage. ``save_dtype``: see ``sft_kwargs``."""
    import torch

    from lamdagent.actions import train
    from lamdagent.actions.merge import merge
    from lamdagent.actions.registry import action_spec

    family = action_spec(recipe["action"]).family
    # Staged with its lineage, then renamed: the directory appears complete or not at all.
    with atomic_directory(out_dir) as staged:
        with measure() as usage:
            if family == "train":
                trainer = getattr(train, TRAIN_METHOD[recipe["action"]])
                metrics = trainer(**sft_kwargs(recipe, parents["model"], datasets["dataset"], staged, save_dtype))
                precision, device = metrics["precision"], "cuda" if torch.cuda.is_available() else "cpu"
            elif family == "merge":
                metrics = merge(**merge_kwargs(recipe, parents, staged))
                precision, device = merge_precision(recipe["params"]["dtype"]), metrics["device"]
            elif family == "custom":
                from lamdagent.actions import custom

                spec = action_spec(recipe["action"])
                custom.verify_code(spec.name, recipe["code"])
                metrics = custom.run(recipe["code"], custom.action_values(recipe, spec, parents, datasets),
                                     str(staged), recipe["seed"])
                precision, device = metrics["precision"], "cpu"
            else:
                raise ValueError(f"no builder for action {recipe['action']!r}")
        return record_model(staged, recipe, parents=parents, datasets=datasets, config=config, usage=usage,
                            device=device, precision=precision, gpus=int(device != "cpu"), metrics=metrics,
                            final_dir=out_dir)


def _config_from_tree(lineage: dict) -> dict:
    """The parts of a workflow config that ``build_lineage`` reads, recovered from a record."""
    config: dict[str, Any] = {"models": {}, "datasets": {}, "seed": None, "data": {}}
    for node in walk(lineage):
        if node["kind"] == "base":
            config["models"][node["model"]] = {k: v for k, v in node["source"].items()
                                               if k not in ("gguf", "package", "package_version")}
            continue
        for data in node["datasets"].values():
            config["datasets"][data["name"]] = data["source"]
            if "generator" in data:
                config["seed"] = data["generator"]["seed"]
                config["data"]["train_examples"] = data["generator"]["examples_per_task"]
    return config


def _ensure_base(node: dict, results: Path, say) -> Path:
    """A base model with the recorded bytes: where it was, or imported again from its source."""
    candidates = [Path(node["dir"]), results / "models" / node["model"]]
    for candidate in candidates:
        if candidate.is_dir():
            problems: list[str] = []
            _check_files(candidate, node["files"], node["model"], problems)
            if not problems:
                say(f"base {node['model']}: {candidate} matches the record")
                return candidate
            say(f"base {node['model']}: {candidate} differs from the record ({len(problems)} files)")
    source = node["source"].get("source")
    target = results / "models" / node["model"]
    if source == "embedded":
        from lamdagent.actions.models import import_embedded_smollm2

        import_embedded_smollm2(target)
    elif source == "hub":
        from lamdagent.actions.models import import_hub_model

        import_hub_model(node["source"]["repo"], target, revision=node["source"].get("revision"),
                         dtype=node["source"].get("dtype", "auto"))
    else:
        raise FileNotFoundError(f"base {node['model']}: no directory with the recorded files "
                                f"(looked in {', '.join(map(str, candidates))}) and source {source!r} cannot be re-fetched")
    problems = []
    _check_files(target, node["files"], node["model"], problems)
    if problems:
        raise ValueError(f"base {node['model']} imported again differs from the record:\n" + "\n".join(problems))
    say(f"base {node['model']}: imported again into {target}, files match the record")
    return target


def _ensure_dataset(data: dict, results: Path, say) -> Path:
    """The dataset file with the recorded hash: regenerated from its generator or source, else refused."""
    from lamdagent.data.datasets import prepare
    from lamdagent.data.tasks import write_splits

    out = results / "datasets" / f"{data['name']}.jsonl"
    if not (out.is_file() and sha256_file(out) == data["sha256"]):
        task_files = []
        if "generator" in data:
            g = data["generator"]
            for task in g["tasks"]:
                paths = write_splits(task, results / "data" / task, {"train": g["examples_per_task"]}, g["seed"])
                task_files.append(paths["train"])
        elif data["source"].get("source") not in ("local", "hub"):
            raise ValueError(f"dataset {data['name']}: no generator or source recorded to make it again")
        prepare(dict(data["source"]), out, task_train_files=task_files)
    actual = sha256_file(out)
    if actual != data["sha256"]:
        raise ValueError(f"dataset {data['name']}: made again with sha256 {short_sha(actual)}, "
                         f"recorded {short_sha(data['sha256'])}")
    say(f"dataset {data['name']}: {out} matches the record ({data['rows']} rows)")
    return out


def rebuild(lineage: dict, results: str | os.PathLike, say=print) -> list[dict]:
    """Make every built model of the tree again under ``results`` with the workflow's library calls.

    Returns one entry per step: model id, directory, recorded and rebuilt weight hashes, whether they
    are identical and whether they were expected to be.
    """
    import torch

    from lamdagent.store.recipes import RecipeStore

    results = Path(results)
    store = RecipeStore(results / "recipes")
    config = _config_from_tree(lineage)
    dirs: dict[str, Path] = {}
    for base in base_nodes(lineage):
        dirs.setdefault(base["model"], _ensure_base(base, results, say))
    report = []
    for node in rebuild_plan(lineage):
        recipe = node["recipe"]
        if store.save(recipe) != node["model"]:
            raise ValueError(f"{node['model']}: the recorded recipe does not hash to its id")
        out = results / "models" / node["model"]
        parents = {slot: dirs[p["model"]] for slot, p in node["parents"].items()}
        datasets = {slot: _ensure_dataset(d, results, say) for slot, d in node["datasets"].items()}
        threads = node.get("hardware", {}).get("torch_threads")
        if threads:  # CPU float reductions are split by thread: same count, same bits
            torch.set_num_threads(threads)
        say(f"building {node['model']} = {pipeline(node)}")
        new = build_step(recipe, parents, datasets, out, config, recorded_save_dtype(node))
        dirs[node["model"]] = out
        recorded, rebuilt = weight_files(node["files"]), weight_files(new["files"])
        same = recorded == rebuilt
        expected = node["determinism"]["bit_reproducible"]
        report.append({"model": node["model"], "dir": str(out), "identical": same, "expected_identical": expected,
                       "reason": node["determinism"]["reason"], "recorded": recorded, "rebuilt": rebuilt})
        verdict = "identical" if same else ("DIFFERS" if expected else "differs (expected: " +
                                             node["determinism"]["reason"] + ")")
        say(f"{node['model']}: weights {verdict}: " + ", ".join(f"{k} {short_sha(v)}" for k, v in rebuilt.items()))
    return report
