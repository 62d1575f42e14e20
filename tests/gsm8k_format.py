"""Small files in GSM8k's format (`question`, `answer` ending "#### <n>"), made here: never the network."""

from __future__ import annotations

import json
from pathlib import Path

from lamdagent.data.tasks import generate


def gsm8k_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` word problems; train, val and test draw disjoint prompts (the embedded arith task's)."""
    rows = []
    for row in generate("arith", split, n, seed):
        question = row["prompt"].split("\n")[0]
        solution = row["completion"].rsplit(" The answer is", 1)[0]
        rows.append({"question": question, "answer": f"{solution}\n#### {row['answer']}"})
    return rows


def write_gsm8k(path: Path, split: str, n: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(split, n, seed)), encoding="utf-8")
    return path
