"""Closed-set choice (``controller.choice: scored``), the seeded listing order, and the short names
of the models the agent made (issues 16 and 25)."""

import pytest
from test_agent import DATASETS, GENERALIST, SPECIALIST, Scripted, config, pool, specialist

from lamdagent.actions.recipe import make_recipe
from lamdagent.agent.controller import OptionScores
from lamdagent.agent.prompts import results_block
from lamdagent.agent.propose import CallLog, propose, propose_many
from lamdagent.store.recipes import RecipeStore, model_id

# A model the agent made in iteration 1: in the pool by its hash only, as the workflow adds it.
MADE_RECIPE = make_recipe("sft", (SPECIALIST, "all", 1e-5), datasets=DATASETS, training={"epochs": 1}, merging={},
                          seed=7)
MADE = model_id(MADE_RECIPE)
HISTORY = [
    {"iteration": 0, "model": "base", "name": "base", "pipeline": "base", "status": "done",
     "score": {"s_multi": 0.1, "tasks": {"arith": 0.1}}},
    {"iteration": 1, "model": MADE, "pipeline": "sft(specialist, all)", "status": "done",
     "score": {"s_multi": 0.412, "tasks": {"arith": 0.412}}},
]


def made_pool():
    grown = pool().with_models([MADE])
    assert MADE not in grown.labels  # unlabelled, as in a real run
    return grown


def store_with_made(tmp_path):
    store = RecipeStore(tmp_path)
    specialist(store)
    store.save(MADE_RECIPE)
    return store


class Scorer:
    """A closed-set controller that prefers the options it is told to, in order (a stand-in for the
    model's log-likelihoods, to test what the agent does with them)."""

    def __init__(self, preferred):
        self.preferred = list(preferred)
        self.asked = []

    def score_options(self, prompt, options, *, prefix=""):
        self.asked.append((prefix, [o.strip() for o in options]))
        rank = {name: len(self.preferred) - i for i, name in enumerate(self.preferred)}
        return OptionScores(logprobs=[-10.0 + rank.get(o.strip(), 0) for o in options], option_tokens=[1] * len(options),
                            tokens_in=len(prompt.split()), latency_s=0.0)


def scored_config(**controller):
    base = config()
    return {**base, "controller": {**base["controller"], "choice": "scored", **controller}}


def test_a_made_model_is_named_by_its_step_everywhere_the_agent_reads(tmp_path):
    controller = Scripted(["1", "[[4, 2]]"])
    log = CallLog()
    record = propose(iteration=2, config=config(), pool=made_pool(), history=HISTORY, memory="m", controller=controller,
                     store=store_with_made(tmp_path), log=log)
    objects_prompt = controller.prompts[1]
    assert "4. m1 = sft(specialist, all), score 0.412" in objects_prompt  # its name, pipeline and score
    assert "2. specialist\n" in objects_prompt and MADE not in objects_prompt  # no score known: none shown
    assert "- m1 = sft(specialist, all): score 0.412" in controller.prompts[0]  # the results block
    assert record["objects"]["model"] == "m1" and record["recipe"]["inputs"]["model"] == MADE  # ids unchanged
    assert record["name"] == "m2" and record["pipeline"] == "sft(sft(specialist, all), all)"
    assert "- m1 = sft(specialist, all): score 0.412" in results_block(HISTORY + [dict(record, status="done",
                                                                                       score=HISTORY[1]["score"])])


def test_a_repeat_keeps_the_name_the_model_was_first_given(tmp_path):
    controller = Scripted(["1", "[[2, 2]]"])  # sft(specialist, all): the recipe of m1
    record = propose(iteration=2, config=config(), pool=made_pool(), history=HISTORY, memory="m", controller=controller,
                     store=store_with_made(tmp_path), log=CallLog())
    assert record["model"] == MADE and record["repeat_of"] == 1 and record["name"] == "m1"


def test_k_proposals_are_named_by_step_and_index(tmp_path):
    store = RecipeStore(tmp_path)
    specialist(store)
    records = propose_many(k=2, iteration=3, config=config(), pool=pool(), history=HISTORY[:1], memory="m",
                           controller=None, store=store, log=CallLog())
    assert [r["name"] for r in records] == ["m3.1", "m3.2"]


def test_scored_choice_takes_the_best_allowed_candidate_with_every_score_recorded(tmp_path):
    # The scorer prefers merging the base with itself, which is no valid merge: never offered.
    scorer = Scorer(["ties_merging", "base", "generalist", "specialist"])
    log = CallLog()
    specialist(RecipeStore(tmp_path))
    record = propose(iteration=1, config=scored_config(), pool=pool(), history=HISTORY[:1], memory="m",
                     controller=scorer, store=RecipeStore(tmp_path), log=log)
    assert record["action"] == "ties_merging" and record["fallback"] == {"type_selection": False,
                                                                         "object_selection": False}
    assert (record["objects"]["model_a"], record["objects"]["model_b"]) == ("generalist", "specialist")
    first, second = log.calls  # slot 2 after "generalist" leaves one valid model: nothing to score
    assert first["kind"] == "type_selection" and first["mode"] == "scored" and first["chosen"] == "ties_merging"
    assert len(first["scores"]) == len(first["options"]) == 2
    # Slot 1 offers only the models that can still make a valid merge: the base cannot.
    assert set(second["options"]) == {"specialist", "generalist"} and second["chosen"] == "generalist"
    assert second["prefix"] == "Slot 1:" and second["slot"] == 1
    assert first["prompt"].endswith("Name the action you choose.")
    assert second["prompt"].endswith("Name one candidate per slot, in slot order, one slot per line.")


def test_scored_k_choices_never_repeat_what_was_chosen_or_built(tmp_path):
    scorer = Scorer(["sft", "specialist", "all", "arith"])  # always the same favourite
    store = RecipeStore(tmp_path)
    specialist(store)
    initial = [dict(HISTORY[0])] + [{"iteration": 0, "model": m, "pipeline": n, "name": n, "status": "done",
                                     "score": {"s_multi": 0.2, "tasks": {"arith": 0.2}}}
                                    for m, n in ((SPECIALIST, "specialist"), (GENERALIST, "generalist"))]
    records = propose_many(k=3, iteration=1, config=scored_config(), pool=pool(), history=initial, memory="m",
                           controller=scorer, store=store, log=CallLog())
    models = [r["model"] for r in records]
    assert len(set(models)) == 3 and not set(models) & {SPECIALIST, GENERALIST}
    assert [r["pipeline"] for r in records][:2] == ["sft(specialist, all)", "sft(specialist, arith)"]
    assert all(r["rejected"] == 0 and not any(r["fallback"].values()) for r in records)


def test_candidates_are_listed_in_a_seeded_permutation_and_mapped_back(tmp_path):
    def ask(seed):
        controller = Scripted(["1", "[[1, 1]]"])
        log = CallLog()
        cfg = {**config(), "seed": seed, "controller": {**config()["controller"], "shuffle": True}}
        specialist(RecipeStore(tmp_path))
        record = propose(iteration=1, config=cfg, pool=pool(), history=HISTORY[:1], memory="m", controller=controller,
                         store=RecipeStore(tmp_path), log=log)
        return record, log

    seen = set()
    for seed in range(6):
        record, log = ask(seed)
        type_order = log.calls[0]["listing"]
        assert record["action"] == ["sft", "ties_merging"][type_order[0]]  # "1" is the first line listed
        assert sorted(type_order) == [0, 1]
        assert ask(seed)[0]["model"] == record["model"]  # seeded
        seen.add((tuple(type_order), tuple(map(tuple, log.calls[1]["listing"]))))
    assert len(seen) > 1  # not one fixed order


def test_local_model_scores_with_the_shared_prompt_cache_equal_full_passes(tiny_model_dir):
    import torch

    from lamdagent.agent.controller import TransformersController

    controller = TransformersController(model_dir=str(tiny_model_dir))
    controller.OPTIONS_PER_BATCH = 2  # several batches, uneven lengths
    options = [" sft", " ties_merging", " m1", " specialist-arith"]
    scored = controller.score_options("Pick one.", options, prefix="I choose the action:")
    tok = controller.tokenizer
    context = tok.apply_chat_template([{"role": "user", "content": "Pick one."}], add_generation_prompt=True,
                                      tokenize=False) + "I choose the action:"
    context_ids = tok(context, add_special_tokens=False)["input_ids"]
    for option, value in zip(options, scored.logprobs):
        option_ids = tok(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context_ids + option_ids])
        with torch.inference_mode():
            logp = torch.log_softmax(controller.model(input_ids=ids).logits[0].float(), dim=-1)
        expected = sum(float(logp[len(context_ids) + t - 1, token]) for t, token in enumerate(option_ids))
        assert value == pytest.approx(expected, abs=1e-3)
    assert scored.tokens_in == len(context_ids)


def test_local_controller_chooses_with_no_fallback(tmp_path, tiny_model_dir):
    from lamdagent.agent.controller import make_controller

    controller = make_controller({"type": "transformers"}, model_dir=str(tiny_model_dir), seed=7)
    store = RecipeStore(tmp_path)
    specialist(store)
    log = CallLog()
    records = propose_many(k=3, iteration=1, config=scored_config(shuffle=True), pool=pool(), history=HISTORY[:1],
                           memory="m", controller=controller, store=store, log=log)
    assert len({r["model"] for r in records}) == 3
    assert all(not any(r["fallback"].values()) for r in records)
    assert all(c["mode"] == "scored" and len(c["scores"]) == len(c["options"]) > 1 and c["listing"] for c in log.calls)
    # A later slot is scored after the answers to the slots before it.
    assert any(c["prefix"].startswith("Slot 1: ") and c["prefix"].endswith("\nSlot 2:") for c in log.calls)


# ---- structured memory ------------------------------------------------------------------------

STEP = {"iteration": 2, "model": "sft-" + "c" * 16, "name": "m2", "pipeline": "sft(sft(specialist, all), all)",
        "status": "done", "repeat_of": None, "score": {"s_multi": 0.3, "tasks": {"arith": 0.3}},
        "recipe": {"action": "sft", "inputs": {"model": MADE, "dataset": {"name": "all"}}}}
MADE_STEP = dict(HISTORY[1], name="m1", repeat_of=None,
                 recipe={"action": "sft", "inputs": {"model": SPECIALIST, "dataset": {"name": "all"}}})
MEMORY_HISTORY = [HISTORY[0], {"iteration": 0, "model": SPECIALIST, "name": "specialist", "pipeline": "specialist",
                               "status": "done", "score": {"s_multi": 0.2, "tasks": {"arith": 0.2}}}, MADE_STEP]


def memory_config(choice):
    base = config()
    return {**base, "memory": {"max_words": 30, "style": "structured"},
            "controller": {**base["controller"], "choice": choice}}


def test_structured_memory_takes_the_numbers_from_the_records_and_the_judgement_from_scores():
    from lamdagent.agent.memory import update_memory

    scorer = Scorer(["ties_merging", "m1"])
    log = CallLog()
    text, fallback = update_memory(config=memory_config("scored"), memory="old", history=MEMORY_HISTORY, new=STEP,
                                   controller=scorer, log=log)
    lines = text.splitlines()
    assert fallback is False
    assert lines[0].startswith("Best so far: m1 = sft(specialist, all) (score 0.412).")
    assert "Helped: m1 = sft(specialist, all) (+0.212 on its best input)." in lines
    assert "Hurt: m2 = sft(sft(specialist, all), all) (-0.112 on its best input)." in lines
    assert lines[-2] == "Try next: ties_merging (" + lines[-2].split("(", 1)[1]
    assert lines[-1] == "Build on: m1 = sft(specialist, all)"
    assert [c["kind"] for c in log.calls] == ["memory_update", "memory_update"]
    assert log.calls[1]["prefix"].startswith("Try next: ties_merging\nBuild on:")
    assert set(log.calls[1]["options"]) == {"base", "specialist", "m1", "m2"}


def test_structured_memory_in_text_counts_an_unparsable_judgement_and_keeps_the_facts():
    from lamdagent.agent.memory import update_memory

    log = CallLog()
    text, fallback = update_memory(config=memory_config("text"), memory="old", history=MEMORY_HISTORY, new=STEP,
                                   controller=Scripted(["no idea", "none", "2", "2"]), log=log)
    assert fallback is True and "Try next" not in text  # the first judgement failed twice: left out
    assert text.splitlines()[-1].startswith("Build on: ") and "Hurt: m2" in text


# ---- structured outputs from an endpoint --------------------------------------------------------

UNSUPPORTED = "400:response_format of type json_schema is not supported by this server"


@pytest.mark.slow
def test_auto_structured_turns_to_text_for_the_rest_of_the_job_on_a_400_saying_unsupported(
        tmp_path, tiny_model_dir, monkeypatch):
    """The real `transformers serve` behind the fault proxy, which answers the first request as a
    server without structured outputs does (vLLM and others word it alike)."""
    from conftest import ServedModel
    from test_faults import FaultProxy

    from lamdagent.agent.controller import OpenAIController

    monkeypatch.setenv("LAMDAGENT_CHOICE_KEY", "sk-choice-test")
    server = ServedModel(tiny_model_dir, tmp_path / "serve").start()
    try:
        with FaultProxy(server.port, delay_s=1) as proxy:
            llm = OpenAIController(model=str(tiny_model_dir), api_key_env="LAMDAGENT_CHOICE_KEY", base_url=proxy.url,
                                   timeout_s=120, backoff={"attempts": 1}, structured="auto")
            assert llm.schema_ok
            proxy.inject(UNSUPPORTED)
            store = RecipeStore(tmp_path)
            specialist(store)
            log = CallLog()
            cfg = scored_config()
            cfg["controller"]["type"] = "openai"
            propose(iteration=1, config=cfg, pool=pool(), history=HISTORY[:1], memory="m", controller=llm,
                    store=store, log=log)
            assert proxy.seen[0] == UNSUPPORTED and set(proxy.seen[1:]) == {"forwarded"}
    finally:
        server.stop()
    assert not llm.schema_ok
    noted = [c for c in log.calls if "structured_off" in c]
    assert len(noted) == 1 and "not supported" in noted[0]["structured_off"] and noted[0] is log.calls[0]
    assert log.calls[0]["error"] is None and log.calls[0]["reply"] is not None  # answered in text at once


class SchemaScripted(Scripted):
    """An endpoint-like controller (structured outputs on) that answers in order and keeps each
    request's response_format."""

    schema_ok = True

    def __init__(self, replies):
        super().__init__(replies)
        self.formats = []

    def complete(self, prompt, *, max_tokens, stop=None, prefix=None, response_format=None):
        self.formats.append((response_format, stop))
        return super().complete(prompt, max_tokens=max_tokens, stop=stop, prefix=None)


def test_an_endpoint_is_asked_for_json_with_enums_of_the_allowed_numbers_only(tmp_path):
    llm = SchemaScripted(['{"action": 2}', '{"slot_1": 3, "slot_2": 2}'])
    specialist(RecipeStore(tmp_path))
    log = CallLog()
    record = propose(iteration=1, config=scored_config(), pool=pool(), history=HISTORY[:1], memory="m",
                     controller=llm, store=RecipeStore(tmp_path), log=log)
    assert record["action"] == "ties_merging" and not any(record["fallback"].values())
    assert (record["objects"]["model_a"], record["objects"]["model_b"]) == ("generalist", "specialist")
    (type_format, type_stop), (objects_format, _) = llm.formats
    assert type_stop is None  # JSON may span lines
    assert type_format["json_schema"]["schema"]["properties"] == {"action": {"type": "integer", "enum": [1, 2]}}
    # The base can be neither merged model: its number (1) is in no enum.
    assert objects_format["json_schema"]["schema"]["properties"] == {
        "slot_1": {"type": "integer", "enum": [2, 3]}, "slot_2": {"type": "integer", "enum": [2, 3]}}
    assert objects_format["json_schema"]["schema"]["required"] == ["slot_1", "slot_2"]
    # Each call records the schema its reply was held to.
    assert [call["response_format"] for call in log.calls] == [type_format, objects_format]


class SchemaRefused(SchemaScripted):
    """An endpoint whose server turns structured output off on the first request (`auto` on a 400)."""

    def complete(self, prompt, *, max_tokens, stop=None, prefix=None, response_format=None):
        self.schema_ok = False
        return super().complete(prompt, max_tokens=max_tokens, stop=stop, prefix=prefix)


def test_a_call_answered_in_text_after_the_schema_was_refused_records_no_schema():
    log = CallLog()
    parsed = log.ask(SchemaRefused(["2"]), "type_selection", "p", max_tokens=8, stop=None, parse=int, attempt=0,
                     response_format={"type": "json_schema"})
    assert parsed == 2 and "response_format" not in log.calls[0]
