rule import_model:
    output:
        model=directory("results/models/{name}"),
    wildcard_constraints:
        name=f"(?!(?:{BUILT_ID}))[A-Za-z0-9][A-Za-z0-9_.-]*",
    params:
        spec=lambda wildcards: config["models"][wildcards.name],
    threads: config["resources"]["import_model"]["threads"]
    resources:
        **resources_of("import_model"),
    retries: config["resources"]["import_model"]["retries"]
    log:
        "results/logs/import_model/{name}.log",
    benchmark:
        "results/benchmarks/import_model/{name}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/import_model.py"


rule sft:
    input:
        unpack(built_model_inputs("sft")),
    output:
        model=directory("results/models/sft-{hash}"),
    threads: config["resources"]["sft"]["threads"]
    resources:
        **resources_of("sft"),
    retries: config["resources"]["sft"]["retries"]
    log:
        "results/logs/sft/{hash}.log",
    benchmark:
        "results/benchmarks/sft/{hash}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/sft.py"


rule ties_merging:
    input:
        unpack(built_model_inputs("ties_merging")),
    output:
        model=directory("results/models/ties_merging-{hash}"),
    threads: config["resources"]["ties_merging"]["threads"]
    resources:
        **resources_of("ties_merging"),
    retries: config["resources"]["ties_merging"]["retries"]
    log:
        "results/logs/ties_merging/{hash}.log",
    benchmark:
        "results/benchmarks/ties_merging/{hash}.tsv"
    conda:
        "../envs/merge.yaml"
    script:
        "../scripts/ties_merging.py"


rule sft_lora:
    input:
        unpack(built_model_inputs("sft_lora")),
    output:
        model=directory("results/models/sft_lora-{hash}"),
    threads: config["resources"]["sft_lora"]["threads"]
    resources:
        **resources_of("sft_lora"),
    retries: config["resources"]["sft_lora"]["retries"]
    log:
        "results/logs/sft_lora/{hash}.log",
    benchmark:
        "results/benchmarks/sft_lora/{hash}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/sft_lora.py"


rule dpo:
    input:
        unpack(built_model_inputs("dpo")),
    output:
        model=directory("results/models/dpo-{hash}"),
    threads: config["resources"]["dpo"]["threads"]
    resources:
        **resources_of("dpo"),
    retries: config["resources"]["dpo"]["retries"]
    log:
        "results/logs/dpo/{hash}.log",
    benchmark:
        "results/benchmarks/dpo/{hash}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/dpo.py"


rule linear:
    input:
        unpack(built_model_inputs("linear")),
    output:
        model=directory("results/models/linear-{hash}"),
    threads: config["resources"]["linear"]["threads"]
    resources:
        **resources_of("linear"),
    retries: config["resources"]["linear"]["retries"]
    log:
        "results/logs/linear/{hash}.log",
    benchmark:
        "results/benchmarks/linear/{hash}.tsv"
    conda:
        "../envs/merge.yaml"
    script:
        "../scripts/linear.py"


rule task_arithmetic:
    input:
        unpack(built_model_inputs("task_arithmetic")),
    output:
        model=directory("results/models/task_arithmetic-{hash}"),
    threads: config["resources"]["task_arithmetic"]["threads"]
    resources:
        **resources_of("task_arithmetic"),
    retries: config["resources"]["task_arithmetic"]["retries"]
    log:
        "results/logs/task_arithmetic/{hash}.log",
    benchmark:
        "results/benchmarks/task_arithmetic/{hash}.tsv"
    conda:
        "../envs/merge.yaml"
    script:
        "../scripts/task_arithmetic.py"


rule dare_ties:
    input:
        unpack(built_model_inputs("dare_ties")),
    output:
        model=directory("results/models/dare_ties-{hash}"),
    threads: config["resources"]["dare_ties"]["threads"]
    resources:
        **resources_of("dare_ties"),
    retries: config["resources"]["dare_ties"]["retries"]
    log:
        "results/logs/dare_ties/{hash}.log",
    benchmark:
        "results/benchmarks/dare_ties/{hash}.tsv"
    conda:
        "../envs/merge.yaml"
    script:
        "../scripts/dare_ties.py"


rule slerp:
    input:
        unpack(built_model_inputs("slerp")),
    output:
        model=directory("results/models/slerp-{hash}"),
    threads: config["resources"]["slerp"]["threads"]
    resources:
        **resources_of("slerp"),
    retries: config["resources"]["slerp"]["retries"]
    log:
        "results/logs/slerp/{hash}.log",
    benchmark:
        "results/benchmarks/slerp/{hash}.tsv"
    conda:
        "../envs/merge.yaml"
    script:
        "../scripts/slerp.py"


# keep_top_k removes the weights of models outside the top-k (lamdagent/prune.py); a job that needs
# them again depends on this flag, which rebuilds them in place from the recipe (sha256 checked).
rule restore_model:
    input:
        unpack(restore_inputs),
    output:
        restored="results/restored/{model}/{consumer}.json",
    wildcard_constraints:
        model=f"(?:{BUILT_ID})[0-9a-f]{{16}}",
        consumer="[A-Za-z0-9_.-]+",
    threads: config["resources"]["sft"]["threads"]
    resources:
        **resources_of("sft"),
    log:
        "results/logs/restore_model/{model}.{consumer}.log",
    benchmark:
        "results/benchmarks/restore_model/{model}.{consumer}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/restore_model.py"
