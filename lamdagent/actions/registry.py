"""Action types: what each takes (its slots), which library runs it, and enumeration.

An action type takes one object per slot, in order; config's ``action_types`` names the object type
that fills each slot (``sft: [models, sft_dataset, sft_lr]``). Trailing ``optional`` slots (a
hyper-parameter such as the epochs) may be left out: the value then comes from config's
``training``/``merging`` section. Enumeration is the product of the candidate lists, minus
combinations that cannot run (a merge of a model with itself).

The registry ``ACTIONS`` holds the built-ins and config's ``custom_actions`` (family ``custom``, see
``lamdagent.actions.custom``): the workflow makes one rule per entry, so a built-in and a user's action run
the same way. Config registers its custom actions when it is loaded (``register_custom_actions``),
in the Snakemake process and again in every job.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

DATASET_KINDS = ("dataset", "preference_dataset")
SLOT_KINDS = ("model", *DATASET_KINDS, "number", "weights", "string")
FAMILIES = ("train", "merge", "custom")


@dataclass(frozen=True)
class Slot:
    name: str
    kind: str  # one of SLOT_KINDS
    describe: str
    optional: bool = False  # a trailing hyper-parameter slot that config may leave to its default
    upper: float | None = None  # numbers: the largest value allowed (inclusive)
    integer: bool = False  # numbers: whole numbers only
    implied: bool = False  # models: left out of the short pipeline text (a merge's base model)
    length: int | None = 2  # weights: how many (None: any number, as a custom N-model merge takes)

    @property
    def is_dataset(self) -> bool:
        return self.kind in DATASET_KINDS


@dataclass(frozen=True)
class ActionSpec:
    name: str
    short: str  # the name in pipeline text, e.g. ties(a, b)
    describe: str
    slots: tuple[Slot, ...]
    library: str
    family: str  # "train" (a trainer on a dataset), "merge" (mergekit) or "custom" (config's custom_actions)
    merge_method: str | None = None  # mergekit's merge_method name
    conda: str | None = None  # the rule's conda env file (None: the family's envs/*.yaml)
    code: dict | None = None  # custom: how it runs and the hash of its code (enters every recipe)
    fixed: dict | None = None  # custom: parameters that are not slots (config's `params`), in every recipe
    distinct_models: bool = False  # custom: combinations naming one model twice are left out

    @property
    def required(self) -> int:
        return sum(not slot.optional for slot in self.slots)

    def slots_for(self, n: int) -> tuple[Slot, ...]:
        """The slots a config with ``n`` object types fills (all required ones, then optional ones)."""
        if not self.required <= n <= len(self.slots):
            raise ValueError(f"{self.name} takes {self.required} to {len(self.slots)} objects, got {n}")
        return self.slots[:n]


_EPOCHS = Slot("epochs", "number", "the number of training epochs", optional=True)
_TUNED = Slot("model", "model", "the model to fine-tune")
_TRAIN_DATA = Slot("dataset", "dataset", "the training dataset")
_LR = Slot("learning_rate", "number", "the learning rate")
_BASE = Slot("base_model", "model", "the base model the task vectors are taken from", implied=True)
_A = Slot("model_a", "model", "the first model to merge")
_B = Slot("model_b", "model", "the second model to merge")
_WEIGHTS = Slot("weights", "weights", "the merge weights of the two models")
_DENSITY = Slot("density", "number", "the fraction of each task vector kept", upper=1.0)

BUILTIN_ACTIONS: dict[str, ActionSpec] = {
    "sft": ActionSpec(
        name="sft",
        short="sft",
        describe="supervised fine-tuning of a model on a dataset",
        slots=(_TUNED, _TRAIN_DATA, _LR, _EPOCHS),
        library="trl SFTTrainer",
        family="train",
    ),
    "sft_lora": ActionSpec(
        name="sft_lora",
        short="lora",
        describe="LoRA fine-tuning of a model on a dataset (a low-rank update, merged into the model)",
        slots=(
            _TUNED,
            _TRAIN_DATA,
            _LR,
            Slot("lora_rank", "number", "the LoRA rank", integer=True),
            Slot("lora_alpha", "number", "the LoRA alpha (the update is scaled by alpha / rank)"),
            _EPOCHS,
        ),
        library="trl SFTTrainer + peft LoRA (merge_and_unload)",
        family="train",
    ),
    "dpo": ActionSpec(
        name="dpo",
        short="dpo",
        describe="preference optimisation (DPO) of a model on pairs of a preferred and a rejected answer",
        slots=(
            Slot("model", "model", "the model to train (also the frozen reference)"),
            Slot("dataset", "preference_dataset", "the preference dataset (prompt, chosen, rejected)"),
            _LR,
            Slot("beta", "number", "the DPO beta (how far the model may move from the reference)"),
            _EPOCHS,
        ),
        library="trl DPOTrainer",
        family="train",
    ),
    "ties_merging": ActionSpec(
        name="ties_merging",
        short="ties",
        describe="TIES merging of two models over a base model",
        slots=(_BASE, _A, _B, _WEIGHTS, _DENSITY),
        library="mergekit (ties)",
        family="merge",
        merge_method="ties",
    ),
    "linear": ActionSpec(
        name="linear",
        short="linear",
        describe="a weighted average of the weights of two models",
        slots=(_A, _B, _WEIGHTS),
        library="mergekit (linear)",
        family="merge",
        merge_method="linear",
    ),
    "task_arithmetic": ActionSpec(
        name="task_arithmetic",
        short="task_arith",
        describe="task arithmetic: add the weighted task vectors of two models to a base model",
        slots=(_BASE, _A, _B, _WEIGHTS),
        library="mergekit (task_arithmetic)",
        family="merge",
        merge_method="task_arithmetic",
    ),
    "dare_ties": ActionSpec(
        name="dare_ties",
        short="dare_ties",
        describe="DARE-TIES merging: randomly drop task-vector entries, rescale, then TIES over a base model",
        slots=(_BASE, _A, _B, _WEIGHTS, _DENSITY),
        library="mergekit (dare_ties)",
        family="merge",
        merge_method="dare_ties",
    ),
    "slerp": ActionSpec(
        name="slerp",
        short="slerp",
        describe="spherical interpolation between the weights of two models",
        slots=(_A, _B, Slot("t", "number", "the interpolation factor from the first model (0) to the second (1)",
                            upper=1.0)),
        library="mergekit (slerp)",
        family="merge",
        merge_method="slerp",
    ),
}

# The registry: built-ins first, then the custom actions of the loaded config.
ACTIONS: dict[str, ActionSpec] = dict(BUILTIN_ACTIONS)


def action_prefixes() -> tuple[str, ...]:
    """``<action>-``: the start of every built model's id (named models may not use them)."""
    return tuple(f"{name}-" for name in ACTIONS)


def register_custom_actions(config: dict) -> None:
    """Make config's ``custom_actions`` entries of ``ACTIONS``, replacing those of an earlier config.

    Each entry has been checked and given its ``code`` (the hash of its script or module) by
    ``lamdagent.config.load``; a job reads the same config, so it registers the same specs.
    """
    for name in [name for name, spec in ACTIONS.items() if spec.family == "custom"]:
        del ACTIONS[name]
    for name, entry in (config.get("custom_actions") or {}).items():
        ACTIONS[name] = custom_spec(name, entry)


def custom_spec(name: str, entry: dict) -> ActionSpec:
    slots = tuple(Slot(slot["name"], slot["kind"], slot["description"], upper=slot.get("max"),
                       integer=bool(slot.get("integer", False)), length=None)
                  for slot in entry["slots"])
    code = entry.get("code") or {}
    how = code.get("script") or entry.get("entry_point")
    return ActionSpec(name=name, short=entry.get("short", name), describe=entry["description"], slots=slots,
                      library=f"custom action ({how})", family="custom", conda=entry.get("conda"), code=code,
                      fixed=dict(entry.get("params") or {}), distinct_models=bool(entry.get("distinct_models")))


def action_spec(name: str) -> ActionSpec:
    try:
        return ACTIONS[name]
    except KeyError:
        raise KeyError(f"unknown action type {name!r}; known: {', '.join(ACTIONS)}") from None


def is_valid_combination(action: str, values: tuple) -> bool:
    """Combinations that would run but mean nothing are left out of the action space."""
    spec = ACTIONS[action]
    if spec.family == "custom":  # a custom action says itself whether one model may fill two slots
        models = [value for slot, value in zip(spec.slots, values) if slot.kind == "model"]
        return not spec.distinct_models or len(set(models)) == len(models)
    if spec.family != "merge":
        return True
    models = {slot.name: value for slot, value in zip(spec.slots, values) if slot.kind == "model"}
    if models["model_a"] == models["model_b"]:
        return False
    return models.get("base_model") not in (models["model_a"], models["model_b"])


def enumerate_actions(action_types: dict[str, list[str]], candidates: dict[str, list[Any]]) -> dict[str, list[tuple]]:
    """Every (action type, objects) the agent may choose, per action type."""
    space: dict[str, list[tuple]] = {}
    for action, object_types in action_types.items():
        combos = itertools.product(*(candidates[object_type] for object_type in object_types))
        space[action] = [combo for combo in combos if is_valid_combination(action, combo)]
    return space


def count_actions(action_types: dict[str, list[str]], candidates: dict[str, list[Any]]) -> dict[str, int]:
    return {action: len(combos) for action, combos in enumerate_actions(action_types, candidates).items()}


def is_built_id(model: str) -> bool:
    return any(model.startswith(f"{action}-") for action in ACTIONS)


def slot_kinds(config: dict) -> dict[str, str]:
    """Kind of every object type that fills a slot ("model", "dataset", "preference_dataset", "number", "weights")."""
    kinds: dict[str, str] = {}
    for action, object_types in config["action_types"].items():
        for slot, object_type in zip(ACTIONS[action].slots, object_types):
            kinds.setdefault(object_type, slot.kind)
    return kinds
