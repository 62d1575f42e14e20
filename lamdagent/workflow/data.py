"""The bodies of rules/data.smk: generated tasks, training datasets, evaluation tasks' data."""

from __future__ import annotations

from pathlib import Path

from lamdagent.workflow.common import job_context


def generate_task(smk):
    from lamdagent.data.tasks import write_splits

    with job_context(smk):
        write_splits(smk.wildcards.task, Path(smk.output.train).parent, dict(smk.params.sizes), smk.params.seed)


def prepare_eval_task(smk):
    from lamdagent.evaluation.eval_data import prepare

    with job_context(smk):
        manifest = prepare(dict(smk.params.spec), smk.output.tasks, dict(smk.params.data), smk.params.seed)
        print(f"prepared {smk.wildcards.task}: " + ", ".join(f"{split} {entry['rows']} rows"
                                                           for split, entry in manifest["splits"].items()))


def fetch_lm_eval_task(smk):
    from lamdagent.evaluation.eval_data import fetch_task

    with job_context(smk):
        entry = fetch_task(smk.wildcards.lm_task, list(smk.params.include_paths), smk.output.docs)
        print(f"fetched lm-eval task {entry['task']}: {entry['docs']} docs into {entry['hf_datasets_cache']}")


def prepare_dataset(smk):
    from lamdagent.data.datasets import prepare

    with job_context(smk):
        entry = prepare(dict(smk.params.spec), smk.output.dataset, task_train_files=list(smk.input.get("tasks", [])))
        print(f"prepared {smk.wildcards.dataset}: {entry}")
