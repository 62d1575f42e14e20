"""Prompt templates for the controller's three calls (after the paper's Appendix templates)."""

from __future__ import annotations

from lamdagent.actions.registry import ACTIONS
from lamdagent.agent.objects import made_name

MAX_RESULT_LINES = 10
MAX_FAILURE_LINES = 3  # the most recent failed actions shown in every prompt


def _tasks_line(eval_tasks: list[dict]) -> str:
    return ", ".join(f"{t['task']} ({t.get('metric', 'exact_match')})" for t in eval_tasks)


def failure_text(entry: dict) -> str:
    """``action sft failed: training loss is nan at step 2`` (the reason's first line)."""
    reason = (entry.get("reason") or "").strip()
    reason = reason.splitlines()[0] if reason else "unknown reason"
    return f"action {entry.get('action') or 'unknown'} failed: {reason}"


def model_text(entry: dict) -> str:
    """``m3 = sft(specialist, all)``: a made model's short name beside its pipeline (a named model: its name)."""
    name = entry.get("name") or (made_name(entry["iteration"], entry.get("index")) if entry.get("iteration") else None)
    return f"{name} = {entry['pipeline']}" if name and name != entry["pipeline"] else entry["pipeline"]


def result_line(entry: dict) -> str:
    score = entry.get("score")
    if entry.get("status") == "failed":  # it made no model: no name to build on
        return f"- {entry['pipeline']}: {failure_text(entry)}"
    if not score:
        return f"- {model_text(entry)}: not evaluated yet"
    tasks = ", ".join(f"{name} {value:.2f}" for name, value in score["tasks"].items())
    return f"- {model_text(entry)}: score {score['s_multi']:.3f} ({tasks})"


def candidate_text(label: str, entry: dict | None) -> str:
    """A model candidate as listed: its name, then (a made model) its pipeline, then its score."""
    if entry is None:
        return label
    text = f"{label} = {entry['pipeline']}" if entry["pipeline"] != label else label
    score = entry.get("score")
    return f"{text}, score {score['s_multi']:.3f}" if score and entry.get("status") != "failed" else text


def failed_entries(history: list[dict]) -> list[dict]:
    return [h for h in history if h.get("status") == "failed"][-MAX_FAILURE_LINES:]


def results_block(history: list[dict]) -> str:
    """The best results, then the most recent failed actions (their failure score is no result)."""
    scored = [h for h in history if h.get("score") and h.get("status") != "failed"]
    best = sorted(scored, key=lambda h: -h["score"]["s_multi"])[:MAX_RESULT_LINES]
    lines = [result_line(h) for h in best + failed_entries(history)]
    return "\n".join(lines) if lines else "- none yet"


def failures_block(history: list[dict]) -> str:
    failed = failed_entries(history)
    if not failed:
        return ""
    lines = "\n".join(result_line(h) for h in failed)
    return f"\n\nActions that failed (they made no model, so it is not a candidate):\n{lines}"


MAX_TAKEN_LINES = 10


def parallel_note(*, number: int, k: int, chosen: list[str], taken: list[str] = ()) -> str:
    """For k > 1 proposals per iteration: which choice this is and what may not be chosen again.

    ``chosen``: pipelines chosen earlier in this iteration; ``taken``: combinations already built
    (object selection only, where the candidates are listed).
    """
    lines = [f"This iteration runs {k} different actions in parallel; this is choice {number} of {k}."]
    if chosen:
        lines.append("Already chosen this iteration: " + "; ".join(chosen) + ".")
    if taken:
        shown = list(taken)[-MAX_TAKEN_LINES:]
        more = f" and {len(taken) - len(shown)} more" if len(taken) > len(shown) else ""
        lines.append("Already built: " + "; ".join(shown) + more + ".")
    lines.append("A choice made already this iteration or built before is rejected: choose a new one.")
    return "\n".join(lines)


# The start of the answer whose continuations a scoring controller compares (``controller.choice: scored``).
TYPE_ANSWER = "I choose the action:"


def slot_answer(number: int) -> str:
    return f"Slot {number}:"


def type_selection(*, eval_tasks, memory: str, history: list[dict], action_types: list[str], counts: dict,
                   parallel: str | None = None, answer: str = "number") -> str:
    """``parallel``: the note of :func:`parallel_note` (k > 1 only; k = 1 is the paper's prompt).

    ``answer``: ``number`` (the paper: reflect, then the number) or ``name`` (the answer that follows
    is scored: name the action, no reflection first)."""
    actions = "\n".join(
        f"{number}. {name}: {ACTIONS[name].describe} ({counts[name]} possible choices)"
        for number, name in enumerate(action_types, start=1)
    )
    return (
        "You are an agent that builds a post-training pipeline for a language model.\n"
        f"Goal: the highest total score on the target tasks: {_tasks_line(eval_tasks)}.\n\n"
        f"Your memory:\n{memory}\n\n"
        f"Results so far, best first:\n{results_block(history)}\n\n"
        + (f"{parallel}\n\n" if parallel else "")
        + f"Actions you can take:\n{actions}\n\n"
        "Keep exploring: an action or combination not tried yet may beat the best pipeline so far.\n"
        + ("Reflect briefly on the results, then provide the number of the action you choose at the end."
           if answer == "number" else "Name the action you choose.")
    )


def object_selection(*, action: str, slots: list[tuple[str, list[str]]], memory: str,
                     fixed: list[tuple[str, str]] = (), parallel: str | None = None,
                     history: list[dict] = (), answer: str = "number") -> str:
    """``slots``: (slot description, candidate labels) in slot order, for the slots to choose;
    ``fixed``: (slot description, the only candidate) for the others; ``parallel``: as for type_selection;
    ``history``: for the failed actions."""
    blocks = []
    for number, (describe, labels) in enumerate(slots, start=1):
        options = "\n".join(f"{index}. {label}" for index, label in enumerate(labels, start=1))
        blocks.append(f"Slot {number}, {describe}:\n{options}")
    letters = ", ".join("abcdefgh"[: len(slots)])
    fixed_text = "".join(f"\n{describe.capitalize()}: {label} (the only candidate)." for describe, label in fixed)
    return (
        f"You chose the action {action}: {ACTIONS[action].describe}.{fixed_text}\n"
        "Pick one candidate for each slot. Models generated in earlier iterations are as promising as "
        "the initial ones.\n\n"
        + (f"{parallel}\n\n" if parallel else "")
        + "\n\n".join(blocks)
        + f"\n\nYour memory:\n{memory}{failures_block(list(history))}\n\n"
        + (f"Answer with one number per slot, in slot order, in double square brackets, like [[{letters}]]."
           if answer == "number" else "Name one candidate per slot, in slot order, one slot per line.")
    )


def memory_judgement(*, eval_tasks, facts: list[str], question: str, options: list[str], answer: str) -> str:
    """One judgement of the structured memory: ``question`` answered with one of ``options``.

    ``answer``: ``number`` (a reply that is parsed) or ``name`` (the answer that follows is scored)."""
    listed = "\n".join(f"{number}. {option}" for number, option in enumerate(options, start=1))
    ask = "Answer with its number only." if answer == "number" else "Name it."
    return (
        "You keep the memory of an agent that builds post-training pipelines for a language model.\n"
        f"Target tasks: {_tasks_line(eval_tasks)}.\n\n"
        "What is known so far:\n" + "\n".join(facts) + "\n\n"
        f"Choose {question}:\n{listed}\n\n{ask}"
    )


def new_results(new: dict | list[dict]) -> str:
    """The result(s) of this iteration: one step (the paper) or the k steps run in parallel."""
    if isinstance(new, dict):
        return f"New result (iteration {new['iteration']}):\n{result_line(new)}"
    lines = "\n".join(result_line(entry) for entry in new)
    return f"New results (iteration {new[0]['iteration']}, {len(new)} actions run in parallel):\n{lines}"


def memory_update(*, eval_tasks, memory: str, history: list[dict], new: dict | list[dict], note: str,
                  max_words: int) -> str:
    return (
        "You keep the memory of an agent that builds post-training pipelines for a language model.\n"
        f"Target tasks: {_tasks_line(eval_tasks)}.\n\n"
        f"Previous memory:\n{memory}\n\n"
        f"Results so far, best first:\n{results_block(history)}\n\n"
        f"{new_results(new)}\n{note}\n\n"
        f"Rewrite the memory in at most {max_words} words: what worked, what did not, and what to try next."
    )
