# One lm-eval process per (model, split) evaluates every task at once: its start-up is paid once.
rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        # With judged tasks, the model's answers; rule judge then writes the evaluation.
        evaluation=answers_path(),
    params:
        tasks=evaluation_tasks,
        settings=EVALUATION_SETTINGS,
    threads: evaluate_threads
    resources:
        **resources_of("evaluate"),
    retries: config["resources"]["evaluate"]["retries"]
    group: BUILD_GROUP
    log:
        "results/logs/evaluate/{model}.{split}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}.{split}.tsv"
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/evaluate.py"


# The judge needs its API, which compute nodes often cannot reach: a local rule, run where Snakemake
# runs. No retries: the client already retried each call; a call that still fails fails the evaluation.
if JUDGED:

    rule judge:
        input:
            unpack(judge_inputs),
        output:
            evaluation="results/evals/{model}/{split}.json",
        params:
            judged=lambda wildcards: judged_tasks(wildcards.split),
            judge=config["evaluation"].get("judge"),
        log:
            "results/logs/judge/{model}.{split}.log",
        benchmark:
            "results/benchmarks/judge/{model}.{split}.tsv"
        retries: 0
        localrule: True
        conda:
            "../envs/agent.yaml"
        script:
            "../scripts/judge.py"


rule score:
    input:
        evaluation="results/evals/{model}/val.json",
    output:
        score="results/scores/{model}.json",
    params:
        card_dir=lambda wildcards: card_dir(wildcards.model),
        eval_tasks=scoring_spec(config["eval_tasks"], "val"),
    log:
        "results/logs/score/{model}.log",
    benchmark:
        "results/benchmarks/score/{model}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/score.py"
