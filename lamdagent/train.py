"""Supervised fine-tuning (the SFT action) with trl's ``SFTTrainer``.

The model is trained on conversational prompt-completion pairs: trl applies the tokenizer's chat
template and puts the loss on the assistant completion only. The result is a plain HF directory
(model, tokenizer, chat template, ``training_log.json``) written atomically by the main process.

Run in-process by calling :func:`sft`, or on several GPUs through the module entry point that
``lamdagent.launch.distributed_command`` builds::

    torchrun --standalone --nproc_per_node=4 -m lamdagent.train --args-json sft_args.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .fileio import atomic_directory, atomic_write_json, read_jsonl

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; nothing was written to ``out_dir``."""


def load_prompt_completion(dataset_path: str | os.PathLike) -> list[dict]:
    """Read ``{"prompt": str, "completion": str}`` rows as trl's conversational prompt-completion rows.

    Other keys (ids, gold answers) are ignored. A bad row raises ValueError naming file and line.
    """
    path = Path(dataset_path)
    rows = read_jsonl(path)
    # read_jsonl skips blank lines; map row index back to the 1-based line number for messages.
    with open(path, encoding="utf-8") as handle:
        line_numbers = [no for no, line in enumerate(handle, start=1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no training rows")
    examples = []
    for row, line_no in zip(rows, line_numbers):
        for key in ("prompt", "completion"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{path}:{line_no}: '{key}' must be a non-empty string, got {value!r}")
        examples.append({
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}],
        })
    return examples


def resolve_precision(precision: str) -> str:
    """``auto`` is bf16 mixed precision where CUDA supports it, else fp32 (fp16 is never chosen
    silently: its loss scaling is a source of divergence on small models)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def strip_stale_gguf_config(config) -> bool:
    """Drop a ``quantization_config`` of method gguf from a config whose weights are plain floats.

    A model dequantised from GGUF keeps that entry in config.json; transformers then marks the
    model quantized and the Trainer refuses to fine-tune it. Returns whether anything was removed.
    """
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(getattr(method, "value", method)).lower() == "gguf":
        del config.quantization_config
        return True
    return False


def load_causal_lm(model_dir, dtype=None):
    """``AutoModelForCausalLM.from_pretrained`` (fp32 by default) that tolerates a stale gguf entry."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    strip_stale_gguf_config(config)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=dtype or torch.float32)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _make_callbacks(log_path: str | os.PathLike | None):
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        """Stop at the first non-finite logged loss (logged every step, unfiltered, see below)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingDiverged(f"training loss is {loss} at step {state.global_step}")

    class JsonlLog(TrainerCallback):
        """Stream each log record as one JSON line so a running job's progress is visible."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    callbacks = [DivergenceGuard()]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        callbacks.append(JsonlLog())
    return callbacks


def sft(model_dir, dataset_path, out_dir, *, learning_rate: float, epochs: float = 1, batch_size: int = 8,
        gradient_accumulation_steps: int = 1, max_length: int = 512, seed: int = 42, precision: str = "auto",
        lr_scheduler_type: str = "linear", warmup_ratio: float = 0.0, log_path=None) -> dict:
    """Fine-tune ``model_dir`` on ``dataset_path`` and write the model to ``out_dir``.

    ``batch_size`` is per device; the effective batch is batch_size x gradient_accumulation_steps x
    number of processes. Returns train_loss, steps, train_runtime_s, tokens_seen, tokens_per_s.
    """
    if (learning_rate <= 0 or epochs <= 0 or batch_size < 1 or gradient_accumulation_steps < 1 or max_length < 2
            or not 0 <= warmup_ratio < 1):
        raise ValueError(
            f"invalid SFT hyperparameters: learning_rate={learning_rate}, epochs={epochs}, "
            f"batch_size={batch_size}, gradient_accumulation_steps={gradient_accumulation_steps}, "
            f"max_length={max_length}, warmup_ratio={warmup_ratio}"
        )
    examples = load_prompt_completion(dataset_path)  # fail on bad data before loading a model
    mode = resolve_precision(precision)

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # fp32 master weights in every mode: bf16/fp16 are autocast (mixed) precision.
    model = load_causal_lm(model_dir, torch.float32)
    if log_path is not None and _is_main_process() and Path(log_path).exists():
        Path(log_path).unlink()  # a retried job starts a fresh log

    # Trainer insists on an output_dir; with save_strategy "no" and report_to "none" nothing is
    # written there, and it is never out_dir so a crash cannot leave a partial model behind.
    scratch_root = tempfile.mkdtemp(prefix="lamdagent-sft-")
    try:
        config = SFTConfig(
            output_dir=scratch_root,
            learning_rate=learning_rate,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            lr_scheduler_type=lr_scheduler_type,
            # transformers 5 dropped warmup_ratio: a float warmup_steps in [0, 1) is the ratio.
            warmup_steps=float(warmup_ratio),
            max_length=max_length,
            seed=seed,
            data_seed=seed,
            # SFTConfig defaults bf16 to True and gradient checkpointing on: both are set explicitly.
            bf16=mode == "bf16",
            fp16=mode == "fp16",
            # trl defaults gradient checkpointing on; models here are small, so it would only cost time.
            activation_checkpointing=False,
            completion_only_loss=True,
            packing=False,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_strategy="steps",
            logging_steps=1,
            # The default filter replaces a NaN/inf step loss by the running mean, which would hide
            # divergence from the DivergenceGuard.
            logging_nan_inf_filter=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
            callbacks=_make_callbacks(log_path),
        )
        result = trainer.train()
        history = list(trainer.state.log_history)
        steps = trainer.state.global_step
        accelerator = trainer.accelerator

        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(trainer.model)
            with atomic_directory(out_dir) as scratch:
                unwrapped.save_pretrained(scratch)
                tokenizer.save_pretrained(scratch)
                atomic_write_json(scratch / "training_log.json", history)
        # Other ranks return only once out_dir is complete, so a caller never sees a partial model.
        accelerator.wait_for_everyone()
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)

    runtime = float(result.metrics.get("train_runtime", 0.0))
    tokens = next((rec["num_tokens"] for rec in reversed(history) if "num_tokens" in rec), None)
    return {
        "train_loss": float(result.training_loss),
        "steps": int(steps),
        "train_runtime_s": runtime,
        "tokens_seen": int(tokens) if tokens is not None else None,
        "tokens_per_s": float(tokens) / runtime if tokens and runtime > 0 else None,
        "precision": mode,
        "examples": len(examples),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lamdagent.train`` (and of torchrun/accelerate launches)."""
    parser = argparse.ArgumentParser(prog="python -m lamdagent.train", description=__doc__.splitlines()[0])
    parser.add_argument("--args-json", required=True, help="JSON object of sft() keyword arguments")
    parser.add_argument("--metrics-json", help="where the main process writes the returned metrics")
    ns = parser.parse_args(argv)
    kwargs: dict[str, Any] = json.loads(Path(ns.args_json).read_text(encoding="utf-8"))
    if not isinstance(kwargs, dict):
        raise SystemExit(f"{ns.args_json}: expected a JSON object of sft() keyword arguments")
    started = time.time()
    metrics = sft(**kwargs)
    metrics["wall_s"] = time.time() - started
    if _is_main_process():
        if ns.metrics_json:
            atomic_write_json(ns.metrics_json, metrics)
        print(json.dumps(metrics), file=sys.stdout)
    _destroy_process_group()
    return 0


def _destroy_process_group() -> None:
    # torchrun workers otherwise warn (or hang on some NCCL versions) at exit.
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exit-time cleanup must not mask the training result
        pass


if __name__ == "__main__":
    sys.exit(main())
