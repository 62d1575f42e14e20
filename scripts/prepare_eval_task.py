"""Snakemake rule `prepare_eval_task`: see lamdagent.workflow.data.prepare_eval_task."""
import sys
from pathlib import Path

# The package sits beside scripts/; put it first so a rule's conda env (--sdm conda) needs no install of it.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - injected by Snakemake

from lamdagent.actions import job_server  # noqa: E402
from lamdagent.workflow import data  # noqa: E402

job_server.run(data.prepare_eval_task, snakemake)  # noqa: F821
