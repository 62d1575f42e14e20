"""TIES merging (the merge action) with mergekit's Python API.

TIES (arXiv 2306.01708) on task vectors delta_i = M_i - base: keep the top ``density`` fraction of
each delta by magnitude, elect a per-parameter sign (sign of the weighted sum), and add the
weighted deltas that agree with it, divided by the sum of their weights when ``normalize``.
The result is a plain HF directory (model, tokenizer, chat template, ``mergekit_config.yml``),
written atomically.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

from .fileio import atomic_directory, atomic_write_text

DTYPES = ("float32", "bfloat16", "float16")
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


def build_ties_config(base_dir, model_dirs: list, weights: list[float], density: float, *,
                      normalize: bool = True, dtype: str = "float32") -> dict:
    """The mergekit configuration (as a plain dict, i.e. the YAML) for a TIES merge; validates inputs."""
    model_dirs = list(model_dirs)
    weights = list(weights)
    if not model_dirs:
        raise ValueError("ties_merge needs at least one model to merge")
    if len(weights) != len(model_dirs):
        raise ValueError(f"got {len(weights)} weights for {len(model_dirs)} models: one weight per model")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if normalize and sum(weights) == 0:
        raise ValueError(f"weights {weights!r} sum to 0, which normalize=True cannot divide by")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    paths = [_model_path(path, "model") for path in model_dirs]
    if len(set(paths)) != len(paths):
        # mergekit keys inputs by path and refuses duplicates ("Duplicate merge inputs").
        raise ValueError(f"a model directory is listed twice in {paths}; merge distinct directories")
    return {
        "merge_method": "ties",
        "base_model": _model_path(base_dir, "base model"),
        "models": [
            {"model": path, "parameters": {"weight": float(w), "density": float(density)}}
            for path, w in zip(paths, weights)
        ],
        "parameters": {"normalize": bool(normalize)},
        "dtype": dtype,
    }


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

    ``density`` (same for every model) is the fraction of each task vector kept. Returns
    merge_runtime_s, method, the parameters used, the device and the process's peak RSS.
    """
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config_dict = build_ties_config(base_dir, model_dirs, weights, density, normalize=normalize, dtype=dtype)
    merge_config = MergeConfiguration.model_validate(config_dict)
    config_yaml = yaml.safe_dump(config_dict, sort_keys=False)
    cuda = torch.cuda.is_available()
    options = MergeOptions(
        cuda=cuda,
        copy_tokenizer=True,  # from the base model: tokenizer, chat template, generation config
        lazy_unpickle=True,
        random_seed=seed,  # TIES (magnitude pruning) is deterministic; this pins any tie-breaking RNG
        allow_crimes=False,
        trust_remote_code=False,
        write_model_card=True,
        safe_serialization=True,
        quiet=True,
    )

    started = time.perf_counter()
    with atomic_directory(out_dir) as scratch:
        run_merge(merge_config, out_path=str(scratch), options=options, config_source=config_yaml)
        # mergekit writes it only with the model card; the workflow relies on it being there.
        atomic_write_text(scratch / "mergekit_config.yml", config_yaml)
        stripped = _strip_stale_gguf_config(scratch / "config.json")
        # mergekit only logs a failed tokenizer copy; a merged model without one is unusable here.
        missing = [name for name in REQUIRED_FILES if not (scratch / name).is_file()]
        if missing:
            raise RuntimeError(f"mergekit output lacks {missing} (does {base_dir} hold a tokenizer?)")
        if not any((scratch / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            raise RuntimeError("mergekit wrote no safetensors weights")
    runtime = time.perf_counter() - started

    return {
        "method": "ties",
        "merge_runtime_s": runtime,
        "n_models": len(config_dict["models"]),
        "weights": [m["parameters"]["weight"] for m in config_dict["models"]],
        "density": float(density),
        "normalize": bool(normalize),
        "dtype": dtype,
        "device": "cuda" if cuda else "cpu",
        "stripped_gguf_quantization_config": stripped,
        # ru_maxrss is KiB on Linux; it is the whole process's peak, not the merge's alone.
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mergekit_config": config_dict,
        "out_dir": os.fspath(out_dir),
    }
