"""The bodies of rules/report.smk: the leaderboard, the top-k, the figures and the costs."""

from __future__ import annotations

from pathlib import Path

from lamdagent.store.fileio import atomic_write_text, read_json
from lamdagent.workflow.common import job_context


def figures(smk):
    import pandas as pd

    from lamdagent.report.figures import write_figures
    from lamdagent.store.recipes import RecipeStore

    with job_context(smk):
        steps = [read_json(p) for p in smk.input.steps]
        board = pd.read_csv(smk.input.leaderboard, sep="\t")
        topk = pd.read_csv(smk.input.topk, sep="\t")
        labels = read_json(smk.input.pool)["labels"]
        report = smk.config["report"]
        written = write_figures(steps, board, topk, RecipeStore("results/recipes"), labels, top_k=report["top_k"],
                                every_k=report["every_k"], out_dir=Path(smk.output.score_png).parent)
        missing = {str(p) for p in smk.output} - {str(p) for p in written}
        if missing:  # the rule's outputs and write_figures' file names must agree
            raise RuntimeError(f"figures not written: {sorted(missing)}")
        print("wrote", *written)


def costs(smk):
    from lamdagent.report.costs import costs_table

    with job_context(smk):
        agent_dir = Path(smk.input.steps[0]).parent.parent  # results/agent/iter_0/step.json -> results/agent
        table = costs_table(smk.params.benchmarks, agent_dir, smk.config["resources"], smk.config["report"]["prices"],
                            evals_dir=smk.params.evals, models_dir=smk.params.models)
        atomic_write_text(smk.output.costs, table.to_csv(sep="\t", index=False))
        print(table.to_string(index=False))



def leaderboard(smk):
    from lamdagent.report.leaderboard import leaderboard_table

    with job_context(smk):
        table = leaderboard_table([read_json(p) for p in smk.input.steps])
        atomic_write_text(smk.output.leaderboard, table.to_csv(sep="\t", index=False))


def topk(smk):
    import pandas as pd

    from lamdagent.evaluation.score import score as compute_score
    from lamdagent.lineage.records import refresh_card
    from lamdagent.report.leaderboard import topk_table

    with job_context(smk):
        board = pd.read_csv(smk.input.leaderboard, sep="\t")
        evals = {Path(p).parent.name: read_json(p) for p in smk.input.evals}
        table = topk_table(board, evals, smk.config["eval_tasks"], smk.config["report"]["top_k"])
        atomic_write_text(smk.output.topk, table.to_csv(sep="\t", index=False))
        # The reported models' cards gain their test and OOD scores beside the validation ones.
        validation = {Path(p).stem: read_json(p) for p in smk.input.scores}
        for model, evaluation in evals.items():
            # Named models may live outside results/ (a user's directory: card_dir is empty, never written).
            card_dir = smk.params.card_dirs.get(model, f"{smk.params.models_dir}/{model}")
            if card_dir and model in validation:
                refresh_card(card_dir, {"validation": validation[model],
                                        "test": compute_score(evaluation, smk.config["eval_tasks"], "test")})
