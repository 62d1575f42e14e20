"""Custom actions: a user's own training, merging or data step, declared in config's ``custom_actions``.

An entry names its slots (what the agent fills), a one-line description, and how it runs: a command
template (``python my_train.py --model {model} --out {output}``, one argument per token, no shell) or
a Python entry point (``package.module:function``, called with one keyword argument per slot and
``output``). Its code (the script file, or the entry point's module file) is hashed into every
recipe (``recipe["code"]``), so changing the script gives new model ids and the old models stay.

The job runs it like a built-in: in the action's child process under the rule's deadline
(``python -m lamdagent.actions.failures --call lamdagent.actions.custom:run``), writing into a staging directory
that becomes ``results/models/<id>/`` by one rename once it loads with ``from_pretrained``. A
non-zero exit, an exception, a missing output or one that does not load is a failed step.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

from lamdagent.actions.registry import BUILTIN_ACTIONS, SLOT_KINDS, register_custom_actions
from lamdagent.errors import ConfigError
from lamdagent.store.fileio import sha256_file

# Fields a command template may name besides its slots and fixed params.
TEMPLATE_FIELDS = ("output", "seed", "threads", "gpus")
SCRIPT_SUFFIXES = (".py", ".sh", ".bash", ".R", ".jl", ".pl", ".rb")
# Rules of the workflow besides the actions (a custom action becomes a rule of its own name).
WORKFLOW_RULES = frozenset({
    "all", "init_pool", "initial_step", "propose", "outcome", "update_memory", "baseline_recipes",
    "random_baseline", "table1", "baselines", "generate_task", "prepare_dataset", "prepare_eval_task",
    "fetch_lm_eval_task", "evaluate", "score",
    "import_model", "restore_model", "leaderboard", "topk", "figures", "costs", "generate_train",
    "resize_dataset", "replay_data", "replay_model", "scaling_data", "scaling_model", "scaling",
})


class CommandFailed(RuntimeError):
    """The action's command exited with a non-zero code."""


class InvalidOutput(RuntimeError):
    """The action finished but left no model that ``from_pretrained`` loads."""


def template_fields(command: str) -> list[str]:
    """The ``{field}`` names of a command template, in order (ValueError for a malformed one)."""
    fields = []
    for token in shlex.split(command):
        for _, field, _, _ in string.Formatter().parse(token):
            if field is not None:
                fields.append(field)
    return fields


def script_of(entry: dict) -> str | None:
    """The script file a command runs: ``script`` if given, else its first token with a script suffix."""
    if "script" in entry:
        return entry["script"]
    for token in shlex.split(entry["command"]):
        if token.endswith(SCRIPT_SUFFIXES) and "{" not in token:
            return token
    return None


def module_file(entry_point: str, workdir: str | os.PathLike) -> str | None:
    """The source file of an entry point's module, found as the child will import it (workdir first)."""
    module = entry_point.partition(":")[0]
    sys.path.insert(0, str(workdir))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.path.remove(str(workdir))
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def code_identity(entry: dict, script_path: str | os.PathLike) -> dict:
    """What enters the recipe of every model the action makes: how it runs and its code's sha256."""
    code = {"sha256": sha256_file(script_path)}
    if "command" in entry:
        return {"command": entry["command"], "script": script_of(entry), **code}
    return {"entry_point": entry["entry_point"], "module_file": str(script_path), **code}


def code_path(code: dict, workdir: str | os.PathLike = ".") -> Path:
    return Path(workdir) / (code["script"] if "command" in code else code["module_file"])


def verify_code(action: str, code: dict, workdir: str | os.PathLike = ".") -> None:
    """The code about to run is the code the recipe was hashed with (else its id would lie)."""
    path = code_path(code, workdir)
    if not path.is_file():
        raise FileNotFoundError(f"{action}: its code {path} is missing")
    if sha256_file(path) != code["sha256"]:
        raise RuntimeError(f"{action}: {path} changed since this recipe was made (sha256 {code['sha256'][:12]}...); "
                           "rerun Snakemake: the new code makes new model ids")


def action_values(recipe: dict, spec, parents: dict, datasets: dict) -> dict[str, Any]:
    """Slot values as the action gets them: model directories, dataset files, the recipe's parameters."""
    values: dict[str, Any] = dict(recipe["params"])
    for slot in spec.slots:
        if slot.kind == "model":
            values[slot.name] = str(parents[slot.name])
        elif slot.is_dataset:
            values[slot.name] = str(datasets[slot.name])
    return values


def render_command(command: str, values: dict[str, Any]) -> list[str]:
    """The argument list: each template token formatted on its own (a value never becomes two arguments)."""

    def text(value):
        return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)

    return [token.format(**{k: text(v) for k, v in values.items()}) for token in shlex.split(command)]


def run(code: dict, values: dict, output: str, seed: int, threads: int = 1, gpus: int = 0, workdir: str = ".") -> dict:
    """Run a custom action into ``output`` and check that a model loads from it; returns its metrics.

    The child process's body (``lamdagent.actions.failures --call lamdagent.actions.custom:run``); rebuild and
    restore call it in-process.
    """
    Path(output).mkdir(parents=True, exist_ok=True)
    extra = {"output": output, "seed": seed, "threads": threads, "gpus": gpus}
    metrics: dict = {}
    if "command" in code:
        argv = render_command(code["command"], {**values, **extra})
        # `python` (and any tool of the job's environment) is the job's own: its conda env or venv first.
        env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        print("custom action:", shlex.join(argv), flush=True)
        returncode = subprocess.run(argv, cwd=workdir, env=env, check=False).returncode
        if returncode != 0:
            raise CommandFailed(f"`{shlex.join(argv[:2])} ...` exited with code {returncode}")
    else:
        module, _, name = code["entry_point"].partition(":")
        sys.path.insert(0, str(Path(workdir).resolve()))
        function = getattr(importlib.import_module(module), name)
        print(f"custom action: {code['entry_point']}(**{sorted(values)}, output=...)", flush=True)
        returned = function(**values, output=output)
        metrics = dict(returned) if isinstance(returned, dict) else {}
    return {**metrics, **check_output(output)}


def check_output(output: str | os.PathLike) -> dict:
    """Load the output as the evaluation will (model and tokenizer); InvalidOutput says why it cannot."""
    output = Path(output)
    if not output.is_dir() or not any(output.iterdir()):
        raise InvalidOutput(f"the action wrote no model to its output directory ({output.name})")
    from transformers import AutoTokenizer

    from lamdagent.actions.train import load_causal_lm  # from_pretrained, as the evaluation loads it

    try:
        model = load_causal_lm(output, "auto")
        AutoTokenizer.from_pretrained(output)
    except Exception as exc:  # noqa: BLE001 - whatever stops the load is the reason the step failed
        message = " ".join(str(exc).split())[:300]
        raise InvalidOutput(f"its output does not load with from_pretrained: {type(exc).__name__}: {message}") from None
    dtype = str(model.dtype).removeprefix("torch.")
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    return {"precision": precision, "parameters": sum(p.numel() for p in model.parameters())}


CUSTOM_RESOURCES = {"gpu": 1, "cpus_per_gpu": 8, "threads": 8, "mem_mb": 32000, "runtime": 240, "retries": 2}


def check_entries(config: dict, workdir: Path) -> None:
    """Check config's ``custom_actions``, hash their code into ``code`` and register them as actions.

    Each becomes a rule of its own name, with ``resources.<name>`` (defaults < its own ``resources``
    < the top-level ``resources.<name>``).
    """
    for name, entry in config["custom_actions"].items():
        key = f"custom_actions.{name}"
        if name in BUILTIN_ACTIONS:
            raise ConfigError(key, f"{name!r} is a built-in action; give yours another name")
        if name in WORKFLOW_RULES:
            raise ConfigError(key, f"{name!r} is the name of a workflow rule; give the action another name")
        if not name.isidentifier() or not name.isascii() or name.startswith("_"):
            raise ConfigError(key, "an action name is a Python-style identifier (letters, digits, _), e.g. orpo")
        names = []
        for index, slot in enumerate(entry["slots"]):
            slot_key = f"{key}.slots[{index}]"
            if slot["kind"] not in SLOT_KINDS:
                raise ConfigError(f"{slot_key}.kind", f"unknown slot kind {slot['kind']!r}; known: {', '.join(SLOT_KINDS)}")
            if not slot["name"].isidentifier() or slot["name"] in TEMPLATE_FIELDS:
                raise ConfigError(f"{slot_key}.name", f"{slot['name']!r} must be an identifier other than "
                                                      f"{', '.join(TEMPLATE_FIELDS)}")
            if slot["name"] in names:
                raise ConfigError(f"{slot_key}.name", f"duplicate slot {slot['name']!r}")
            names.append(slot["name"])
        params = entry.get("params") or {}
        for param in params:
            if param in names or param in TEMPLATE_FIELDS or not param.isidentifier():
                raise ConfigError(f"{key}.params.{param}", "must be an identifier that is neither a slot nor "
                                                           f"{', '.join(TEMPLATE_FIELDS)}")
        if ("command" in entry) == ("entry_point" in entry):
            raise ConfigError(key, "give exactly one of `command` (a template) or `entry_point` (package.module:function)")
        if "command" in entry:
            try:
                fields = template_fields(entry["command"])
            except ValueError as err:
                raise ConfigError(f"{key}.command", f"not a valid template: {err}") from None
            for field in fields:
                if field not in names and field not in params and field not in TEMPLATE_FIELDS:
                    raise ConfigError(f"{key}.command", f"{{{field}}} is not a slot of {name} (slots: {', '.join(names)}; "
                                                        f"also {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})")
            if "output" not in fields:
                raise ConfigError(f"{key}.command", "never names {output}, the directory the model is saved to")
            script = script_of(entry)
            script_key = f"{key}.script" if "script" in entry else f"{key}.command"
            if script is None:
                raise ConfigError(f"{key}.script", "missing: name the file the command runs (its sha256 enters the "
                                                   "model ids)")
            path = workdir / script
            if not path.is_file():
                raise ConfigError(script_key, f"script {script} not found (looked in {workdir.resolve()})")
        else:
            found = module_file(entry["entry_point"], workdir)
            if found is None:
                raise ConfigError(f"{key}.entry_point", f"module {entry['entry_point'].partition(':')[0]!r} not "
                                                        f"found (importable from {workdir.resolve()} or the environment)")
            path = Path(found)
        if "conda" in entry:
            conda = (workdir / entry["conda"]).resolve()
            if not conda.is_file():
                raise ConfigError(f"{key}.conda", f"{conda} is not a file (a conda env YAML)")
            entry["conda"] = str(conda)
        code = code_identity(entry, path)
        if "entry_point" in entry:  # recorded relative to the workdir where it can be, so a moved checkout keeps ids
            code["module_file"] = os.path.relpath(path.resolve(), workdir.resolve()) \
                if path.resolve().is_relative_to(workdir.resolve()) else str(path.resolve())
        entry["code"] = code
        config["resources"][name] = {**CUSTOM_RESOURCES, **entry.get("resources", {}),
                                     **config["resources"].get(name, {})}
    register_custom_actions(config)
