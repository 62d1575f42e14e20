"""The embedded demo's time per stage, from the benchmark files of a finished ``make demo``.

Reads ``results/benchmarks/`` (one Snakemake benchmark file per job; stages as in
``lamdagent.report.costs``, which builds ``results/report/costs.tsv`` from the same files) and prints the
jobs and the summed wall and CPU seconds per stage, the sum over all jobs, and the span from the
first job's start to the last job's end (jobs of two cores overlap, so the sum can exceed the span).
Usage::

    make demo && .venv/bin/python benchmarks/demo_stages.py            # ./results/benchmarks
    .venv/bin/python benchmarks/demo_stages.py --benchmarks DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import read_benchmarks, run_span_s, stage_totals  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    jobs = read_benchmarks(args.benchmarks)
    if jobs.empty:
        raise SystemExit(f"{args.benchmarks}: no benchmark files (run `make demo` first)")
    totals = stage_totals(jobs)
    print("| stage | jobs | wall s | CPU s |")
    print("|---|---|---|---|")
    for row in totals.itertuples():
        print(f"| {row.stage} | {row.jobs} | {row.wall_s:.0f} | {row.cpu_s:.0f} |")
    print(f"| all jobs | {len(jobs)} | {jobs['wall_s'].sum():.0f} | {jobs['cpu_s'].sum():.0f} |")
    print(f"\nspan, first job start to last job end: {run_span_s(args.benchmarks):.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
