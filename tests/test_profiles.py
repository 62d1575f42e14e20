"""One source of truth for job sizes: the config's `resources:`; the profiles hold cluster details only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lamdagent.config import DEFAULTS

REPO = Path(__file__).resolve().parent.parent
PROFILES = sorted(REPO.glob("profiles/*/config.yaml"))
# What the rules take from the config's resources (threads -> set-threads; cpus_per_task overrides
# both threads and cpus_per_gpu at sbatch), for every rule family the config sizes.
CONFIG_RESOURCES = {key for spec in DEFAULTS["resources"].values() for key in spec} - {"retries"} | {"cpus_per_task"}
SIZED_RULES = set(DEFAULTS["resources"]) | {"restore_model"}


def test_the_profiles_are_found():
    assert {p.parent.name for p in PROFILES} >= {"default", "slurm", "slurm-ci"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.parent.name)
def test_no_profile_sets_a_resource_the_config_sets(profile):
    settings = yaml.safe_load(profile.read_text()) or {}
    overrides = []
    for rule, resources in (settings.get("set-resources") or {}).items():
        overrides += [f"set-resources.{rule}.{key}" for key in resources or {} if key in CONFIG_RESOURCES]
    overrides += [f"set-threads.{rule}" for rule in settings.get("set-threads") or {} if rule in SIZED_RULES]
    overrides += [f"default-resources.{key}" for key in settings.get("default-resources") or {}
                  if key.split("=")[0] in CONFIG_RESOURCES]
    assert not overrides, f"{profile.relative_to(REPO)} sets what the config's `resources:` sets: {overrides}"


def test_the_slurm_profile_submits_the_config_job_sizes(tmp_path):
    """A dry run through profiles/slurm with the real-study example: the import job is the size the
    example's config asks for (32 GB, 60 min), not one a profile chose."""
    example = REPO / "config/examples/gemma2-gsm8k.yaml"
    wanted = yaml.safe_load(example.read_text())["resources"]["import_model"]
    command = [str(Path(sys.executable).with_name("snakemake")), "--snakefile", str(REPO / "Snakefile"),
               "--profile", str(REPO / "profiles/slurm"), "--workflow-profile", "none", "--directory", str(tmp_path),
               "--configfile", str(example), "-n", "results/models/gemma2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = re.search(r"^\s*resources: (.*)$", result.stdout, re.M)
    assert shown, result.stdout[-3000:]
    resources = dict(item.split("=", 1) for item in shown[1].split(", "))
    assert resources["mem_mb"] == str(wanted["mem_mb"]) and resources["runtime"] == str(wanted["runtime"]), resources
    assert resources["gpu"] == str(wanted["gpu"]), resources


# ---- the executor of the SLURM profiles: slurm-chain (profiles/executor-plugin) -------------------


@pytest.mark.parametrize("name", ["slurm", "slurm-ci"])
def test_the_slurm_profiles_use_slurm_chain_and_spell_its_settings(name):
    """Every executor setting of the profile is one slurm-chain has: a plain plugin's `slurm-...` key
    next to `executor: slurm-chain` would be a setting of an executor not in use."""
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    settings = yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
    assert settings["executor"] == "slurm-chain"
    plugin = ExecutorPluginRegistry().get_plugin("slurm-chain")
    known = {f"slurm-chain-{f.name.replace('_', '-')}" for f in plugin.settings_cls.__dataclass_fields__.values()}
    assert "slurm-chain-max-seconds-between-status-checks" in known
    keys = {key for key in settings if key.startswith("slurm-")}
    assert keys and keys <= known, keys - known
    assert settings["slurm-chain-max-seconds-between-status-checks"] >= 1


def test_slurm_chain_caps_the_poll_interval_the_slurm_plugin_grows(monkeypatch):
    """The SLURM plugin adds 10 s to its interval after each poll that saw no job finish; slurm-chain
    keeps it at most max-seconds-between-status-checks, and leaves a shorter one alone."""
    import asyncio
    from types import SimpleNamespace

    import snakemake_executor_plugin_slurm as slurm
    from snakemake_executor_plugin_slurm_chain import Executor, ExecutorSettings

    async def parent_check(self, active_jobs):  # the parent's bookkeeping: nothing finished, interval grown
        self.next_seconds_between_status_checks = self.grown_to
        for job in active_jobs:
            yield job

    monkeypatch.setattr(slurm.Executor, "check_active_jobs", parent_check)
    executor = Executor.__new__(Executor)  # no workflow, no wait thread: only the poll bookkeeping
    executor.workflow = SimpleNamespace(executor_settings=SimpleNamespace(max_seconds_between_status_checks=5))

    async def poll(grown_to):
        executor.grown_to = grown_to
        return [job async for job in executor.check_active_jobs(["job-1", "job-2"])]

    assert asyncio.run(poll(25)) == ["job-1", "job-2"]  # the running jobs stay active
    assert executor.next_seconds_between_status_checks == 5
    asyncio.run(poll(3))
    assert executor.next_seconds_between_status_checks == 3
    with pytest.raises(ValueError, match="max-seconds-between-status-checks must be a positive integer"):
        ExecutorSettings(max_seconds_between_status_checks=0)
