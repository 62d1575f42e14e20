rule generate_task:
    output:
        train="results/data/{task}/train.jsonl",
        val="results/data/{task}/val.jsonl",
        test="results/data/{task}/test.jsonl",
        ood="results/data/{task}/ood.jsonl",
    params:
        seed=config["seed"],
        sizes={
            "train": config["data"]["train_examples"],
            "val": config["data"]["val_examples"],
            "test": config["data"]["test_examples"],
            "ood": config["data"]["test_examples"],
        },
    log:
        "results/logs/generate_task/{task}.log",
    benchmark:
        "results/benchmarks/generate_task/{task}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/generate_task.py"


rule prepare_dataset:
    input:
        unpack(dataset_inputs),
    output:
        dataset="results/datasets/{dataset}.jsonl",
    params:
        spec=lambda wildcards: config["datasets"][wildcards.dataset],
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{dataset}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/prepare_dataset.py"


# Your own evaluation data (a local file or the hub) as lm-eval tasks. A local rule, so hub data is
# fetched where the workflow runs (compute nodes often have no network); no retries: data that
# cannot be loaded or splits that overlap fail once, with the reason.
rule prepare_eval_task:
    input:
        unpack(eval_task_inputs),
    output:
        tasks=directory("results/eval_tasks/{task}"),
    params:
        spec=lambda wildcards: file_eval_task(wildcards.task),
        data=config["data"],
        seed=config["seed"],
    log:
        "results/logs/prepare_eval_task/{task}.log",
    benchmark:
        "results/benchmarks/prepare_eval_task/{task}.tsv"
    retries: 0
    localrule: True
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/prepare_eval_task.py"


# The data of an lm-eval task named in config (built in or under evaluation.include_paths), loaded once
# here, where the workflow runs, into the datasets cache the evaluate jobs then read offline. No
# retries: a task whose data cannot be loaded fails once, with the reason, before any evaluation.
rule fetch_lm_eval_task:
    output:
        docs="results/lm_eval_data/{lm_task}.json",
    params:
        include_paths=config["evaluation"]["include_paths"],
    wildcard_constraints:
        lm_task="[A-Za-z0-9][A-Za-z0-9_.-]*",
    log:
        "results/logs/fetch_lm_eval_task/{lm_task}.log",
    benchmark:
        "results/benchmarks/fetch_lm_eval_task/{lm_task}.tsv"
    retries: 0
    localrule: True
    conda:
        "../envs/eval.yaml"
    script:
        "../scripts/fetch_lm_eval_task.py"
