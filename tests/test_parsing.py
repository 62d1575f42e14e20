import pytest

from lamdagent.agent.parsing import clean_memory, parse_choice, parse_objects


@pytest.mark.parametrize("reply,n,expected", [
    ("I will fine-tune again. 2", 2, 1),
    ("Action 1 worked before, so this time I choose 2.", 2, 1),
    ("[[1]] is my answer", 3, 0),
    ("The answer is [[2]] not 3", 3, 1),
    ("3", 2, None),  # out of range
    ("", 2, None),
    ("no idea", 2, None),
    ("0", 2, None),
    ("1.5", 2, None),
    ("I choose 12345", 2, None),
])
def test_parse_choice(reply, n, expected):
    assert parse_choice(reply, n) == expected


@pytest.mark.parametrize("reply,sizes,expected", [
    ("[[1, 2, 1]]", [3, 2, 1], [0, 1, 0]),
    ("I pick [[3,1,1]].", [3, 2, 1], [2, 0, 0]),
    ("[[a, b, c]] means [[2, 2, 1]]", [3, 2, 1], [1, 1, 0]),
    ("2, 1, 1", [3, 2, 1], [1, 0, 0]),
    ("[[4, 1, 1]]", [3, 2, 1], None),   # index out of range
    ("[[1, 1]]", [3, 2, 1], None),       # too short
    ("[[1, 1, 1, 1]]", [3, 2, 1], None),  # too long
    ("[[i, j, k]]", [3, 2, 1], None),    # the prompt's example copied
    ("nothing", [3], None),
    ("[[0, 1, 1]]", [3, 2, 1], None),
])
def test_parse_objects(reply, sizes, expected):
    assert parse_objects(reply, sizes) == expected


@pytest.mark.parametrize("garbage,choice,objects,memory", [
    ("\x00\x01", None, None, None),
    ("[[[[", None, None, None),
    ("]]]][[", None, None, None),
    ("[[1,,,2]]", 1, [0, 1], None),  # the numbers are read through the stray commas
    ("1" * 5000, None, None, None),  # one huge number: out of range, not an overflow
    ("[[" * 300, None, None, None),
    ("🙂 [[ 1 ]] 🙂", 0, None, "🙂 [[ 1 ]] 🙂"),  # one number: a choice, not two objects; five "words"
    (None, None, None, None),
    (42, None, None, None),
])
def test_garbage_never_raises_and_gives_no_made_up_answer(garbage, choice, objects, memory):
    assert parse_choice(garbage, 3) == choice
    assert parse_objects(garbage, [2, 2]) == objects
    assert clean_memory(garbage, 10) == memory


def test_clean_memory_cuts_words_and_rejects_empty():
    assert clean_memory("Memory: sft on all helps; try merging it with the arith specialist", 5) == \
        "sft on all helps; try"
    assert clean_memory("  ", 10) is None
    assert clean_memory("ok", 10) is None


def test_a_looping_reply_is_not_a_memory():
    loop = "The previous memory was: No results yet. Rewrite it in at most 80 words: " * 3
    assert clean_memory(loop, 80) is None
    memory = "SFT on all lifted every task; merging the context and arith specialists is next."
    assert clean_memory(memory, 80) == memory
