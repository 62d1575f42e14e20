"""Model merging (the merge actions) with mergekit's Python API.

TIES (arXiv 2306.01708) on task vectors delta_i = M_i - base: keep the top ``density`` fraction of
each delta by magnitude, elect a per-parameter sign (sign of the weighted sum), and add the
weighted deltas that agree with it, divided by the sum of their weights when ``normalize``.
DARE-TIES (arXiv 2311.03099) drops a random ``1 - density`` of each delta instead and rescales the
rest; task arithmetic (arXiv 2212.04089) adds the weighted deltas; linear averages the weights;
SLERP interpolates two models along the sphere. The result is a plain HF directory (model,
tokenizer, chat template, ``mergekit_config.yml``), written atomically.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

from lamdagent.store.fileio import atomic_directory, atomic_write_text

DTYPES = ("float32", "bfloat16", "float16")
# mergekit merge_method names this module runs (lamdagent.actions.registry maps action types to them).
METHODS = ("ties", "dare_ties", "task_arithmetic", "linear", "slerp")
# Methods that draw random numbers (dare_ties drops task-vector entries at random).
RANDOMIZED = ("dare_ties",)
# Files a merged directory must hold for the rest of the workflow to load it.
REQUIRED_FILES = ("config.json", "tokenizer_config.json", "mergekit_config.yml")


def _model_path(path, role: str) -> str:
    path = Path(path).resolve()
    # mergekit reads a reference it cannot find locally as a hub repo id: fail here instead.
    if not (path / "config.json").is_file():
        raise ValueError(f"{role} {path} is not a model directory (no config.json)")
    # mergekit parses "a+b" as model+LoRA and "a@rev" as a revision.
    if "+" in str(path) or "@" in str(path):
        raise ValueError(f"{role} path {path} contains '+' or '@', which mergekit cannot read as a local path")
    return str(path)


def _check_weights(weights: list, n_models: int, normalize: bool) -> list[float]:
    weights = list(weights)
    if len(weights) != n_models:
        raise ValueError(f"got {len(weights)} weights for {n_models} models: one weight per model")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if normalize and sum(weights) == 0:
        raise ValueError(f"weights {weights!r} sum to 0, which normalize=True cannot divide by")
    return [float(w) for w in weights]


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def build_merge_config(method: str, base_dir, model_dirs: list, *, weights: list[float] | None = None,
                       density: float | None = None, t: float | None = None, normalize: bool | None = None,
                       dtype: str = "float32") -> dict:
    """The mergekit configuration (as a plain dict, i.e. the YAML) of one merge; validates inputs.

    ``ties``, ``dare_ties`` and ``task_arithmetic`` take task vectors over ``base_dir``; ``linear``
    averages ``model_dirs`` (no base); ``slerp`` interpolates from model_dirs[0] (mergekit's base) to
    model_dirs[1] by ``t``. ``normalize`` None leaves mergekit's default of the method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    model_dirs = list(model_dirs)
    if not model_dirs:
        raise ValueError(f"{method} merge needs at least one model to merge")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config: dict = {"merge_method": method}
    parameters: dict = {} if normalize is None else {"normalize": bool(normalize)}
    per_model: list[dict] = []
    if method == "slerp":
        if len(model_dirs) != 2:
            raise ValueError(f"slerp interpolates between exactly 2 models, got {len(model_dirs)}")
        parameters["t"] = _check_fraction("t", t)
    else:
        weights = _check_weights(weights if weights is not None else [], len(model_dirs), bool(normalize))
        per_model = [{"weight": w} for w in weights]
        if method in ("ties", "dare_ties"):
            density = _check_fraction("density", density)
            per_model = [{**p, "density": density} for p in per_model]
    paths = [_model_path(path, "model") for path in model_dirs]
    if len(set(paths)) != len(paths):
        # mergekit keys inputs by path and refuses duplicates ("Duplicate merge inputs").
        raise ValueError(f"a model directory is listed twice in {paths}; merge distinct directories")
    if method == "slerp":
        config["base_model"] = paths[0]
        config["models"] = [{"model": path} for path in paths]
    else:
        if method != "linear":
            config["base_model"] = _model_path(base_dir, "base model")
        config["models"] = [{"model": path, "parameters": p} for path, p in zip(paths, per_model)]
    if parameters:
        config["parameters"] = parameters
    config["dtype"] = dtype
    return config


def _strip_stale_gguf_config(config_path: Path) -> bool:
    """mergekit copies the base config; a model dequantised from GGUF carries a gguf
    ``quantization_config`` that would make transformers refuse to fine-tune the merge."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gguf":
        del config["quantization_config"]
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return True
    return False


def ties_merge(base_dir, model_dirs: list, weights: list[float], density: float, out_dir, *,
               normalize: bool = True, dtype: str = "float32", seed: int = 42) -> dict:
    """Merge ``model_dirs`` onto ``base_dir`` with TIES and write the model to ``out_dir``.

    ``density`` (same for every model) is the fraction of each task vector kept.
    """
    return merge("ties", base_dir, model_dirs, out_dir, weights=weights, density=density, normalize=normalize,
                 dtype=dtype, seed=seed)


def merge(method: str, base_dir, model_dirs: list, out_dir, *, weights: list[float] | None = None,
          density: float | None = None, t: float | None = None, normalize: bool | None = None,
          dtype: str = "float32", seed: int = 42) -> dict:
    """Merge with mergekit's ``method`` and write the model to ``out_dir`` (atomically).

    Returns merge_runtime_s, method, the parameters used, the device and the process's peak RSS.
    ``seed`` seeds torch's global RNG (mergekit's ``random_seed``): it draws dare_ties' drop masks.
    """
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config_dict = build_merge_config(method, base_dir, model_dirs, weights=weights, density=density, t=t,
                                     normalize=normalize, dtype=dtype)
    merge_config = MergeConfiguration.model_validate(config_dict)
    config_yaml = yaml.safe_dump(config_dict, sort_keys=False)
    cuda = torch.cuda.is_available()
    options = MergeOptions(
        cuda=cuda,
        copy_tokenizer=True,  # from the base model: tokenizer, chat template, generation config
        lazy_unpickle=True,
        random_seed=seed,  # dare_ties draws its masks from torch's RNG; the others are deterministic
        allow_crimes=False,
        trust_remote_code=False,
        write_model_card=True,
        safe_serialization=True,
        quiet=True,
    )
    tokenizer_source = config_dict.get("base_model", config_dict["models"][0]["model"])

    started = time.perf_counter()
    with atomic_directory(out_dir) as scratch:
        run_merge(merge_config, out_path=str(scratch), options=options, config_source=config_yaml)
        # mergekit writes it only with the model card; the workflow relies on it being there.
        atomic_write_text(scratch / "mergekit_config.yml", config_yaml)
        stripped = _strip_stale_gguf_config(scratch / "config.json")
        # mergekit only logs a failed tokenizer copy; a merged model without one is unusable here.
        missing = [name for name in REQUIRED_FILES if not (scratch / name).is_file()]
        if missing:
            raise RuntimeError(f"mergekit output lacks {missing} (does {tokenizer_source} hold a tokenizer?)")
        if not any((scratch / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            raise RuntimeError("mergekit wrote no safetensors weights")
    runtime = time.perf_counter() - started

    return {
        "method": method,
        "merge_runtime_s": runtime,
        "n_models": len(config_dict["models"]),
        "weights": [m.get("parameters", {}).get("weight") for m in config_dict["models"]],
        "density": None if density is None else float(density),
        "t": None if t is None else float(t),
        "normalize": config_dict.get("parameters", {}).get("normalize"),
        "dtype": dtype,
        "seed": seed,
        "randomized": method in RANDOMIZED,
        "device": "cuda" if cuda else "cpu",
        "stripped_gguf_quantization_config": stripped,
        # ru_maxrss is KiB on Linux; it is the whole process's peak, not the merge's alone.
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mergekit_config": config_dict,
        "out_dir": os.fspath(out_dir),
    }
