"""LLM as judge: MT-Bench's single-answer grading of turn 1, a rating from 1 to 10 (the paper's Exp. 2).

The evaluated model answers a ``kind: judge`` task's prompts in rule ``evaluate`` (lm-eval,
generate_until with the chat template, as every task); rule ``judge`` then sends each answer to the
judge through the project's OpenAI-compatible client (``controller.OpenAIController``: the same
backoff on time-outs, refused connections, 429 and 5xx; the key from the environment variable
``evaluation.judge.api_key_env``) and parses the rating from the fixed format ``[[N]]``. Rule
``judge`` is a local rule: it runs where Snakemake runs (which reaches the API), not on a compute
node. The metric is ``rating`` (maximum 10, so ``weight: auto`` gives 1/10).

Judge prompts, raw replies and ratings are stored per sample in the evaluation JSON. A reply
without a rating in the format is kept with ``rating: null`` and left out of the mean (MT-Bench
does the same); a judge call that fails after its retries, or a task with no rating at all, fails
the job (no retries: ``resources`` retries are for infrastructure), with the calls made so far
written beside the log; it never scores 0.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from lamdagent.store.fileio import atomic_write_json, read_json, read_jsonl

MAX_RATING = 10.0
TEMPLATE = "mt-bench single-v1"
# MT-Bench's "single-v1" judge prompt (FastChat, llm_judge/data/judge_prompts.jsonl), and its
# "single-math-v1" variant when the task gives a reference answer.
_INSTRUCTION = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. {criteria} Begin your evaluation by {begin}. Be as objective "
    "as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    "following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)
_CRITERIA = ("Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
             "creativity, and level of detail of the response.")
_CRITERIA_REF = "Your evaluation should consider correctness and helpfulness. You will be given a reference answer " \
                "and the assistant's answer."
_BEGIN = "providing a short explanation"
_BEGIN_REF = "comparing the assistant's answer with the reference answer. Identify and correct any mistakes"
RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


class JudgeFailed(RuntimeError):
    """The judge could not grade a task: a call failed after its retries, or no reply had a rating."""


def judge_prompt(question: str, answer: str, reference: str | None = None) -> str:
    if reference:
        head = _INSTRUCTION.format(criteria=_CRITERIA_REF, begin=_BEGIN_REF)
        return (f"{head}[Question]\n{question}\n\n[The Start of Reference Answer]\n{reference}\n"
                f"[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
                f"[The End of Assistant's Answer]")
    head = _INSTRUCTION.format(criteria=_CRITERIA, begin=_BEGIN)
    return f"{head}[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"


def parse_rating(reply: str) -> float | None:
    """The last ``[[N]]`` in the reply with 1 <= N <= 10; None when there is none."""
    for match in reversed(RATING.findall(reply or "")):
        value = float(match)
        if 1.0 <= value <= MAX_RATING:
            return value
    return None


def make_judge(judge_config: dict, seed: int = 0):
    from lamdagent.agent.controller import OpenAIController

    return OpenAIController(model=judge_config["model"], api_key_env=judge_config["api_key_env"],
                            base_url=judge_config.get("base_url"), temperature=judge_config.get("temperature", 0.0),
                            timeout_s=judge_config.get("timeout_s", 120.0), backoff=judge_config.get("backoff"),
                            seed=seed)


def grade(answers: dict, tasks: dict[str, list[dict]], client, *, max_tokens: int, judge_config: dict,
          failed_json=None) -> dict:
    """The evaluation of ``answers`` (rule evaluate's JSON) with each judged task's samples graded.

    ``tasks`` maps each judged lm-eval task to its data rows (for the reference answers, by doc_id).
    """
    from lamdagent.agent.controller import ControllerError

    result = {**answers, "samples": dict(answers["samples"]), "tasks": dict(answers["tasks"])}
    usage = {"calls": 0, "tokens_in": 0, "tokens_out": 0}
    for task, rows in tasks.items():
        samples = []
        for sample in answers["samples"][task]:
            row = rows[sample["doc_id"]] if sample.get("doc_id") is not None else {}
            prompt = judge_prompt(sample["prompt"], sample["response"] or "", row.get("reference"))
            try:
                reply = client.complete(prompt, max_tokens=max_tokens)
            except ControllerError as err:
                samples.append({**sample, "judge_prompt": prompt, "judge_error": str(err)})
                _record_failure(failed_json, result, task, samples, str(err))
                raise JudgeFailed(f"task {task}, doc {sample.get('doc_id')}: the judge call failed after its "
                                  f"retries: {err}") from None
            usage["calls"] += 1
            usage["tokens_in"] += reply.tokens_in
            usage["tokens_out"] += reply.tokens_out
            samples.append({k: v for k, v in sample.items() if k not in ("filtered", "exact_match", "target")}
                           | {"judge_prompt": prompt, "judge_reply": reply.text, "rating": parse_rating(reply.text),
                              "judge_attempts": reply.attempts})
        ratings = [s["rating"] for s in samples if s["rating"] is not None]
        if not ratings:
            _record_failure(failed_json, result, task, samples, "no rating")
            raise JudgeFailed(f"task {task}: none of the judge's {len(samples)} replies has a rating in the format "
                              "[[N]] (1-10); the replies are kept in the failure record")
        stderr = statistics.stdev(ratings) / math.sqrt(len(ratings)) if len(ratings) > 1 else 0.0
        result["tasks"][task] = {"rating,judge": statistics.fmean(ratings), "rating_stderr,judge": stderr,
                                 "n": len(samples), "rated": len(ratings)}
        result["samples"][task] = samples
    result["judge"] = {"template": TEMPLATE, "model": judge_config["model"], "base_url": judge_config.get("base_url"),
                       "max_tokens": max_tokens, "temperature": judge_config.get("temperature", 0.0), **usage}
    return result


def _record_failure(failed_json, result: dict, task: str, samples: list[dict], reason: str) -> None:
    if failed_json is not None:
        atomic_write_json(failed_json, {"status": "failed", "task": task, "reason": reason, "samples": samples,
                                        "model_dir": result.get("model_dir")})


def judge_evaluation(answers_json, out_json, judged: dict[str, str], judge_config: dict, *, seed: int = 0,
                     failed_json=None) -> dict:
    """Grade the judged tasks (``{lm-eval task: its data file}``) of one evaluation; write ``out_json``."""
    client = make_judge(judge_config, seed)
    tasks = {task: read_jsonl(path) for task, path in judged.items()}
    result = grade(read_json(answers_json), tasks, client, max_tokens=int(judge_config.get("max_tokens", 512)),
                   judge_config=judge_config, failed_json=failed_json)
    atomic_write_json(out_json, result)
    if failed_json is not None:
        Path(failed_json).unlink(missing_ok=True)
    return result
