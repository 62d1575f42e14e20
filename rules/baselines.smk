# The paper's baselines (`snakemake baselines`, not part of `all`): results/report/table1.tsv puts
# the specialists, the fully fine-tuned model, the best of a TIES grid and the random controller's
# best beside the exploration's top-k on the test and OOD tasks.


checkpoint baseline_recipes:
    input:
        unpack(baseline_dataset_inputs),
    output:
        recipes="results/baselines/recipes.json",
    params:
        baselines=BASELINES,
    log:
        "results/logs/baselines/recipes.log",
    benchmark:
        "results/benchmarks/baselines/recipes.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/baseline_recipes.py"


# The same workflow with `controller: {type: random}` in results/baselines/random/, sharing the
# content-addressed folders (models, recipes, evaluations, data); it takes all the cores given.
checkpoint random_baseline:
    input:
        unpack(random_baseline_inputs),
    output:
        leaderboard="results/baselines/random/results/leaderboard.tsv",
        topk="results/baselines/random/results/report/topk.tsv",
    params:
        snakefile=workflow.main_snakefile,
        iterations=BASELINES["random"] and BASELINES["random"]["iterations"],
    threads: workflow.cores
    log:
        "results/logs/baselines/random.log",
    benchmark:
        "results/benchmarks/baselines/random.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/random_baseline.py"


rule table1:
    input:
        unpack(table1_inputs),
    output:
        table=report("results/report/table1.tsv", caption="../report/table1.rst", category="Leaderboard"),
    log:
        "results/logs/baselines/table1.log",
    benchmark:
        "results/benchmarks/baselines/table1.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/table1.py"


rule baselines:
    input:
        "results/report/table1.tsv",
