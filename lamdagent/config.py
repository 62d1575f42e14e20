"""Config: JSON-schema validation, defaults, and the cross-reference checks a schema cannot do.

Everything here runs when Snakemake parses the workflow, before any job: a bad config stops the
run with one line naming the offending key (``config: action_types.sft[1]: ...``) or file.
The checks of a section that has its own code live with that code (``actions.custom.check_entries``,
``evaluation.eval_data.check_file_task``, ``studies.defaults.fill``, ``store.tracking.check``).

Over 400 lines: what is left is the schema, the defaults and the cross-reference checks of the
action space (action types, objects, named models), read top to bottom in the order ``load`` runs them.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lamdagent.actions import custom
from lamdagent.actions.registry import ACTIONS, action_prefixes, count_actions, slot_kinds
from lamdagent.agent.controller import BACKOFF
from lamdagent.agent.objects import recipe_order
from lamdagent.data.tasks import PREFERENCE_TASKS, TASKS
from lamdagent.errors import ConfigError
from lamdagent.evaluation.eval_data import check_file_task, check_lm_eval_names, check_lm_eval_task
from lamdagent.evaluation.score import METRIC_MAX
from lamdagent.redact import is_variable_name
from lamdagent.studies import defaults as study_defaults

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


DEFAULTS: dict[str, Any] = {
    "proposals_per_iteration": 1,
    "custom_actions": {},
    "controller": {
        "temperature": 0.0,
        "timeout_s": 120.0,
        "retries": 1,
        # Past this share of questions answered by the seeded random fallback (after fallback_rate_after
        # questions), the run stops: it would be random search.
        "max_fallback_rate": 0.5,
        "fallback_rate_after": 4,
        "max_tokens_param": "max_tokens",
        "backoff": dict(BACKOFF),
        "max_tokens": {"type_selection": 48, "object_selection": 24, "memory_update": 160},
        "stop": ["\n"],
        "choice": "scored",  # the local controller scores the allowed candidates; text: parse its reply
        "shuffle": True,  # candidates listed in a seeded permutation per call
        "structured": "auto",  # openai with choice scored: JSON-schema answers; off after a 400 saying unsupported
    },
    # structured: facts from the records, the controller's judgement chosen from a closed set; free: the paper's rewrite
    "memory": {"max_words": 120, "initial": "No results yet.", "style": "structured"},
    "generated_models_join": ["models"],
    "keep_top_k": None,  # off: every model keeps its weights
    "training": {"epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1, "max_length": 512,
                 "precision": "auto", "lr_scheduler_type": "linear", "warmup_ratio": 0.0,
                 # auto: the trained model's own dtype (a bf16 base gives bf16 weights); see train.resolve_save_dtype
                 "save_dtype": "auto"},
    "merging": {"dtype": "float32", "normalize": True},
    "evaluation": {"batch_size": 16, "backend": "hf", "limit": None, "device": "auto", "dtype": "auto",
                   "include_paths": [], "with_build": False},
    # Prices default to 0 (the embedded agent runs locally); set them for an API model and rented GPUs.
    "report": {"top_k": 3, "every_k": 5,
               "prices": {"input_per_1m_tokens": 0.0, "output_per_1m_tokens": 0.0, "gpu_hour": 0.0, "cpu_hour": 0.0}},
    # A failed action (exception, NaN loss, out of memory, time limit) is fed back with this score; it
    # stops itself time_margin_s before its rule's runtime ends, to record the failure.
    "failures": {"score": 0.0, "time_margin_s": 60, "log_tail_lines": 30},
    # Local runs: jobs fork from one process that imported torch & co. (lamdagent/actions/job_server.py).
    "job_server": {"enabled": True, "idle_s": 60},
    # Experiment tracking (lamdagent/store/tracking.py): off unless a backend is named.
    # `dir` defaults by backend (store/tracking.settings).
    "tracking": {"backend": "none", "experiment": "lamdagent", "training_curves": True},
    # retries: Snakemake reruns a job that failed for infrastructure reasons (killed, node lost).
    "resources": {
        "sft": {"gpu": 1, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 240, "retries": 2},
        "sft_lora": {"gpu": 1, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 240, "retries": 2},
        "dpo": {"gpu": 1, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 240, "retries": 2},
        "ties_merging": {"gpu": 0, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 60, "retries": 2},
        "linear": {"gpu": 0, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 60, "retries": 2},
        "task_arithmetic": {"gpu": 0, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 60, "retries": 2},
        "dare_ties": {"gpu": 0, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 60, "retries": 2},
        "slerp": {"gpu": 0, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 60, "retries": 2},
        "evaluate": {"gpu": 1, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 120, "retries": 2},
        "import_model": {"gpu": 0, "cpus_per_gpu": 1, "threads": 2, "mem_mb": 16000, "runtime": 60, "retries": 2},
        # propose and update_memory, where Snakemake runs: a local controller's torch threads. Nothing else
        # runs meanwhile (the next build waits for the agent's choice), so they may take every local core.
        "agent": {"threads": 2},
    },
}


def _merge_defaults(config: dict, defaults: dict) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_defaults(value, merged[key])
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _key_path(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


_API_KEY_ENV_PROBLEM = ("give the NAME of the environment variable that holds the API key (e.g. OPENAI_API_KEY), "
                        "never the key itself; the value is not shown")


def read_config_file(path: str | Path) -> dict:
    """A YAML config file as a dict; a syntax error names the file, line and column.

    Snakemake's own message for a config file it cannot parse names neither.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(where, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"YAML error: {err}") from None


def schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _schema_check(config: dict) -> None:
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        error = errors[0]
        key = _key_path(error.absolute_path)
        if error.absolute_path and error.absolute_path[-1] == "api_key_env":
            message = _API_KEY_ENV_PROBLEM  # never the value: it is often the key itself
        elif error.validator == "additionalProperties":
            message = error.message.replace("Additional properties are not allowed", "unknown key")
        elif error.validator == "required":
            missing = error.message.split("'")[1] if "'" in error.message else error.message
            key = f"{key}.{missing}" if error.absolute_path else missing
            message = "missing required key"
        else:
            message = error.message
        raise ConfigError(key, message)


def load(config: dict, workdir: str | Path = ".") -> dict:
    """Validate ``config`` (as Snakemake read it) and return it with defaults filled in."""
    if not isinstance(config, dict) or not config:
        raise ConfigError("(top level)", "the config is empty; pass --configfile config/config.yaml")
    if (config.get("evaluation") or {}).get("backend") == "vllm":  # said plainly, before the schema's enum message
        raise ConfigError("evaluation.backend", "'vllm' is not supported: no environment of the workflow installs "
                                                "vLLM and no test runs it; use 'hf'")
    _schema_check(config)
    config = _merge_defaults(config, DEFAULTS)
    custom.check_entries(config, Path(workdir))
    check(config, Path(workdir))
    _check_tracking(config)
    study_defaults.fill(config)
    return config


def _check_tracking(config: dict) -> None:
    from lamdagent.store.tracking import check as tracking_problem

    problem = tracking_problem(config)
    if problem is not None:
        raise ConfigError(f"tracking.{problem[0]}", problem[1])


def slots_of(action: str):
    return ACTIONS[action].slots


def slot_uses(config: dict) -> dict[str, list]:
    """Every slot each object type fills (one type may fill several, e.g. a density for two merges)."""
    uses: dict[str, list] = {}
    for action, object_types in config["action_types"].items():
        for slot, object_type in zip(ACTIONS[action].slots, object_types):
            uses.setdefault(object_type, []).append(slot)
    return uses


def is_preference(spec: dict) -> bool:
    return spec.get("kind", "sft") == "preference"


def _value_kind(value: Any, config: dict) -> str:
    """What a candidate looks like, to catch an object type put in the wrong slot."""
    if isinstance(value, bool):
        return "unknown"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "weights"
    if isinstance(value, str) and value in config["models"]:
        return "model"
    if isinstance(value, str) and value in config["datasets"]:
        return "preference_dataset" if is_preference(config["datasets"][value]) else "dataset"
    return "unknown"


def _check_value(kind: str, value: Any, key: str, config: dict, slot=None) -> None:
    if kind == "model":
        if not isinstance(value, str) or value not in config["models"]:
            raise ConfigError(key, f"{value!r} is not a model defined under `models`")
    elif kind in ("dataset", "preference_dataset"):
        if not isinstance(value, str) or value not in config["datasets"]:
            raise ConfigError(key, f"{value!r} is not a dataset defined under `datasets`")
        preference = is_preference(config["datasets"][value])
        if preference != (kind == "preference_dataset"):
            want = "a preference dataset (kind: preference)" if kind == "preference_dataset" else "an SFT dataset"
            raise ConfigError(key, f"{value!r} is {'a preference' if preference else 'an SFT'} dataset; "
                                   f"this slot takes {want}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(key, f"{value!r} must be a positive number")
        if slot is not None and slot.upper is not None and value > slot.upper:
            raise ConfigError(key, f"{value!r} is above {slot.upper:g}, the largest {slot.name} allowed")
        if slot is not None and slot.integer and value != int(value):
            raise ConfigError(key, f"{value!r} must be a whole number ({slot.name})")
    elif kind == "weights":
        length = 2 if slot is None else slot.length
        if (not isinstance(value, list) or not value or (length is not None and len(value) != length)
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0 for x in value)):
            raise ConfigError(key, f"{value!r} must be a list of {'two' if length == 2 else length or 'some'} "
                                   "positive merge weights")
    elif kind == "string":
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"{value!r} must be a non-empty string")


def check(config: dict, workdir: Path) -> None:
    # Action types and the object types filling their slots.
    for action, object_types in config["action_types"].items():
        if action not in ACTIONS:
            raise ConfigError(f"action_types.{action}", f"unknown action type; known: {', '.join(ACTIONS)}")
        spec = ACTIONS[action]
        slots = spec.slots
        if not spec.required <= len(object_types) <= len(slots):
            raise ConfigError(f"action_types.{action}", f"takes {_arity(spec)}, got {len(object_types)}")
        for index, (slot, object_type) in enumerate(zip(slots, object_types)):
            if object_type not in config["objects"]:
                raise ConfigError(f"action_types.{action}[{index}]", f"unknown object type {object_type!r}")
    for action, object_types in config["action_types"].items():
        for index, (slot, object_type) in enumerate(zip(slots_of(action), object_types)):
            # Unknown values (a typo) are reported per value below; here only a clear kind mismatch.
            held = {_value_kind(value, config) for value in config["objects"][object_type]} - {"unknown"}
            if held and held != {slot.kind}:
                raise ConfigError(
                    f"action_types.{action}[{index}]",
                    f"slot {slot.name!r} takes a {slot.kind} but object type {object_type!r} holds "
                    f"{' and '.join(sorted(held))} values",
                )
    kinds = slot_kinds(config)
    uses = slot_uses(config)
    for index, action in enumerate(config.get("forced_actions") or []):
        if action is not None and action not in config["action_types"]:
            raise ConfigError(f"forced_actions[{index}]", f"{action!r} is not an action type under `action_types`")

    # Named models.
    for name, spec in config["models"].items():
        key = f"models.{name}"
        if name.startswith(action_prefixes()):
            raise ConfigError(key, f"names starting with {'/'.join(action_prefixes())} are reserved for built models")
        has_recipe, source = "recipe" in spec, spec.get("source")
        if has_recipe == (source is not None):
            raise ConfigError(key, "give exactly one of `source` (embedded, local, hub) or `recipe`")
        if source == "local":
            if "path" not in spec:
                raise ConfigError(f"{key}.path", "missing (a local Hugging Face model directory)")
            path = (workdir / spec["path"]).resolve()
            if not (path / "config.json").is_file():
                raise ConfigError(f"{key}.path", f"{path} is not a Hugging Face model directory (no config.json)")
        elif source == "hub" and "repo" not in spec:
            raise ConfigError(f"{key}.repo", "missing (the hub id, e.g. google/gemma-2-2b)")
    _check_recipe_models(config, kinds)

    # Datasets.
    for name, spec in config["datasets"].items():
        key = f"datasets.{name}"
        source = spec["source"]
        fields = spec.get("fields")
        wanted = {"prompt", "chosen", "rejected"} if is_preference(spec) else {"prompt", "completion"}
        if fields is not None and set(fields) != wanted:
            raise ConfigError(f"{key}.fields", f"a {spec.get('kind', 'sft')} dataset maps exactly "
                                               f"{', '.join(sorted(wanted))}; got {', '.join(sorted(fields))}")
        if source == "embedded":
            tasks = spec.get("tasks")
            known = PREFERENCE_TASKS if is_preference(spec) else TASKS
            if not tasks:
                raise ConfigError(f"{key}.tasks", f"missing; embedded tasks are {', '.join(known)}")
            for index, task in enumerate(tasks):
                if task not in known:
                    what = "preference task" if is_preference(spec) else "task"
                    raise ConfigError(f"{key}.tasks[{index}]", f"unknown embedded {what} {task!r}; known: {', '.join(known)}")
        elif source == "local":
            if "path" not in spec:
                raise ConfigError(f"{key}.path", "missing (a JSONL or parquet file)")
            from lamdagent.data.datasets import check_local_dataset  # noqa: PLC0415 - imports pandas only when needed

            check_local_dataset(workdir / spec["path"], spec.get("fields"), key, preference=is_preference(spec))
        elif source == "hub":
            for required in ("repo", "fields"):
                if required not in spec:
                    raise ConfigError(f"{key}.{required}", "missing (hub datasets need a repo and a field mapping)")

    # Objects.
    for object_type, values in config["objects"].items():
        seen = []
        for index, value in enumerate(values):
            for slot in uses.get(object_type, []):
                _check_value(slot.kind, value, f"objects.{object_type}[{index}]", config, slot)
            if value in seen:
                raise ConfigError(f"objects.{object_type}[{index}]", f"duplicate candidate {value!r}")
            seen.append(value)
    for index, object_type in enumerate(config["generated_models_join"]):
        if kinds.get(object_type) != "model":
            raise ConfigError(f"generated_models_join[{index}]", f"{object_type!r} is not an object type of models")
    _check_proposals(config)

    # Evaluation tasks.
    names = []
    for index, task in enumerate(config["eval_tasks"]):
        key = f"eval_tasks[{index}]"
        if task["task"] in names:
            raise ConfigError(f"{key}.task", f"duplicate task {task['task']!r}")
        names.append(task["task"])
        if task.get("kind") == "judge" and task.get("source") not in ("local", "hub"):
            raise ConfigError(f"{key}.kind", "a judged task reads its prompts from your data: give `source: local|hub`")
        if task.get("source") in ("local", "hub"):
            check_file_task(task, key, config, workdir)
        elif "lm_eval_task" in task:
            check_lm_eval_task(task, key)
        elif task["task"] not in TASKS:
            raise ConfigError(f"{key}.task", f"unknown task {task['task']!r}: embedded tasks are {', '.join(TASKS)}; "
                                             "other tasks need `source: local|hub` or `lm_eval_task`")
        metric = task.setdefault("metric", "exact_match")
        weight = task.setdefault("weight", "auto")
        if weight == "auto" and "max" not in task and metric.split(",")[0] not in METRIC_MAX:
            raise ConfigError(f"{key}.weight", f"`auto` needs the range of metric {metric!r}: give `max` or a number")

    check_lm_eval_names(config, workdir)

    # An action must keep some of its runtime after the margin in which it records its failure.
    margin = config["failures"]["time_margin_s"]
    for family, spec in config["resources"].items():
        if family in ACTIONS and spec.get("runtime") and margin >= spec["runtime"] * 60:
            raise ConfigError("failures.time_margin_s",
                              f"{margin} s leaves no time to resources.{family}.runtime ({spec['runtime']} min)")

    # Controller.
    controller = config["controller"]
    if controller["type"] in ("transformers", "openai") and not controller.get("model"):
        raise ConfigError("controller.model", f"required for controller type {controller['type']!r}")
    if controller["type"] == "openai" and not controller.get("api_key_env"):
        raise ConfigError("controller.api_key_env", "required for the openai controller (the env var holding the key)")
    for key, section in (("controller", controller), ("evaluation.judge", config["evaluation"].get("judge") or {})):
        if "api_key_env" in section and not is_variable_name(section["api_key_env"]):
            raise ConfigError(f"{key}.api_key_env", _API_KEY_ENV_PROBLEM)
    if controller["type"] == "transformers":
        model = controller["model"]
        if model not in config["models"] and not (workdir / model / "config.json").is_file():
            raise ConfigError("controller.model", f"{model!r} is neither a model under `models` nor a model directory")


def _check_proposals(config: dict) -> None:
    """k distinct proposals need k distinct actions in the first iteration's space (it only grows)."""
    k = config["proposals_per_iteration"]
    if k == 1:
        return
    total = sum(count_actions(config["action_types"], config["objects"]).values())
    if k > total:
        raise ConfigError("proposals_per_iteration", f"{k} distinct actions per iteration, but the initial objects "
                                                     f"allow only {total}")


def _check_recipe_models(config: dict, kinds: dict[str, str]) -> None:
    """Recipes in config (e.g. the specialists) may use any other named model, without cycles."""
    for name, spec in config["models"].items():
        recipe = spec.get("recipe")
        if not recipe:
            continue
        key = f"models.{name}.recipe"
        action = recipe["action"]
        if action not in ACTIONS:
            raise ConfigError(f"{key}.action", f"unknown action type {action!r}; known: {', '.join(ACTIONS)}")
        spec = ACTIONS[action]
        if not spec.required <= len(recipe["objects"]) <= len(spec.slots):
            raise ConfigError(f"{key}.objects", f"{action} takes {_arity(spec)}, got {len(recipe['objects'])}")
        for index, (slot, value) in enumerate(zip(spec.slots, recipe["objects"])):
            _check_value(slot.kind, value, f"{key}.objects[{index}]", config, slot)
        if spec.family == "merge":
            from lamdagent.actions.registry import is_valid_combination  # noqa: PLC0415

            if not is_valid_combination(action, tuple(recipe["objects"])):
                raise ConfigError(f"{key}.objects", "a merge needs two different models, neither of them the base")
    for name in config["models"]:
        recipe_order(config, name)


def _arity(spec) -> str:
    names = ", ".join(s.name + (" (optional)" if s.optional else "") for s in spec.slots)
    count = f"{spec.required}" if spec.required == len(spec.slots) else f"{spec.required} to {len(spec.slots)}"
    return f"{count} object types ({names})"
