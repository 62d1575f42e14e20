"""The agent's selection step: enumerate the actions, pick the action type, then the objects.

Each controller call is recorded (prompt, raw reply, parsed choice, tokens, latency). An unparsable
reply is asked again ``retries`` times, then replaced by a seeded random valid choice, and the
fallback is counted in the proposal.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from . import prompts
from .actions import ACTIONS, enumerate_actions
from .objects import Pool, recipe_for
from .parsing import parse_choice, parse_objects
from .recipe import RecipeStore, model_id, pipeline_text


@dataclass(frozen=True)
class Retry:
    """How a retry asks: a reminder appended to the prompt, the start of the reply, its parser."""

    hint: str
    prefix: str | None
    parse: object


def answer_after(prefix: str, reply: str, end: str) -> str:
    """The prefilled answer: the text after ``prefix`` up to the first character of ``end``."""
    text = reply[len(prefix):] if reply.startswith(prefix) else reply
    for char in end:
        text = text.split(char, 1)[0]
    return text


@dataclass
class CallLog:
    """Every controller call of one agent step, in order (written to ``calls.jsonl``)."""

    calls: list[dict] = field(default_factory=list)

    def ask(self, controller, kind: str, prompt: str, *, max_tokens: int, stop, parse, attempt: int,
            prefix: str | None = None):
        record = {"kind": kind, "attempt": attempt, "prompt": prompt, "prefix": prefix, "reply": None,
                  "parsed": None, "tokens_in": 0, "tokens_out": 0, "latency_s": 0.0, "error": None}
        started = time.perf_counter()
        try:
            completion = controller.complete(prompt, max_tokens=max_tokens, stop=stop, prefix=prefix)
        except Exception as err:  # noqa: BLE001 - a failed call is recorded and answered by the fallback
            record["error"] = f"{type(err).__name__}: {err}"
            record["latency_s"] = time.perf_counter() - started
            self.calls.append(record)
            return None
        parsed = parse(completion.text)
        record.update(reply=completion.text, parsed=parsed, tokens_in=completion.tokens_in,
                      tokens_out=completion.tokens_out, latency_s=round(completion.latency_s, 4))
        self.calls.append(record)
        return parsed

    def ask_until_parsed(self, controller, kind: str, prompt: str, *, retries: int, parse, retry: Retry | None = None,
                         **kwargs):
        """The paper's prompt first; each retry adds a terse reminder and starts the reply with the
        answer format (a greedy model would otherwise repeat the same unparsable reply)."""
        for attempt in range(1 + retries):
            if attempt and retry is not None:
                parsed = self.ask(controller, kind, f"{prompt}\n\n{retry.hint}", attempt=attempt, prefix=retry.prefix,
                                  parse=retry.parse, **kwargs)
            else:
                parsed = self.ask(controller, kind, prompt, attempt=attempt, parse=parse, **kwargs)
            if parsed is not None:
                return parsed
        return None

    def totals(self) -> dict:
        return {
            "calls": len(self.calls),
            "tokens_in": sum(c["tokens_in"] for c in self.calls),
            "tokens_out": sum(c["tokens_out"] for c in self.calls),
            "latency_s": round(sum(c["latency_s"] for c in self.calls), 4),
        }


def seeded_rng(seed: int, iteration: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{iteration}:{purpose}")


def propose(*, iteration: int, config: dict, pool: Pool, history: list[dict], memory: str, controller,
            store: RecipeStore, log: CallLog) -> dict:
    """Choose the next step and return its proposal record (recipe saved to ``store``)."""
    space = {a: combos for a, combos in enumerate_actions(config["action_types"], pool.candidates).items() if combos}
    if not space:
        raise RuntimeError("the action space is empty: every action type lacks a valid combination of objects")
    action_types = list(space)
    settings = config["controller"]
    fallback = {"type_selection": False, "object_selection": False}

    if controller is None:  # random controller: uniform over all enumerated actions
        rng = seeded_rng(config["seed"], iteration, "random-controller")
        flat = [(action, combo) for action in action_types for combo in space[action]]
        action, combo = rng.choice(flat)
    else:
        prompt = prompts.type_selection(eval_tasks=config["eval_tasks"], memory=memory, history=history,
                                        action_types=action_types, counts={a: len(space[a]) for a in action_types})
        n_types = len(action_types)
        prefix = "I choose action number"
        retry = Retry(hint=f"Reply with the number of the action only (1 to {n_types}).", prefix=prefix,
                      parse=lambda reply: parse_choice(answer_after(prefix, reply, ":.,\n"), n_types))
        index = log.ask_until_parsed(controller, "type_selection", prompt, retries=settings["retries"],
                                     max_tokens=settings["max_tokens"]["type_selection"], stop=settings["stop"],
                                     parse=lambda reply: parse_choice(reply, n_types), retry=retry)
        if index is None:
            fallback["type_selection"] = True
            index = seeded_rng(config["seed"], iteration, "type").randrange(len(action_types))
        action = action_types[index]
        combo = _select_objects(action, config, pool, space[action], memory, controller, log, fallback, iteration)

    recipe = recipe_for(config, pool.datasets, action, combo)
    mid = model_id(recipe)
    store.save(recipe)
    repeat_of = next((h["iteration"] for h in history if h["model"] == mid), None)
    object_types = config["action_types"][action]
    return {
        "iteration": iteration,
        "model": mid,
        "action": action,
        "objects": {slot.name: pool.label(value) if slot.kind == "model" else value
                    for slot, value in zip(ACTIONS[action].slots, combo)},
        "object_types": object_types,
        "pipeline": pipeline_text(mid, store, pool.labels),
        "pipeline_full": pipeline_text(mid, store, pool.labels, full=True),
        "recipe": recipe,
        "repeat_of": repeat_of,
        "controller": config["controller"]["type"],
        "fallback": fallback,
        "calls": log.totals(),
    }


def _select_objects(action, config, pool, combos, memory, controller, log, fallback, iteration) -> tuple:
    """Ask for the objects of the open slots; a slot with one candidate is filled, not asked."""
    settings = config["controller"]
    object_types = config["action_types"][action]
    candidate_lists = [pool.candidates[t] for t in object_types]
    specs = ACTIONS[action].slots
    open_slots = [i for i, values in enumerate(candidate_lists) if len(values) > 1]
    if not open_slots:
        return tuple(combos[0])
    slots = [(specs[i].describe, [pool.label(v) for v in candidate_lists[i]]) for i in open_slots]
    fixed = [(specs[i].describe, pool.label(candidate_lists[i][0])) for i in range(len(specs)) if i not in open_slots]
    prompt = prompts.object_selection(action=action, slots=slots, memory=memory, fixed=fixed)

    def parse(reply: str):
        picked = parse_objects(reply, [len(candidate_lists[i]) for i in open_slots])
        if picked is None:
            return None
        chosen = dict(zip(open_slots, picked))
        combo = tuple(values[chosen.get(i, 0)] for i, values in enumerate(candidate_lists))
        return combo if combo in combos else None  # e.g. a merge of a model with itself

    retry = Retry(hint=f"Reply with {len(slots)} numbers in double square brackets, one per slot.", prefix="[[",
                  parse=lambda reply: parse("[[" + answer_after("[[", reply, "]") + "]]"))
    combo = log.ask_until_parsed(controller, "object_selection", prompt, retries=settings["retries"],
                                 max_tokens=settings["max_tokens"]["object_selection"], stop=settings["stop"],
                                 parse=parse, retry=retry)
    if combo is None:
        fallback["object_selection"] = True
        combo = seeded_rng(config["seed"], iteration, f"objects:{action}").choice(combos)
    return tuple(combo)

