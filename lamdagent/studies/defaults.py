"""Defaults of config's ``scaling`` and ``baselines`` sections, filled from the rest of the config
(``lamdagent.config.load`` calls ``fill``; a bad value is a ``ConfigError`` naming its key).
"""

from __future__ import annotations

from lamdagent.actions.registry import ACTIONS, BUILTIN_ACTIONS, slot_kinds
from lamdagent.errors import ConfigError


def fill(config: dict) -> None:
    """Fill and check the `scaling` and `baselines` sections (read only by their own targets).

    Their defaults come from the rest of the config: the exploration's top-k, its base model,
    its named recipe models as specialists, the agent's own TIES candidates, the same budget.
    """
    scaling = config.setdefault("scaling", {})
    if "factors" in scaling and "examples" in scaling:
        raise ConfigError("scaling.examples", "give either `factors` or `examples`, not both")
    if "examples" not in scaling:
        scaling.setdefault("factors", [1, 2, 4, 6])
    scaling.setdefault("top_k", config["report"]["top_k"])
    if "model" in scaling:
        base = scaling["model"]["base"]
        if base not in config["models"] or "recipe" in config["models"][base]:
            raise ConfigError("scaling.model.base", f"{base!r} is not a base model (with a `source`) under `models`")
        scaling["model"].setdefault("ranks", [])

    baselines = config.setdefault("baselines", {})
    kinds = slot_kinds(config)
    # The built-ins' slots only: a custom action's `weights` or `learning_rate` is not the baselines' TIES or SFT.
    objects_of = {slot.name: config["objects"][object_type]
                  for action, object_types in config["action_types"].items() if action in BUILTIN_ACTIONS
                  for slot, object_type in zip(ACTIONS[action].slots, object_types)}
    bases = [m for m in config["models"] if "recipe" not in config["models"][m]]
    base = baselines.setdefault("base", next((m for t, v in config["objects"].items() if kinds.get(t) == "model"
                                              for m in v if m in bases), bases[0]))
    if base not in bases:
        raise ConfigError("baselines.base", f"{base!r} is not a base model (with a `source`) under `models`")
    specialists = baselines.setdefault("specialists", [m for m in config["models"] if "recipe" in config["models"][m]])
    for index, name in enumerate(specialists):
        if "recipe" not in config["models"].get(name, {}):
            raise ConfigError(f"baselines.specialists[{index}]", f"{name!r} is not a recipe model under `models`")
    full = baselines.get("full_sft")
    if full:
        if full["dataset"] not in config["datasets"]:
            raise ConfigError("baselines.full_sft.dataset", f"{full['dataset']!r} is not a dataset under `datasets`")
        if "learning_rate" not in full:
            if "learning_rate" not in objects_of:
                raise ConfigError("baselines.full_sft.learning_rate", "missing (no sft learning rate among the objects)")
            full["learning_rate"] = objects_of["learning_rate"][0]
    ties = baselines.setdefault("ties", {})
    for key in ("weights", "density"):
        if objects_of.get(key):  # no ties_merging action among the agent's: no grid (and no empty list to validate)
            ties.setdefault(key, list(objects_of[key]))
    random = baselines.setdefault("random", {})
    if random is not False:
        random.setdefault("iterations", config["iterations"])
