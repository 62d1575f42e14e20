checkpoint leaderboard:
    input:
        pool="results/agent/pool.json",
        steps=steps_upto(ITERATIONS),
    output:
        leaderboard="results/leaderboard.tsv",
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
        topk="results/report/topk.tsv",
    log:
        "results/logs/report/topk.log",
    benchmark:
        "results/benchmarks/report/topk.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/topk.py"
