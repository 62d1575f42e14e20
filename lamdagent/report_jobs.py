"""The bodies of the report rules `figures` and `costs` (``scripts/<rule>.py`` calls ``report_jobs.<rule>``)."""

from __future__ import annotations

from pathlib import Path

from .fileio import atomic_write_text, read_json
from .jobs import job_context


def figures(smk):
    import pandas as pd

    from .figures import write_figures
    from .recipe import RecipeStore

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
    from .costs import costs_table

    with job_context(smk):
        agent_dir = Path(smk.input.steps[0]).parent.parent  # results/agent/iter_0/step.json -> results/agent
        table = costs_table(smk.params.benchmarks, agent_dir, smk.config["resources"], smk.config["report"]["prices"],
                            evals_dir=smk.params.evals, models_dir=smk.params.models)
        atomic_write_text(smk.output.costs, table.to_csv(sep="\t", index=False))
        print(table.to_string(index=False))
