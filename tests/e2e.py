"""Helpers of the end-to-end tests: a tiny-model config and a bounded Snakemake run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def tiny_config(tiny_model_dir: Path, *, iterations: int = 3, controller: dict | None = None) -> dict:
    """Two embedded tasks, two specialists of a tiny random Llama, SFT and TIES: seconds per job."""
    return {
        "seed": 0,
        "iterations": iterations,
        "controller": controller or {"type": "random"},
        "memory": {"max_words": 40},
        "models": {
            "tiny": {"source": "local", "path": str(tiny_model_dir)},
            "specialist-arith": {"recipe": {"action": "sft", "objects": ["tiny", "arith", 1.0e-3]}},
            "specialist-choice": {"recipe": {"action": "sft", "objects": ["tiny", "choice", 1.0e-3]}},
        },
        "datasets": {
            "arith": {"source": "embedded", "tasks": ["arith"]},
            "choice": {"source": "embedded", "tasks": ["choice"]},
            "all": {"source": "embedded", "tasks": ["arith", "choice"]},
        },
        "objects": {
            "base_models": ["tiny"],
            "models": ["tiny", "specialist-arith", "specialist-choice"],
            "sft_dataset": ["arith", "choice", "all"],
            "sft_lr": [1.0e-3],
            "ties_weights": [[0.5, 0.5]],
            "ties_density": [0.5],
        },
        "action_types": {
            "sft": ["models", "sft_dataset", "sft_lr"],
            "ties_merging": ["base_models", "models", "models", "ties_weights", "ties_density"],
        },
        "eval_tasks": [
            {"task": "arith", "metric": "exact_match", "weight": "auto"},
            {"task": "choice", "metric": "exact_match", "weight": "auto"},
        ],
        "data": {"train_examples": 16, "val_examples": 6, "test_examples": 6},
        "training": {"epochs": 1, "batch_size": 8, "max_length": 128},
        "evaluation": {"batch_size": 8},
        "report": {"top_k": 2},
        "resources": {
            # No retries: a test fails on the first error rather than hide it behind a retry.
            family: {"gpu": 0, "cpus_per_gpu": 1, "threads": 1, "mem_mb": 2000, "runtime": 10, "retries": 0}
            for family in ("sft", "ties_merging", "evaluate", "import_model")
        },
    }


def write_tiny_config(workdir: Path, tiny_model_dir: Path, *, iterations: int = 3, controller: dict | None = None,
                      **overrides) -> Path:
    config = tiny_config(tiny_model_dir, iterations=iterations, controller=controller)
    config.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_command(workdir: Path, config_path: Path, *extra_args: str, cores: int = 2) -> list[str]:
    return [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config_path), "--cores", str(cores), *extra_args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def communicate_bounded(process: subprocess.Popen, timeout: float) -> tuple[str, bool]:
    """(output, timed out) of a Snakemake started in its own session; past ``timeout`` it is
    stopped with SIGINT (SIGTERM makes Snakemake wait for its jobs), then SIGKILL after 60 s."""
    try:
        output, _ = process.communicate(timeout=timeout)
        return output, False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        return output, True


def run_snakemake(workdir: Path, config_path: Path, *extra_args: str, timeout: float = 900,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Run the workflow, bounded by ``timeout``; a failure shows the log tail."""
    process = subprocess.Popen(snakemake_command(workdir, config_path, *extra_args), cwd=workdir, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, timed_out = communicate_bounded(process, timeout)
    if timed_out:
        raise AssertionError(f"snakemake ran past {timeout} s and was stopped:\n{output[-6000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, output, "")
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{output[-8000:]}")
    return result


NEW_ACTIONS = ("sft_lora", "dpo", "linear", "task_arithmetic", "dare_ties", "slerp")
# Iterations 1..3 are forced to these; the initial pool's recipes use the other three new actions.
WIDE_FORCED = ["task_arithmetic", "dare_ties", "slerp"]


def wide_config(tiny_model_dir: Path) -> dict:
    """Every new action on the tiny model in a 3-iteration run: LoRA, DPO and a linear merge make the
    initial pool; the iterations are forced to the other three merges (their objects stay random)."""
    config = tiny_config(tiny_model_dir, iterations=3)
    config.update({
        "forced_actions": list(WIDE_FORCED),
        "models": {
            "tiny": {"source": "local", "path": str(tiny_model_dir)},
            "lora-arith": {"recipe": {"action": "sft_lora", "objects": ["tiny", "arith", 1.0e-3, 4, 8]}},
            "pref-arith": {"recipe": {"action": "dpo", "objects": ["tiny", "arith-pref", 1.0e-3, 0.1]}},
            "avg": {"recipe": {"action": "linear", "objects": ["lora-arith", "pref-arith", [0.5, 0.5]]}},
        },
        "datasets": {
            "arith": {"source": "embedded", "tasks": ["arith"]},
            "arith-pref": {"source": "embedded", "kind": "preference", "tasks": ["arith"]},
        },
        "objects": {
            "base_models": ["tiny"],
            "models": ["tiny", "lora-arith", "pref-arith", "avg"],
            "sft_dataset": ["arith"],
            "pref_dataset": ["arith-pref"],
            "lr": [1.0e-3],
            "lora_rank": [4],
            "lora_alpha": [8],
            "dpo_beta": [0.1],
            "epochs": [1],
            "merge_weights": [[0.5, 0.5]],
            "density": [0.5],
            "slerp_t": [0.5],
        },
        "action_types": {
            "sft_lora": ["models", "sft_dataset", "lr", "lora_rank", "lora_alpha", "epochs"],
            "dpo": ["models", "pref_dataset", "lr", "dpo_beta", "epochs"],
            "linear": ["models", "models", "merge_weights"],
            "task_arithmetic": ["base_models", "models", "models", "merge_weights"],
            "dare_ties": ["base_models", "models", "models", "merge_weights", "density"],
            "slerp": ["models", "models", "slerp_t"],
        },
        "eval_tasks": [{"task": "arith", "metric": "exact_match", "weight": "auto"}],
        "data": {"train_examples": 8, "val_examples": 3, "test_examples": 3},
        "training": {"epochs": 1, "batch_size": 8, "max_length": 128},
        "report": {"top_k": 1},
        "resources": {
            family: {"gpu": 0, "cpus_per_gpu": 1, "threads": 1, "mem_mb": 2000, "runtime": 10, "retries": 0}
            for family in (*NEW_ACTIONS, "sft", "ties_merging", "evaluate", "import_model")
        },
    })
    return config


def wandb_runs(root: Path) -> dict[str, dict]:
    """{run name: its summary and records} of each offline W&B run under ``root``, read with W&B's own
    reader of its run log (``wandb leet inspect``: no server, no internal API)."""
    runs = {}
    for run_dir in sorted(root.rglob("offline-run-*")):
        inspect = [sys.executable, "-m", "wandb", "leet", "inspect"]
        summary = json.loads(subprocess.run([*inspect, "--summary", "--json", str(run_dir)], check=True,
                                            capture_output=True, text=True).stdout)
        records = [json.loads(line) for line in subprocess.run([*inspect, "--json", str(run_dir)], check=True,
                                                                capture_output=True, text=True).stdout.splitlines()]
        runs[summary["name"]] = dict(summary, records=records)
    return runs
