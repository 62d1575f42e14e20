"""Recipes: the content-addressed description of how a model is made (``store.recipes`` keeps the files).

A recipe names the action type, its inputs (parent model ids, which are themselves hashes of their
recipes, and datasets by content hash and size), its hyper-parameters and the seed. The model id is
``<action>-<16 hex of sha256(canonical recipe)>``: an identical recipe always maps to the same
``results/models/<id>/`` target, so Snakemake never trains it twice.
"""

from __future__ import annotations

from typing import Any

from lamdagent.actions.registry import action_spec, is_built_id
from lamdagent.store.recipes import RecipeStore

# The mergekit settings each method takes from config's `merging` (task_arithmetic and slerp have no
# `normalize`: task arithmetic adds the weighted task vectors as they are, slerp interpolates).
MERGE_SETTINGS = {"ties": ("dtype", "normalize"), "dare_ties": ("dtype", "normalize"), "linear": ("dtype", "normalize"),
                  "task_arithmetic": ("dtype",), "slerp": ("dtype",)}


# LoRA settings that are not objects: fixed, and recorded in the recipe so that changing them changes the id.
LORA_FIXED = {"lora_dropout": 0.0, "lora_target_modules": "all-linear"}


def action_settings(action: str, *, training: dict, merging: dict) -> dict:
    """The config-wide parameters of one action type, as they enter its recipe."""
    spec = action_spec(action)
    if spec.family == "custom":  # its own fixed parameters, none of training's or merging's
        return dict(spec.fixed or {})
    if spec.family == "merge":
        return {key: merging[key] for key in MERGE_SETTINGS[spec.merge_method] if key in merging}
    settings = {key: training[key] for key in sorted(training)}
    # The dtype the weights are saved in enters the recipe (and so the id) only when it is not the
    # default: a model saved in another dtype is another file target, and the ids of recipes made
    # before the setting existed stay as they were.
    if settings.get("save_dtype", "auto") == "auto":
        settings.pop("save_dtype", None)
    if action == "sft_lora":
        settings.update(LORA_FIXED)
    return settings


def make_recipe(action: str, values: tuple | list, *, datasets: dict[str, dict], training: dict, merging: dict,
                seed: int) -> dict:
    """Turn a chosen (action, objects) into the recipe that is hashed.

    ``values`` are in slot order; model slots hold model ids, dataset slots dataset names (resolved
    here to their content hash and size, so changing a dataset changes every id built on it).
    """
    spec = action_spec(action)
    values = list(values)
    # Config-wide settings first; a slot (e.g. an `epochs` object) overrides the default of the same name.
    params: dict[str, Any] = dict(action_settings(action, training=training, merging=merging))
    inputs: dict[str, Any] = {}
    for slot, value in zip(spec.slots_for(len(values)), values, strict=True):
        if slot.kind == "model":
            inputs[slot.name] = value
        elif slot.is_dataset:
            entry = datasets[value]
            inputs[slot.name] = {"name": value, "sha256": entry["sha256"], "rows": entry["rows"]}
        elif slot.kind == "weights":
            params[slot.name] = [float(x) for x in value]
        elif slot.kind == "string":
            params[slot.name] = str(value)
        elif slot.integer or (isinstance(params.get(slot.name), int) and float(value).is_integer()):
            # A whole number overriding a whole-number default (epochs: 1) is written like it, so that
            # the same value as an object or as the default is the same recipe.
            params[slot.name] = int(value)
        else:
            params[slot.name] = float(value)
    recipe = {"action": action, "inputs": inputs, "params": params, "seed": seed}
    if spec.code:  # a custom action's code: changing its script makes new ids (built-ins' ids have no such key)
        recipe["code"] = dict(spec.code)
    return recipe


def pipeline_text(model: str, store: RecipeStore, labels: dict[str, str], *, full: bool = False) -> str:
    """``sft(ties(specialist-arith, specialist-choice), all)``: named models stop the recursion.

    ``full`` adds every hyper-parameter chosen from an object list, for audit.
    """
    if model in labels and not full:
        return labels[model]
    if not is_built_id(model):
        return labels.get(model, model)
    recipe = store.load(model)
    spec = action_spec(recipe["action"])
    parts = []
    for slot in spec.slots:
        if slot.kind == "model":
            if slot.implied and not full:
                continue  # the base is implied in the short form, as in the paper's figures
            parts.append(pipeline_text(recipe["inputs"][slot.name], store, labels, full=full))
        elif slot.is_dataset:
            parts.append(recipe["inputs"][slot.name]["name"])
        elif full and slot.name in recipe["params"]:
            parts.append(f"{slot.name}={recipe['params'][slot.name]}")
    text = f"{spec.short}({', '.join(parts)})"
    if full and model in labels:
        text = f"{labels[model]}={text}"
    return text
