"""The bodies of rules/evaluate.smk: lm-eval, the judge, the score."""

from __future__ import annotations

from pathlib import Path

from lamdagent.store.fileio import atomic_write_json, read_json
from lamdagent.workflow.common import job_context, require_weights


def evaluate(smk):
    from lamdagent.actions.failures import read_failure
    from lamdagent.evaluation.contamination import ContaminationError, check_deferred
    from lamdagent.evaluation.evaluate import evaluate as run_evaluate
    from lamdagent.evaluation.evaluate import offline_if_fetched
    from lamdagent.lineage.clock import start_clock, stop_clock

    # The tasks and the settings that determine the result come from params (the rule's rerun trigger).
    settings = {**smk.config["evaluation"], **smk.params.settings}
    tasks = list(smk.params.tasks)
    with job_context(smk):
        failure = read_failure(smk.input.model)
        if failure is not None:
            # Asked for with evaluation.with_build (the evaluation shares its build's job, so it is in
            # the DAG before anyone knows the action failed): the record says so; nothing scores it.
            atomic_write_json(smk.output.evaluation, failed_evaluation(smk.wildcards.model, smk.wildcards.split, failure))
            print(f"{smk.input.model}: its action failed ({failure['reason']}); nothing to evaluate", flush=True)
            return
        require_weights(smk.input.model)
        # Before datasets is imported (its offline switch is read then), by the guard or by lm-eval.
        offline_if_fetched(smk.input.get("lm_eval_data", []))
        # What parse time could not read (lm-eval documents, hub data not prepared yet) is checked by
        # the first evaluation job, which stops the exploration on an overlap (and records it for the next parse).
        try:
            check_deferred(smk.config)
        except ContaminationError as err:
            print(err, flush=True)  # in the log, which Snakemake shows when the job fails
            raise
        clock = start_clock()
        # Our file tasks' YAMLs (results/eval_tasks/<task>/) and the user's own task directories.
        include = [str(path) for path in smk.input.get("tasks", [])] + list(settings["include_paths"])
        run_evaluate(smk.input.model, tasks, smk.output.evaluation, batch_size=settings["batch_size"],
                     device=settings["device"], dtype=settings["dtype"], backend=settings["backend"],
                     limit=settings["limit"], seed=settings["seed"], extra_include_paths=include,
                     usage=lambda: stop_clock(clock))


def failed_evaluation(model: str, split: str, failure: dict) -> dict:
    """The evaluation of a model whose action failed: no tasks, the action's failure record."""
    return {"model": model, "split": split, "status": "failed", "failure": failure, "tasks": {}}


def judge(smk):
    from lamdagent.evaluation.judge import judge_evaluation

    failed = Path(smk.log[0]).with_suffix(".failed.json")
    with job_context(smk):
        answers = read_json(smk.input.answers)
        if answers.get("status") == "failed":  # with_build: a failed action's answers are its failure
            atomic_write_json(smk.output.evaluation, answers)
            return
        result = judge_evaluation(smk.input.answers, smk.output.evaluation, dict(smk.params.judged),
                                  dict(smk.params.judge), seed=smk.config["seed"], failed_json=failed)
        print("judged: " + ", ".join(f"{task} {result['tasks'][task]['rating,judge']:.2f}"
                                     for task in smk.params.judged), flush=True)


def score(smk):
    from lamdagent.evaluation.score import score as compute_score
    from lamdagent.lineage.records import refresh_card

    with job_context(smk):
        evaluation = read_json(smk.input.evaluation)
        if evaluation.get("status") == "failed":  # the workflow never asks; an explicit target gets a clear error
            raise ValueError(f"{smk.input.evaluation}: {smk.wildcards.model} holds no model, its action failed "
                             f"({evaluation['failure']['reason']}); a failed step is fed back with failures.score")
        result = compute_score(evaluation, smk.params.eval_tasks, "val")
        result["model"] = smk.wildcards.model
        atomic_write_json(smk.output.score, result)
        if smk.params.card_dir and refresh_card(smk.params.card_dir, {"validation": result}):
            print(f"model card of {smk.params.card_dir} now shows the validation scores")
