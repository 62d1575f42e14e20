checkpoint leaderboard:
    input:
        pool="results/agent/pool.json",
        steps=explored_steps,
    output:
        leaderboard=report(
            "results/leaderboard.tsv", caption="../report/leaderboard.rst", category="Leaderboard"
        ),
    log:
        "results/logs/report/leaderboard.log",
    benchmark:
        "results/benchmarks/report/leaderboard.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/leaderboard.py"


# The top-k by validation score, evaluated on the test and out-of-distribution tasks.
rule topk:
    input:
        unpack(topk_inputs),
    output:
        topk=report("results/report/topk.tsv", caption="../report/topk.rst", category="Leaderboard"),
    params:
        card_dirs=lambda wildcards: {m: card_dir(m) for m in config["models"]},
        models_dir=f"{RESULTS}/models",
    log:
        "results/logs/report/topk.log",
    benchmark:
        "results/benchmarks/report/topk.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/topk.py"


# Score over iterations (Figure 5), the top-k pipelines as graphs (Figures 3 and 6), per-task scores.
# The PNGs go into the HTML report; the SVGs beside them are for papers.
rule figures:
    input:
        pool="results/agent/pool.json",
        steps=explored_steps,
        leaderboard="results/leaderboard.tsv",
        topk="results/report/topk.tsv",
    output:
        score_png=report(
            "results/report/score_over_iterations.png",
            caption="../report/score_over_iterations.rst",
            category="Figures",
        ),
        score_svg="results/report/score_over_iterations.svg",
        pipelines_png=report(
            "results/report/pipelines.png", caption="../report/pipelines.rst", category="Figures"
        ),
        pipelines_svg="results/report/pipelines.svg",
        tasks_png=report(
            "results/report/task_scores.png", caption="../report/task_scores.rst", category="Figures"
        ),
        tasks_svg="results/report/task_scores.svg",
    log:
        "results/logs/report/figures.log",
    benchmark:
        "results/benchmarks/report/figures.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/figures.py"


# Compute per stage and agent tokens per call kind, priced (Tables 4 and 5). It reads every benchmark
# file, so it runs last: after the figures, whose own timing it then includes.
rule costs:
    input:
        steps=explored_steps,
        topk="results/report/topk.tsv",
        figures=rules.figures.output.tasks_png,
    output:
        costs=report("results/report/costs.tsv", caption="../report/costs.rst", category="Costs"),
    params:
        benchmarks="results/benchmarks",
        evals="results/evals",
        models="results/models",
    log:
        "results/logs/report/costs.log",
    benchmark:
        "results/benchmarks/report/costs.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/costs.py"
