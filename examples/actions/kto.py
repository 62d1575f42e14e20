"""KTO (Kahneman-Tversky optimisation, trl's KTOTrainer) as a LaMDAgent custom action.

A user's own training script, run by the workflow through its command template
(config/examples/custom-action.yaml):

    python examples/actions/kto.py --model {model} --data {dataset} --lr {learning_rate} --beta {beta} \
        --epochs {epochs} --seed {seed} --out {output}

It knows nothing of LaMDAgent: it reads a Hugging Face model directory and a preference JSONL file
(prompt, chosen, rejected: the workflow's preference datasets), and saves the trained model and its
tokenizer to --out. KTO learns from unpaired feedback, so each pair becomes a desirable and an
undesirable example. The reference model is a frozen copy of the input model.
"""

import argparse
import json
import tempfile

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer


def kto_rows(path):
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                pair = json.loads(line)
                rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
                rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="input model directory")
    parser.add_argument("--data", required=True, help="preference JSONL (prompt, chosen, rejected)")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="where to save the trained model")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="kto-") as scratch:
        config = KTOConfig(output_dir=scratch, learning_rate=args.lr, beta=args.beta, num_train_epochs=args.epochs,
                           per_device_train_batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                           bf16=False, activation_checkpointing=False, save_strategy="no", report_to="none",
                           logging_steps=1, use_cpu=not torch.cuda.is_available())
        trainer = KTOTrainer(model=model, ref_model=reference, args=config,
                             train_dataset=Dataset.from_list(kto_rows(args.data)), processing_class=tokenizer)
        trainer.train()
    trainer.model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved the KTO model to {args.out}")


if __name__ == "__main__":
    main()
