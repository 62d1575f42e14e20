"""Snakemake executor ``slurm-chain``: the SLURM executor with a cap on the time between status polls.

snakemake-executor-plugin-slurm adds 10 s to its poll interval after every poll in which no job of the
run finished, up to 180 s (a constant), and resets it once one did. For an exploration that is a chain
of dependent jobs (build -> evaluate -> the agent -> the next build), one job at a time, each job's end
is noticed only at the next poll of that growing schedule: 20 s late for a 25 s job, ~90 s late on
average for a job of hours, and the chain waits the whole time. ``max-seconds-between-status-checks``
caps the interval, so every job is noticed at most that long after it ends. The price is one status
query (``squeue`` or ``sacct``, one call for all the run's jobs) per interval while jobs run.

Everything else is the SLURM executor's, with its settings under this executor's prefix
(``--slurm-chain-status-command`` for ``--slurm-status-command``, and so on); jobs run on the nodes
through ``slurm-jobstep`` as before. Used by profiles/slurm and profiles/slurm-ci.
"""

from dataclasses import dataclass, field

from snakemake_executor_plugin_slurm import Executor as SlurmExecutor
from snakemake_executor_plugin_slurm import ExecutorSettings as SlurmExecutorSettings
from snakemake_executor_plugin_slurm import common_settings  # noqa: F401 - Snakemake reads it from this module

__all__ = ["Executor", "ExecutorSettings", "common_settings"]


@dataclass
class ExecutorSettings(SlurmExecutorSettings):
    max_seconds_between_status_checks: int = field(
        default=180,
        metadata={
            "help": "Poll SLURM at least this often while jobs run (the SLURM executor's interval grows by 10 s "
            "after every poll that saw nothing finish, up to 180 s). A job's end is noticed at most this long "
            "after it happened.",
            "env_var": False,
            "required": False,
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.max_seconds_between_status_checks, int) or self.max_seconds_between_status_checks < 1:
            raise ValueError(f"max-seconds-between-status-checks must be a positive integer of seconds, "
                             f"not {self.max_seconds_between_status_checks!r}")


class Executor(SlurmExecutor):
    async def check_active_jobs(self, active_jobs):
        async for job in super().check_active_jobs(active_jobs):
            yield job
        # The parent has just set the next interval (grown or reset); keep it under the cap.
        cap = self.workflow.executor_settings.max_seconds_between_status_checks
        interval = self.next_seconds_between_status_checks
        if interval is not None and interval > cap:
            self.next_seconds_between_status_checks = cap
