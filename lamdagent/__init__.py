"""LaMDAgent: an LLM agent that explores post-training pipelines, run as a Snakemake workflow."""

__version__ = "0.1.0"
