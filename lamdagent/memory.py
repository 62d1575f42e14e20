"""The agent's memory: a short text the controller rewrites after every evaluated step."""

from __future__ import annotations

from . import prompts
from .agent import Retry
from .parsing import clean_memory


def summary_memory(history: list[dict], new: dict | list[dict]) -> str:
    """The memory written without an LLM (random controller, or as the counted fallback).

    ``new``: the iteration's step, or its k steps when they ran in parallel.
    """
    news = [new] if isinstance(new, dict) else list(new)
    scored = [h for h in history + news if h.get("score") and h.get("status") != "failed"]
    lines = []
    if scored:
        best = max(scored, key=lambda h: h["score"]["s_multi"])
        lines.append(f"Best so far: {prompts.model_text(best)} (score {best['score']['s_multi']:.3f}).")
    if isinstance(new, dict):
        lines.append(f"Last step: {prompts.result_line(new)[2:]}.")
    else:
        lines.append("Last steps: " + "; ".join(prompts.result_line(entry)[2:] for entry in news) + ".")
    return " ".join(lines)


def step_note(new: dict | list[dict], history: list[dict]) -> str:
    news = [new] if isinstance(new, dict) else list(new)
    notes = []
    for entry in news:
        failed = entry.get("status") == "failed"
        if entry.get("repeat_of") is not None:
            known = "failure" if failed else "score"
            notes.append(f"Note: this choice repeated the recipe of iteration {entry['repeat_of']}; nothing was "
                         f"trained and the known {known} was reused. Choose something new next time.")
        elif failed:
            notes.append(f"Note: {entry['pipeline']}: the action failed, so it made no model; it counts with the "
                         f"failure score {entry['score']['s_multi']:.3f}. Avoid what made it fail.")
    return "\n".join(notes)


def update_memory(*, config: dict, memory: str, history: list[dict], new: dict | list[dict], controller,
                  log) -> tuple[str, bool]:
    """(new memory, fallback used). ``new``: the step, or the k steps of the iteration (all feed the memory)."""
    max_words = config["memory"]["max_words"]
    if controller is None:
        return summary_memory(history, new), False
    prompt = prompts.memory_update(eval_tasks=config["eval_tasks"], memory=memory, history=history, new=new,
                                   note=step_note(new, history), max_words=max_words)
    settings = config["controller"]
    prefix = "What worked:"
    retry = Retry(hint="Reply with the new memory only: what worked, what did not, and what to try next.",
                  prefix=prefix, parse=lambda reply: clean_memory(reply, max_words))
    text = log.ask_until_parsed(controller, "memory_update", prompt, retries=settings["retries"],
                                max_tokens=settings["max_tokens"]["memory_update"], stop=None,
                                parse=lambda reply: clean_memory(reply, max_words), retry=retry)
    if text is None:
        return summary_memory(history, new), True
    return text, False
