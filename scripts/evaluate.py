"""Snakemake rule `evaluate`: see lamdagent.workflow.evaluate.evaluate."""
import sys
from pathlib import Path

# The package sits beside scripts/; put it first so a rule's conda env (--sdm conda) needs no install of it.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - injected by Snakemake

from lamdagent.actions import job_server  # noqa: E402
from lamdagent.workflow import evaluate  # noqa: E402

job_server.run(evaluate.evaluate, snakemake)  # noqa: F821
