"""Property tests of the reply parsers and the selection step: any text gives a valid action or a
counted fallback, never an exception. Derandomized and bounded, so every run checks the same cases."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_agent import config as agent_config
from test_agent import pool, specialist

from lamdagent.actions.registry import enumerate_actions
from lamdagent.agent.controller import Completion
from lamdagent.agent.objects import recipe_for
from lamdagent.agent.parsing import clean_memory, parse_choice, parse_objects
from lamdagent.agent.propose import CallLog, propose
from lamdagent.store.recipes import RecipeStore, model_id

FUZZ = settings(derandomize=True, max_examples=400, deadline=None)

# Text that looks like what a wandering model writes: brackets, numbers, decimals, punctuation,
# plus arbitrary unicode, so the parsers' success paths are reached as well as their refusals.
TOKENS = ["[[", "]]", "[", "]", ",", ", ", " ", "\n", ".", "-", "1", "2", "3", "0", "10", "9999", "12345", "1.5",
          "2.", "Memory:", "sft", "I pick", "answer:"]
replies = st.one_of(
    st.text(max_size=80),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.integers(0, 20000).map(str), st.text(max_size=4)),
             max_size=25).map("".join),
)
no_brackets = st.text(max_size=30).filter(lambda t: "[" not in t and "]" not in t)
# Near-answers, for the selection step: a number or a bracketed list, right or wrong in length and
# range for test_agent's pool (two action types; sft takes 3 objects, ties_merging 5), inside noise.
answers = st.one_of(
    st.sampled_from(["1", "2", "3", "0", "[[1, 2, 1]]", "[[3, 1, 1]]", "[[1, 2, 3, 1, 1]]", "[[1, 3, 2, 1, 1]]",
                     "[[1, 1, 1, 1, 1]]", "[[4, 1, 1]]", "[[1, 2]]"]),
    st.sampled_from([1, 3, 5, 6]).flatmap(lambda n: st.lists(st.integers(0, 3), min_size=n, max_size=n))
    .map(lambda xs: f"[[{', '.join(map(str, xs))}]]"),
)
near_answers = st.tuples(st.text(max_size=10), answers, st.text(max_size=10)).map("".join)


@FUZZ
@given(reply=st.one_of(replies, st.none(), st.integers(), st.binary(max_size=10)), n=st.integers(-2, 30))
def test_parse_choice_never_raises_and_stays_in_range(reply, n):
    choice = parse_choice(reply, n)
    if choice is not None:
        assert 0 <= choice < n
        assert str(choice + 1) in reply  # the number it returns is one the reply wrote


@FUZZ
@given(prefix=replies, suffix=no_brackets, n=st.integers(1, 30), data=st.data())
def test_parse_choice_reads_a_bracketed_answer_whatever_surrounds_it(prefix, suffix, n, data):
    k = data.draw(st.integers(0, n + 1))  # 0 and n + 1 are out of range
    choice = parse_choice(f"{prefix}[[{k}]]{suffix}", n)
    if 1 <= k <= n:
        assert choice == k - 1
    else:
        assert choice is None or 0 <= choice < n


@FUZZ
@given(reply=st.one_of(replies, st.none(), st.integers()), sizes=st.lists(st.integers(-1, 6), max_size=6))
def test_parse_objects_never_raises_and_gives_one_index_per_slot_in_range(reply, sizes):
    picked = parse_objects(reply, sizes)
    if picked is not None:
        assert len(picked) == len(sizes)
        assert all(0 <= p < size for p, size in zip(picked, sizes))


@FUZZ
@given(prefix=replies, suffix=no_brackets, sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6),
       data=st.data())
def test_parse_objects_reads_the_last_bracketed_list(prefix, suffix, sizes, data):
    numbers = [data.draw(st.integers(0, size + 1)) for size in sizes]  # 0 and size + 1 are out of range
    picked = parse_objects(f"{prefix}[[{', '.join(map(str, numbers))}]]{suffix}", sizes)
    if all(1 <= x <= size for x, size in zip(numbers, sizes)):
        assert picked == [x - 1 for x in numbers]
    else:
        assert picked is None or all(0 <= p < size for p, size in zip(picked, sizes))


@FUZZ
@given(reply=st.one_of(replies, st.none(), st.integers()), max_words=st.integers(10, 200))
def test_clean_memory_never_raises_and_keeps_a_prefix_of_the_words(reply, max_words):
    memory = clean_memory(reply, max_words)
    if memory is not None:
        words = memory.split()
        assert 3 <= len(words) <= max_words
        assert words == reply.strip().removeprefix("Memory:").split()[:len(words)]


class Replies:
    """A controller answering with generated text, in order."""

    def __init__(self, texts):
        self.texts = list(texts)

    def complete(self, prompt, *, max_tokens, stop=None, prefix=None):
        text = (prefix or "") + self.texts.pop(0)  # a prefilled reply starts with the prefix, as a local model's
        return Completion(text=text, tokens_in=len(prompt.split()), tokens_out=len(text.split()), latency_s=0.0)


@settings(derandomize=True, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.one_of(near_answers, replies), min_size=4, max_size=4))
def test_any_replies_give_a_valid_action_and_exact_fallback_flags(texts, tmp_path):
    config = agent_config()  # retries: 1, so at most two calls per selection, four in all
    store = RecipeStore(tmp_path)
    specialist(store)
    log = CallLog()
    record = propose(iteration=1, config=config, pool=pool(), history=[], memory="m", controller=Replies(texts),
                     store=store, log=log)

    assert all(c["error"] is None for c in log.calls)  # every call reached the parsers
    space = enumerate_actions(config["action_types"], pool().candidates)
    action_types = [a for a, combos in space.items() if combos]
    by_kind = {kind: [c["parsed"] for c in log.calls if c["kind"] == kind]
               for kind in ("type_selection", "object_selection")}
    for kind, parsed in by_kind.items():
        assert 1 <= len(parsed) <= 2
        assert record["fallback"][kind] == all(p is None for p in parsed)  # counted exactly when nothing parsed
        event(f"{kind} fallback: {record['fallback'][kind]}")  # --hypothesis-show-statistics shows the mix

    # The action is the parsed one when there was one; the objects are an enumerated combination,
    # the parsed one when there was one.
    chosen = next((p for p in by_kind["type_selection"] if p is not None), None)
    if chosen is not None:
        assert record["action"] == action_types[chosen]
    matches = [combo for combo in space[record["action"]]
               if model_id(recipe_for(config, pool().datasets, record["action"], combo)) == record["model"]]
    assert len(matches) == 1
    picked = next((p for p in by_kind["object_selection"] if p is not None), None)
    if picked is not None:
        assert tuple(picked) == matches[0]
