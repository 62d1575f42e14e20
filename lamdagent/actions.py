"""Action types: what each takes (its slots), which library runs it, and enumeration.

An action type takes one object per slot, in order; config's ``action_types`` names the object type
that fills each slot (``sft: [models, sft_dataset, sft_lr]``). Enumeration is the product of the
candidate lists, minus combinations that cannot run (a merge of a model with itself).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Slot:
    name: str
    kind: str  # "model" | "dataset" | "number" | "weights"
    describe: str


@dataclass(frozen=True)
class ActionSpec:
    name: str
    short: str  # the name in pipeline text, e.g. ties(a, b)
    describe: str
    slots: tuple[Slot, ...]
    library: str

    def slot_index(self, name: str) -> int:
        return [slot.name for slot in self.slots].index(name)


ACTIONS: dict[str, ActionSpec] = {
    "sft": ActionSpec(
        name="sft",
        short="sft",
        describe="supervised fine-tuning of a model on a dataset",
        slots=(
            Slot("model", "model", "the model to fine-tune"),
            Slot("dataset", "dataset", "the training dataset"),
            Slot("learning_rate", "number", "the learning rate"),
        ),
        library="trl SFTTrainer",
    ),
    "ties_merging": ActionSpec(
        name="ties_merging",
        short="ties",
        describe="TIES merging of two models over a base model",
        slots=(
            Slot("base_model", "model", "the base model the task vectors are taken from"),
            Slot("model_a", "model", "the first model to merge"),
            Slot("model_b", "model", "the second model to merge"),
            Slot("weights", "weights", "the merge weights of the two models"),
            Slot("density", "number", "the fraction of each task vector kept"),
        ),
        library="mergekit (ties)",
    ),
}

ACTION_PREFIXES = tuple(f"{name}-" for name in ACTIONS)


def action_spec(name: str) -> ActionSpec:
    try:
        return ACTIONS[name]
    except KeyError:
        raise KeyError(f"unknown action type {name!r}; known: {', '.join(ACTIONS)}") from None


def is_valid_combination(action: str, values: tuple) -> bool:
    """Combinations that would run but mean nothing are left out of the action space."""
    if action == "ties_merging":
        base, model_a, model_b = values[0], values[1], values[2]
        return model_a != model_b and base not in (model_a, model_b)
    return True


def enumerate_actions(action_types: dict[str, list[str]], candidates: dict[str, list[Any]]) -> dict[str, list[tuple]]:
    """Every (action type, objects) the agent may choose, per action type."""
    space: dict[str, list[tuple]] = {}
    for action, object_types in action_types.items():
        combos = itertools.product(*(candidates[object_type] for object_type in object_types))
        space[action] = [combo for combo in combos if is_valid_combination(action, combo)]
    return space


def count_actions(action_types: dict[str, list[str]], candidates: dict[str, list[Any]]) -> dict[str, int]:
    return {action: len(combos) for action, combos in enumerate_actions(action_types, candidates).items()}
