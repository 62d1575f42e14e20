"""A weighted average of three models through mergekit's Python API, as a LaMDAgent custom action.

Used as an entry point (config/examples/custom-action.yaml):

    entry_point: examples.actions.merge3:linear_merge

The workflow calls ``linear_merge`` with one keyword per slot (model directories, the weights) and
``output``, the directory to write the merged model to; the returned dict is recorded as metrics.
"""

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge


def linear_merge(model_a, model_b, model_c, weights, output, dtype="float32"):
    models = [model_a, model_b, model_c]
    if len(weights) != len(models):
        raise ValueError(f"{len(models)} models need {len(models)} weights, got {weights}")
    config = {"merge_method": "linear", "dtype": dtype, "parameters": {"normalize": True},
              "models": [{"model": path, "parameters": {"weight": float(w)}} for path, w in zip(models, weights)]}
    run_merge(MergeConfiguration.model_validate(config), out_path=str(output),
              options=MergeOptions(copy_tokenizer=True, lazy_unpickle=True, safe_serialization=True, quiet=True),
              config_source=yaml.safe_dump(config, sort_keys=False))
    return {"n_models": len(models), "weights": ",".join(str(w) for w in weights)}
