"""The agent's memory, rewritten after every evaluated step.

``memory.style``:

- ``structured`` (default): a short memory whose facts come from the records (the best pipeline so
  far, the last step, what helped and what hurt: a step's score against its best input model's) and
  whose judgement the controller makes: which action to try next and which model to build on,
  each chosen from a closed set (scored by the local controller: no fallback; parsed from a
  numbered reply otherwise, the fallback counted and the line left out).
- ``free``: the paper's rewrite, in the controller's own words (a small model's loop or garble is
  asked again, then replaced by the summary and counted).
"""

from __future__ import annotations

from lamdagent.actions.registry import ACTIONS
from lamdagent.agent import prompts
from lamdagent.agent.parsing import clean_memory, parse_choice, parse_json_numbers
from lamdagent.agent.propose import Retry, listing, note_structured, scores_choices, structured_request

MAX_EFFECT_LINES = 3  # the most recent steps that helped, and that hurt


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


def effects(entries: list[dict]) -> tuple[list[str], list[str]]:
    """(helped, hurt): agent steps scored above / below the best model they were built from."""
    scores = {e["model"]: e["score"]["s_multi"] for e in entries if e.get("score") and e.get("status") != "failed"}
    helped, hurt = [], []
    for entry in entries:
        if not entry.get("iteration") or entry.get("status") != "done" or entry.get("repeat_of") is not None:
            continue
        inputs = [v for v in (entry.get("recipe") or {}).get("inputs", {}).values()
                  if isinstance(v, str) and v in scores]
        if not inputs or entry["model"] not in scores:
            continue
        delta = scores[entry["model"]] - max(scores[v] for v in inputs)
        line = f"{prompts.model_text(entry)} ({delta:+.3f} on its best input)"
        (helped if delta > 0 else hurt if delta < 0 else []).append(line)
    return helped[-MAX_EFFECT_LINES:], hurt[-MAX_EFFECT_LINES:]


def structured_facts(history: list[dict], new: dict | list[dict]) -> list[str]:
    """The memory's lines that come from the records: numbers never written by the controller."""
    news = [new] if isinstance(new, dict) else list(new)
    entries = history + news
    lines = [summary_memory(history, new)]
    helped, hurt = effects(entries)
    if helped:
        lines.append("Helped: " + "; ".join(helped) + ".")
    if hurt:
        lines.append("Hurt: " + "; ".join(hurt) + ".")
    note = step_note(new, history)
    return lines + ([note] if note else [])


def _judge(config, facts: list[str], history, new, controller, log) -> tuple[list[str], bool]:
    """The controller's judgement as memory lines: the action to try next, the model to build on."""
    news = [new] if isinstance(new, dict) else list(new)
    iteration = news[0]["iteration"]
    entries = [e for e in history + news if e.get("status") == "done" and e.get("score")]
    models, texts = [], {}
    for entry in sorted(entries, key=lambda e: -e["score"]["s_multi"]):
        name = entry.get("name") or prompts.model_text(entry)
        if name not in texts:
            models.append(name)
            texts[name] = prompts.model_text(entry)
    questions = [("Try next:", "the action to try next", list(config["action_types"]))]
    if len(models) > 1:
        questions.append(("Build on:", "the model to build on next", models[:prompts.MAX_RESULT_LINES]))
    settings = config["controller"]
    lines, fallback, answer = [], False, ""
    for number, (prefix, question, options) in enumerate(questions):
        order = listing(len(options), config, iteration, f"memory:{number}")
        listed = [options[i] for i in order]
        if scores_choices(controller, settings):
            prompt = prompts.memory_judgement(eval_tasks=config["eval_tasks"], facts=facts, question=question,
                                              options=listed, answer="name")
            position = log.score(controller, "memory_update", prompt, prefix=answer + prefix, options=listed,
                                 listing=order, slot=number + 1)
        else:
            prompt = prompts.memory_judgement(eval_tasks=config["eval_tasks"], facts=facts, question=question,
                                              options=listed, answer="number")
            first_call = len(log.calls)
            n = len(listed)
            request = structured_request(controller, settings, "type_selection", {"choice": list(range(1, n + 1))})
            position = log.ask_until_parsed(controller, "memory_update", prompt, retries=settings["retries"],
                                            parse=lambda reply, n=n: (parse_json_numbers(reply, ["choice"], [n])
                                                                      or [parse_choice(reply, n)])[0], **request)
            note_structured(controller, log, first_call)
            for call in log.calls[first_call:]:
                call["listing"] = order
            if position is None:  # no judgement: the line is left out, and counted
                fallback = True
                continue
        choice = listed[position]
        if prefix == "Try next:":
            choice = f"{choice} ({ACTIONS[choice].describe})"
        else:
            choice = texts[choice]
        lines.append(f"{prefix} {choice}")
        answer += f"{prefix} {listed[position]}\n"
    return lines, fallback


def update_memory(*, config: dict, memory: str, history: list[dict], new: dict | list[dict], controller,
                  log) -> tuple[str, bool]:
    """(new memory, fallback used). ``new``: the step, or the k steps of the iteration (all feed the memory)."""
    max_words = config["memory"]["max_words"]
    if controller is None:
        return summary_memory(history, new), False
    if config["memory"]["style"] == "structured":
        facts = structured_facts(history, new)
        judgement, fallback = _judge(config, facts, history, new, controller, log)
        return "\n".join(facts + judgement), fallback
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
