"""The selection logic with a scripted controller (the real LLMs are in the end-to-end tests)."""

import re

import pytest

from lamdagent.actions.recipe import make_recipe
from lamdagent.agent.controller import Completion, ControllerRejected, ControllerUnavailable
from lamdagent.agent.memory import update_memory
from lamdagent.agent.objects import Pool, recipe_for
from lamdagent.agent.parsing import parse_choice, parse_objects
from lamdagent.agent.prompts import memory_update, object_selection, type_selection
from lamdagent.agent.propose import CallLog, action_space, propose, seeded_rng
from lamdagent.store.recipes import RecipeStore, model_id


class Scripted:
    """Answers with the given replies in order; raising an exception for an Exception item. Past the
    last reply it is an endpoint that stopped answering (the fallback takes over)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def complete(self, prompt, *, max_tokens, stop=None, prefix=None):
        self.prompts.append(prompt)
        if not self.replies:
            raise ControllerUnavailable(1, ["no scripted reply left"])
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return Completion(text=(prefix or "") + reply, tokens_in=len(prompt.split()), tokens_out=len(reply.split()), latency_s=0.01)


def config():
    return {
        "seed": 7,
        # The scripted replies answer in text, by the listed numbers: no scoring, no shuffling.
        "controller": {"type": "transformers", "retries": 1, "stop": ["\n"], "choice": "text", "shuffle": False,
                       "max_tokens": {"type_selection": 8, "object_selection": 8, "memory_update": 40}},
        "memory": {"max_words": 30, "style": "free"},
        "action_types": {"sft": ["models", "sft_dataset", "sft_lr"],
                         "ties_merging": ["base_models", "models", "models", "ties_weights", "ties_density"]},
        "eval_tasks": [{"task": "arith", "metric": "exact_match"}],
        "training": {"epochs": 1}, "merging": {},
    }


def specialist_recipe(dataset):
    return make_recipe("sft", ("base", dataset, 1e-5), datasets=DATASETS, training={"epochs": 1}, merging={}, seed=7)


def specialist(store: RecipeStore) -> None:
    store.save(specialist_recipe("arith"))
    store.save(specialist_recipe("all"))


DATASETS = {"arith": {"sha256": "1" * 64, "rows": 8}, "all": {"sha256": "2" * 64, "rows": 16}}
SPECIALIST = model_id(specialist_recipe("arith"))
GENERALIST = model_id(specialist_recipe("all"))


def pool():
    return Pool(
        candidates={"base_models": ["base"], "models": ["base", SPECIALIST, GENERALIST], "sft_dataset": ["arith", "all"],
                    "sft_lr": [1e-5], "ties_weights": [[0.5, 0.5]], "ties_density": [0.5]},
        kinds={"base_models": "model", "models": "model", "sft_dataset": "dataset", "sft_lr": "number",
               "ties_weights": "weights", "ties_density": "number"},
        labels={"base": "base", SPECIALIST: "specialist", GENERALIST: "generalist"},
        datasets=DATASETS,
        join_types=["models"], initial_models=["base", SPECIALIST, GENERALIST],
    )


HISTORY = [{"iteration": 0, "model": "base", "pipeline": "base", "status": "done",
            "score": {"s_multi": 0.1, "tasks": {"arith": 0.1}}}]


def run(replies, history=HISTORY, tmp_path=None):
    controller = Scripted(replies)
    log = CallLog()
    specialist(RecipeStore(tmp_path))
    record = propose(iteration=1, config=config(), pool=pool(), history=history, memory="No results yet.",
                     controller=controller, store=RecipeStore(tmp_path), log=log)
    return record, log, controller


def test_parsed_choices_build_the_recipe(tmp_path):
    record, log, _ = run(["I think fine-tuning is best: 1", "[[2, 2]]"], tmp_path=tmp_path)
    assert record["action"] == "sft"
    assert record["objects"] == {"model": "specialist", "dataset": "all", "learning_rate": 1e-5}
    assert record["pipeline"] == "sft(specialist, all)"
    assert record["fallback"] == {"type_selection": False, "object_selection": False}
    assert [c["kind"] for c in log.calls] == ["type_selection", "object_selection"]
    assert (tmp_path / f"{record['model']}.json").exists()
    assert log.totals()["tokens_in"] > 0


def test_unparsable_reply_is_asked_again_then_falls_back(tmp_path):
    record, log, _ = run(["no idea", "still no idea", "[[9, 9, 9]]", "[[i, j, k]]"], tmp_path=tmp_path)
    assert record["fallback"] == {"type_selection": True, "object_selection": True}
    assert len(log.calls) == 4
    again, _, _ = run(["no idea", "still no idea", "[[9, 9, 9]]", "[[i, j, k]]"], tmp_path=tmp_path)
    assert again["model"] == record["model"]  # the fallback is seeded


def test_retry_succeeds_on_second_attempt(tmp_path):
    record, log, _ = run(["hmm", "2", "[[2, 3]]"], tmp_path=tmp_path)
    assert record["action"] == "ties_merging"
    assert record["objects"]["model_a"] == "specialist" and record["objects"]["model_b"] == "generalist"
    assert record["fallback"] == {"type_selection": False, "object_selection": False}
    assert [c["attempt"] for c in log.calls] == [0, 1, 0]


def test_merge_with_the_base_itself_is_rejected(tmp_path):
    record, log, _ = run(["2", "[[1, 2]]", "[[2, 2]]"], tmp_path=tmp_path)
    assert record["action"] == "ties_merging"
    assert record["fallback"]["object_selection"] is True  # both replies merge the base with itself
    assert log.calls[1]["parsed"] is None and log.calls[2]["parsed"] is None


def test_an_unavailable_controller_is_answered_by_the_fallback_a_refusal_fails_the_step(tmp_path):
    # Transient errors past the backoff: recorded, and the seeded fallback answers the type question.
    down = ControllerUnavailable(5, ["APIConnectionError: Connection error."])
    record, log, _ = run([down, down, "[[3, 2]]"], tmp_path=tmp_path)  # [[3, 2]] is valid for sft and ties alike
    assert record["fallback"] == {"type_selection": True, "object_selection": False}
    assert [c["error"] for c in log.calls[:2]] == ["ControllerUnavailable: no reply after 5 attempt(s); last error: "
                                                   "APIConnectionError: Connection error."] * 2
    assert log.calls[2]["error"] is None and log.calls[2]["parsed"] is not None
    assert (log.totals()["questions"], log.totals()["fallbacks"]) == (2, 1)
    assert record["calls"]["questions"] == 2 and record["calls"]["fallbacks"] == 1
    # A refused request (wrong key, model, parameter) or any other error is not random search: it fails.
    for error in (ControllerRejected("the controller endpoint refused the request (HTTP 404)"), ConnectionError("x")):
        with pytest.raises(type(error)):
            run([error, "1", "[[3, 2]]"], tmp_path=tmp_path)


def test_a_known_recipe_is_flagged_as_a_repeat(tmp_path):
    first, _, _ = run(["1", "[[1, 1]]"], tmp_path=tmp_path)
    history = HISTORY + [{"iteration": 1, "model": first["model"], "pipeline": first["pipeline"], "status": "done",
                          "score": {"s_multi": 0.3, "tasks": {"arith": 0.3}}}]
    again, _, _ = run(["1", "[[1, 1]]"], history=history, tmp_path=tmp_path)
    assert again["model"] == first["model"] and again["repeat_of"] == 1


def test_random_controller_is_seeded_and_uniform_over_actions(tmp_path):
    seen = set()
    specialist(RecipeStore(tmp_path))
    for iteration in range(1, 30):
        record = propose(iteration=iteration, config=config(), pool=pool(), history=HISTORY, memory="",
                         controller=None, store=RecipeStore(tmp_path), log=CallLog())
        seen.add(record["action"])
        again = propose(iteration=iteration, config=config(), pool=pool(), history=HISTORY, memory="",
                        controller=None, store=RecipeStore(tmp_path), log=CallLog())
        assert again["model"] == record["model"]
    assert seen == {"sft", "ties_merging"}


def test_prompts_are_the_papers_g_type_and_g_obj():
    """The paper's two-step selection (arXiv 2505.21963, section 3): a_type = Agent(g_type(m, l_type)),
    a_obj = Agent(g_obj(m, l_obj, a_type)); the memory then rewritten from m and the new result."""
    memory = "SFT on arith lifted arith; merging is untried."
    prompt = type_selection(eval_tasks=config()["eval_tasks"], memory=memory, history=HISTORY,
                            action_types=["ties_merging", "sft"], counts={"sft": 4, "ties_merging": 1})
    assert f"Your memory:\n{memory}\n" in prompt  # m
    # l_type, numbered in the order the reply's number is read against, each with its choices.
    assert re.findall(r"^(\d+)\. (\w+): .* \((\d+) possible choices\)$", prompt, re.M) == [
        ("1", "ties_merging", "1"), ("2", "sft", "4")]
    assert "arith (exact_match)" in prompt and "- base: score 0.100 (arith 0.10)" in prompt  # the goal, the results
    assert prompt.rstrip().endswith("provide the number of the action you choose at the end.")
    assert parse_choice("Merging is untried, so 1", 2) == 0  # what it asks for is what is parsed

    objects = object_selection(action="sft", slots=[("the model", ["base", "sft(base, arith)"]),
                                                    ("the dataset", ["arith", "all"])], memory=memory)
    assert objects.startswith("You chose the action sft: ")  # a_type
    assert f"Your memory:\n{memory}" in objects  # m
    slots = re.findall(r"^Slot (\d+), ([^:]+):\n((?:\d+\. .+\n?)+)", objects, re.M)  # l_obj, numbered per slot
    assert [(n, what, re.findall(r"^\d+\. (.+)$", listed, re.M)) for n, what, listed in slots] == [
        ("1", "the model", ["base", "sft(base, arith)"]), ("2", "the dataset", ["arith", "all"])]
    assert "Models generated in earlier iterations are as promising as the initial ones." in objects
    assert objects.rstrip().endswith("in double square brackets, like [[a, b]].")  # letters: nothing to copy
    assert parse_objects("I take [[2, 1]]", [2, 2]) == [1, 0]

    new = {"iteration": 1, "model": "sft-x", "pipeline": "sft(base, all)", "status": "done",
           "score": {"s_multi": 0.4, "tasks": {"arith": 0.4}}, "repeat_of": None}
    rewrite = memory_update(eval_tasks=config()["eval_tasks"], memory=memory, history=HISTORY, new=new, note="",
                            max_words=30)
    assert f"Previous memory:\n{memory}" in rewrite and "- m1 = sft(base, all): score 0.400 (arith 0.40)" in rewrite
    assert "at most 30 words" in rewrite


def test_slots_with_one_candidate_are_filled_not_asked(tmp_path):
    record, log, controller = run(["1", "[[3, 1]]"], tmp_path=tmp_path)
    assert record["objects"] == {"model": "generalist", "dataset": "arith", "learning_rate": 1e-5}
    assert "The learning rate: 1e-05 (the only candidate)" in controller.prompts[1]
    assert "Slot 3" not in controller.prompts[1]


def test_memory_update_uses_the_reply_or_counts_the_fallback():
    new = {"iteration": 1, "model": "sft-x", "pipeline": "sft(base, all)", "status": "done",
           "score": {"s_multi": 0.4, "tasks": {"arith": 0.4}}, "repeat_of": None}
    text, fallback = update_memory(config=config(), memory="old", history=HISTORY, new=new,
                                   controller=Scripted(["SFT on all helped a lot; try merging next."]), log=CallLog())
    assert text.startswith("SFT on all helped") and fallback is False
    text, fallback = update_memory(config=config(), memory="old", history=HISTORY, new=new,
                                   controller=Scripted(["", "  "]), log=CallLog())
    assert fallback is True and "sft(base, all)" in text
    repeat = dict(new, repeat_of=1)
    controller = Scripted(["Repeating did not help; try something new."])
    update_memory(config=config(), memory="old", history=HISTORY, new=repeat, controller=controller, log=CallLog())
    assert "repeated the recipe of iteration 1" in controller.prompts[0]


@pytest.mark.parametrize("reply,type_parsed", [("", False), ("1", True), ("[[1]]", True), ("nonsense", False),
                                               ("[[2, 1, 1]]", True)])
def test_any_reply_gives_a_valid_action_the_unusable_ones_the_seeded_draw(tmp_path, reply, type_parsed):
    record, log, _ = run([reply] * 4, tmp_path=tmp_path)
    # None of these names two objects: the objects are always the seeded draw; the type is read where
    # the reply holds a number in range (1: sft), else drawn too.
    assert record["fallback"] == {"type_selection": not type_parsed, "object_selection": True}
    space = action_space(config(), pool())
    action = record["action"]
    if type_parsed:
        assert action == "sft"
    else:
        assert action == list(space)[seeded_rng(7, 1, "type").randrange(len(space))]
    combo = seeded_rng(7, 1, f"objects:{action}").choice(space[action])
    assert record["model"] == model_id(recipe_for(config(), pool().datasets, action, combo))
    assert [c["kind"] for c in log.calls] == ["type_selection"] * (1 if type_parsed else 2) + ["object_selection"] * 2


def test_retry_adds_a_reminder_and_starts_the_reply_with_the_answer_format(tmp_path):
    record, log, controller = run(["I'm glad to help!", " 2: ties_merging", "I would pick the first ones",
                                   "2, 3]] and more"], tmp_path=tmp_path)
    assert record["action"] == "ties_merging" and record["fallback"] == {"type_selection": False,
                                                                          "object_selection": False}
    assert log.calls[1]["prefix"] == "I choose action number" and "number of the action only" in controller.prompts[1]
    assert log.calls[3]["prefix"] == "[[" and "2 numbers in double square brackets" in controller.prompts[3]
    assert (record["objects"]["model_a"], record["objects"]["model_b"]) == ("specialist", "generalist")


def test_forced_actions_fix_the_type_and_leave_the_objects_to_the_controller(tmp_path):
    specialist(RecipeStore(tmp_path))
    forced = {**config(), "forced_actions": ["ties_merging"]}
    # An LLM controller is asked for the objects only: no type-selection call.
    controller = Scripted(["[[2, 3]]"])
    log = CallLog()
    record = propose(iteration=1, config=forced, pool=pool(), history=HISTORY, memory="m", controller=controller,
                     store=RecipeStore(tmp_path), log=log)
    assert record["action"] == "ties_merging" and record["forced_action"]
    assert [call["kind"] for call in log.calls] == ["object_selection"]
    # The random controller draws among that type's combinations only; iteration 2 is free again.
    for iteration in range(1, 6):
        record = propose(iteration=iteration, config={**forced, "forced_actions": ["ties_merging"] * 5},
                         pool=pool(), history=HISTORY, memory="m", controller=None, store=RecipeStore(tmp_path),
                         log=CallLog())
        assert record["action"] == "ties_merging"
    free = propose(iteration=2, config=forced, pool=pool(), history=HISTORY, memory="m", controller=None,
                   store=RecipeStore(tmp_path), log=CallLog())
    assert not free["forced_action"]


def test_a_failed_recipe_is_never_offered_again_unless_every_recipe_failed(tmp_path):
    specialist(RecipeStore(tmp_path))
    sft_only = {**config(), "forced_actions": ["sft"] * 40}
    store = RecipeStore(tmp_path)

    def models(history):
        return {propose(iteration=i, config=sft_only, pool=pool(), history=history, memory="", controller=None,
                        store=store, log=CallLog())["model"] for i in range(1, 41)}

    def failed(combo):
        return {"iteration": 1, "model": model_id(recipe_for(sft_only, DATASETS, "sft", combo)), "pipeline": "x",
                "status": "failed", "score": None}

    combos = action_space(sft_only, pool(), 1)["sft"]
    every = models(HISTORY)
    assert len(every) == len(combos)  # the seeded draw reaches every sft recipe in 40 iterations
    diverged = failed(combos[-1])
    assert models(HISTORY + [diverged]) == every - {diverged["model"]}
    # Every recipe failed: the whole space stays, and the step is a flagged repeat.
    all_failed = HISTORY + [failed(combo) for combo in combos]
    record = propose(iteration=2, config=sft_only, pool=pool(), history=all_failed, memory="", controller=None,
                     store=store, log=CallLog())
    assert record["repeat_of"] == 1
