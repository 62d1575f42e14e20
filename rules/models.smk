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
    log:
        "results/logs/ties_merging/{hash}.log",
    benchmark:
        "results/benchmarks/ties_merging/{hash}.tsv"
    conda:
        "../envs/merge.yaml"
    script:
        "../scripts/ties_merging.py"
