# Scaling studies (`snakemake scaling`, not part of `all`): the exploration's top-k replayed with the
# same recipe trees and resized datasets (new content-addressed ids; subtrees without a dataset keep
# theirs), and, with `scaling.model`, on another base model.


# More training examples of a generated task: the same generator and seed, so the exploration's
# train.jsonl is a prefix of it and validation and test never change.
rule generate_train:
    output:
        train="results/data/{task}/train.n{examples}.jsonl",
    wildcard_constraints:
        examples="[0-9]+",
    params:
        seed=config["seed"],
    log:
        "results/logs/generate_train/{task}.n{examples}.log",
    benchmark:
        "results/benchmarks/generate_train/{task}.n{examples}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/generate_train.py"


# The first <rows> examples of a dataset's source; recipes name it `resized/<dataset>.n<rows>`.
rule resize_dataset:
    input:
        unpack(resized_dataset_inputs),
    output:
        dataset="results/datasets/resized/{dataset}.n{rows}.jsonl",
    wildcard_constraints:
        rows="[0-9]+",
    params:
        spec=lambda wildcards: config["datasets"][wildcards.dataset],
    log:
        "results/logs/resize_dataset/{dataset}.n{rows}.log",
    benchmark:
        "results/benchmarks/resize_dataset/{dataset}.n{rows}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/resize_dataset.py"


# Saves the replayed recipes, so the models they name become targets only then.
checkpoint replay_data:
    input:
        unpack(replay_data_inputs),
    output:
        replays="results/scaling/data_replays.json",
    params:
        datasets="results/datasets",
        scaling=SCALING,
    log:
        "results/logs/scaling/replay_data.log",
    benchmark:
        "results/benchmarks/scaling/replay_data.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/replay_data.py"


checkpoint replay_model:
    input:
        leaderboard="results/leaderboard.tsv",
    output:
        replays="results/scaling/model_replays.json",
    params:
        scaling=SCALING,
    log:
        "results/logs/scaling/replay_model.log",
    benchmark:
        "results/benchmarks/scaling/replay_model.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/replay_model.py"


# Score against data size per pipeline (Figure 7) and Kendall's tau against the exploration size.
rule scaling_data:
    input:
        unpack(replayed_evals("data")),
    output:
        data=report("results/scaling/data.tsv", caption="../report/scaling.rst", category="Scaling"),
        kendall="results/scaling/kendall.tsv",
        png=report("results/scaling/data.png", caption="../report/scaling.rst", category="Scaling"),
        svg="results/scaling/data.svg",
    log:
        "results/logs/scaling/data.log",
    benchmark:
        "results/benchmarks/scaling/data.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/scaling_data.py"


rule scaling_model:
    input:
        unpack(replayed_evals("model", with_sources=True)),
    output:
        table=report("results/scaling/model.tsv", caption="../report/scaling.rst", category="Scaling"),
    log:
        "results/logs/scaling/model.log",
    benchmark:
        "results/benchmarks/scaling/model.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/scaling_model.py"


rule scaling:
    input:
        scaling_targets(),
