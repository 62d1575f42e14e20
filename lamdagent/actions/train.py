"""The training actions with trl: SFT (``SFTTrainer``, full or LoRA with peft) and DPO (``DPOTrainer``).

SFT trains on conversational prompt-completion pairs: trl applies the tokenizer's chat template and
puts the loss on the assistant completion only. With ``lora_rank`` only a peft LoRA adapter is
trained; it is merged into the weights (``merge_and_unload``) so the output is a full model like any
other, and the adapter is kept in ``adapter/``. DPO trains on conversational (prompt, chosen,
rejected) triples against a frozen copy of the starting model. The result is a plain HF directory
(model, tokenizer, chat template, ``training_log.json``) written atomically by the main process.

A job runs them in a child process (``python -m lamdagent.actions.failures --call lamdagent.actions.train:sft``,
under torchrun with one worker per GPU on several GPUs): see ``lamdagent.actions.failures``.

Over 400 lines: SFT and DPO share the loading, the hyper-parameter checks, the trainer arguments,
the precision and save-dtype rules and the save; apart, each half would import the other's privates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from lamdagent.store.fileio import atomic_directory, atomic_write_json, read_jsonl, read_jsonl_lines

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SAVE_DTYPES = ("auto", "float32", "bfloat16")
ADAPTER_DIR = "adapter"


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


def load_preference(dataset_path: str | os.PathLike) -> list[dict]:
    """Read ``{"prompt", "chosen", "rejected"}`` rows as trl's conversational preference rows."""
    path = Path(dataset_path)
    examples = []
    for line_no, row in read_jsonl_lines(path):
        for key in ("prompt", "chosen", "rejected"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{path}:{line_no}: '{key}' must be a non-empty string, got {value!r}")
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"{path}:{line_no}: 'chosen' and 'rejected' are the same answer")
        examples.append({
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        })
    if not examples:
        raise ValueError(f"{path}: no preference rows")
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


def resolve_save_dtype(save_dtype: str, model_dir) -> str:
    """The dtype a trained model is written in: ``auto`` is that of the model trained (its config.json
    ``dtype``, or ``torch_dtype`` as older transformers wrote it; float32 when it names none), so a
    bf16 base gives bf16 weights, like the merges of it, rather than twice the bytes in fp32."""
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, got {save_dtype!r}")
    if save_dtype != "auto":
        return save_dtype
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


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


def _check_hyperparameters(learning_rate, epochs, batch_size, gradient_accumulation_steps, max_length,
                           warmup_ratio, **extra) -> None:
    bad = {name: value for name, value in extra.items() if value is not None and value <= 0}
    if (learning_rate <= 0 or epochs <= 0 or batch_size < 1 or gradient_accumulation_steps < 1 or max_length < 2
            or not 0 <= warmup_ratio < 1 or bad):
        raise ValueError(
            f"invalid training hyperparameters: learning_rate={learning_rate}, epochs={epochs}, "
            f"batch_size={batch_size}, gradient_accumulation_steps={gradient_accumulation_steps}, "
            f"max_length={max_length}, warmup_ratio={warmup_ratio}"
            + "".join(f", {name}={value}" for name, value in extra.items())
        )


def _common_args(scratch_root: str, mode: str, *, learning_rate, epochs, batch_size, gradient_accumulation_steps,
                 max_length, seed, lr_scheduler_type, warmup_ratio, tracking=None) -> dict:
    """The trainer settings SFT and DPO share (trl's SFTConfig and DPOConfig both take them)."""
    import torch

    from lamdagent.store.tracking import report_to

    reporter, run_name = report_to(tracking)  # trl's own reporting: "none" unless config `tracking` says

    return dict(
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
        # trl's configs default bf16 to True and gradient checkpointing on: both are set explicitly.
        bf16=mode == "bf16",
        fp16=mode == "fp16",
        # trl defaults gradient checkpointing on; models here are small, so it would only cost time.
        activation_checkpointing=False,
        save_strategy="no",
        eval_strategy="no",
        report_to=reporter,
        run_name=run_name,
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


def _train_and_save(trainer, tokenizer, out_dir, *, lora: bool, save_dtype: str) -> tuple:
    """Train, then write the model in ``save_dtype`` (LoRA: merged into the weights, the adapter, as
    trained, in ``adapter/``). Rounding fp32 master weights to bf16 is deterministic: a CPU fp32 build
    saved in bf16 is still rebuilt bit-identically."""
    import torch

    from lamdagent.store.tracking import end_training_run

    result = trainer.train()
    history = list(trainer.state.log_history)
    steps = trainer.state.global_step
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(trainer.model)
        with atomic_directory(out_dir) as scratch:
            if lora:
                unwrapped.save_pretrained(scratch / ADAPTER_DIR)  # adapter_config.json + adapter weights
                unwrapped = unwrapped.merge_and_unload()
            unwrapped.to(getattr(torch, save_dtype)).save_pretrained(scratch)  # config.json gets the dtype
            tokenizer.save_pretrained(scratch)
            atomic_write_json(scratch / "training_log.json", history)
    # Other ranks return only once out_dir is complete, so a caller never sees a partial model.
    accelerator.wait_for_everyone()
    end_training_run(trainer.args.report_to)
    return result, history, steps


def _metrics(result, history, steps, mode, examples, save_dtype) -> dict:
    runtime = float(result.metrics.get("train_runtime", 0.0))
    tokens = next((rec["num_tokens"] for rec in reversed(history) if "num_tokens" in rec), None)
    return {
        "train_loss": float(result.training_loss),
        "steps": int(steps),
        "train_runtime_s": runtime,
        "tokens_seen": int(tokens) if tokens is not None else None,
        "tokens_per_s": float(tokens) / runtime if tokens and runtime > 0 else None,
        "precision": mode,
        "save_dtype": save_dtype,
        "examples": len(examples),
    }


def _load_for_training(model_dir, log_path):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # fp32 master weights in every mode: bf16/fp16 are autocast (mixed) precision.
    model = load_causal_lm(model_dir, torch.float32)
    if log_path is not None and _is_main_process() and Path(log_path).exists():
        Path(log_path).unlink()  # a retried job starts a fresh log
    return tokenizer, model


def full_logits_loss_on(device_is_cuda: bool) -> bool:
    """Whether SFT computes its loss from the model's full logits instead of trl's fused LM head.

    trl 1.16 computes the SFT loss through a tiled LM-head kernel (``trl/kernels/chunked_logprob.py``)
    that never materialises the batch x sequence x vocabulary logits: the right trade on a GPU, where
    memory is the limit. On CPU its tile-by-tile Python forward and backward cost more than the logits
    they save (benchmarks/RESULTS.md, section 2), so there the loss is one LM-head matmul plus cross
    entropy. Both are the same loss; which one ran is recorded in the model's lineage."""
    return not device_is_cuda


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward can project only chosen positions through its LM head
    (transformers' ``logits_to_keep``, given a tensor of positions); a peft model passes it on."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _full_logits_sft_trainer():
    """trl's SFTTrainer with ``compute_loss`` from full logits (trl's documented extension point)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class FullLogitsSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            targets = labels[:, 1:]  # position t predicts token t + 1
            if accepts_logits_to_keep(self.accelerator.unwrap_model(model)):
                # Only the positions that predict a completion token (in any row) go through the LM head:
                # the loss never reads the prompt's logits, and the head's vocabulary-wide matmul and
                # softmax are most of a small model's step on CPU. The same loss, to float rounding.
                keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
                outputs = model(**model_inputs, logits_to_keep=keep)
                logits, targets = outputs.logits.float(), targets[:, keep]
            else:
                outputs = model(**model_inputs)
                logits = outputs.logits[:, :-1, :].float()
            mask = targets != -100
            # Like trl: the completion tokens' summed NLL over the tokens of the whole accumulated batch.
            loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum")
            num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients across ranks
            self._log_step_metrics(model, inputs, logits.detach(), targets, mask)
            return (loss, outputs) if return_outputs else loss

        def _log_step_metrics(self, model, inputs, logits, targets, mask):
            """The figures trl's own compute_loss logs: token accuracy and the running token count."""
            mode = "train" if model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            valid = gather(mask.sum()).sum()
            correct = gather(((logits.argmax(-1) == targets) & mask).sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    return FullLogitsSFTTrainer


def sft(model_dir, dataset_path, out_dir, *, learning_rate: float, epochs: float = 1, batch_size: int = 8,
        gradient_accumulation_steps: int = 1, max_length: int = 512, seed: int = 42, precision: str = "auto",
        lr_scheduler_type: str = "linear", warmup_ratio: float = 0.0, log_path=None, lora_rank: int | None = None,
        lora_alpha: float | None = None, lora_dropout: float = 0.0, lora_target_modules="all-linear",
        save_dtype: str = "auto", tracking: dict | None = None) -> dict:
    """Fine-tune ``model_dir`` on ``dataset_path`` and write the model to ``out_dir``.

    ``batch_size`` is per device; the effective batch is batch_size x gradient_accumulation_steps x
    number of processes. ``lora_rank`` (with ``lora_alpha``) trains a peft LoRA adapter instead of
    every weight. ``save_dtype`` (see ``resolve_save_dtype``) is the dtype the weights are written in.
    Returns train_loss, steps, train_runtime_s, tokens_seen, tokens_per_s, precision, save_dtype.
    """
    lora = lora_rank is not None
    _check_hyperparameters(learning_rate, epochs, batch_size, gradient_accumulation_steps, max_length, warmup_ratio,
                           **({"lora_rank": lora_rank, "lora_alpha": lora_alpha or 0} if lora else {}))
    examples = load_prompt_completion(dataset_path)  # fail on bad data before loading a model
    mode = resolve_precision(precision)
    save_dtype = resolve_save_dtype(save_dtype, model_dir)

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, model = _load_for_training(model_dir, log_path)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=int(lora_rank), lora_alpha=float(lora_alpha), lora_dropout=float(lora_dropout),
                                 target_modules=lora_target_modules, bias="none", task_type="CAUSAL_LM")
    # Trainer insists on an output_dir; with save_strategy "no" nothing is written there (curves
    # reported to a tracker go to its own directory), and it is never out_dir so a crash cannot leave a partial model behind.
    scratch_root = tempfile.mkdtemp(prefix="lamdagent-sft-")
    try:
        config = SFTConfig(
            **_common_args(scratch_root, mode, learning_rate=learning_rate, epochs=epochs, batch_size=batch_size,
                           gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length, seed=seed,
                           lr_scheduler_type=lr_scheduler_type, warmup_ratio=warmup_ratio, tracking=tracking),
            completion_only_loss=True,
            packing=False,
        )
        full_logits = full_logits_loss_on(torch.cuda.is_available())
        trainer_class = _full_logits_sft_trainer() if full_logits else SFTTrainer
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
            callbacks=_make_callbacks(log_path),
            peft_config=peft_config,
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        result, history, steps = _train_and_save(trainer, tokenizer, out_dir, lora=lora, save_dtype=save_dtype)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    metrics = _metrics(result, history, steps, mode, examples, save_dtype)
    metrics["trainable_params"] = trainable
    if not full_logits:
        metrics["loss_head"] = "trl_fused"
    else:
        metrics["loss_head"] = "completion_logits" if accepts_logits_to_keep(trainer.model) else "full_logits"
    return metrics


def dpo(model_dir, dataset_path, out_dir, *, learning_rate: float, beta: float, epochs: float = 1,
        batch_size: int = 8, gradient_accumulation_steps: int = 1, max_length: int = 512, seed: int = 42,
        precision: str = "auto", lr_scheduler_type: str = "linear", warmup_ratio: float = 0.0, log_path=None,
        save_dtype: str = "auto", tracking: dict | None = None) -> dict:
    """DPO of ``model_dir`` on the preference pairs of ``dataset_path``; writes the model to ``out_dir``.

    The reference is a frozen copy of ``model_dir``; ``beta`` weighs the implicit KL penalty.
    Returns the sft() metrics plus the final reward accuracy and margin.
    """
    _check_hyperparameters(learning_rate, epochs, batch_size, gradient_accumulation_steps, max_length, warmup_ratio,
                           beta=beta)
    examples = load_preference(dataset_path)  # fail on bad data before loading a model
    mode = resolve_precision(precision)
    save_dtype = resolve_save_dtype(save_dtype, model_dir)

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, model = _load_for_training(model_dir, log_path)
    # Passed explicitly: trl would otherwise reload it from config._name_or_path, without
    # load_causal_lm's tolerance of a stale gguf quantization_config.
    reference = load_causal_lm(model_dir, torch.float32)
    scratch_root = tempfile.mkdtemp(prefix="lamdagent-dpo-")
    try:
        config = DPOConfig(
            **_common_args(scratch_root, mode, learning_rate=learning_rate, epochs=epochs, batch_size=batch_size,
                           gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length, seed=seed,
                           lr_scheduler_type=lr_scheduler_type, warmup_ratio=warmup_ratio, tracking=tracking),
            beta=float(beta),
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=config,
            train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
            callbacks=_make_callbacks(log_path),
        )
        result, history, steps = _train_and_save(trainer, tokenizer, out_dir, lora=False, save_dtype=save_dtype)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    metrics = _metrics(result, history, steps, mode, examples, save_dtype)
    last = next((rec for rec in reversed(history) if "loss" in rec), {})
    for key in ("rewards/accuracies", "rewards/margins"):
        if key in last:
            metrics[key.replace("/", "_")] = float(last[key])
    return metrics
