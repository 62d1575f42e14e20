"""Recipe files: ``results/recipes/<id>.json`` and the content-addressed model id.

The model id is ``<action>-<16 hex of sha256(canonical recipe)>``: an identical recipe always maps to
the same ``results/models/<id>/`` target, so Snakemake never trains it twice.
"""

from __future__ import annotations

from pathlib import Path

from lamdagent.store.fileio import atomic_write_json, read_json, sha256_json

ID_HEX = 16


def model_id(recipe: dict) -> str:
    return f"{recipe['action']}-{sha256_json(recipe)[:ID_HEX]}"


class RecipeStore:
    """``results/recipes/<id>.json``: written once when a recipe is first proposed, never changed."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, model: str) -> Path:
        return self.root / f"{model}.json"

    def save(self, recipe: dict) -> str:
        mid = model_id(recipe)
        path = self.path(mid)
        if not path.exists():  # content-addressed: an existing file already holds this recipe
            atomic_write_json(path, recipe)
        return mid

    def load(self, model: str) -> dict:
        path = self.path(model)
        if not path.exists():
            raise FileNotFoundError(
                f"no recipe for model {model!r} ({path}); models are proposed by the agent or named in config"
            )
        recipe = read_json(path)
        if model_id(recipe) != model:
            raise ValueError(f"{path}: recipe content does not hash to {model!r} (file edited by hand?)")
        return recipe
