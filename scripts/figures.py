"""Snakemake rule `figures`: see lamdagent.report_jobs.figures."""
import sys
from pathlib import Path

# The package sits beside scripts/; put it first so a rule's conda env (--sdm conda) needs no install of it.
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - injected by Snakemake

from lamdagent import report_jobs  # noqa: E402

report_jobs.figures(snakemake)  # noqa: F821
