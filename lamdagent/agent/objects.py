"""The object pool: candidates per object type, growing with every model the agent makes.

Model candidates are model ids: a base model's id is its config name; a recipe model's id is its
content hash, and the config name (e.g. ``specialist-arith``) is kept as its label. A model the agent
made gets a short name from its step (``m3``; ``m3.2`` for the second of k proposals), which the
agent reads everywhere instead of the hash; ids never change, names are display only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lamdagent.actions.recipe import make_recipe
from lamdagent.actions.registry import ACTIONS, slot_kinds
from lamdagent.errors import ConfigError
from lamdagent.store.recipes import RecipeStore


@dataclass
class Pool:
    candidates: dict[str, list[Any]]
    kinds: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)  # model id -> config name
    datasets: dict[str, dict] = field(default_factory=dict)  # dataset name -> {sha256, rows, path}
    join_types: list[str] = field(default_factory=list)
    initial_models: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # model id -> short name of a model the agent made

    @classmethod
    def initial(cls, config: dict, datasets: dict[str, dict], store: RecipeStore) -> "Pool":
        """Resolve config names to ids (saving the recipes of named recipe models, e.g. specialists)."""
        name_to_id: dict[str, str] = {}
        labels: dict[str, str] = {}
        order: list[str] = []
        for name in config["models"]:
            order += [m for m in recipe_order(config, name) if m not in order]
        for name in order:  # parents before the recipes built on them
            spec = config["models"][name]
            if "recipe" in spec:
                action = spec["recipe"]["action"]
                values = [
                    name_to_id[value] if slot.kind == "model" else value
                    for slot, value in zip(ACTIONS[action].slots, spec["recipe"]["objects"])
                ]
                mid = store.save(recipe_for(config, datasets, action, values))
            else:
                mid = name
            name_to_id[name] = mid
            labels[mid] = name
        kinds = slot_kinds(config)
        candidates = {
            object_type: [name_to_id[v] if kinds.get(object_type) == "model" else v for v in values]
            for object_type, values in config["objects"].items()
        }
        initial = []
        for object_type, values in candidates.items():
            if kinds.get(object_type) == "model":
                initial += [v for v in values if v not in initial]
        return cls(candidates=candidates, kinds=kinds, labels=labels, datasets=datasets,
                   join_types=list(config["generated_models_join"]), initial_models=initial)

    def label(self, value: Any) -> str:
        if not isinstance(value, str):
            return str(value)
        return self.labels.get(value) or self.names.get(value) or value

    def name_made_models(self, history: list[dict]) -> None:
        """Give every model the agent made its short name (the first step that proposed it)."""
        for entry in history:
            if entry.get("iteration"):
                self.names.setdefault(entry["model"], entry.get("name") or made_name(entry["iteration"],
                                                                                     entry.get("index")))

    def add_model(self, model: str) -> None:
        for object_type in self.join_types:
            if model not in self.candidates[object_type]:
                self.candidates[object_type].append(model)

    def with_models(self, models: list[str]) -> "Pool":
        pool = Pool.from_json(self.to_json())
        for model in models:
            pool.add_model(model)
        return pool

    def without_models(self, models: list[str]) -> "Pool":
        """The pool without these models in any candidate list (failed: never an input of an action)."""
        pool = Pool.from_json(self.to_json())
        for object_type, values in pool.candidates.items():
            if pool.kinds.get(object_type) == "model":
                pool.candidates[object_type] = [v for v in values if v not in models]
        return pool

    def to_json(self) -> dict:
        return {"candidates": self.candidates, "kinds": self.kinds, "labels": self.labels, "datasets": self.datasets,
                "join_types": self.join_types, "initial_models": self.initial_models, "names": self.names}

    @classmethod
    def from_json(cls, data: dict) -> "Pool":
        return cls(**{key: data[key] for key in ("candidates", "kinds", "labels", "datasets", "join_types",
                                                  "initial_models")}, names=dict(data.get("names", {})))


def made_name(iteration: int, index: int | None = None) -> str:
    """``m3``: the model step 3 made; ``m3.2``: the second of step 3's k proposals (``index`` 1)."""
    return f"m{iteration}" if index is None else f"m{iteration}.{index + 1}"


def recipe_for(config: dict, datasets: dict[str, dict], action: str, values) -> dict:
    return make_recipe(action, values, datasets=datasets, training=config["training"], merging=config["merging"],
                       seed=config["seed"])


def recipe_order(config: dict, name: str, _visiting: tuple = ()) -> list[str]:
    """Named models in the order they must be resolved (parents first); a cycle is a config error."""
    if name in _visiting:
        raise ConfigError(f"models.{name}.recipe", f"cycle: {' -> '.join(_visiting + (name,))}")
    recipe = config["models"][name].get("recipe")
    order: list[str] = []
    if recipe:
        for slot, value in zip(ACTIONS[recipe["action"]].slots, recipe["objects"]):
            if slot.kind == "model":
                order += [m for m in recipe_order(config, value, _visiting + (name,)) if m not in order]
    return order + [name]
