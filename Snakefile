# LaMDAgent: an LLM agent that explores post-training pipelines (arXiv 2505.21963).
# config -> plan (agent steps) -> targets (models, evaluations) -> scores -> agent, every step a file.
import os

from snakemake.utils import min_version, validate

import lamdagent.config

min_version("9.0")

# Snakemake's message for a config file it cannot parse names neither the file nor the line.
if os.path.exists("config/config.yaml"):
    try:
        lamdagent.config.read_config_file("config/config.yaml")
    except lamdagent.config.ConfigError as err:
        raise WorkflowError(str(err)) from None


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


validate(config, schema="lamdagent/schemas/config.schema.yaml")


include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/evaluate.smk"
include: "rules/agent.smk"
include: "rules/report.smk"
include: "rules/scaling.smk"
include: "rules/baselines.smk"


rule all:
    input:
        "results/leaderboard.tsv",
        "results/report/topk.tsv",
        "results/report/score_over_iterations.png",
        "results/report/pipelines.png",
        "results/report/task_scores.png",
        "results/report/costs.tsv",
        # Until all `iterations` are on disk: a raised budget continues a finished exploration.
        frontier_step,
    default_target: True
