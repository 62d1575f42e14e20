"""The agent's selection step: enumerate the actions, pick the action type, then the objects.

Each controller call is recorded (prompt, raw reply, parsed choice, tokens, latency). An unparsable
reply, or a call that found the endpoint unavailable past its backoff, is asked again ``retries``
times, then replaced by a seeded random valid choice, and the fallback is counted in the proposal;
a refused request (wrong key, model or parameter) fails the step instead. With ``proposals_per_iteration`` k > 1, :func:`propose_many`
makes k such choices, each excluding what the iteration chose already and what was built before.

Over 400 lines: the two questions of one step (the type, then the objects), their retries, the
seeded fallback and the call log are one procedure; the prompts, the parsing and the controllers
are already modules of their own.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from lamdagent.actions.recipe import pipeline_text
from lamdagent.actions.registry import ACTIONS, enumerate_actions, is_valid_combination
from lamdagent.agent import prompts
from lamdagent.agent.controller import ControllerUnavailable, json_schema_format
from lamdagent.agent.objects import Pool, made_name, recipe_for
from lamdagent.agent.parsing import parse_choice, parse_json_numbers, parse_objects
from lamdagent.store.recipes import RecipeStore, model_id


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
            prefix: str | None = None, response_format: dict | None = None):
        record = {"kind": kind, "attempt": attempt, "prompt": prompt, "prefix": prefix, "reply": None,
                  "parsed": None, "tokens_in": 0, "tokens_out": 0, "latency_s": 0.0, "error": None}
        started = time.perf_counter()
        try:
            completion = controller.complete(prompt, max_tokens=max_tokens, stop=stop, prefix=prefix,
                                             **({"response_format": response_format} if response_format else {}))
        except ControllerUnavailable as err:  # transient errors outlasted the backoff: recorded, the fallback answers
            # Anything else (a refused key, model or parameter: ControllerRejected) fails the job: a
            # run must not turn into random search without a word.
            record["error"] = f"{type(err).__name__}: {err}"
            record["latency_s"] = time.perf_counter() - started
            self.calls.append(record)
            return None
        parsed = parse(completion.text)
        record.update(reply=completion.text, parsed=parsed, tokens_in=completion.tokens_in,
                      tokens_out=completion.tokens_out, latency_s=round(completion.latency_s, 4))
        if response_format and getattr(controller, "schema_ok", False):  # still on: the reply was held to it
            record["response_format"] = response_format
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

    def score(self, controller, kind: str, prompt: str, *, prefix: str, options: list[str], listing: list[int],
              slot: int | None = None) -> int:
        """Position (in ``options``) of the option the controller scores highest as the answer after
        ``prompt`` and ``prefix``; every option's score is recorded with the call (ties: the first listed)."""
        scored = controller.score_options(prompt, [f" {option}" for option in options], prefix=prefix)
        best = max(range(len(options)), key=lambda p: scored.logprobs[p])
        self.calls.append({
            "kind": kind, "mode": "scored", "attempt": 0, "slot": slot, "prompt": prompt, "prefix": prefix,
            "listing": listing, "options": options, "scores": [round(x, 4) for x in scored.logprobs],
            "option_tokens": scored.option_tokens, "chosen": options[best], "reply": options[best], "parsed": best,
            "tokens_in": scored.tokens_in, "tokens_out": 0, "latency_s": round(scored.latency_s, 4), "error": None,
        })
        return best

    def totals(self, since: int = 0) -> dict:
        """Calls, tokens and latency of the calls from number ``since`` on (all by default), and the
        questions they asked (a question: its first call and the retries after it) with how many of
        them no reply answered (``fallbacks``: the seeded random choice or summary memory took over)."""
        calls = self.calls[since:]
        answered: list[bool] = []
        for call in calls:
            if call["attempt"] == 0 or not answered:
                answered.append(False)
            answered[-1] = answered[-1] or call["parsed"] is not None
        return {
            "calls": len(calls),
            "tokens_in": sum(c["tokens_in"] for c in calls),
            "tokens_out": sum(c["tokens_out"] for c in calls),
            "latency_s": round(sum(c["latency_s"] for c in calls), 4),
            "questions": len(answered),
            "fallbacks": answered.count(False),
        }


def seeded_rng(seed: int, iteration: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{iteration}:{purpose}")


def action_space(config: dict, pool: Pool, iteration: int | None = None) -> dict[str, list[tuple]]:
    space = {a: combos for a, combos in enumerate_actions(config["action_types"], pool.candidates).items() if combos}
    if not space:
        raise RuntimeError("the action space is empty: every action type lacks a valid combination of objects")
    forced = forced_action(config, iteration) if iteration is not None else None
    if forced is not None:  # config's forced_actions: this iteration's action type is fixed, its objects are not
        if forced not in space:
            raise RuntimeError(f"forced_actions[{iteration - 1}]: {forced!r} has no valid combination of objects "
                               f"in iteration {iteration}")
        space = {forced: space[forced]}
    return space


def without_failed(space: dict[str, list[tuple]], config: dict, pool: Pool, history: list[dict]) -> dict[str, list[tuple]]:
    """``space`` less the recipes whose action failed before: with k = 1 a repeat is allowed (the
    paper's, flagged ``repeat_of``, free in compute), but a failed recipe can only fail again, so
    repeating it wastes the iteration. If every recipe left has failed, the whole space stays (a
    flagged repeat keeps the run going, as when every recipe is known)."""
    failed = {entry["model"] for entry in history if entry.get("status") == "failed"}
    if not failed:
        return space
    kept = {action: [combo for combo in combos
                     if model_id(recipe_for(config, pool.datasets, action, combo)) not in failed]
            for action, combos in space.items()}
    kept = {action: combos for action, combos in kept.items() if combos}
    return kept or space


def forced_action(config: dict, iteration: int) -> str | None:
    """The action type config's ``forced_actions`` fixes for ``iteration`` (1-based), or None."""
    forced = config.get("forced_actions") or []
    return forced[iteration - 1] if iteration - 1 < len(forced) else None


@dataclass
class Round:
    """Choice ``index`` (0-based) of the ``k`` an iteration proposes (k > 1 only).

    ``chosen``: the combinations chosen earlier in this iteration; ``taken``: per action type, the
    combinations built before; ``rejected``: replies that named a combination chosen already or
    built (counted in the step record). Combinations are written with every object, hyper-parameters
    included (a pipeline's text leaves them out), in the words of the candidate lists.
    """

    index: int
    k: int
    chosen: list[str]
    taken: dict[str, list[str]]
    rejected: int = 0

    def note(self, action: str | None = None) -> str:
        return prompts.parallel_note(number=self.index + 1, k=self.k, chosen=self.chosen,
                                     taken=self.taken.get(action, []) if action else [])

    def purpose(self, name: str) -> str:
        """The seeded fallback's purpose: choice 0 draws as with k = 1, the others each their own."""
        return name if self.index == 0 else f"{name}:{self.index}"


def propose(*, iteration: int, config: dict, pool: Pool, history: list[dict], memory: str, controller,
            store: RecipeStore, log: CallLog) -> dict:
    """Choose the next step and return its proposal record (recipe saved to ``store``): the paper's k = 1."""
    pool.name_made_models(history)
    space = without_failed(action_space(config, pool, iteration), config, pool, history)
    rng = seeded_rng(config["seed"], iteration, "random-controller")
    action, combo, fallback = _choose(space, iteration=iteration, config=config, pool=pool, history=history,
                                      memory=memory, controller=controller, log=log, rng=rng, round_=None)
    return _record(iteration, action, combo, fallback, config=config, pool=pool, history=history, store=store,
                   log=log)


def propose_many(*, k: int, iteration: int, config: dict, pool: Pool, history: list[dict], memory: str, controller,
                 store: RecipeStore, log: CallLog) -> list[dict]:
    """Choose ``k`` distinct steps to run in parallel (``proposals_per_iteration``).

    Each choice is a round of type and object selection told what this iteration chose already; a
    recipe chosen already or built before (initial models, earlier steps) is rejected: asked again,
    then replaced by a seeded random choice among the remaining new recipes (counted as a fallback).
    Fewer than k come back only when fewer new recipes remain; when none remains at all, one known
    recipe is proposed and flagged as a repeat, as with k = 1. ``k = 1`` is :func:`propose`.
    """
    if k == 1:
        return [propose(iteration=iteration, config=config, pool=pool, history=history, memory=memory,
                        controller=controller, store=store, log=log)]
    pool.name_made_models(history)
    space = action_space(config, pool, iteration)
    ids = {action: [model_id(recipe_for(config, pool.datasets, action, combo)) for combo in combos]
           for action, combos in space.items()}
    known = {entry["model"] for entry in history}
    # What the object prompt lists as built, per action type, in the words of its candidates.
    built = {action: [_combo_text(action, c, pool) for c, mid in zip(combos, ids[action]) if mid in known]
             for action, combos in space.items()}
    rng = seeded_rng(config["seed"], iteration, "random-controller")
    records: list[dict] = []
    chosen: list[str] = []
    for index in range(k):
        taken = known | {r["model"] for r in records}
        remaining = {action: [c for c, mid in zip(combos, ids[action]) if mid not in taken]
                     for action, combos in space.items()}
        remaining = {action: combos for action, combos in remaining.items() if combos}
        round_ = Round(index=index, k=k, chosen=list(chosen), taken=built)
        if not remaining:
            if records:
                break
            # Every recipe is known: one flagged repeat keeps the iteration going, asked as with k = 1.
            remaining, round_ = space, None
        first_call = len(log.calls)
        action, combo, fallback = _choose(remaining, iteration=iteration, config=config, pool=pool, history=history,
                                          memory=memory, controller=controller, log=log, rng=rng, round_=round_)
        record = _record(iteration, action, combo, fallback, config=config, pool=pool, history=history, store=store,
                         log=log, since=first_call, index=index)
        records.append({"iteration": iteration, "index": index, **record,
                        "rejected": round_.rejected if round_ else 0})
        chosen.append(_combo_text(action, combo, pool))
    return records


def _combo_text(action: str, combo: tuple, pool: Pool) -> str:
    """A combination as the object prompt names its candidates: ``sft(tiny, arith, 0.001)``."""
    return f"{action}({', '.join(pool.label(value) for value in combo)})"


def _record(iteration, action, combo, fallback, *, config, pool, history, store, log, since: int = 0,
            index: int | None = None) -> dict:
    recipe = recipe_for(config, pool.datasets, action, combo)
    mid = model_id(recipe)
    store.save(recipe)
    repeat_of = next((h["iteration"] for h in history if h["model"] == mid), None)
    object_types = config["action_types"][action]
    return {
        "iteration": iteration,
        "model": mid,
        # One name per model: a repeat keeps the name it was first given, a new model its step's.
        "name": pool.label(mid) if pool.label(mid) != mid else made_name(iteration, index),
        "action": action,
        "objects": {slot.name: pool.label(value) if slot.kind == "model" else value
                    for slot, value in zip(ACTIONS[action].slots, combo)},
        "object_types": object_types,
        "pipeline": pipeline_text(mid, store, pool.labels),
        "pipeline_full": pipeline_text(mid, store, pool.labels, full=True),
        "recipe": recipe,
        "repeat_of": repeat_of,
        "controller": config["controller"]["type"],
        "forced_action": forced_action(config, iteration) is not None,
        "fallback": fallback,
        "calls": log.totals(since),
    }


def listing(n: int, config: dict, iteration: int, purpose: str) -> list[int]:
    """The order ``n`` candidates are listed in (``listing[p]``: the candidate at position p).

    ``controller.shuffle``: a seeded permutation per call, against a bias towards the first lines
    (the answer is mapped back; the permutation is recorded with the call).
    """
    order = list(range(n))
    if config["controller"]["shuffle"]:
        seeded_rng(config["seed"], iteration, f"listing:{purpose}").shuffle(order)
    return order


def scores_choices(controller, settings: dict) -> bool:
    """``controller.choice: scored`` on a controller that can score a closed set (the local one)."""
    return settings["choice"] == "scored" and hasattr(controller, "score_options")


def uses_schema(controller, settings: dict) -> bool:
    """``controller.choice: scored`` on an endpoint that answers with JSON-schema structured output."""
    return settings["choice"] == "scored" and getattr(controller, "schema_ok", False)


def structured_request(controller, settings: dict, kind: str, properties: dict[str, list[int]]) -> dict:
    """The ask's arguments: a JSON schema of the allowed numbers (no stop string: JSON may span
    lines; room for the JSON), or the text path's."""
    if not uses_schema(controller, settings):
        return {"max_tokens": settings["max_tokens"][kind], "stop": settings["stop"]}
    return {"max_tokens": max(settings["max_tokens"][kind], 16 + 8 * len(properties)), "stop": None,
            "response_format": json_schema_format(kind, properties)}


def note_structured(controller, log: CallLog, first_call: int) -> None:
    """The endpoint turned structured output off during these calls: say why, once."""
    take = getattr(controller, "take_structured_note", None)
    note = take() if take else None
    if note and first_call < len(log.calls):
        log.calls[first_call]["structured_off"] = note


def _choose(space, *, iteration, config, pool, history, memory, controller, log, rng, round_: Round | None):
    """(action, objects, fallback flags) of one choice among ``space``."""
    action_types = list(space)
    fallback = {"type_selection": False, "object_selection": False}
    if controller is None:  # random controller: uniform over all enumerated actions
        flat = [(action, combo) for action in action_types for combo in space[action]]
        action, combo = rng.choice(flat)
        return action, combo, fallback
    if forced_action(config, iteration) is not None:  # the type is fixed by config: only the objects are asked
        action = action_types[0]
        combo = _select_objects(action, config, pool, space[action], memory, controller, log, fallback, iteration,
                                round_, history)
        return action, combo, fallback
    settings = config["controller"]
    purpose = round_.purpose("type") if round_ else "type"
    order = listing(len(action_types), config, iteration, purpose)
    listed = [action_types[i] for i in order]
    scored = scores_choices(controller, settings)
    prompt = prompts.type_selection(eval_tasks=config["eval_tasks"], memory=memory, history=history,
                                    action_types=listed, counts={a: len(space[a]) for a in action_types},
                                    parallel=round_.note() if round_ else None, answer="name" if scored else "number")
    if scored:  # every listed type has an allowed combination: the answer is valid by construction
        position = log.score(controller, "type_selection", prompt, prefix=prompts.TYPE_ANSWER, options=listed,
                             listing=order)
        return _finish_type(listed[position], space, config, pool, memory, controller, log, fallback, iteration,
                            round_, history)
    n_types = len(action_types)
    prefix = "I choose action number"

    def parse(reply: str):  # a structured reply, else the text one
        picked = parse_json_numbers(reply, ["action"], [n_types])
        return picked[0] if picked else parse_choice(reply, n_types)

    retry = Retry(hint=f"Reply with the number of the action only (1 to {n_types}).", prefix=prefix,
                  parse=lambda reply: parse_json_numbers(reply, ["action"], [n_types]) and parse(reply)
                  or parse(answer_after(prefix, reply, ":.,\n")))
    first_call = len(log.calls)
    request = structured_request(controller, settings, "type_selection", {"action": list(range(1, n_types + 1))})
    position = log.ask_until_parsed(controller, "type_selection", prompt, retries=settings["retries"], parse=parse,
                                    retry=retry, **request)
    note_structured(controller, log, first_call)
    for call in log.calls[first_call:]:
        call["listing"] = order
    if position is None:
        fallback["type_selection"] = True
        action = action_types[seeded_rng(config["seed"], iteration, purpose).randrange(len(action_types))]
    else:
        action = listed[position]
    return _finish_type(action, space, config, pool, memory, controller, log, fallback, iteration, round_, history)


def _finish_type(action, space, config, pool, memory, controller, log, fallback, iteration, round_, history):
    combo = _select_objects(action, config, pool, space[action], memory, controller, log, fallback, iteration,
                            round_, history)
    return action, combo, fallback


def _select_objects(action, config, pool, combos, memory, controller, log, fallback, iteration,
                    round_: Round | None = None, history: list[dict] = ()) -> tuple:
    """Ask for the objects of the open slots; a slot with one candidate is filled, not asked.

    ``combos`` are the choices allowed (with k > 1, those not taken yet); a reply naming another
    valid combination is rejected like an unparsable one.
    """
    settings = config["controller"]
    object_types = config["action_types"][action]
    candidate_lists = [pool.candidates[t] for t in object_types]
    specs = ACTIONS[action].slots
    open_slots = [i for i, values in enumerate(candidate_lists) if len(values) > 1]
    if not open_slots:
        return tuple(combos[0])
    purpose = round_.purpose(f"objects:{action}") if round_ else f"objects:{action}"
    orders = {i: listing(len(candidate_lists[i]), config, iteration, f"{purpose}:{i}") for i in open_slots}
    listed = {i: [candidate_lists[i][j] for j in orders[i]] for i in open_slots}
    # Beside each model its pipeline and score, so that "the best model so far" names a candidate.
    known = {h["model"]: h for h in history if h.get("status") != "failed"}
    slots = [(specs[i].describe, [prompts.candidate_text(pool.label(v), known.get(v) if specs[i].kind == "model"
                                                         else None) for v in listed[i]]) for i in open_slots]
    fixed = [(specs[i].describe, pool.label(candidate_lists[i][0])) for i in range(len(candidate_lists))
             if i not in open_slots]
    scored = scores_choices(controller, settings)
    prompt = prompts.object_selection(action=action, slots=slots, memory=memory, fixed=fixed,
                                      parallel=round_.note(action) if round_ else None, history=history,
                                      answer="name" if scored else "number")
    if scored:
        return _score_objects(prompt, candidate_lists, open_slots, listed, orders, combos, pool, controller, log)

    sizes = [len(candidate_lists[i]) for i in open_slots]
    keys = [f"slot_{number}" for number in range(1, len(open_slots) + 1)]

    def parse(reply: str):  # a structured reply, else the text one
        picked = parse_json_numbers(reply, keys, sizes) or parse_objects(reply, sizes)
        if picked is None:
            return None
        chosen = {i: listed[i][p] for i, p in zip(open_slots, picked)}
        combo = tuple(chosen.get(i, values[0]) for i, values in enumerate(candidate_lists))
        if combo in combos:
            return combo
        if round_ is not None and is_valid_combination(action, combo):
            round_.rejected += 1  # a valid combination, but chosen already or built before
        return None  # e.g. a merge of a model with itself

    hint = f"Reply with {len(slots)} numbers in double square brackets, one per slot."
    if round_ is not None:
        hint = f"Reply with {len(slots)} numbers in double square brackets, one per slot, for a new combination."
    retry = Retry(hint=hint, prefix="[[", parse=lambda reply: parse(reply) if parse_json_numbers(reply, keys, sizes)
                  else parse("[[" + answer_after("[[", reply, "]") + "]]"))
    first_call = len(log.calls)
    # Each slot's enum holds only the positions of values some allowed combination uses.
    properties = {key: [p + 1 for p, value in enumerate(listed[i]) if any(c[i] == value for c in combos)]
                  for key, i in zip(keys, open_slots)}
    request = structured_request(controller, settings, "object_selection", properties)
    combo = log.ask_until_parsed(controller, "object_selection", prompt, retries=settings["retries"], parse=parse,
                                 retry=retry, **request)
    note_structured(controller, log, first_call)
    for call in log.calls[first_call:]:
        call["listing"] = [orders[i] for i in open_slots]
    if combo is None:
        fallback["object_selection"] = True
        combo = seeded_rng(config["seed"], iteration, purpose).choice(combos)
    return tuple(combo)


def _score_objects(prompt, candidate_lists, open_slots, listed, orders, combos, pool, controller, log) -> tuple:
    """The objects by the controller's own scores, slot by slot, each among the values that still
    complete to an allowed combination: valid by construction (no self-merge; with k > 1, nothing
    chosen already or built before).

    Slot by slot, not jointly: joint scoring costs the product of the slot sizes (n^2 combinations for
    a merge of n models, 10^4 after 100 made models) where slot by slot costs their sum; and it is how
    the model would write the answer itself (constrained greedy decoding): each slot is scored after
    the answers to the slots before it, so a merge's second model is chosen knowing the first.
    """
    chosen: dict[int, object] = {}
    answer = ""
    for number, i in enumerate(open_slots, start=1):
        allowed = {combo[i] for combo in combos if all(combo[j] == value for j, value in chosen.items())}
        positions = [p for p, value in enumerate(listed[i]) if value in allowed]
        prefix = answer + prompts.slot_answer(number)
        if len(positions) == 1:  # the slots before leave one value: nothing to choose
            chosen[i] = listed[i][positions[0]]
        else:
            labels = [pool.label(listed[i][p]) for p in positions]
            picked = log.score(controller, "object_selection", prompt, prefix=prefix, options=labels,
                               listing=orders[i], slot=number)
            chosen[i] = listed[i][positions[picked]]
        answer = f"{prefix} {pool.label(chosen[i])}\n"
    return tuple(chosen.get(i, values[0]) for i, values in enumerate(candidate_lists))
