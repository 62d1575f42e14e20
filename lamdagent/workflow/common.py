"""What every job shares: ``job_context`` (the rule's log, torch's threads, config's custom actions).

``scripts/<rule>.py`` calls ``lamdagent.workflow.<rules file>.<rule>(snakemake)``. Each job sends its
output (Python and C level, subprocesses included) to the rule's log file and limits torch to the
rule's threads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from lamdagent.store.fileio import read_json


@contextlib.contextmanager
def job_context(smk):
    """Redirect fds 1 and 2 to the rule's log and pin torch's thread count; register config's custom actions."""
    from lamdagent.actions.registry import register_custom_actions

    # A job is a process of its own: its registry starts with the built-ins until config's are added.
    register_custom_actions(getattr(smk, "config", None) or {})
    log_path = Path(smk.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            threads = max(1, int(getattr(smk, "threads", 1) or 1))
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            if "torch" in sys.modules or _wants_torch(smk):
                import torch

                torch.set_num_threads(threads)
            print(f"[lamdagent] {smk.rule} started {time.strftime('%Y-%m-%dT%H:%M:%S')} with {threads} thread"
                  f"{'s' if threads > 1 else ''}", flush=True)
            try:
                yield
            except Exception as exc:  # the reason goes to the rule's log too, not only to Snakemake's output
                print(f"[lamdagent] {smk.rule} failed: {type(exc).__name__}: {exc}", flush=True)
                raise
            print(f"[lamdagent] {smk.rule} finished {time.strftime('%Y-%m-%dT%H:%M:%S')}", flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _wants_torch(smk) -> bool:
    # Importing torch costs ~2 s of CPU per job: the agent rules need it only for a local LLM controller,
    # and an action's job not at all (the action runs in a child process, given the threads).
    if smk.rule in {"propose", "update_memory"}:
        return smk.config["controller"]["type"] == "transformers"
    return smk.rule in {"import_model", "restore_model", "evaluate"}


def require_weights(*model_dirs) -> None:
    """A pruned input (keep_top_k) is restored by rule restore_model before its consumers run;
    reaching here without weights means that flag is stale, so say how to get them back."""
    from lamdagent.lineage.prune import is_pruned

    for model_dir in model_dirs:
        if is_pruned(model_dir):
            name = Path(model_dir).name
            raise RuntimeError(f"{model_dir}: its weights were removed by keep_top_k; rebuild them with "
                               f"`snakemake --force results/restored/{name}/user.json`")


RECIPES = "results/recipes"


def read_board(path):
    import pandas as pd

    return pd.read_csv(path, sep="\t")


def read_evals(paths) -> dict[tuple[str, str], dict]:
    """{(model, split): evaluation} from ``results/evals/<model>/<split>.json`` paths."""
    return {(Path(p).parent.name, Path(p).stem): read_json(p) for p in paths}
