"""Reading the controller's replies. Never raises: a reply either gives a valid choice or None.

Small models wander, so the parsers look for the answer where the prompt asked for it (the number
at the end; the ``[[...]]`` list), check its length and ranges, and give up otherwise.
"""

from __future__ import annotations

import json
import re

# Whole numbers of up to 4 digits, not parts of decimals ("1.5") but allowing a full stop after ("2.").
_INT = re.compile(r"(?<![\d.])(?<!\d\.)\d{1,4}(?!\d)(?!\.\d)")
_BRACKETS = re.compile(r"\[\[([^\[\]]*)\]\]")


def parse_choice(reply: str, n_options: int) -> int | None:
    """0-based index of the option the reply names, or None.

    Prefers a ``[[k]]`` answer, then the last number in range (the prompt asks for it at the end).
    """
    if not isinstance(reply, str) or n_options < 1:
        return None
    for group in reversed(_BRACKETS.findall(reply)):
        numbers = _INT.findall(group)
        if len(numbers) == 1 and 1 <= int(numbers[0]) <= n_options:
            return int(numbers[0]) - 1
    for number in reversed(_INT.findall(reply)):
        if 1 <= int(number) <= n_options:
            return int(number) - 1
    return None


def parse_objects(reply: str, sizes: list[int]) -> list[int] | None:
    """0-based candidate index per slot from a ``[[i, j, k]]`` answer, or None.

    The last bracketed list of the right length with every index in range wins; without brackets,
    a reply that is exactly the right count of numbers is accepted.
    """
    if not isinstance(reply, str) or not sizes:
        return None

    def valid(numbers: list[str]) -> list[int] | None:
        if len(numbers) != len(sizes):
            return None
        picked = [int(x) - 1 for x in numbers]
        return picked if all(0 <= p < size for p, size in zip(picked, sizes)) else None

    for group in reversed(_BRACKETS.findall(reply)):
        picked = valid(_INT.findall(group))
        if picked is not None:
            return picked
    return valid(_INT.findall(reply))


def clean_memory(reply: str, max_words: int) -> str | None:
    """The rewritten memory, cut to ``max_words``; None when the reply holds no words."""
    if not isinstance(reply, str):
        return None
    text = reply.strip().removeprefix("Memory:").strip()
    words = text.split()
    if len(words) < 3 or _loops(words):
        return None
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def _loops(words: list[str], span: int = 6) -> bool:
    """A reply that repeats a run of ``span`` words is a small model stuck in a loop, not a memory."""
    seen = set()
    for start in range(len(words) - span + 1):
        run = tuple(w.lower() for w in words[start:start + span])
        if run in seen:
            return True
        seen.add(run)
    return False


def parse_json_numbers(reply: str, keys: list[str], sizes: list[int]) -> list[int] | None:
    """0-based index per key from a structured-output reply ``{"slot_1": 3, ...}``, or None."""
    if not isinstance(reply, str):
        return None
    try:
        data = json.loads(reply)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    values = [data.get(key) for key in keys]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= n for v, n in zip(values, sizes)):
        return None
    return [v - 1 for v in values]
