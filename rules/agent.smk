# The agent runs where Snakemake runs (localrule): it needs the LLM API, which compute nodes often
# cannot reach, and it is cheap. Iteration i's proposal is a checkpoint: the model it names becomes
# a target only once it is chosen.


checkpoint init_pool:
    input:
        datasets=expand("results/datasets/{dataset}.jsonl", dataset=used_datasets()),
    output:
        pool="results/agent/pool.json",
    log:
        "results/logs/agent/init_pool.log",
    benchmark:
        "results/benchmarks/agent/init_pool.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/init_pool.py"


rule initial_step:
    input:
        unpack(initial_step_inputs),
    output:
        step="results/agent/iter_0/step.json",
        memory="results/agent/iter_0/memory.md",
    log:
        "results/logs/agent/iter_0.log",
    benchmark:
        "results/benchmarks/agent/iter_0.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/initial_step.py"


checkpoint propose:
    input:
        unpack(propose_inputs),
    output:
        proposal="results/agent/iter_{iteration}/proposal.json",
        calls="results/agent/iter_{iteration}/propose_calls.jsonl",
    wildcard_constraints:
        iteration="[1-9][0-9]*",
    threads: config["resources"]["agent"]["threads"]
    log:
        "results/logs/agent/propose_{iteration}.log",
    benchmark:
        "results/benchmarks/agent/propose_{iteration}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/propose.py"


# Whether each built model of step i (iteration 0: the initial models) exists or its action failed.
# A checkpoint: a failed action leaves no model to evaluate, so the agent's next inputs depend on it.
checkpoint outcome:
    input:
        unpack(outcome_inputs),
    output:
        outcome="results/agent/iter_{iteration}/outcome.json",
    log:
        "results/logs/agent/outcome_{iteration}.log",
    benchmark:
        "results/benchmarks/agent/outcome_{iteration}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/outcome.py"


rule update_memory:
    input:
        unpack(update_memory_inputs),
    output:
        step="results/agent/iter_{iteration}/step.json",
        memory="results/agent/iter_{iteration}/memory.md",
        calls="results/agent/iter_{iteration}/memory_calls.jsonl",
    wildcard_constraints:
        iteration="[1-9][0-9]*",
    threads: config["resources"]["agent"]["threads"]
    log:
        "results/logs/agent/memory_{iteration}.log",
    benchmark:
        "results/benchmarks/agent/memory_{iteration}.tsv"
    localrule: True
    conda:
        "../envs/agent.yaml"
    script:
        "../scripts/update_memory.py"
