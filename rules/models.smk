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


# One rule per action of the registry (lamdagent/actions/registry.py: the built-ins, then config's custom_actions),
# named after it, so profiles address each by name (set-resources: sft: ...). A model's id starts with
# its action's name; the recipe it was proposed with says what the job runs.
for action, spec in ACTIONS.items():

    rule:
        name:
            action
        input:
            unpack(built_model_inputs(action)),
        output:
            model=directory(f"results/models/{action}-{{hash}}"),
        threads: config["resources"][action]["threads"]
        resources:
            **resources_of(action),
        retries: config["resources"][action]["retries"]
        group: BUILD_GROUP
        log:
            f"results/logs/{action}/{{hash}}.log",
        benchmark:
            f"results/benchmarks/{action}/{{hash}}.tsv"
        conda:
            action_env(spec)
        script:
            "../scripts/build_model.py"


# keep_top_k removes the weights of models outside the top-k (lamdagent/lineage/prune.py); a job that needs
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
