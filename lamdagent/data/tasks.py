"""Three small synthetic tasks mirroring LaMDAgent's Experiment 1 (GSM8k, CommonsenseQA, TriviaQA).

Each task has its own answer format (a worked solution ending "The answer is N.", a letter in
``[[X]]``, a bare short phrase), so fine-tuning on one task teaches a format that hurts the others,
as the paper observes. The ``ood`` split uses other templates and other numbers / vocabulary.

Splits of one task never share a prompt: every in-distribution prompt is assigned to exactly one
of train/val/test by a stable hash of its text (independent of the seed), and OOD prompts come
from templates the other splits never use.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Callable

from lamdagent.store.fileio import write_jsonl

TASKS = ("arith", "choice", "context")
# Tasks with a generated wrong answer, for preference data (DPO): the right completion is chosen.
PREFERENCE_TASKS = ("arith", "choice")
SPLITS = ("train", "val", "test", "ood")

# Buckets of sha256(prompt) % 10 owned by each in-distribution split.
_SPLIT_BUCKETS = {"train": range(0, 6), "val": range(6, 8), "test": range(8, 10)}

# Record = (prompt, completion, answer)
Example = tuple[str, str, str]


def _bucket(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 10


# --------------------------------------------------------------------------------------------
# arith: 2-3 step word problems
# --------------------------------------------------------------------------------------------

_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ida", "Jack",
          "Lena", "Max", "Nora", "Oscar", "Paula", "Sam", "Tina", "Victor"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "stamps", "shells", "cards",
          "buttons", "books"]
_OOD_NAMES = ["Mr. Patel", "Mrs. Okafor", "Dr. Lindqvist", "Ms. Romero", "Mr. Kowalski",
              "Mrs. Tanaka", "Dr. Haddad", "Ms. Fischer"]
_OOD_GOODS = ["notebooks", "lamps", "tickets", "chairs", "plants", "jackets", "mugs", "bikes"]

_ARITH_INSTR = "\nSolve it step by step and give the final answer as a number."


def _arith_in(rng: random.Random) -> Example:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(3, 20), rng.randint(2, 15)
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
             f"How many {item} does {name} have now?")
        s1, ans = a + b, a + b - c
        sol = f"{name} starts with {a}. After getting {b} more: {a} + {b} = {s1}. After giving away {c}: {s1} - {c} = {ans}."
    elif kind == 1:
        a, d = rng.randint(2, 12), rng.randint(2, 7)
        c = rng.randint(1, a * d - 1)
        q = (f"{name} collects {a} {item} every day for {d} days, then loses {c} of them. "
             f"How many {item} does {name} have left?")
        s1, ans = a * d, a * d - c
        sol = f"In {d} days {name} collects {a} x {d} = {s1}. After losing {c}: {s1} - {c} = {ans}."
    elif kind == 2:
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
        q = (f"There are {a} boxes with {b} {item} in each box. {name} adds {c} more {item}. "
             f"How many {item} are there in total?")
        s1, ans = a * b, a * b + c
        sol = f"The boxes hold {a} x {b} = {s1}. Adding {c}: {s1} + {c} = {ans}."
    else:
        k, per, c = rng.randint(2, 6), rng.randint(2, 10), rng.randint(1, 9)
        a = k * per
        q = (f"{name} shares {a} {item} equally among {k} friends. One friend already had {c} {item}. "
             f"How many {item} does that friend have now?")
        ans = per + c
        sol = f"Each friend gets {a} / {k} = {per}. That friend has {per} + {c} = {ans}."
    return q + _ARITH_INSTR, f"{sol} The answer is {ans}.", str(ans)


def _arith_ood(rng: random.Random) -> Example:
    name, good = rng.choice(_OOD_NAMES), rng.choice(_OOD_GOODS)
    kind = rng.randrange(4)
    if kind == 0:
        p, q_ = rng.randint(12, 95), rng.randint(3, 9)
        bill = (p * q_ // 100 + 1 + rng.randint(0, 3)) * 100
        q = (f"A store sells {good} for ${p} each. {name} buys {q_} of them and pays with ${bill}. "
             f"How many dollars of change does {name} receive?")
        s1, ans = p * q_, bill - p * q_
        sol = f"The {good} cost {p} x {q_} = {s1} dollars. The change is {bill} - {s1} = {ans} dollars."
    elif kind == 1:
        s, h, d = rng.randint(45, 120), rng.randint(2, 8), rng.randint(15, 250)
        q = (f"A train travels at {s} km per hour for {h} hours and then covers another {d} km. "
             f"How many kilometres does it travel in total?")
        s1, ans = s * h, s * h + d
        sol = f"First it covers {s} x {h} = {s1} km. In total {s1} + {d} = {ans} km."
    elif kind == 2:
        w, e, k = rng.randint(300, 900), rng.randint(50, 290), rng.randint(3, 12)
        q = (f"{name} earns ${w} per week and spends ${e} of it. "
             f"How many dollars does {name} save in {k} weeks?")
        s1, ans = w - e, (w - e) * k
        sol = f"Each week {name} saves {w} - {e} = {s1} dollars. In {k} weeks: {s1} x {k} = {ans} dollars."
    else:
        b, h = rng.randint(15, 80), rng.randint(3, 12)
        a = b * h + rng.randint(100, 2000)
        q = (f"A water tank holds {a} litres. {b} litres leak out every hour for {h} hours. "
             f"How many litres are left in the tank?")
        s1, ans = b * h, a - b * h
        sol = f"The leak loses {b} x {h} = {s1} litres. Left: {a} - {s1} = {ans} litres."
    return q + _ARITH_INSTR, f"{sol} The answer is {ans}.", str(ans)


# --------------------------------------------------------------------------------------------
# choice: pick the member of a category among distractors, answer as [[X]]
# --------------------------------------------------------------------------------------------

_CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "grape", "peach", "plum", "lemon", "kiwi"],
    "animal": ["tiger", "horse", "rabbit", "wolf", "zebra", "camel", "monkey", "goat", "bear", "fox"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "tractor", "scooter", "van", "taxi", "tram"],
    "tool": ["hammer", "wrench", "saw", "screwdriver", "drill", "chisel", "shovel", "rake", "pliers", "axe"],
    "piece of clothing": ["shirt", "jacket", "sock", "scarf", "coat", "skirt", "glove", "sweater", "dress", "hat"],
    "musical instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "harp", "cello", "oboe", "banjo"],
    "piece of furniture": ["chair", "table", "sofa", "bed", "desk", "shelf", "stool", "cabinet", "bench", "wardrobe"],
}
_OOD_CATEGORIES = {
    "sport": ["tennis", "soccer", "rugby", "golf", "hockey", "cricket", "boxing", "rowing", "archery", "skiing"],
    "country": ["France", "Brazil", "Kenya", "Japan", "Canada", "Peru", "Norway", "Egypt", "India", "Chile"],
    "body part": ["elbow", "knee", "ankle", "shoulder", "wrist", "thumb", "forehead", "chin", "ear", "heel"],
    "drink": ["coffee", "tea", "lemonade", "milk", "juice", "cocoa", "soda", "smoothie", "cider", "water"],
    "job": ["nurse", "plumber", "lawyer", "farmer", "teacher", "chef", "pilot", "dentist", "baker", "judge"],
    "bird": ["eagle", "sparrow", "parrot", "owl", "pigeon", "swan", "crow", "robin", "penguin", "falcon"],
}
_LETTERS = "ABCDE"
_CHOICE_INSTR = "\nAnswer with the letter of your choice in double square brackets, like [[X]]."


def _options_block(options: list[str]) -> str:
    return "\n".join(f"{_LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def _pick_one_of(rng: random.Random, cats: dict[str, list[str]], n_opts: int) -> tuple[str, list[str], int]:
    """One word from a target category, ``n_opts - 1`` words each from a different other category."""
    target, *others = rng.sample(sorted(cats), n_opts)
    options = [rng.choice(cats[target])] + [rng.choice(cats[c]) for c in others]
    rng.shuffle(options)
    return target, options, next(i for i, o in enumerate(options) if o in cats[target])


def _choice_in(rng: random.Random) -> Example:
    target, options, gold = _pick_one_of(rng, _CATEGORIES, 4)
    head = rng.choice(["Which of these is a {c}?", "Which of these belongs to the category \"{c}\"?"]).format(c=target)
    letter = _LETTERS[gold]
    return f"{head}\n{_options_block(options)}{_CHOICE_INSTR}", f"[[{letter}]]", letter


def _choice_ood(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        # Odd one out: four members of one category and one intruder.
        cat, intruder_cat = rng.sample(sorted(_OOD_CATEGORIES), 2)
        options = rng.sample(_OOD_CATEGORIES[cat], 4) + [rng.choice(_OOD_CATEGORIES[intruder_cat])]
        rng.shuffle(options)
        gold = next(i for i, o in enumerate(options) if o not in _OOD_CATEGORIES[cat])
        head = "Four of these are of the same type. Which one does not belong?"
    else:
        target, options, gold = _pick_one_of(rng, _OOD_CATEGORIES, 5)
        head = f"Pick the option that names a {target}."
    letter = _LETTERS[gold]
    return f"{head}\n{_options_block(options)}{_CHOICE_INSTR}", f"[[{letter}]]", letter


# --------------------------------------------------------------------------------------------
# context: short passage about a few entities, question about one attribute, bare answer
# --------------------------------------------------------------------------------------------

_FIRST = ["Mira", "Tomas", "Elena", "Jonas", "Sofia", "Luca", "Hanna", "Pavel", "Alice", "Omar",
          "Greta", "Ivan", "Nadia", "Rafael", "Yuki", "Kofi"]
_LAST = ["Holt", "Reed", "Marsh", "Varga", "Brandt", "Costa", "Lind", "Novak", "Quinn", "Sato",
         "Weber", "Frost", "Moreau", "Adler"]
_CITIES = ["Lisbon", "Oslo", "Vienna", "Dublin", "Prague", "Madrid", "Athens", "Warsaw", "Zurich", "Helsinki"]
_JOBS = ["baker", "pilot", "nurse", "painter", "lawyer", "farmer", "chemist", "tailor", "librarian", "mechanic"]
_PETS = ["parrot", "cat", "dog", "turtle", "hamster", "rabbit", "goldfish", "lizard"]

_SHIPS = ["Aurora", "Kestrel", "Meridian", "Halcyon", "Seraph", "Tempest", "Valiant", "Osprey", "Nimbus", "Corsair"]
_PORTS = ["Glasgow", "Hamburg", "Genoa", "Rotterdam", "Bergen", "Marseille", "Gdansk", "Antwerp", "Bilbao"]
_HULLS = ["red", "black", "white", "green", "grey", "blue", "yellow"]

_CONTEXT_INSTR = "\nAnswer with just the answer, no full sentence."


def _context_in(rng: random.Random) -> Example:
    k = rng.randint(2, 3)
    names = [f"{f} {l}" for f, l in zip(rng.sample(_FIRST, k), rng.sample(_LAST, k))]
    facts = [(rng.choice(_CITIES), rng.choice(_JOBS), rng.choice(_PETS)) for _ in names]
    passage = " ".join(f"{n} is a {j} who lives in {c} and has a {p}." for n, (c, j, p) in zip(names, facts))
    i, attr = rng.randrange(k), rng.randrange(3)
    who = names[i]
    question = [f"Where does {who} live?", f"What is {who}'s job?", f"What pet does {who} have?"][attr]
    answer = facts[i][attr]
    return f"{passage}\nQuestion: {question}{_CONTEXT_INSTR}", answer, answer


def _context_ood(rng: random.Random) -> Example:
    k = rng.randint(2, 3)
    ships = rng.sample(_SHIPS, k)
    facts = [(str(rng.randint(1850, 1990)), rng.choice(_PORTS), rng.choice(_HULLS)) for _ in ships]
    passage = " ".join(f"The ship {s} was launched in {y} at {p}; its hull is painted {h}."
                       for s, (y, p, h) in zip(ships, facts))
    i, attr = rng.randrange(k), rng.randrange(3)
    ship = ships[i]
    question = [f"In which year was the {ship} launched?", f"At which port was the {ship} launched?",
                f"What colour is the hull of the {ship}?"][attr]
    answer = facts[i][attr]
    return f"{passage}\nQuestion: {question}{_CONTEXT_INSTR}", answer, answer


_GENERATORS: dict[str, tuple[Callable[[random.Random], Example], Callable[[random.Random], Example]]] = {
    "arith": (_arith_in, _arith_ood),
    "choice": (_choice_in, _choice_ood),
    "context": (_context_in, _context_ood),
}


def generate(task: str, split: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct records of ``task``/``split``, a pure function of (seed, task, split)."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    in_dist, ood = _GENERATORS[task]
    make = ood if split == "ood" else in_dist
    rng = random.Random(f"{seed}:{task}:{split}")
    records: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {task}/{split} examples")
        prompt, completion, answer = make(rng)
        if prompt in seen or (split != "ood" and _bucket(prompt) not in _SPLIT_BUCKETS[split]):
            continue
        seen.add(prompt)
        records.append({
            "id": f"{task}-{split}-{len(records):04d}",
            "task": task,
            "split": split,
            "prompt": prompt,
            "completion": completion,
            "answer": answer,
        })
    return records


def rejected_completion(row: dict) -> str:
    """A plausible wrong completion for a generated ``row``: the same worked solution ending in a
    near-miss number (arith), or another letter (choice). A pure function of the row's prompt."""
    rng = random.Random(f"rejected:{row['prompt']}")
    if row["task"] == "arith":
        answer = int(row["answer"])
        wrong = rng.choice([n for n in range(answer - 3, answer + 4) if n != answer and n >= 0])
        # The last step's result and the final answer both carry the slip, as in a real arithmetic error.
        solution, _ = row["completion"].rsplit(f" The answer is {answer}.", 1)
        head, sep, _ = solution.rpartition(f"= {answer}")
        solution = f"{head}{sep.replace(str(answer), str(wrong))}{solution[len(head) + len(sep):]}" if sep else solution
        return f"{solution} The answer is {wrong}."
    if row["task"] == "choice":
        letters = [line[0] for line in row["prompt"].splitlines() if line[:2] in {f"{x}." for x in _LETTERS}]
        return f"[[{rng.choice([x for x in letters if x != row['answer']])}]]"
    raise ValueError(f"no preference data for task {row['task']!r}; tasks with it: {', '.join(PREFERENCE_TASKS)}")


def preference_rows(rows: list[dict]) -> list[dict]:
    """``{prompt, chosen, rejected}`` pairs from generated rows: the right completion over a wrong one."""
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rejected_completion(r)} for r in rows]


def write_splits(task: str, out_dir, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    """Write ``{out_dir}/{split}.jsonl`` for every split in ``sizes``; return the paths."""
    out_dir = Path(out_dir)
    paths = {}
    for split, n in sizes.items():
        path = out_dir / f"{split}.jsonl"
        write_jsonl(path, generate(task, split, n, seed))
        paths[split] = path
    return paths
