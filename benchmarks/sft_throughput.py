"""SFT throughput: the project's ``lamdagent.actions.train.sft`` (trl SFTTrainer, as the ``sft`` rule calls it)
against a minimal hand-written PyTorch loop doing the same work, on CPU, in tokens per second.

Same model (a random Llama with SmolLM2's tokenizer, or ``--model DIR``), same rows (the embedded
``all`` mix), same chat-template tokenisation with the loss on the completion only, truncation to
``max_length``, right padding to the batch's longest row, batch size, steps (one epoch), AdamW with
a linear schedule and gradient clipping at 1.0 (the Trainer's defaults), fp32, the same thread count.
The loop checks that it saw exactly the tokens trl counted.

Tokens are the non-padding input tokens of all steps (trl's ``num_tokens``). Two rates per run:
``train`` (the training loop alone: trl's ``train_runtime``, the loop's steps) and ``call`` (the whole
call: load model and tokenizer, tokenise, train, save). Repeats are interleaved (the order alternates)
and the ratio is the median of the per-repeat ratios. Target: project / loop >= 0.9. Usage::

    .venv/bin/python benchmarks/sft_throughput.py                       # ~15M-parameter Llama, 3 repeats
    .venv/bin/python benchmarks/sft_throughput.py --model smollm2 --examples 32  # the real model
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, model_for_benchmark  # noqa: E402


def make_dataset(out_dir: Path, examples: int, seed: int = 0) -> Path:
    """The embedded ``all`` mix (arith, choice, context interleaved), as prepare_dataset writes it."""
    from lamdagent.data.datasets import prepare
    from lamdagent.data.tasks import write_splits

    per_task = -(-examples // 3)
    files = [write_splits(task, out_dir / task, {"train": per_task}, seed)["train"]
             for task in ("arith", "choice", "context")]
    path = out_dir / "all.jsonl"
    prepare({"source": "embedded", "tasks": ["arith", "choice", "context"], "max_examples": examples}, path,
            task_train_files=files)
    return path


def run_project(model_dir: Path, dataset: Path, out_dir: Path, args) -> dict:
    from lamdagent.actions.train import sft

    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    metrics = sft(str(model_dir), str(dataset), str(out_dir), learning_rate=args.lr, epochs=1,
                  batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, precision="fp32",
                  warmup_ratio=args.warmup_ratio)
    call_s = time.perf_counter() - started
    return {"tokens": metrics["tokens_seen"], "train_s": metrics["train_runtime_s"], "call_s": call_s,
            "steps": metrics["steps"], "loss": metrics["train_loss"]}


def tokenize(tokenizer, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) as trl builds them for a conversational prompt-completion row."""
    prompt = [{"role": "user", "content": row["prompt"]}]
    full = prompt + [{"role": "assistant", "content": row["completion"]}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1
    labels = [-100] * start + ids[start:]
    return ids[:max_length], labels[:max_length]


def run_loop(model_dir: Path, dataset: Path, out_dir: Path, args) -> dict:
    """The minimal loop: tokenise, shuffle, pad, forward/backward, clip, AdamW, linear schedule, save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from lamdagent.store.fileio import read_jsonl

    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    rows = [tokenize(tokenizer, row, args.max_length) for row in read_jsonl(dataset)]
    steps = math.ceil(len(rows) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * steps), steps)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    tokens, losses = 0, []
    train_started = time.perf_counter()
    for step in range(steps):
        batch = [rows[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (ids, lab) in enumerate(batch):
            input_ids[j, :len(ids)] = torch.tensor(ids)
            labels[j, :len(lab)] = torch.tensor(lab)
            mask[j, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - train_started
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    call_s = time.perf_counter() - started
    return {"tokens": tokens, "train_s": train_s, "call_s": call_s, "steps": steps, "loss": sum(losses) / len(losses)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="'smollm2' (the embedded model) or an HF model directory "
                        "(default: a random Llama, see --hidden)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (1: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", type=Path)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import trl  # noqa: F401 - imported before timing: both sides run in a warm process

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="lamdagent-sft-bench-"))
    print(f"machine: {machine()}; torch threads {args.threads}")
    try:
        model_dir = model_for_benchmark(args.model, scratch, args.hidden, args.layers)
        dataset = make_dataset(scratch / "data", args.examples)
        print(f"model {model_dir}; {args.examples} rows; batch {args.batch_size}; max_length {args.max_length}")
        runs = {"project": [], "loop": []}
        # One untimed warm-up of each (first-call costs: kernels, tokenizer caches), then interleaved repeats.
        run_project(model_dir, dataset, scratch / "out-project", args)
        run_loop(model_dir, dataset, scratch / "out-loop", args)
        for repeat in range(args.repeats):
            order = ("project", "loop") if repeat % 2 == 0 else ("loop", "project")
            for name in order:
                run = (run_project if name == "project" else run_loop)(model_dir, dataset, scratch / f"out-{name}",
                                                                         args)
                runs[name].append(run)
                print(f"repeat {repeat} {name}: {json.dumps({k: round(v, 3) for k, v in run.items()})}", flush=True)
        project, loop = runs["project"], runs["loop"]
        same_tokens = project[0]["tokens"] == loop[0]["tokens"] and project[0]["steps"] == loop[0]["steps"]
        print(f"\ntokens per run: project {project[0]['tokens']}, loop {loop[0]['tokens']} "
              f"({'same' if same_tokens else 'DIFFERENT'}); steps {project[0]['steps']} / {loop[0]['steps']}")
        print("\n| measure | project tokens/s | loop tokens/s | ratio (median of per-repeat ratios) |")
        print("|---|---|---|---|")
        for key in ("train", "call"):
            p_rate = [r["tokens"] / r[f"{key}_s"] for r in project]
            l_rate = [r["tokens"] / r[f"{key}_s"] for r in loop]
            ratio = median([p / q for p, q in zip(p_rate, l_rate)])
            print(f"| {key} | {median(p_rate):.0f} | {median(l_rate):.0f} | {ratio:.2f} "
                  f"{'(target >= 0.9 met)' if ratio >= 0.9 else '(target >= 0.9 MISSED)'} |")
        print(f"\nmedian seconds: project train {median(r['train_s'] for r in project):.2f} / call "
              f"{median(r['call_s'] for r in project):.2f}; loop train {median(r['train_s'] for r in loop):.2f} / "
              f"call {median(r['call_s'] for r in loop):.2f}")
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
